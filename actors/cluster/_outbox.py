"""The agent's durable outbox: reports are journaled on the host before they are sent.

See ``_agent.py`` for the protocol (sequence numbers, cumulative acknowledgements, re-sending
after a reconnect or a restart).
"""

from __future__ import annotations

import anyio

from actors.executors import AttemptFinished, AttemptReport, AttemptSpec, AttemptStarted
from persistence import Event, EventCodec, RecordedEvent, SQLiteJournal

from ._protocol import (
    CancelAttempt,
    CheckpointAttempt,
)

__all__ = [
    "OUTBOX_CODEC",
    "AttemptKey",
    "Outbox",
    "OutboxAcked",
    "OutboxAttemptLost",
    "OutboxReport",
    "attempt_key",
]

AttemptKey = tuple[str, str, int]  # job_id, task_id, fencing_token
_OUTBOX_STREAM = "agent.outbox"


# -- the outbox's events ----------------------------------------------------------------------


class OutboxReport(Event, frozen=True, kw_only=True, tag="agent.outbox_report"):
    """A report was produced and waits to be acknowledged; its position is its sequence."""

    report: AttemptReport


class OutboxAcked(Event, frozen=True, kw_only=True, tag="agent.outbox_acked"):
    """The coordinator journaled every report up to and including ``sequence``."""

    sequence: int


class OutboxAttemptLost(Event, frozen=True, kw_only=True, tag="agent.outbox_attempt_lost"):
    """An attempt that was running when the agent died was cleaned up after the restart.

    Recorded together with the synthesized failure report, so the clean-up happens once.
    """

    job_id: str
    task_id: str
    fencing_token: int


OUTBOX_CODEC = EventCodec()
"""The codec of the agent's outbox journal (its own events only)."""
OUTBOX_CODEC.register(OutboxReport)
OUTBOX_CODEC.register(OutboxAcked)
OUTBOX_CODEC.register(OutboxAttemptLost)


def attempt_key(
    item: AttemptReport | AttemptSpec | CancelAttempt | CheckpointAttempt,
) -> AttemptKey:
    return (item.job_id, item.task_id, item.fencing_token)


class _Batch:
    """The puts that go into one journal append, and its outcome."""

    __slots__ = ("done", "error")

    def __init__(self) -> None:
        self.done = anyio.Event()
        self.error: Exception | None = None


class Outbox:
    """Reports on their way to the coordinator: journaled first, forgotten once acknowledged.

    While :meth:`run` runs, every report put meanwhile goes into one journal append (one commit
    for the reports of many attempts, and the latest acknowledgement with them); without it,
    each put is its own append.
    """

    def __init__(self, journal: SQLiteJournal) -> None:
        self._journal = journal
        self._pending: dict[int, AttemptReport] = {}  # sequence -> report, in sequence order
        self._acked = 0  # acknowledged in memory
        self._acked_journaled = 0
        self._lock = anyio.Lock()
        self._changed = anyio.Event()
        self._acknowledged = anyio.Event()
        # Attempts started but not finished, per the journal (for the restart clean-up).
        self._open: dict[AttemptKey, AttemptStarted] = {}
        self._buffer: list[Event] = []
        self._batch = _Batch()
        self._wakeup = anyio.Event()
        self._writing = False
        self._appends = 0
        self._reports = 0

    @property
    def pending(self) -> int:
        return len(self._pending)

    def statistics(self) -> dict[str, int]:
        """Return counters: reports and journal appends so far, reports not yet acknowledged."""
        return {"reports": self._reports, "appends": self._appends, "pending": len(self._pending)}

    async def load(self) -> list[AttemptStarted]:
        """Rebuild the unacknowledged reports; return the attempts that never finished."""
        async for batch in self._journal.read_all():
            for recorded in batch:
                self._apply(recorded)
        self._acked_journaled = self._acked
        return list(self._open.values())

    def _apply(self, recorded: RecordedEvent) -> None:
        event = recorded.event
        if isinstance(event, OutboxReport):
            if recorded.position > self._acked:
                self._pending[recorded.position] = event.report
            self._track(event.report)
        elif isinstance(event, OutboxAcked):
            self._drop_upto(event.sequence)
        elif isinstance(event, OutboxAttemptLost):
            self._open.pop((event.job_id, event.task_id, event.fencing_token), None)

    def _track(self, report: AttemptReport) -> None:
        if isinstance(report, AttemptStarted):
            self._open[attempt_key(report)] = report
        elif isinstance(report, AttemptFinished):
            self._open.pop(attempt_key(report), None)

    def _drop_upto(self, sequence: int) -> None:
        if sequence <= self._acked:
            return
        self._acked = sequence
        for done in [s for s in self._pending if s <= sequence]:
            del self._pending[done]

    def changed(self) -> anyio.Event:
        """Return the event set when the next report is added (read it before sending)."""
        return self._changed

    def after(self, sequence: int) -> list[tuple[int, AttemptReport]]:
        """Return the unacknowledged reports after ``sequence``, in order."""
        return [(s, r) for s, r in self._pending.items() if s > sequence]

    async def put(self, *events: Event) -> None:
        """Journal ``events`` (reports and their bookkeeping) durably, then queue the reports.

        Raises:
            Exception: the append failed (the journal's error); nothing was queued.
        """
        if not self._writing:
            await self._append(list(events))
            return
        self._buffer.extend(events)
        batch = self._batch
        self._wakeup.set()
        await batch.done.wait()
        if batch.error is not None:
            raise batch.error

    def put_nowait(self, *events: Event) -> bool:
        """Queue ``events`` for the next append without waiting for it; return False (and do
        nothing) when :meth:`run` is not running.  A failure of that append fails ``run``."""
        if not self._writing:
            return False
        self._buffer.extend(events)
        self._wakeup.set()
        return True

    async def _append(self, events: list[Event]) -> None:
        """Append ``events`` (with the acknowledgement, if it moved) and queue their reports."""
        acked = self._acked
        if acked > self._acked_journaled:
            events.append(OutboxAcked(sequence=acked))
        if not events:
            return
        # One append at a time, so sequences enter the queue in order (the sender never looks
        # back past the last sequence it sent).
        async with self._lock:
            result = await self._journal.append(_OUTBOX_STREAM, events)
        self._appends += 1
        self._acked_journaled = max(self._acked_journaled, acked)
        position = result.first_position
        for event in events:
            if isinstance(event, OutboxReport):
                self._reports += 1
                if position > self._acked:
                    self._pending[position] = event.report
                    self._track(event.report)
            position += 1
        self._changed.set()
        self._changed = anyio.Event()

    async def run(self) -> None:
        """Journal what is put, many puts (and the latest acknowledgement) per append, until
        cancelled; what is put after that is appended by the put itself."""
        self._writing = True
        try:
            while True:
                await self._wakeup.wait()
                self._wakeup = anyio.Event()
                await self._write_buffer()
        finally:
            self._writing = False
            if self._buffer:
                with anyio.move_on_after(5, shield=True):
                    await self._write_buffer()
            batch = self._batch
            if not batch.done.is_set():
                batch.error = batch.error or RuntimeError("the outbox closed first")
                batch.done.set()

    async def _write_buffer(self) -> None:
        events, batch = self._buffer, self._batch
        self._buffer, self._batch = [], _Batch()
        try:
            await self._append(events)
        except Exception as error:
            batch.error = error
            raise
        finally:
            batch.done.set()

    def acknowledge(self, sequence: int) -> None:
        """Forget the reports up to ``sequence`` (journaled later, with the next append)."""
        if sequence > self._acked:
            self._drop_upto(sequence)
            self._wakeup.set()
            self._acknowledged.set()
            self._acknowledged = anyio.Event()

    def acknowledged(self) -> anyio.Event:
        """Return the event set when the next acknowledgement arrives."""
        return self._acknowledged

    async def flush_acks(self) -> None:
        """Journal the latest acknowledgement now, if it moved."""
        await self._append([])
