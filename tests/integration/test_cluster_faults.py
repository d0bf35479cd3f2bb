"""Faults on a real cluster on loopback: a coordinator and agents SIGKILLed mid-run, agents that
come back under the same name, and the client commands against the live coordinator.

Each test runs ``taskfarm serve`` and ``taskfarm agent`` as separate processes with a real
SQLite journal; the checkpointing workload is the heat simulation of the scientific domain.
"""

from __future__ import annotations

import json
import sys
from collections import Counter
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

import anyio
import msgspec
import pytest

from actors import (
    JobSubmitted,
    JobSummary,
    NodeRegistered,
    TaskAssigned,
    TaskCompleted,
    TaskFailed,
    TaskRequeued,
)
from actors.cluster import LogsRequest, TextReply
from persistence import RecordedEvent

if TYPE_CHECKING:
    from conftest import Cluster

FINISHED = ("completed", "failed", "cancelled")

PYTHON = sys.executable
HEAT_STEPS = 6000
HEAT_SIZE = 40

E = TypeVar("E")

# A task that runs until the test creates a file (the child polls; the test never sleeps).
WAIT_FOR_FILE = """\
import pathlib, sys, time
print("waiting for", sys.argv[1], flush=True)
while not pathlib.Path(sys.argv[1]).exists():
    time.sleep(0.05)
"""


def events_of(records: list[RecordedEvent], job_id: str, kind: type[E]) -> list[E]:
    """Return the events of one type in a job's stream, in journal order."""
    return [
        r.event for r in records if r.stream_id == f"job:{job_id}" and isinstance(r.event, kind)
    ]


def heat_job(name: str, stages: tuple[str, ...], output: Path, *, steps: int = HEAT_STEPS) -> str:
    """Return a TOML job running one checkpointing heat-simulation stage per task."""
    tasks = "".join(f'\n[[jobs.tasks]]\nname = "{stage}"\n' for stage in stages)
    return f"""
[[jobs]]
name = "{name}"
checkpointable = true
command = ["{PYTHON}", "-m", "domains.scientific.heat_simulation", "--stage", "{{task}}",
           "--steps", "{steps}", "--size", "{HEAT_SIZE}", "--checkpoint-every", "100",
           "--output", "{output.as_posix()}"]
resources = {{ cores = 1, memory = "64MiB" }}
{tasks}"""


def print_job(name: str, tasks: int, *, depends_on: str | None = None) -> str:
    """Return a TOML job of ``tasks`` quick tasks that each print a recognisable line."""
    names = "".join(f'\n[[jobs.tasks]]\nname = "t{i}"\n' for i in range(tasks))
    after = f'depends_on = ["{depends_on}"]' if depends_on else ""
    return f"""
[[jobs]]
name = "{name}"
command = ["{PYTHON}", "-c", "import sys; print('hello from', sys.argv[1])", "{name}/{{task}}"]
resources = {{ cores = 1, memory = "16MiB" }}
{after}
{names}"""


def gate_job(name: str, release: Path) -> str:
    """Return a TOML job of one task that runs until the file ``release`` exists."""
    waiter = release.with_name("wait_for_file.py")
    waiter.write_text(WAIT_FOR_FILE)
    return f"""
[[jobs]]
name = "{name}"
command = ["{PYTHON}", "{waiter.as_posix()}", "{release.as_posix()}"]
resources = {{ cores = 1, memory = "16MiB" }}
"""


def all_checkpointed(fraction: float) -> Callable[[JobSummary], bool]:
    """Return a job predicate: every task runs, has checkpointed and is ``fraction`` done."""

    def check(job: JobSummary) -> bool:
        return bool(job.tasks) and all(
            t.status == "running" and t.checkpoint is not None and t.progress >= fraction
            for t in job.tasks
        )

    return check


def assert_each_task_completed_once(records: list[RecordedEvent], summary: JobSummary) -> None:
    """Every task of the job has exactly one TaskCompleted, for its last assignment."""
    job_id = summary.job_id
    completed = events_of(records, job_id, TaskCompleted)
    counts = Counter(event.task for event in completed)
    assert counts == dict.fromkeys(range(summary.tasks_total), 1), f"{job_id}: {counts}"
    for event in completed:
        assigned = [a for a in events_of(records, job_id, TaskAssigned) if a.task == event.task]
        assert event.token == assigned[-1].token, f"{job_id} task {event.task}: stale completion"


def grid_of(path: Path) -> list[list[float]]:
    document = json.loads(path.read_text())
    assert document["steps"] == HEAT_STEPS
    grid: list[list[float]] = document["grid"]
    return grid


@pytest.mark.slow
async def test_coordinator_sigkill_and_restart(cluster: Cluster) -> None:
    """After a coordinator SIGKILL and restart every job completes once, resuming checkpoints."""
    cluster.start_coordinator(heartbeat_timeout=2.0, restart_grace=4.0)
    for name in ("a1", "a2", "a3"):
        cluster.start_agent(name)
    await cluster.wait_online("a1", "a2", "a3")
    output = cluster.root / "out"
    stages = ("s0", "s1", "s2")
    spec = heat_job("sim", stages, output) + print_job("post", 2, depends_on="sim")
    assert await cluster.submit(spec) == ["sim", "post"]
    before = await cluster.wait_job("sim", all_checkpointed(0.1), what="checkpointed, mid-run")
    victim = next(t.index for t in before.tasks if t.node == "a3")

    cluster.kill_coordinator()
    cluster.kill_agent("a3")  # its host is gone too: its attempt can only be re-run
    cluster.start_coordinator(heartbeat_timeout=2.0, restart_grace=4.0)
    await cluster.wait_online("a1", "a2")
    done = await cluster.wait_finished("sim", "post", limit=60)

    assert {job.status for job in done.values()} == {"completed"}, done
    assert cluster.agents["a1"].poll() is None, "a1 restarted"
    assert cluster.agents["a2"].poll() is None, "a2 restarted"
    records = await cluster.journal_events()
    for summary in done.values():
        assert_each_task_completed_once(records, summary)
    assert len(events_of(records, "sim", JobSubmitted)) == 1
    assigned = events_of(records, "sim", TaskAssigned)
    for task in range(len(stages)):
        attempts = [a for a in assigned if a.task == task]
        if task == victim:
            assert attempts[-1].node != "a3"
            assert attempts[-1].resume_from is not None, attempts
        else:  # re-claimed by its agent and finished in place, or re-run from its checkpoint
            assert len(attempts) == 1 or attempts[-1].resume_from is not None, attempts
    requeued = [r for r in events_of(records, "sim", TaskRequeued) if r.task == victim]
    assert requeued
    assert "coordinator restart" in requeued[0].reason
    reply = await cluster.ask(LogsRequest(job_id="sim", task=victim))
    assert isinstance(reply, TextReply)
    assert "resuming from step" in reply.text, reply.text
    # Resumed or not, every stage ends bit-identical (the stage name does not enter the numerics).
    grids = [grid_of(output / f"{stage}.json") for stage in stages]
    assert grids[0] == grids[1] == grids[2]


async def test_work_finished_while_the_coordinator_was_down_is_kept(cluster: Cluster) -> None:
    """An attempt that ends while the coordinator is down is journaled once from the outbox."""
    cluster.start_coordinator(restart_grace=30.0)
    cluster.start_agent("o1", cores="2")
    await cluster.wait_online("o1")
    release = cluster.root / "release"
    await cluster.submit(gate_job("gate", release) + print_job("next", 1, depends_on="gate"))
    await cluster.wait_job("gate", lambda job: job.task_counts == {"running": 1}, what="running")

    cluster.kill_coordinator()
    release.touch()
    await cluster.wait_for_log("agent-o1", "attempt_finished", job_id="gate", outcome="completed")
    cluster.start_coordinator(restart_grace=30.0)  # long: only the outbox can end the attempt
    done = await cluster.wait_finished("gate", "next", limit=20)

    assert {job.status for job in done.values()} == {"completed"}
    records = await cluster.journal_events()
    for summary in done.values():
        assert_each_task_completed_once(records, summary)
    assert len(events_of(records, "gate", TaskAssigned)) == 1
    assert not events_of(records, "gate", TaskRequeued)


async def test_job_cancelled_while_its_agent_is_away_after_a_restart(cluster: Cluster) -> None:
    """A job cancelled before its agent is back after a restart ends when the agent returns."""
    cluster.start_coordinator(restart_grace=60.0)  # long: only the agent's return may end it
    cluster.start_agent("c1")
    await cluster.wait_online("c1")
    release = cluster.root / "release"  # never created: the task would run forever
    await cluster.submit(gate_job("gate", release))
    await cluster.wait_job("gate", lambda job: job.task_counts == {"running": 1}, what="running")

    cluster.pause_agent("c1")  # it cannot reconnect until we say so
    cluster.kill_coordinator()
    cluster.start_coordinator(restart_grace=60.0)
    result = await cluster.cli("cancel", "gate")
    assert result.returncode == 0, result.stderr
    assert b"cancelling" in result.stdout, result.stdout
    cluster.resume_agent("c1")
    done = await cluster.wait_job(
        "gate", lambda job: job.status in FINISHED, what="finished", limit=20
    )

    assert done.status == "cancelled"
    assert done.task_counts == {"cancelled": 1}
    entry = await cluster.wait_for_log("agent-c1", "attempt_finished", job_id="gate")
    assert entry["outcome"] == "cancelled"


@pytest.mark.slow
async def test_agent_sigkill_mid_task_requeues_after_heartbeat_timeout(cluster: Cluster) -> None:
    """A SIGKILLed agent's attempt is requeued after the heartbeat timeout, resumed elsewhere."""
    timeout = 2.0
    cluster.start_coordinator(heartbeat_timeout=timeout)
    cluster.start_agent("b1")
    cluster.start_agent("b2")
    await cluster.wait_online("b1", "b2")
    output = cluster.root / "out"
    await cluster.submit(heat_job("sim", ("s0", "s1"), output))
    before = await cluster.wait_job("sim", all_checkpointed(0.1), what="checkpointed, mid-run")
    victim = before.tasks[0].node
    assert victim is not None
    survivor = ({"b1", "b2"} - {victim}).pop()

    cluster.kill_agent(victim)
    killed_at = datetime.now(UTC)
    (done,) = (await cluster.wait_finished("sim")).values()

    assert done.status == "completed", done
    records = await cluster.journal_events()
    assert_each_task_completed_once(records, done)
    requeues = [
        r
        for r in records
        if isinstance(r.event, TaskRequeued) and r.stream_id == "job:sim" and r.event.task == 0
    ]
    assert len(requeues) == 1
    assert victim in requeues[0].event.reason  # type: ignore[attr-defined]
    waited = (requeues[0].timestamp - killed_at).total_seconds()
    assert waited >= timeout - 0.2, f"requeued {waited:.2f} s after the kill"
    last = [a for a in events_of(records, "sim", TaskAssigned) if a.task == 0][-1]
    assert (last.node, last.attempt) == (survivor, 2)
    assert last.resume_from is not None
    assert not events_of(records, "sim", TaskFailed)  # lost is not the task's fault
    nodes = await cluster.nodes()
    assert (nodes[victim].health, nodes[survivor].health) == ("offline", "online")
    assert grid_of(output / "s0.json") == grid_of(output / "s1.json")

    # Each attempt's log is fetched from the node that ran it (the victim's, once it is back).
    cluster.start_agent(victim)
    await cluster.wait_online(victim)
    latest = await cluster.cli("logs", "sim", "0")
    assert f"attempt 2, on {survivor}".encode() in latest.stdout, latest.stdout
    assert b"resuming from step" in latest.stdout
    first = await cluster.cli("logs", "sim", "0", "--attempt", "1")
    assert first.returncode == 0, first.stderr
    assert f"attempt 1, on {victim}".encode() in first.stdout, first.stdout
    assert b"started pid" in first.stdout
    assert b"resuming" not in first.stdout


@pytest.mark.slow
async def test_hung_agent_is_fenced_off(cluster: Cluster) -> None:
    """A hung (SIGSTOPped) agent's attempt runs again elsewhere; its stale copy is refused."""
    cluster.start_coordinator(heartbeat_timeout=2.0)
    cluster.start_agent("h1")
    cluster.start_agent("h2")
    await cluster.wait_online("h1", "h2")
    output = cluster.root / "out"
    await cluster.submit(heat_job("sim", ("s0", "s1"), output))
    before = await cluster.wait_job("sim", all_checkpointed(0.1), what="checkpointed, mid-run")
    victim = before.tasks[0].node
    assert victim is not None
    survivor = ({"h1", "h2"} - {victim}).pop()

    cluster.pause_agent(victim)
    await cluster.wait_job(
        "sim",
        lambda job: job.tasks[0].attempt == 2 and job.tasks[0].node == survivor,
        what="task 0 reassigned",
    )
    cluster.resume_agent(victim)
    (done,) = (await cluster.wait_finished("sim")).values()
    nodes = await cluster.wait_online(victim)

    assert done.status == "completed", done
    assert nodes[survivor].health == "online"
    records = await cluster.journal_events()
    assert_each_task_completed_once(records, done)
    assert [(a.task, a.node) for a in events_of(records, "sim", TaskAssigned) if a.task == 0] == [
        (0, victim),
        (0, survivor),
    ]
    assert grid_of(output / "s0.json") == grid_of(output / "s1.json")
    assert cluster.agents[victim].poll() is None


@pytest.mark.parametrize("away", ["briefly", "past-timeout"])
async def test_agent_that_comes_back_keeps_its_identity(cluster: Cluster, away: str) -> None:
    """An agent restarted with the same --name is the same node, online again, and gets work."""
    # Briefly away is well within the heartbeat timeout, even on a loaded machine.
    cluster.start_coordinator(heartbeat_timeout=2.0 if away == "past-timeout" else 10.0)
    cluster.start_agent("w1")
    await cluster.wait_online("w1")
    cluster.kill_agent("w1")
    if away == "past-timeout":
        await cluster.wait_until(
            lambda: _health_is(cluster, "w1", "offline"), what="w1 offline", limit=15
        )
    cluster.start_agent("w1")
    await cluster.wait_online("w1")

    result = await cluster.cli("nodes", "--json")
    assert result.returncode == 0, result.stderr
    nodes = json.loads(result.stdout)
    assert [(n["name"], n["health"]) for n in nodes] == [("w1", "online")]
    await cluster.submit(print_job("after", 2))
    (done,) = (await cluster.wait_finished("after")).values()
    assert done.status == "completed"
    assert {t.node for t in done.tasks} == {"w1"}
    records = await cluster.journal_events()
    registered = [r for r in records if isinstance(r.event, NodeRegistered)]
    assert [r.stream_id for r in registered] == ["node:w1"]


async def test_no_work_is_placed_on_an_agent_while_it_is_away(cluster: Cluster) -> None:
    """Work submitted while an agent is away waits for it: nothing fails for lack of an agent."""
    cluster.start_coordinator(heartbeat_timeout=10.0)
    cluster.start_agent("q1", cores="2")
    await cluster.wait_online("q1")
    cluster.kill_agent("q1")
    await cluster.wait_for_log("coordinator", "agent_disconnected", node_id="q1")
    await cluster.submit(print_job("meanwhile", 2))
    cluster.start_agent("q1", cores="2")
    (done,) = (await cluster.wait_finished("meanwhile", limit=20)).values()

    assert done.status == "completed", done
    assert [(t.attempt, t.last_error) for t in done.tasks] == [(1, None), (1, None)]
    nodes = await cluster.nodes()
    assert (nodes["q1"].health, nodes["q1"].consecutive_failures) == ("online", 0)


async def test_agent_back_without_its_attempt_gets_it_retried(cluster: Cluster) -> None:
    """An agent back (work folder wiped) without its attempt gets that task retried, not stuck."""
    cluster.start_coordinator(heartbeat_timeout=5.0)
    cluster.start_agent("r1")
    await cluster.wait_online("r1")
    release = cluster.root / "release"
    await cluster.submit(gate_job("gate", release) + 'retries = { backoff = "0s" }\n')
    await cluster.wait_job("gate", lambda job: job.task_counts == {"running": 1}, what="running")

    cluster.kill_agent("r1")
    release.touch()  # the next attempt ends at once
    cluster.start_agent("r1", work_dir=cluster.root / "agents" / "r1-reimaged")
    (done,) = (await cluster.wait_finished("gate", limit=20)).values()

    assert done.status == "completed", done
    records = await cluster.journal_events()
    assert [(a.attempt, a.node) for a in events_of(records, "gate", TaskAssigned)] == [
        (1, "r1"),
        (2, "r1"),
    ]
    assert_each_task_completed_once(records, done)


async def test_local_agents_outlive_a_coordinator_crash(cluster: Cluster) -> None:
    """`serve --local-agents 1` SIGKILLed and restarted reuses its surviving local agent."""
    cluster.start_coordinator("--local-agents", "1")
    await cluster.wait_online("local-1")
    registry = cluster.root / "coordinator-work" / "local-agents.json"
    (pid,) = json.loads(registry.read_text()).values()

    cluster.kill_coordinator()
    cluster.start_coordinator("--local-agents", "1")
    nodes = await cluster.wait_online("local-1")

    assert list(nodes) == ["local-1"]
    assert json.loads(registry.read_text()) == {"local-1": pid}
    assert await anyio.Path(f"/proc/{pid}").exists()  # the same process, still running
    await cluster.submit(print_job("after", 1))
    (done,) = (await cluster.wait_finished("after")).values()
    assert done.status == "completed"
    assert done.tasks[0].node == "local-1"


async def _health_is(cluster: Cluster, name: str, health: str) -> bool:
    nodes = await cluster.nodes()
    return name in nodes and nodes[name].health == health


async def test_client_commands_against_a_live_coordinator(cluster: Cluster) -> None:
    """`taskfarm status`, `why`, `logs JOB TASK` (output lines) and `nodes` work live."""
    cluster.start_coordinator()
    cluster.start_agent("s1", cores="2")
    await cluster.wait_online("s1")
    release = cluster.root / "release"
    await cluster.submit(gate_job("gate", release) + print_job("hello", 2, depends_on="gate"))
    await cluster.wait_job("gate", lambda job: job.task_counts == {"running": 1}, what="running")

    why = await cluster.cli("why", "hello")
    assert why.returncode == 0, why.stderr
    assert b"gate" in why.stdout, why.stdout
    status = await cluster.cli("status")
    assert status.returncode == 0, status.stderr
    for word in (b"gate", b"hello", b"running"):
        assert word in status.stdout, status.stdout

    release.touch()
    await cluster.wait_finished("gate", "hello")
    status = await cluster.cli("status", "hello", "--json")
    assert status.returncode == 0, status.stderr
    (hello,) = msgspec.json.decode(status.stdout, type=list[JobSummary])
    assert hello.status == "completed"
    assert {t.node for t in hello.tasks} == {"s1"}
    logs = await cluster.cli("logs", "hello", "1")
    assert logs.returncode == 0, logs.stderr
    assert b"hello from hello/t1" in logs.stdout, logs.stdout
    assert b"hello/t0" not in logs.stdout
    nodes = await cluster.cli("nodes")
    assert nodes.returncode == 0, nodes.stderr
    assert [line.split()[:2] for line in nodes.stdout.decode().splitlines()[1:]] == [
        ["s1", "online"]
    ]
    missing = await cluster.cli("logs", "no-such-job")
    assert missing.returncode != 0
    assert b"no-such-job" in missing.stderr
