"""The render farm's part of ``taskfarm demo``: a coordinator running the render-farm policy,
real agent processes, two client studios' shots with deadlines, previews first.

It writes ``farm.toml`` (two clients, a one-minute margin so a demo-sized deadline means
something), submits a comfortable shot for one client and a tight one for the other, shows
each job's frames, verdict and effective priority as they render (preview passes of every 4th
frame first), and ends with the verdicts, the previews and how to audit it.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import anyio

from actors import CoordinatorConfig, EngineSettings, Resources, open_coordinator
from actors.cli import ensure_token_file

from ._audit import AuditProjection
from ._config import load_farm_config
from ._models import PreviewSettings, RenderJob
from ._policy import RenderFarmPolicy

__all__ = ["DEMO_FARM", "RenderDemo", "run_render_demo"]

DEMO_FARM = """# The demo's render farm: two client studios sharing the farm.
margin = "1m"
reclaim_after = "30s"
frame_estimate = "2s"

[[clients]]
id = "studio-a"
name = "Studio A"
tier = "premium"
guaranteed = 60
maximum = 100

[[clients]]
id = "studio-b"
name = "Studio B"
tier = "standard"
guaranteed = 40
maximum = 100

[energy]
mode = "performance"

[previews]
stride = 4
passes = [0.25]
"""
_FINISHED = ("completed", "failed", "cancelled")


@dataclass
class RenderDemo:
    """What the render demo did (for the demo's summary)."""

    journal: Path
    output: Path
    jobs: list[str]
    statuses: dict[str, str]
    verdicts: dict[str, str]
    previews: dict[str, list[str]]
    first_preview_s: dict[str, float]
    seconds: float


def _jobs(root: Path, *, frames: int, run: int, now: Any) -> list[RenderJob]:
    python = sys.executable
    out = root / "output" / f"render-{run}"
    renderer = [python, "-m", "domains.render_farm.tiny_renderer"]
    one_core = Resources.of(cores=1, memory="256MiB")

    def job(name: str, client: str, scene: str, deadline_s: float, priority: str) -> RenderJob:
        out_dir = str(out / name)
        frames_of = [*renderer, "--scene", scene, "--frames", "{start}-{end}"]
        passes = [*frames_of, "--step", "{stride}", "--quality", "{quality}"]
        return RenderJob(
            name=f"{name}-{run}",
            client=client,
            command=[*frames_of, "--output", out_dir],
            frames=(1, frames),
            chunk=3,
            deadline=now + timedelta(seconds=deadline_s),
            frame_estimate=2.0,
            priority=priority,
            resources=one_core,
            preview=PreviewSettings(command=[*passes, "--output", out_dir]),
        )

    return [
        job("shot010", "studio-a", "orbit", 600.0, "medium"),
        job("shot020", "studio-b", "bounce", 45.0, "low"),
    ]


async def run_render_demo(
    root: Path, *, frames: int, agents: int, run: int, show: Any = print
) -> RenderDemo:
    """Run the render farm part of the demo in ``root``; ``show`` prints a line."""
    farm_toml = root / "farm.toml"
    if not farm_toml.exists():
        farm_toml.write_text(DEMO_FARM, encoding="utf-8")
    policy = RenderFarmPolicy(load_farm_config(farm_toml), config_path=farm_toml)
    token_file, token = ensure_token_file(root / "taskfarm.token")
    config = CoordinatorConfig(
        journal=root / "render-farm.db",
        token=token,
        port=0,
        work_dir=root / "render-work",
        local_agents=agents,
        token_file=token_file,
        heartbeat_interval=0.5,
        heartbeat_timeout=5.0,
        settings=EngineSettings(restart_grace=5.0),
    )
    started = time.monotonic()
    async with open_coordinator(config, policy=policy) as coordinator:
        engine = coordinator.engine
        show(
            f"render farm: coordinator with the render-farm policy ({farm_toml.name}), "
            f"journal {config.journal}"
        )
        with anyio.fail_after(60):
            # Polls the scheduler's view: agents are separate processes that connect when ready.
            while sum(n.health == "online" for n in await engine.nodes()) < agents:  # noqa: ASYNC110
                await anyio.sleep(0.1)
        jobs = _jobs(root, frames=frames, run=run, now=coordinator.clock.now())
        ids = await engine.submit([job.to_spec(source="demo farm") for job in jobs])
        now = coordinator.clock.now()
        for job in jobs:
            left = (job.deadline - now).total_seconds() if job.deadline else 0.0
            show(
                f"  submitted {job.name} for {job.client}, deadline in {left:.0f} s, previews first"
            )
        verdicts: dict[str, str] = {}
        statuses: dict[str, str] = {}
        seen: dict[str, str] = {}
        with anyio.fail_after(300):
            while True:
                rows = await engine.policy_command("status")
                for row in rows:
                    verdicts[row["job"]] = f"{row['verdict']} (priority {row['priority']})"
                    line = (
                        f"  {row['job']:<14} {row['client']:<9} [{row['strip']}] "
                        f"{row['frames_done']}/{row['frames_total']} {row['verdict']}, "
                        f"priority {row['priority']}"
                    )
                    if seen.get(row["job"]) != line:
                        seen[row["job"]] = line
                        show(line)
                summaries = [(await engine.status(job_id))[0] for job_id in ids]
                statuses = {s.job_id: s.status for s in summaries}
                if all(status in _FINISHED for status in statuses.values()):
                    break
                await anyio.sleep(0.3)
        previews: dict[str, list[str]] = {}
        for job_id in ids:
            listed = await engine.policy_command("previews", {"job": job_id})
            previews[job_id] = [p["path"] for p in listed]
        # The journal says how each ended, and when its first preview came.
        projection = AuditProjection(keep_entries=False)
        async for batch in engine.journal.read_all():
            projection.feed(batch)
        projection.metrics()
        first: dict[str, float] = {}
        for job_id in ids:
            figures = projection.job_figures(job_id) or {}
            if figures.get("first_preview_s") is not None:
                first[job_id] = float(figures["first_preview_s"])
    return RenderDemo(
        journal=config.journal,
        output=root / "output" / f"render-{run}",
        jobs=ids,
        statuses=statuses,
        verdicts=verdicts,
        previews=previews,
        first_preview_s=first,
        seconds=time.monotonic() - started,
    )
