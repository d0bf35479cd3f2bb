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


class Outbox:
    """Reports on their way to the coordinator: journaled first, forgotten once acknowledged."""

    def __init__(self, journal: SQLiteJournal) -> None:
        self._journal = journal
        self._pending: dict[int, AttemptReport] = {}  # sequence -> report, in sequence order
        self._acked = 0  # acknowledged in memory
        self._acked_journaled = 0
        self._lock = anyio.Lock()
        self._changed = anyio.Event()
        self._ack_changed = anyio.Event()
        self._acknowledged = anyio.Event()
        # Attempts started but not finished, per the journal (for the restart clean-up).
        self._open: dict[AttemptKey, AttemptStarted] = {}

    @property
    def pending(self) -> int:
        return len(self._pending)

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
        """Journal ``events`` (reports and their bookkeeping) durably, then queue the reports."""
        # One append at a time, queued under the same lock, so sequences enter the queue in
        # order (the sender never looks back past the last sequence it sent).
        async with self._lock:
            result = await self._journal.append(_OUTBOX_STREAM, list(events))
            position = result.first_position
            for event in events:
                if isinstance(event, OutboxReport) and position > self._acked:
                    self._pending[position] = event.report
                    self._track(event.report)
                position += 1
        self._changed.set()
        self._changed = anyio.Event()

    def acknowledge(self, sequence: int) -> None:
        """Forget the reports up to ``sequence`` (journaled later, coalesced, by ``run_acks``)."""
        if sequence > self._acked:
            self._drop_upto(sequence)
            self._ack_changed.set()
            self._acknowledged.set()
            self._acknowledged = anyio.Event()

    def acknowledged(self) -> anyio.Event:
        """Return the event set when the next acknowledgement arrives."""
        return self._acknowledged

    async def run_acks(self) -> None:
        """Journal acknowledgements as they come, many acks per write."""
        while True:
            await self._ack_changed.wait()
            self._ack_changed = anyio.Event()
            await self.flush_acks()

    async def flush_acks(self) -> None:
        target = self._acked
        if target > self._acked_journaled:
            async with self._lock:
                await self._journal.append(_OUTBOX_STREAM, [OutboxAcked(sequence=target)])
            self._acked_journaled = max(self._acked_journaled, target)
