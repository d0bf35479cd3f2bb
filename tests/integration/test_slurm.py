"""Agents as Slurm pilot jobs, against a real single-node Slurm started on this machine.

``slurm_cluster`` starts munged, slurmctld and slurmd (see its module); the coordinator is a
real ``taskfarm serve`` process (``conftest.Cluster``), the pilots real sbatch jobs whose
``srun`` starts real ``taskfarm slurm agent`` processes.  The tests skip only when Slurm
cannot run here at all (not installed: ``.ci/run`` installs it; not root).

The allocation-end test needs no Slurm: a pilot agent outside any job is given a fake
``$SLURM_JOB_ID`` and ``$SLURM_JOB_END_TIME`` a few seconds ahead, and prepares for that end
for real.
"""

from __future__ import annotations

import re
import subprocess
import sys
from collections.abc import Awaitable, Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING

import anyio
import pytest
from slurm_cluster import SlurmCluster, slurm_unavailable, start_slurm_cluster

from actors.engine import (
    NodeHealthChanged,
    TaskAssigned,
    TaskCheckpointed,
    TaskCompleted,
    TaskFailed,
    TaskPreempted,
    TaskRequeued,
    job_stream,
    node_stream,
)

if TYPE_CHECKING:
    from conftest import Cluster

HOST = "127.0.0.1"
_SUBMITTED = re.compile(r"submitted (\d+) pilot jobs?: ([\d ]+) \(")


@pytest.fixture(scope="module")
def slurm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SlurmCluster]:
    """A single-node Slurm cluster for this module (skips if Slurm cannot run here)."""
    reason = slurm_unavailable()
    if reason is not None:
        pytest.skip(reason)
    with start_slurm_cluster(tmp_path_factory.mktemp("slurm")) as running:
        yield running


async def _taskfarm(
    cluster: Cluster, slurm: SlurmCluster, *args: str
) -> subprocess.CompletedProcess[bytes]:
    """Run ``taskfarm ARGS`` with Slurm's commands pointed at ``slurm`` (and the markers of
    both harnesses in its environment, which sbatch passes on to the pilots)."""
    return await anyio.run_process(
        cluster.command(*args), env=slurm.env(cluster.env("slurm")), check=False
    )


async def _submit_pilots(
    cluster: Cluster, slurm: SlurmCluster, pilots: Path, count: int
) -> list[str]:
    result = await _taskfarm(
        cluster,
        slurm,
        "slurm",
        "submit-agents",
        "--count",
        str(count),
        "--partition",
        slurm.partition,
        "--time",
        "00:10:00",
        "--cores",
        "2",
        "--connect",
        f"{HOST}:{cluster.port}",
        "--token-file",
        str(cluster.token_file),
        "--pilot-dir",
        str(pilots),
        "--terminate-grace",
        "1",
        "--drain-margin",
        "30s",
        "--checkpoint-warning",
        "1m",
    )
    output = result.stdout.decode()
    assert result.returncode == 0, result.stderr.decode()
    match = _SUBMITTED.search(output)
    assert match, output
    jobs = match.group(2).split()
    assert len(jobs) == count == int(match.group(1))
    assert re.search(rf"wrote {re.escape(str(pilots))}/pilot-{slurm.partition}-\S+\.sbatch", output)
    return jobs


WORKFLOW = """
[[jobs]]
name = "workflow"
frames = "1-6"
command = ["sh", "-c", "sleep 4 && echo {{frame}} > {out}/{{frame}}.done"]
resources = {{ cores = 1, memory = "64MiB" }}
"""


@pytest.mark.slow
async def test_pilots_run_a_workflow_and_a_cancelled_pilots_work_completes_on_the_other(
    cluster: Cluster, slurm: SlurmCluster, tmp_path: Path
) -> None:
    """Two pilot jobs start an agent each; ``slurm status`` pairs them; scancelling one pilot
    mid-run requeues its tasks as lost (never failed) and every task completes on the other."""
    cluster.start_coordinator(heartbeat_timeout=3.0)
    first, second = await _submit_pilots(cluster, slurm, tmp_path / "pilots", count=2)
    agents = {job: f"pilot-{job}-{slurm.node}" for job in (first, second)}
    nodes = await cluster.wait_online(*agents.values(), limit=90)
    for job, name in agents.items():
        assert f"slurm-job={job}" in nodes[name].labels
        assert nodes[name].capacity.cores == 2  # what Slurm allocated, not the host's CPUs

    status = await _taskfarm(cluster, slurm, "slurm", "status", *cluster.client_args())
    assert status.returncode == 0, status.stderr.decode()
    rows = {line.split()[0]: line for line in status.stdout.decode().splitlines()[1:]}
    for job, name in agents.items():
        assert "RUNNING" in rows[job]
        assert f"{name} (online" in rows[job]
    # Without the coordinator, the pilots are still shown (and the status says what failed).
    blind = await _taskfarm(
        cluster,
        slurm,
        "slurm",
        "status",
        "--connect",
        f"{HOST}:1",
        "--token-file",
        str(cluster.token_file),
    )
    assert blind.returncode == 1
    assert blind.stderr.decode().startswith("taskfarm: error: the coordinator's agents are")
    assert {first, second} <= {line.split()[0] for line in blind.stdout.decode().splitlines()}

    out = tmp_path / "out"
    await anyio.Path(out).mkdir()
    (job_id,) = await cluster.submit(WORKFLOW.format(out=out))

    async def both_busy() -> bool:
        nodes = await cluster.nodes()
        return all(nodes[name].running >= 1 for name in agents.values())

    await cluster.wait_until(both_busy, what="both pilots running tasks", limit=60)
    cancel = await _taskfarm(cluster, slurm, "slurm", "cancel", first)
    assert cancel.returncode == 0, cancel.stderr.decode()
    assert f"cancelled pilot job {first}" in cancel.stdout.decode()

    (summary,) = (await cluster.wait_finished(job_id, limit=120)).values()
    assert summary.status == "completed", cluster.diagnostics()
    done = sorted([path.name async for path in anyio.Path(out).iterdir()])
    assert done == [f"{n}.done" for n in range(1, 7)]

    events = [r.event for r in await cluster.journal_events() if r.stream_id == job_stream(job_id)]
    assert not [e for e in events if isinstance(e, TaskFailed)]
    requeued = [e for e in events if isinstance(e, TaskRequeued)]
    assert requeued, "the cancelled pilot ran tasks that had to be requeued"
    assert all(e.lost or e.reason == "preempted" for e in requeued)
    # Each requeued task completed, and on the pilot that was not cancelled.
    last_node: dict[int, str] = {}
    for event in events:
        if isinstance(event, TaskAssigned):
            last_node[event.task] = event.node
    completed = {e.task for e in events if isinstance(e, TaskCompleted)}
    assert completed == set(range(6))
    for event in requeued:
        assert last_node[event.task] == agents[second]

    assert first not in slurm.jobs()  # the cancelled pilot has ended
    assert slurm.jobs().get(second) == "RUNNING"

    unknown = await _taskfarm(cluster, slurm, "slurm", "cancel", first)
    assert unknown.returncode == 2
    assert f"no pending or running pilot job {first}" in unknown.stderr.decode()
    everything = await _taskfarm(cluster, slurm, "slurm", "cancel", "--all")
    assert everything.returncode == 0, everything.stderr.decode()
    assert f"cancelled pilot job {second}:" in everything.stdout.decode()
    await cluster.wait_until(
        _no_pilots(slurm), what="every pilot job to end after cancel --all", limit=60
    )


CHECKPOINTING = r"""
import os, signal, sys, time
resume = os.environ.get("TASKFARM_RESUME_FROM")
step = int(open(resume).read()) if resume else 0
log = open(sys.argv[1], "a")
def checkpoint(signum, frame):
    path = os.path.join(os.environ["TASKFARM_CHECKPOINT_DIR"], f"step-{step}")
    with open(path, "w") as file:
        file.write(str(step))
    log.write(f"{time.time()} {os.environ['TASKFARM_ATTEMPT']} usr1 {step}\n")
    log.flush()
    print(f"@taskfarm checkpoint {path}", flush=True)
signal.signal(signal.SIGUSR1, checkpoint)
log.write(f"{time.time()} {os.environ['TASKFARM_ATTEMPT']} start {step}\n")
log.flush()
while step < 60:
    time.sleep(0.25)
    step += 1
"""


def _start_fake_pilot(
    cluster: Cluster, tmp_path: Path, end: datetime, log: Path
) -> subprocess.Popen[bytes]:
    """Start ``taskfarm slurm agent`` outside Slurm, in the environment of job 4242 on node
    fake-node, whose allocation ends at ``end``."""
    with log.open("wb") as output:
        return subprocess.Popen(
            cluster.command(
                "--log-format",
                "json",
                "--log-level",
                "info",
                "slurm",
                "agent",
                *cluster.client_args(),
                "--pilot-dir",
                str(tmp_path / "pilots"),
                "--checkpoint-warning",
                "16s",
                "--drain-margin",
                "12s",
                "--terminate-grace",
                "1",
            ),
            stdout=output,
            stderr=output,
            env={
                **cluster.env("pilot"),
                "SLURM_JOB_ID": "4242",
                "SLURMD_NODENAME": "fake-node",
                "SLURM_CPUS_ON_NODE": "1",
                "SLURM_JOB_END_TIME": str(int(end.timestamp())),
            },
            start_new_session=True,
        )


def _no_pilots(slurm: SlurmCluster) -> Callable[[], Awaitable[bool]]:
    async def probe() -> bool:
        return not await anyio.to_thread.run_sync(slurm.jobs)

    return probe


def _exited(process: subprocess.Popen[bytes]) -> Callable[[], Awaitable[bool]]:
    async def probe() -> bool:
        return process.poll() is not None

    return probe


@pytest.mark.slow
async def test_a_pilot_agent_warns_drains_and_leaves_before_its_allocation_ends(
    cluster: Cluster, tmp_path: Path
) -> None:
    """With ``$SLURM_JOB_END_TIME`` a few seconds ahead, the pilot agent SIGUSR1s its
    checkpointable attempt ``--checkpoint-warning`` before the end, has its node drained
    ``--drain-margin`` before it (the attempt checkpoints and is requeued, not failed), then
    exits by itself before the end; the task resumes elsewhere from the checkpoint."""
    cluster.start_coordinator(heartbeat_timeout=3.0)
    program = tmp_path / "work.py"
    await anyio.Path(program).write_text(CHECKPOINTING)
    trace = tmp_path / "trace.txt"
    end = datetime.now(UTC).replace(microsecond=0) + timedelta(seconds=26)
    warn_at, drain_at = end - timedelta(seconds=16), end - timedelta(seconds=12)
    log = tmp_path / "pilot-agent.log"
    pilot = _start_fake_pilot(cluster, tmp_path, end, log)
    try:
        name = "pilot-4242-fake-node"
        await cluster.wait_online(name)
        (job_id,) = await cluster.submit(
            "[[jobs]]\n"
            'name = "long"\n'
            "checkpointable = true\n"
            f'command = ["{sys.executable}", "{program}", "{trace}"]\n'
            'resources = { cores = 1, memory = "64MiB" }\n'
        )

        async def started() -> bool:
            path = anyio.Path(trace)
            return await path.exists() and " start " in await path.read_text()

        await cluster.wait_until(started, what="the attempt started on the pilot")
        cluster.start_agent("steady")  # where the task goes once the pilot drains
        await cluster.wait_until(
            _exited(pilot), what="the pilot agent to leave by itself", limit=60
        )
        left_at = datetime.now(UTC)
        assert pilot.returncode == 0, (await anyio.Path(log).read_text())[-3000:]
        assert left_at < end, "the agent left before its allocation ended"
        (summary,) = (await cluster.wait_finished(job_id, limit=60)).values()
        assert summary.status == "completed", cluster.diagnostics()
    finally:
        if pilot.poll() is None:
            pilot.kill()
        pilot.wait(timeout=30)

    lines = [line.split() for line in (await anyio.Path(trace).read_text()).splitlines()]
    warned = [float(at) for at, attempt, what, _ in lines if attempt == "1" and what == "usr1"]
    assert warned, "the attempt on the pilot was asked to checkpoint"
    # The warning came from the agent, before the drain (not only the drain's preemption).
    assert warn_at.timestamp() - 1 <= warned[0] < drain_at.timestamp()
    resumed = [int(step) for at, attempt, what, step in lines if attempt == "2" and what == "start"]
    assert resumed, "the task ran again"
    assert resumed[0] > 0, "the second attempt resumed from a checkpoint"

    records = await cluster.journal_events()
    planned = [
        r.event
        for r in records
        if r.stream_id == node_stream(name) and isinstance(r.event, NodeHealthChanged)
    ]
    assert planned[0].drain_at == drain_at
    assert planned[-1].health == "draining"
    events = [r.event for r in records if r.stream_id == job_stream(job_id)]
    assert not [e for e in events if isinstance(e, TaskFailed)]
    assert [e.node for e in events if isinstance(e, TaskPreempted)] == [name]
    assert [e for e in events if isinstance(e, TaskCheckpointed)]
    assigned = [e.node for e in events if isinstance(e, TaskAssigned)]
    assert assigned == [name, "steady"]
