"""The agent's outbox on a real SQLite file: reports journaled in batches, in order, and
acknowledgements journaled with them."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anyio

from actors.cluster import OUTBOX_CODEC, Outbox, OutboxReport
from actors.executors import AttemptProgress, AttemptStarted
from persistence import open_sqlite_journal
from runtime import SystemClock

IDENT: dict[str, Any] = {"job_id": "job", "task_id": "t", "attempt": 1, "fencing_token": 1}


@asynccontextmanager
async def _outbox(path: Path, *, writer: bool) -> AsyncIterator[Outbox]:
    async with (
        open_sqlite_journal(path, clock=SystemClock(), codec=OUTBOX_CODEC) as journal,
        anyio.create_task_group() as group,
    ):
        outbox = Outbox(journal)
        await outbox.load()
        if writer:
            group.start_soon(outbox.run)
            await anyio.lowlevel.checkpoint()  # let it start
        yield outbox
        group.cancel_scope.cancel()


def _progress(number: int) -> OutboxReport:
    return OutboxReport(report=AttemptProgress(fraction=number / 100, **IDENT))


async def test_concurrent_reports_share_appends_and_keep_their_order(tmp_path: Path) -> None:
    """Reports put at once go into a few appends, and come out in the order they were put."""
    async with _outbox(tmp_path / "outbox.db", writer=True) as outbox:
        async with anyio.create_task_group() as group:
            for number in range(50):
                group.start_soon(outbox.put, _progress(number))
        statistics = outbox.statistics()
        fractions = [report.fraction for _, report in outbox.after(0)]  # type: ignore[union-attr]
    assert statistics["reports"] == 50
    assert statistics["appends"] < 10
    assert fractions == [number / 100 for number in range(50)]


async def test_without_the_writer_each_put_is_its_own_append(tmp_path: Path) -> None:
    """Before the writer runs (or after it stopped), a put appends by itself and returns."""
    async with _outbox(tmp_path / "outbox.db", writer=False) as outbox:
        await outbox.put(_progress(1))
        await outbox.put(_progress(2))
        assert outbox.put_nowait(_progress(3)) is False
        assert outbox.statistics()["appends"] == 2


async def test_a_start_queued_without_waiting_goes_out_first_and_survives(tmp_path: Path) -> None:
    """put_nowait() queues a report ahead of what is put next; both are durable together."""
    path = tmp_path / "outbox.db"
    started = OutboxReport(report=AttemptStarted(pid=7, **IDENT))
    async with _outbox(path, writer=True) as outbox:
        assert outbox.put_nowait(started)
        await outbox.put(_progress(50))
        kinds = [type(report).__name__ for _, report in outbox.after(0)]
        assert outbox.statistics()["appends"] <= 2
    assert kinds == ["AttemptStarted", "AttemptProgress"]
    async with _outbox(path, writer=False) as reopened:
        assert [type(r).__name__ for _, r in reopened.after(0)] == kinds


async def test_acknowledgements_are_journaled_with_the_next_append(tmp_path: Path) -> None:
    """An acknowledgement is journaled (with the next batch, or alone), so a restart does not
    send acknowledged reports again."""
    path = tmp_path / "outbox.db"
    async with _outbox(path, writer=True) as outbox:
        for number in range(3):
            await outbox.put(_progress(number))
        _, second, third = (sequence for sequence, _ in outbox.after(0))
        acknowledged = outbox.acknowledged()
        outbox.acknowledge(second)
        await acknowledged.wait()
        await outbox.put(_progress(3))
    async with _outbox(path, writer=False) as reopened:
        assert next(sequence for sequence, _ in reopened.after(0)) == third
