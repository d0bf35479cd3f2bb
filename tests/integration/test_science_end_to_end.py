"""The scientific domain end to end: a three-stage heat simulation whose middle stage spans two
nodes, on three real agents with a shared checkpoint folder, under ``taskfarm serve --policy
science``.  The agent running the middle stage is SIGKILLed; the stage resumes on the others
from its last checkpoint in the shared folder, the result is bit-identical to an uninterrupted
run, and ``taskfarm science nodes`` counts the lost node against its reliability."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import anyio
import pytest

from actors import JobSummary, TaskAssigned, TaskRequeued

if TYPE_CHECKING:
    from conftest import Cluster

PYTHON = sys.executable.replace("\\", "/")
STEPS = {"spinup": 600, "main": 6000, "analysis": 200}
SIZE = 40


def heat(stage: str, out: Path, checkpoints: Path) -> list[str]:
    """The command of one stage (reading the previous stage's grid)."""
    previous = {"main": "spinup", "analysis": "main"}.get(stage)
    command = [
        PYTHON,
        "-m",
        "domains.scientific.heat_simulation",
        "--stage",
        stage,
        "--steps",
        str(STEPS[stage]),
        "--size",
        str(SIZE),
        "--checkpoint-every",
        "100",
        "--checkpoint-dir",
        (checkpoints / stage).as_posix(),
        "--output",
        out.as_posix(),
    ]
    if previous is not None:
        command += ["--input", (out / f"{previous}.json").as_posix()]
    return command


def spec(out: Path, checkpoints: Path) -> str:
    """The simulation as a spec file: stages with walltimes, the middle one on two nodes."""
    tasks = []
    for stage, after, nodes in (
        ("spinup", None, 1),
        ("main", "spinup", 2),
        ("analysis", "main", 1),
    ):
        argv = ", ".join(json.dumps(a) for a in heat(stage, out, checkpoints))
        lines = [f'[[jobs.tasks]]\nname = "{stage}"\ncommand = [{argv}]\nmax_runtime = "10m"']
        if after:
            lines.append(f'depends_on = ["{after}"]')
        if nodes > 1:
            lines.append(f"nodes = {nodes}")
        tasks.append("\n".join(lines))
    return f"""
[[jobs]]
name = "heat"
checkpointable = true
preemptible = true
launch = "leader"
resources = {{ cores = 1, memory = "64MiB" }}
metadata = {{ owner = "ana", project = "climate", resilience = "high" }}
{chr(10).join(tasks)}
"""


def grid(path: Path) -> object:
    return json.loads(path.read_text())["grid"]


@pytest.mark.slow
async def test_a_simulation_resumes_its_two_node_stage_elsewhere_after_a_sigkill(
    cluster: Cluster,
) -> None:
    """SIGKILL the agent that runs the two-node stage mid-run: the stage is requeued, placed
    on the two other agents, resumes from the last checkpoint in the shared folder, and every
    stage's result equals an uninterrupted run's."""
    shared = cluster.root / "shared-checkpoints"
    out = cluster.root / "out"
    config = cluster.root / "cluster.toml"
    config.write_text("[projects.climate]\nweight = 2\n")
    cluster.start_coordinator(
        "--policy", "science", "--policy-config", str(config), heartbeat_timeout=2.0
    )
    for name in ("a1", "a2", "a3"):
        cluster.start_agent(name)
    await cluster.wait_online("a1", "a2", "a3")
    await cluster.submit(spec(out, shared))

    def main_checkpointed(job: JobSummary) -> bool:
        tasks = job.tasks
        return len(tasks) == 3 and tasks[1].checkpoint is not None and tasks[1].progress >= 0.1

    before = await cluster.wait_job("heat", main_checkpointed, what="stage 2 checkpointed")
    leader = before.tasks[1].node
    assert leader is not None
    cluster.kill_agent(leader)
    (done,) = (await cluster.wait_finished("heat", limit=120.0)).values()
    assert done.status == "completed", done

    records = await cluster.journal_events()
    stream = [r.event for r in records if r.stream_id == "job:heat"]
    requeued = [e for e in stream if isinstance(e, TaskRequeued) and e.task == 1]
    assert len(requeued) == 1
    assert requeued[0].lost
    attempts = [e for e in stream if isinstance(e, TaskAssigned) and e.task == 1]
    assert len(attempts) == 2
    assert len(attempts[0].nodes) == 2
    assert leader in attempts[0].nodes
    assert set(attempts[1].nodes) == {"a1", "a2", "a3"} - {leader}
    assert attempts[1].resume_from is not None
    assert attempts[1].resume_from.startswith(shared.as_posix())
    # The science policy counted the lost node against its reliability.
    result = await cluster.cli("science", "nodes", "--json")
    assert result.returncode == 0, result.stderr.decode()
    reliability = {n["node"]: n for n in json.loads(result.stdout)}
    assert reliability[leader]["recent_failures"] > 0
    assert reliability[leader]["reliability"] < 1
    assert all(reliability[n]["reliability"] == 1 for n in reliability if n != leader)

    # The same stages, uninterrupted, in one process after the other.
    alone = cluster.root / "alone"
    for stage in ("spinup", "main", "analysis"):
        await anyio.run_process(heat(stage, alone, cluster.root / "alone-checkpoints"))
    for stage in ("spinup", "main", "analysis"):
        assert grid(out / f"{stage}.json") == grid(alone / f"{stage}.json"), stage
