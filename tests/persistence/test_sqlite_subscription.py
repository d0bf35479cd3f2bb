"""Subscriptions to an SQLite journal beyond the contract: what another process appends is seen
at this journal's next commit or, with ``poll_interval``, by polling; a read-only journal
follows a live file by polling."""

from __future__ import annotations

import sys
from pathlib import Path

import anyio
import pytest

from persistence import (
    Event,
    EventCodec,
    JournalError,
    RecordedEvent,
    Subscription,
    open_sqlite_journal,
)
from runtime import SystemClock

# A second process appending to the same file.
CHILD = """
import sys
import anyio
from persistence import Event, EventCodec, open_sqlite_journal
from runtime import SystemClock

class Noted(Event, frozen=True, kw_only=True, tag="follow.noted"):
    text: str

async def main(path: str, count: int) -> None:
    codec = EventCodec()
    codec.register(Noted)
    async with open_sqlite_journal(path, clock=SystemClock(), codec=codec) as journal:
        for n in range(count):
            await journal.append("other:1", [Noted(text=f"other {n}")])

anyio.run(main, sys.argv[1], int(sys.argv[2]))
"""


class Noted(Event, frozen=True, kw_only=True, tag="follow.noted"):
    text: str


def make_codec() -> EventCodec:
    codec = EventCodec()
    codec.register(Noted)
    return codec


async def append_from_another_process(path: Path, count: int) -> None:
    result = await anyio.run_process(
        [sys.executable, "-c", CHILD, str(path), str(count)], check=False
    )
    assert result.returncode == 0, result.stderr.decode()


async def collect(subscription: Subscription, count: int) -> list[RecordedEvent]:
    seen: list[RecordedEvent] = []
    async for batch in subscription:
        seen.extend(batch)
        if len(seen) >= count:
            break
    return seen


async def test_polling_sees_another_process_appends(tmp_path: Path) -> None:
    """With poll_interval, a subscriber sees rows another process committed to the file
    although this journal commits nothing."""
    path = tmp_path / "j.db"
    async with open_sqlite_journal(path, clock=SystemClock(), codec=make_codec()) as journal:
        await journal.append("mine:1", [Noted(text="mine")])
        with anyio.fail_after(60):
            async with journal.subscribe(after=1, poll_interval=0.05) as subscription:
                await append_from_another_process(path, 5)
                seen = await collect(subscription, 5)
    assert [(r.position, r.stream_id) for r in seen] == [(n, "other:1") for n in range(2, 7)]


async def test_another_process_appends_are_seen_at_the_next_own_commit(tmp_path: Path) -> None:
    """Without polling, a subscriber sees another process's rows when this journal next
    commits (its writer moves past them), in position order with its own."""
    path = tmp_path / "j.db"
    async with open_sqlite_journal(path, clock=SystemClock(), codec=make_codec()) as journal:
        await journal.append("mine:1", [Noted(text="first")])
        with anyio.fail_after(60):
            async with journal.subscribe(after=1) as subscription:
                await append_from_another_process(path, 3)
                result = await journal.append("mine:1", [Noted(text="second")])
                seen = await collect(subscription, 4)
    assert result.first_position == 5
    assert [(r.position, r.stream_id) for r in seen] == [
        (2, "other:1"),
        (3, "other:1"),
        (4, "other:1"),
        (5, "mine:1"),
    ]


async def test_a_read_only_journal_follows_a_live_file_by_polling(tmp_path: Path) -> None:
    """A read-only journal (no writer of its own) follows the commits of the process that
    writes the file when it polls."""
    path = tmp_path / "j.db"
    codec = make_codec()
    async with open_sqlite_journal(path, clock=SystemClock(), codec=codec) as writer:
        await writer.append("w:1", [Noted(text="before")])
        async with open_sqlite_journal(
            path, clock=SystemClock(), codec=codec, read_only=True
        ) as reader:
            with anyio.fail_after(30):
                async with reader.subscribe(poll_interval=0.02) as subscription:
                    first = await collect(subscription, 1)
                    await writer.append("w:1", [Noted(text="after")])
                    second = await collect(subscription, 1)
    assert [r.event for r in first + second] == [Noted(text="before"), Noted(text="after")]


async def test_poll_interval_must_be_positive(tmp_path: Path) -> None:
    """A poll interval that is not a positive number of seconds is refused."""
    async with open_sqlite_journal(
        tmp_path / "j.db", clock=SystemClock(), codec=make_codec()
    ) as journal:
        for bad in (0, -1.0):
            with pytest.raises(JournalError, match="poll_interval"):
                journal.subscribe(poll_interval=bad)
