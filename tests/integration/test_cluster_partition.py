"""Leased attempts on a real cluster: a TCP path that stalls between an agent and the coordinator
(a proxy that stops forwarding without closing anything), and a coordinator restart.

The tasks stamp their own start and end (wall-clock time, shared by every process on the host)
into files, so a test can prove that two copies of a task never ran at the same time.
"""

from __future__ import annotations

import itertools
import sys
from collections import defaultdict
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

import anyio
import pytest
from anyio.abc import SocketStream, TaskGroup

from actors import JobSummary, TaskAssigned, TaskCompleted, TaskFailed, TaskRequeued
from persistence import RecordedEvent

if TYPE_CHECKING:
    from conftest import Cluster

E = TypeVar("E")

PYTHON = sys.executable
HOST = "127.0.0.1"

# A task that stamps its start, answers SIGUSR1 with a checkpoint, stamps its end when told to
# stop (SIGTERM) or when the release file appears (then also "done"), and polls for that file.
MARKER_TASK = """\
import os, pathlib, signal, sys, time
out = pathlib.Path(sys.argv[1])
name = f"{os.environ['TASKFARM_TASK_ID']}.{os.environ['TASKFARM_ATTEMPT']}.{os.getpid()}"
def stamp(kind):
    (out / f"{name}.{kind}").write_text(repr(time.time()))
stamp("start")
def on_term(signum, frame):
    stamp("end")
    os._exit(143)
def on_usr1(signum, frame):
    print(f"@taskfarm checkpoint {name}", flush=True)
signal.signal(signal.SIGTERM, on_term)
signal.signal(signal.SIGUSR1, on_usr1)
print("running", name, flush=True)
while not (out / "release").exists():
    time.sleep(0.02)
stamp("end")
stamp("done")
"""


def events_of(records: list[RecordedEvent], job_id: str, kind: type[E]) -> list[E]:
    """Return the events of one type in a job's stream, in journal order."""
    return [
        r.event for r in records if r.stream_id == f"job:{job_id}" and isinstance(r.event, kind)
    ]


def assert_each_task_completed_once(records: list[RecordedEvent], summary: JobSummary) -> None:
    """Every task of the job has exactly one TaskCompleted, for its last assignment."""
    job_id = summary.job_id
    completed = events_of(records, job_id, TaskCompleted)
    assert sorted(event.task for event in completed) == list(range(summary.tasks_total))
    for event in completed:
        assigned = [a for a in events_of(records, job_id, TaskAssigned) if a.task == event.task]
        assert event.token == assigned[-1].token, f"{job_id} task {event.task}: stale completion"


def marker_job(name: str, tasks: int, out: Path) -> str:
    """Return a TOML job of ``tasks`` checkpointable marker tasks stamping into ``out``."""
    script = out / "marker_task.py"
    script.write_text(MARKER_TASK)
    names = "".join(f'\n[[jobs.tasks]]\nname = "t{i}"\n' for i in range(tasks))
    return f"""
[[jobs]]
name = "{name}"
checkpointable = true
command = ["{PYTHON}", "{script.as_posix()}", "{out.as_posix()}"]
resources = {{ cores = 1, memory = "16MiB" }}
{names}"""


class StallingProxy:
    """Forwards TCP connections on loopback to a port; ``stall()`` stops reading and forwarding
    in both directions (nothing is closed: to both ends the path just goes quiet), ``heal()``
    lets everything held back through."""

    def __init__(self, target: int) -> None:
        self.target = target
        self.port = 0
        self._flowing = anyio.Event()
        self._flowing.set()

    def stall(self) -> None:
        self._flowing = anyio.Event()

    def heal(self) -> None:
        self._flowing.set()

    async def _pipe(self, source: SocketStream, sink: SocketStream, group: TaskGroup) -> None:
        try:
            while True:
                await self._flowing.wait()
                data = await source.receive()
                await self._flowing.wait()  # read just before a stall: held back too
                await sink.send(data)
        except (anyio.EndOfStream, anyio.BrokenResourceError, anyio.ClosedResourceError):
            pass
        finally:
            group.cancel_scope.cancel()

    async def _handle(self, client: SocketStream) -> None:
        async with (
            client,
            await anyio.connect_tcp(HOST, self.target) as upstream,
            anyio.create_task_group() as group,
        ):
            group.start_soon(self._pipe, client, upstream, group)
            group.start_soon(self._pipe, upstream, client, group)


@asynccontextmanager
async def open_proxy(target: int) -> AsyncIterator[StallingProxy]:
    proxy = StallingProxy(target)
    listener = await anyio.create_tcp_listener(local_host=HOST, local_port=0)
    proxy.port = listener.extra(anyio.abc.SocketAttribute.local_port)
    async with listener, anyio.create_task_group() as group:
        group.start_soon(listener.serve, proxy._handle)
        try:
            yield proxy
        finally:
            group.cancel_scope.cancel()


def copies(out: Path) -> dict[str, list[tuple[int, float, float | None]]]:
    """Return each task's copies that ran: (attempt, start, end or None), by task id."""
    found: dict[str, list[tuple[int, float, float | None]]] = defaultdict(list)
    for start in out.glob("*.start"):
        task, attempt, pid = start.name.split(".")[:3]
        end = out / f"{task}.{attempt}.{pid}.end"
        stopped = float(end.read_text()) if end.exists() else None
        found[task].append((int(attempt), float(start.read_text()), stopped))
    return found


def assert_no_two_copies_overlap(out: Path) -> None:
    """Every copy of every task ended, and no two copies of one task ran at the same time."""
    for task, runs in copies(out).items():
        assert all(end is not None for _, _, end in runs), f"task {task}: a copy never ended"
        ordered = sorted(runs, key=lambda run: run[1])
        for (attempt, _, end), (later, start, _) in itertools.pairwise(ordered):
            assert end is not None
            assert end < start, (
                f"task {task}: attempt {attempt} ran until {end}, {later} from {start}"
            )


async def _health(cluster: Cluster, name: str) -> str | None:
    nodes = await cluster.nodes()
    return nodes[name].health if name in nodes else None


@pytest.mark.slow
async def test_a_partitioned_agent_stops_its_work_before_it_runs_elsewhere(
    cluster: Cluster,
) -> None:
    """A stall longer than the lease: the cut-off agent stops its attempts (unreachable, not
    draining), then the coordinator runs them elsewhere; healed, every task completes once."""
    cluster.start_coordinator("--lease", "2", "--fence", "6", heartbeat_timeout=1.0)
    out = cluster.root / "marks"
    out.mkdir()
    async with open_proxy(cluster.port) as proxy:
        cluster.start_agent("p1", cores="2", port=proxy.port)
        await cluster.wait_online("p1")
        await cluster.submit(marker_job("mark", 2, out))
        await cluster.wait_job(
            "mark", lambda job: job.task_counts == {"running": 2}, what="both run"
        )
        cluster.start_agent("p2", cores="2")
        await cluster.wait_online("p2")

        proxy.stall()
        await cluster.wait_until(
            lambda: _is(cluster, "p1", "unreachable"), what="p1 unreachable", limit=10
        )
        await cluster.wait_for_log("agent-p1", "agent_lease_expired", limit=10)
        moved = await cluster.wait_job(
            "mark",
            lambda job: all(t.node == "p2" and t.status == "running" for t in job.tasks),
            what="both tasks requeued on p2",
        )
        assert [t.attempt for t in moved.tasks] == [2, 2]
        assert (await _health(cluster, "p1")) == "offline"  # past the fence

        proxy.heal()
        await cluster.wait_for_log("agent-p1", "agent_connected", reconnect=True)
        (out / "release").touch()
        (done,) = (await cluster.wait_finished("mark")).values()

    assert done.status == "completed", done
    assert_no_two_copies_overlap(out)
    runs = copies(out)
    for task in ("0", "1"):
        first = [run for run in runs[task] if run[0] == 1]
        second = [run for run in runs[task] if run[0] == 2]
        assert len(first) == len(second) == 1, runs
    assert sorted(p.name.split(".")[:2] for p in out.glob("*.done")) == [["0", "2"], ["1", "2"]]
    records = await cluster.journal_events()
    assert_each_task_completed_once(records, done)
    assert not events_of(records, "mark", TaskFailed)  # lost is not the task's fault
    stopped = [
        e
        for e in cluster.log_entries("agent-p1")
        if (e["event"], e.get("component")) == ("attempt_finished", "actors.agent")
    ]
    assert {(e["task_id"], e["outcome"]) for e in stopped} == {("0", "lost"), ("1", "lost")}


async def _is(cluster: Cluster, name: str, health: str) -> bool:
    return (await _health(cluster, name)) == health


@pytest.mark.slow
async def test_a_stall_shorter_than_the_lease_loses_nothing(cluster: Cluster) -> None:
    """A stall long enough for the coordinator to drop the agent, shorter than the lease: the
    agent comes back, re-claims both attempts, and nothing runs twice."""
    cluster.start_coordinator("--lease", "8", heartbeat_timeout=1.0)
    out = cluster.root / "marks"
    out.mkdir()
    async with open_proxy(cluster.port) as proxy:
        cluster.start_agent("s1", cores="2", port=proxy.port)
        await cluster.wait_online("s1")
        await cluster.submit(marker_job("mark", 2, out))
        await cluster.wait_job(
            "mark", lambda job: job.task_counts == {"running": 2}, what="both run"
        )

        proxy.stall()
        await cluster.wait_until(
            lambda: _is(cluster, "s1", "unreachable"), what="s1 unreachable", limit=10
        )
        proxy.heal()
        entry = await cluster.wait_for_log("agent-s1", "agent_connected", reconnect=True)
        assert entry["reclaimed"] == 2
        await cluster.wait_online("s1")
        (out / "release").touch()
        (done,) = (await cluster.wait_finished("mark")).values()

    assert done.status == "completed", done
    assert [t.attempt for t in done.tasks] == [1, 1]
    assert sorted(p.name.split(".")[:2] for p in out.glob("*.done")) == [["0", "1"], ["1", "1"]]
    assert len(list(out.glob("*.start"))) == 2
    assert "agent_lease_expired" not in {e["event"] for e in cluster.log_entries("agent-s1")}
    reclaimed = await cluster.wait_for_log("coordinator", "agent_connected", reclaimed=2)
    assert reclaimed["node_id"] == "s1"


@pytest.mark.slow
async def test_an_agent_back_within_the_fence_hands_in_its_checkpoints(cluster: Cluster) -> None:
    """Past its lease, the agent checkpoints and stops; back before the fence, its lost reports
    requeue the tasks from those checkpoints, without spending a retry."""
    cluster.start_coordinator("--lease", "2", "--fence", "30", heartbeat_timeout=1.0)
    out = cluster.root / "marks"
    out.mkdir()
    async with open_proxy(cluster.port) as proxy:
        cluster.start_agent("f1", cores="2", port=proxy.port)
        await cluster.wait_online("f1")
        await cluster.submit(marker_job("mark", 2, out))
        await cluster.wait_job(
            "mark", lambda job: job.task_counts == {"running": 2}, what="both run"
        )

        proxy.stall()
        await cluster.wait_for_log("agent-f1", "agent_lease_expired", limit=10)
        for task in ("0", "1"):
            await cluster.wait_for_log(
                "agent-f1",
                "attempt_finished",
                task_id=task,
                outcome="lost",
                component="actors.agent",
                limit=10,
            )
        proxy.heal()
        await cluster.wait_job(
            "mark",
            lambda job: all(t.attempt == 2 and t.status == "running" for t in job.tasks),
            what="both tasks running again",
        )
        (out / "release").touch()
        (done,) = (await cluster.wait_finished("mark")).values()

    assert done.status == "completed", done
    assert_no_two_copies_overlap(out)
    records = await cluster.journal_events()
    assert_each_task_completed_once(records, done)
    assert not events_of(records, "mark", TaskFailed)
    requeued = events_of(records, "mark", TaskRequeued)
    assert len(requeued) == 2
    assert all("lease" in event.reason for event in requeued), requeued
    second = [a for a in events_of(records, "mark", TaskAssigned) if a.attempt == 2]
    assert sorted(a.resume_from or "" for a in second) == sorted(
        f"{task}.1.{pid}" for task, pid in _first_pids(out)
    )


def _first_pids(out: Path) -> list[tuple[str, str]]:
    return [
        (start.name.split(".")[0], start.name.split(".")[2]) for start in out.glob("*.1.*.start")
    ]


@pytest.mark.slow
async def test_a_coordinator_restart_shorter_than_the_lease_loses_nothing(
    cluster: Cluster,
) -> None:
    """A coordinator SIGKILLed and restarted within the lease: its agents re-claim their
    attempts; nothing is stopped, requeued or run twice."""
    cluster.start_coordinator("--lease", "10", heartbeat_timeout=1.0, restart_grace=30.0)
    out = cluster.root / "marks"
    out.mkdir()
    cluster.start_agent("r1", cores="2")
    await cluster.wait_online("r1")
    await cluster.submit(marker_job("mark", 2, out))
    await cluster.wait_job("mark", lambda job: job.task_counts == {"running": 2}, what="both run")

    cluster.kill_coordinator()
    cluster.start_coordinator("--lease", "10", heartbeat_timeout=1.0, restart_grace=30.0)
    await cluster.wait_for_log("agent-r1", "agent_connected", reconnect=True, reclaimed=2)
    (out / "release").touch()
    (done,) = (await cluster.wait_finished("mark")).values()

    assert done.status == "completed", done
    assert [t.attempt for t in done.tasks] == [1, 1]
    assert len(list(out.glob("*.start"))) == 2
    records = await cluster.journal_events()
    assert not events_of(records, "mark", TaskRequeued)
    assert "agent_lease_expired" not in {e["event"] for e in cluster.log_entries("agent-r1")}
