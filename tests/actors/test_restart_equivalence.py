"""A restart from snapshots rebuilds what a replay from position 0 rebuilds, reading a finished
job's final snapshot only for what the dependency graph needs, in a few bulk reads."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import msgspec
import pytest
from engine_farm import job

from actors import (
    ENGINE_CODEC,
    Dependency,
    JobAggregate,
    JobFinished,
    JobReopened,
    JobState,
    JobSubmitted,
    NodeAggregate,
    NodeHealthChanged,
    NodeRegistered,
    Resources,
    SubmitJob,
    TaskAssigned,
    TaskCancelled,
    TaskCompleted,
    TaskFailed,
    TaskMetricRecorded,
    TaskSkipped,
    TaskStarted,
    job_stream,
    node_stream,
    open_engine,
)
from actors.engine import Outcome, TaskRef
from persistence import Event, InMemoryJournal, Journal, open_sqlite_journal
from runtime import VirtualClock

START = datetime(2026, 5, 1, tzinfo=UTC)
CPU8 = Resources.of(cores=8, memory="16GiB")

FINAL = -1  # a snapshot at the stream's last version (a finished job's final state)

OpenJournal = Callable[[Path], AbstractAsyncContextManager[Journal]]


@pytest.fixture(params=["memory", "sqlite"])
def open_journal(request: pytest.FixtureRequest) -> OpenJournal:
    memory: dict[Path, InMemoryJournal] = {}

    @asynccontextmanager
    async def in_memory(path: Path) -> AsyncIterator[Journal]:
        # The same journal each time for one path, as a file would be.
        if path not in memory:
            memory[path] = InMemoryJournal(clock=VirtualClock(START), codec=ENGINE_CODEC)
        yield memory[path]

    @asynccontextmanager
    async def sqlite(path: Path) -> AsyncIterator[Journal]:
        async with open_sqlite_journal(
            path, clock=VirtualClock(START), codec=ENGINE_CODEC
        ) as journal:
            yield journal

    return in_memory if request.param == "memory" else sqlite


def _run(task: int, token: int, node: str = "n1") -> list[Event]:
    return [
        TaskAssigned(task=task, attempt=1, token=token, node=node),
        TaskStarted(task=task, token=token),
    ]


def _done(task: int, token: int, node: str = "n1") -> list[Event]:
    return [*_run(task, token, node), TaskCompleted(task=task, token=token, runtime_s=2.0)]


def _finished(outcome: Any) -> JobFinished:
    return JobFinished(outcome=outcome, finished_at=START + timedelta(minutes=5))


def _farm() -> list[tuple[SubmitJob, list[Event], list[int]]]:
    """Jobs as a farm leaves them: (spec, events after JobSubmitted, versions snapshotted).

    Finished jobs with their final snapshot (completed with metrics, failed, all skipped), one
    without (an older journal), one reopened after its final snapshot, and unfinished ones:
    with attempts in doubt and events after their snapshot, blocked on an unfinished parent,
    and gated on a finished parent's metric.
    """
    done = job("done", tasks=3)
    broken = job("broken", tasks=2)
    stopped = job("stopped", tasks=2)
    skipped = job("skipped", tasks=2)
    again = job("again", tasks=2)
    running = job("running", tasks=4, dependencies=[Dependency(parent="done")])
    waiting = job("waiting", tasks=2, dependencies=[Dependency(parent="running")])
    gated = job("gated", dependencies=[Dependency(parent="done", when="psnr > 25")])
    failed = TaskFailed(task=1, token=5, outcome="failed", error="exit 3", kind="exit_code")
    return [
        (
            done,
            [
                *_done(0, 2),
                *_done(1, 5, "n2"),
                TaskMetricRecorded(task=1, token=5, name="psnr", value=31.5),
                *_done(2, 9),
                _finished("completed"),
            ],
            [FINAL],
        ),
        (broken, [*_done(0, 2), *_run(1, 5), failed, _finished("failed")], [FINAL]),
        (
            stopped,
            [
                TaskCancelled(task=0, reason="by user"),
                TaskCancelled(task=1, reason="by user"),
                _finished("cancelled"),
            ],
            [],
        ),
        (
            skipped,
            [
                TaskSkipped(task=0, reason="branch"),
                TaskSkipped(task=1, reason="branch"),
                _finished("completed"),
            ],
            [FINAL],
        ),
        (again, [*_done(0, 2), *_done(1, 5), _finished("completed"), JobReopened(tasks=(0,))], [8]),
        (running, [*_done(0, 2), *_run(1, 5, "n2"), *_run(2, 7)], [4]),
        (waiting, [], []),
        (gated, [], []),
    ]


async def _write(journal: Journal, *, snapshots: bool) -> None:
    """Write the farm; with ``snapshots``, at the versions it names (else none at all)."""
    await journal.append(node_stream("n1"), [NodeRegistered(name="n1", capacity=CPU8)])
    await journal.append(
        node_stream("n2"),
        [
            NodeRegistered(name="n2", capacity=CPU8, labels=("gpu",)),
            NodeHealthChanged(health="draining", reason="disk"),
        ],
    )
    if snapshots:
        nodes = NodeAggregate()
        node = nodes.initial_state(node_stream("n2"))
        node = nodes.apply(node, NodeRegistered(name="n2", capacity=CPU8, labels=("gpu",)))
        await journal.save_snapshot(
            node_stream("n2"), version=1, state=node, schema_version=nodes.schema_version
        )
    aggregate = JobAggregate()
    for spec, events, versions in _farm():
        stream = job_stream(spec.job_id)
        batch: list[Event] = [JobSubmitted(job=spec, submitted_at=START), *events]
        await journal.append(stream, batch, expected_version=0)
        for version in [len(batch) if v == FINAL else v for v in versions] if snapshots else []:
            state = aggregate.initial_state(stream)
            for event in batch[:version]:
                state = aggregate.apply(state, event)
            await journal.save_snapshot(
                stream, version=version, state=state, schema_version=aggregate.schema_version
            )


async def _recovered(journal: Journal) -> dict[str, Any]:
    """Everything a restart rebuilds that the scheduler and the graph expose."""
    async with open_engine(journal=journal, clock=VirtualClock(START)) as engine:
        core = engine.core
        graph = core.graph
        outcomes = {
            spec.job_id: (
                graph.outcome(spec.job_id),
                [graph.outcome(TaskRef(spec.job_id, i)) for i in range(len(spec.tasks))],
            )
            for spec, _events, _versions in _farm()
        }
        live = {
            spec.job_id: [core.task_status(spec.job_id, i) for i in range(len(spec.tasks))]
            for spec, _events, _versions in _farm()
            if core.has_job(spec.job_id)
        }
        statistics = core.statistics()
        nodes = {(n.name, n.health, n.labels) for n in core.node_summaries()}
        summaries = [(s.job_id, s.status, s.task_counts) for s in await engine.status(tasks=True)]
        return {
            "recovery": engine.recovery,
            "outcomes": outcomes,
            "live": live,
            "ready": graph.ready_tasks(),
            "statistics": statistics,
            "nodes": nodes,
            "summaries": summaries,
        }


async def test_a_restart_from_snapshots_rebuilds_what_replay_from_zero_rebuilds(
    open_journal: OpenJournal, tmp_path: Path
) -> None:
    """Outcomes (tasks included), live jobs, readiness, in-doubt attempts, nodes and summaries
    are the same with snapshots as without any."""
    states = []
    for snapshots in (True, False):
        path = tmp_path / f"journal-{snapshots}.db"
        async with open_journal(path) as journal:
            await _write(journal, snapshots=snapshots)
        async with open_journal(path) as journal:
            states.append(await _recovered(journal))
    with_snapshots, from_zero = states
    assert with_snapshots == from_zero
    outcomes = from_zero["outcomes"]
    assert {job_id: outcomes[job_id][0] for job_id in outcomes} == {
        "done": Outcome.SUCCEEDED,
        "broken": Outcome.FAILED,
        "stopped": Outcome.CANCELLED,
        "skipped": Outcome.SKIPPED,
        "again": None,
        "running": None,
        "waiting": None,
        "gated": None,
    }
    assert outcomes["broken"][1] == [Outcome.SUCCEEDED, Outcome.FAILED]
    # The finished parent's metric met the condition; the unfinished parent blocks.
    assert TaskRef("gated", 0) in from_zero["ready"]
    assert from_zero["live"]["waiting"] == ["blocked", "blocked"]
    assert from_zero["recovery"].in_doubt == 2
    assert from_zero["recovery"].jobs == 8


def test_a_job_snapshot_leaves_out_default_fields_and_reads_either_way() -> None:
    """A JobState encodes without its default fields (a big job's snapshot stays small), and a
    snapshot written with every field, as before, decodes to the same state."""
    aggregate = JobAggregate()
    spec, events, _versions = _farm()[0]
    state = aggregate.initial_state(job_stream(spec.job_id))
    for event in [JobSubmitted(job=spec, submitted_at=START), *events]:
        state = aggregate.apply(state, event)
    compact = ENGINE_CODEC.encode_state(state)
    every_field = msgspec.json.encode(
        {
            **msgspec.to_builtins(state),
            "tasks": [
                {name: msgspec.to_builtins(getattr(task, name)) for name in task.__struct_fields__}
                for task in state.tasks
            ],
        }
    )
    assert b'"checkpoint_at"' not in compact
    assert b'"checkpoint_at":null' in every_field
    assert len(compact) < len(every_field) - 3 * 200
    assert ENGINE_CODEC.decode_state(compact, JobState) == state
    assert ENGINE_CODEC.decode_state(every_field, JobState) == state


class _CountingReads(InMemoryJournal):
    """An in-memory journal that counts the per-stream reads a recovery makes."""

    def __init__(self) -> None:
        super().__init__(clock=VirtualClock(START), codec=ENGINE_CODEC)
        self.reads: list[str] = []

    async def read_stream(self, stream_id: str, **bounds: Any) -> Any:
        self.reads.append(f"read_stream {stream_id}")
        return await super().read_stream(stream_id, **bounds)

    async def load_snapshot(self, stream_id: str, state_type: Any, **bounds: Any) -> Any:
        self.reads.append(f"load_snapshot {stream_id}")
        return await super().load_snapshot(stream_id, state_type, **bounds)

    async def load_streams(
        self, prefix: str, state_type: Any, **options: Any
    ) -> AsyncIterator[Any]:
        self.reads.append(f"load_streams {prefix}")
        async for stream in super().load_streams(prefix, state_type, **options):
            yield stream


def _reads_of(reads: Sequence[str]) -> list[str]:
    return [r for r in reads if "policy:" not in r]


async def test_a_restart_reads_finished_jobs_in_bulk_and_only_unfinished_ones_in_full() -> None:
    """Finished jobs with a final snapshot cost no read of their own; an unfinished job with a
    snapshot is read once more in full; nodes and jobs come in one bulk read each."""
    journal = _CountingReads()
    await _write(journal, snapshots=True)
    journal.reads.clear()
    async with open_engine(journal=journal, clock=VirtualClock(START)):
        recovery_reads = _reads_of(journal.reads)
    assert sorted(recovery_reads) == [
        "load_snapshot job:again",
        "load_snapshot job:running",
        "load_streams job:",
        "load_streams node:",
    ]
