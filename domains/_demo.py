"""``taskfarm demo``: a coordinator, two real agent processes and a small real workload.

It runs a simulation of three stages that checkpoint, with dependencies between the stages,
under the scientific domain's policy (fair share, checkpoint intervals, recovery strategies),
then a render farm: a coordinator running the render-farm policy renders two client studios'
shots with the tiny ray tracer, with deadlines and previews first
(:mod:`domains.render_farm._demo`).  It shows live progress, and prints where the frames, the
charts and the journals are, and how to replay and audit them.  Everything lives in
``./taskfarm-demo``; running it again adds a new run to the same journals.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import anyio

from actors import CoordinatorConfig, EngineSettings, JobSummary, open_coordinator, parse_spec
from actors.cli import ensure_token_file
from domains.scientific import SCIENCE_CODEC, science_policy
from runtime import ConfigurationError, tune_gc_for_many_objects

__all__ = ["configure", "demo_spec"]

_FINISHED = ("completed", "failed", "cancelled")


def configure(parser: argparse.ArgumentParser) -> None:
    """Add ``demo``'s arguments."""
    parser.add_argument("--dir", default="taskfarm-demo", help="where everything goes")
    parser.add_argument("--frames", type=int, default=12, help="frames to render (default 12)")
    parser.add_argument("--agents", type=int, default=2, help="local agent processes (default 2)")
    parser.set_defaults(handler=_demo)


def demo_spec(root: Path, *, frames: int, run: int) -> str:
    """Return the demo's job spec (TOML) writing under ``root``."""
    python = sys.executable.replace("\\", "/")
    out = (root / "output").as_posix()
    return f"""
# A simulation: one job of three stages, scheduled by the science policy (its owner and
# project count for fair share); each stage resumes from its checkpoint if its node is lost.
[[jobs]]
name = "heat-{run}"
priority = "medium"
checkpointable = true
preemptible = true
resources = {{ cores = 1, memory = "256MiB" }}
metadata = {{ owner = "demo", project = "heat", resilience = "high" }}

[[jobs.tasks]]
name = "spinup"
command = ["{python}", "-m", "domains.scientific.heat_simulation", "--stage", "spinup",
           "--steps", "2000", "--output", "{out}/run-{run}/simulation"]
max_runtime = "10m"

[[jobs.tasks]]
name = "main"
command = ["{python}", "-m", "domains.scientific.heat_simulation", "--stage", "main",
           "--steps", "6000", "--input", "{out}/run-{run}/simulation/spinup.json",
           "--output", "{out}/run-{run}/simulation"]
max_runtime = "20m"
depends_on = ["spinup"]

[[jobs.tasks]]
name = "analysis"
command = ["{python}", "-m", "domains.scientific.heat_simulation", "--stage", "analysis",
           "--steps", "200", "--input", "{out}/run-{run}/simulation/main.json",
           "--output", "{out}/run-{run}/simulation"]
max_runtime = "10m"
depends_on = ["main"]
"""


def _prepare(folder: str) -> Path:
    root = Path(os.path.abspath(folder))
    if root.exists() and not root.is_dir():
        raise ConfigurationError(f"{folder} is not a directory", where="--dir")
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise ConfigurationError(
            f"cannot create {folder}: {error.strerror or error}", where="--dir"
        ) from None
    return root


async def _demo(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    tune_gc_for_many_objects()
    if not 1 <= args.frames <= 480:
        raise ConfigurationError("must be 1-480", where="--frames")
    if not 1 <= args.agents <= 16:
        raise ConfigurationError("must be 1-16", where="--agents")
    console = Console()
    root = _prepare(args.dir)
    token_file, token = ensure_token_file(root / "taskfarm.token")
    config = CoordinatorConfig(
        journal=root / "taskfarm.db",
        token=token,
        port=0,
        work_dir=root / "work",
        local_agents=args.agents,
        token_file=token_file,
        heartbeat_interval=0.5,
        heartbeat_timeout=5.0,
        settings=EngineSettings(restart_grace=5.0),
        events=(SCIENCE_CODEC,),  # the science policy's journaled decisions
    )
    started = time.monotonic()
    async with open_coordinator(config, policy=science_policy(None)) as coordinator:
        engine = coordinator.engine
        console.print(
            f"[bold]taskfarm demo[/bold]: coordinator on 127.0.0.1:{coordinator.port}, "
            f"journal {config.journal}, policy {engine.policy.name}"
        )
        with anyio.fail_after(60):
            # Polls the scheduler's view: agents are separate processes that connect when ready.
            while sum(n.health == "online" for n in await engine.nodes()) < args.agents:  # noqa: ASYNC110
                await anyio.sleep(0.1)
        console.print(f"{args.agents} agent processes connected")
        run = len(await engine.status()) + 1
        text = demo_spec(root, frames=args.frames, run=run)
        spec_file = parse_spec(text, fmt="toml", source="demo.toml")
        ids = await engine.submit(spec_file.to_commands().jobs, source="demo.toml")
        columns = (
            TextColumn("{task.description:<24}"),
            BarColumn(),
            TextColumn("{task.percentage:>5.1f}%"),
            TextColumn("{task.fields[status]:<10}"),
            TimeElapsedColumn(),
        )
        summaries: list[JobSummary] = []
        with Progress(*columns, console=console, refresh_per_second=8) as progress:
            bars = {job_id: progress.add_task(job_id, total=100, status="queued") for job_id in ids}
            with anyio.fail_after(300):
                while True:
                    summaries = [(await engine.status(job_id))[0] for job_id in ids]
                    for summary in summaries:
                        progress.update(
                            bars[summary.job_id],
                            completed=summary.progress * 100,
                            status=summary.status,
                        )
                    if all(s.status in _FINISHED for s in summaries):
                        break
                    await anyio.sleep(0.2)
    from domains.render_farm._demo import run_render_demo

    console.print("")
    render = await run_render_demo(
        root, frames=args.frames, agents=args.agents, run=run, show=console.print
    )
    elapsed = time.monotonic() - started
    failed = [s for s in summaries if s.status != "completed"]
    out = root / "output" / f"run-{run}"
    done = len(summaries) - len(failed)
    console.print(f"\nfinished in {elapsed:.1f} s: {done} of {len(summaries)} jobs completed")
    for summary in failed:
        console.print(f"[red]{summary.job_id}: {summary.status}[/red] {summary.reason or ''}")
    rendered = [job for job, status in render.statuses.items() if status == "completed"]
    console.print(f"render farm: {len(rendered)} of {len(render.jobs)} shots completed")
    for job in render.jobs:
        first = render.first_preview_s.get(job)
        console.print(
            f"  {job}: {render.statuses.get(job)}, deadline {render.verdicts.get(job, '-')}; "
            f"{len(render.previews.get(job, []))} previews"
            + (f", the first {first:.1f} s after submission" if first is not None else "")
        )
    console.print(f"frames:      {render.output} (previews in */previews/)")
    console.print(f"simulation:  {out / 'simulation'} (spinup/main/analysis .json and .png)")
    console.print(f"journals:    {config.journal}, {render.journal}")
    console.print(f"inspect it:  taskfarm journal inspect {config.journal}")
    console.print(f"replay it:   taskfarm replay {config.journal} --stream job:{ids[0]}")
    console.print(f"audit it:    taskfarm audit --journal {render.journal} --job {render.jobs[1]}")
    return 1 if failed or len(rendered) != len(render.jobs) else 0
