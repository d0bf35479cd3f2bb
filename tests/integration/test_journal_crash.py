"""Crash safety: SIGKILL a process that appends to a journal, at random moments, many times.

Every event the child acknowledged (it prints each one only after ``append`` or
``append_many`` returned) must be in the journal exactly once, in order, whole; unacknowledged
commits may be there too; a multi-stream append is there whole (every event of it, at
consecutive positions) or not at all, wherever the kill fell; every event passes its checksum;
and a new process must be able to carry on appending where the journal left off.
"""

from __future__ import annotations

import importlib.util
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import ModuleType

import anyio
import pytest

from persistence import (
    RecordedEvent,
    SQLiteJournal,
    check_sqlite_journal,
    open_sqlite_journal,
)
from runtime import SystemClock

CHILD = Path(__file__).with_name("journal_crash_child.py")
ROUNDS = 30


def load_child() -> ModuleType:
    spec = importlib.util.spec_from_file_location("journal_crash_child", CHILD)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


child = load_child()


def run_and_kill(
    path: Path, seed: int, acks_before_kill: int, delay: float, log: Path
) -> list[str]:
    """Start the child, let it acknowledge some events, SIGKILL it; return its ack lines."""
    with log.open("w") as stderr:
        process = subprocess.Popen(
            [sys.executable, str(CHILD), str(path), str(seed)],
            stdout=subprocess.PIPE,
            stderr=stderr,
            text=True,
        )
        assert process.stdout is not None
        lines: list[str] = []
        try:
            ready = process.stdout.readline()
            assert ready == "ready\n", f"child did not start: {ready!r}; {log.read_text()}"
            while len(lines) < acks_before_kill:
                line = process.stdout.readline()
                assert line, f"child stopped early: {log.read_text()}"
                lines.append(line)
            if delay:
                time.sleep(delay)  # a random extra moment, not synchronisation
        finally:
            process.send_signal(signal.SIGKILL)
            process.wait(timeout=30)
        # Everything the child flushed before it died was acknowledged too.
        lines.extend(process.stdout.readlines())
        process.stdout.close()
    assert process.returncode == -signal.SIGKILL
    return lines


async def verify(path: Path, acknowledged: dict[int, tuple[str, int]]) -> tuple[int, int]:
    """Check the journal against the acknowledged events; return the last position and the
    number of multi-stream appends in it."""
    check = await check_sqlite_journal(path)
    assert check.ok, f"every checksum and SQLite's own check pass: {check}"
    async with open_sqlite_journal(path, clock=SystemClock(), codec=child.make_codec()) as j:
        last = await check_journal(j, acknowledged)
        records = [record async for batch in j.read_all() for record in batch]
    return last, check_linked(records)


def check_linked(records: list[RecordedEvent]) -> int:
    """Assert that every multi-stream append is whole; return how many there are."""
    batches: dict[str, list[tuple[int, int, int]]] = {}
    for record in records:
        event = record.event
        if isinstance(event, child.Linked):
            batches.setdefault(event.batch, []).append((record.position, event.index, event.size))
    for batch, parts in batches.items():
        size = parts[0][2]
        positions = [position for position, _, _ in parts]
        assert len(parts) == size, f"multi-stream append {batch}: {len(parts)} of {size} events"
        assert positions == list(range(positions[0], positions[0] + size)), f"{batch} interleaved"
        assert [index for _, index, _ in parts] == list(range(size))
    return len(batches)


async def check_journal(journal: SQLiteJournal, acknowledged: dict[int, tuple[str, int]]) -> int:
    records = [record async for batch in journal.read_all() for record in batch]
    positions = [record.position for record in records]
    assert positions == list(range(1, len(records) + 1)), "positions must be gapless"
    versions: dict[str, int] = {}
    for record in records:
        event = record.event
        expected_version = versions.get(record.stream_id, 0) + 1
        assert record.version == expected_version, f"stream out of order at {record.position}"
        versions[record.stream_id] = expected_version
        if isinstance(event, child.Linked):
            assert record.stream_id.startswith("linked:")
            assert event.check == child.linked_checksum(
                event.batch, event.index, event.size, event.filler
            ), "torn"
            continue
        assert isinstance(event, child.Written)
        assert record.stream_id == f"crash:{event.writer}"
        assert event.seq == record.version, "each version appended exactly once"
        assert event.check == child.checksum(event.writer, event.seq, event.filler), "torn"
    for position, (stream_id, version) in acknowledged.items():
        assert position <= len(records), f"acknowledged position {position} is missing"
        record = records[position - 1]
        assert (record.stream_id, record.version) == (stream_id, version)
    for stream_id, version in versions.items():
        if not stream_id.startswith("crash:"):
            continue
        loaded = await journal.load_snapshot(stream_id, child.Progress)
        if loaded is not None:
            assert loaded[0] <= version
            assert loaded[1].seq == loaded[0]
    return len(records)


def parse(lines: list[str], acknowledged: dict[int, tuple[str, int]]) -> int:
    count = 0
    for line in lines:
        tag, position, stream_id, version = line.split()
        assert tag == "ack"
        entry = (stream_id, int(version))
        assert acknowledged.setdefault(int(position), entry) == entry, "position reused"
        count += 1
    return count


@pytest.mark.slow
def test_acknowledged_events_survive_sigkill(tmp_path: Path) -> None:
    """After each of 30 SIGKILLs at random moments every acknowledged event is present once,
    in order and whole, every multi-stream append is whole or absent, every checksum passes,
    and appending carries on correctly."""
    rng = random.Random(20261127)
    path = tmp_path / "crash.db"
    acknowledged: dict[int, tuple[str, int]] = {}
    unacknowledged_commits = 0
    linked = 0
    for round_ in range(ROUNDS):
        acks = 0 if round_ % 5 == 0 else rng.randrange(1, 400)
        delay = rng.choice([0.0, rng.uniform(0, 0.005)])
        lines = run_and_kill(path, round_, acks, delay, tmp_path / f"child-{round_}.log")
        parse(lines, acknowledged)
        last, linked = anyio.run(verify, path, acknowledged)
        if last > max(acknowledged, default=0):
            unacknowledged_commits += 1
    assert len(acknowledged) > ROUNDS * 50
    assert linked > ROUNDS, "multi-stream appends must be among what the kills interrupted"
    # Appending continues where the journal left off, with correct versions and positions.

    async def carry_on() -> None:
        async with open_sqlite_journal(path, clock=SystemClock(), codec=child.make_codec()) as j:
            before = await j.last_position()
            version = await j.stream_version("crash:0")
            event = child.written(0, version + 1, random.Random(1))
            result = await j.append("crash:0", [event], expected_version=version)
            assert (result.first_position, result.version) == (before + 1, version + 1)
            await check_journal(j, acknowledged)

    anyio.run(carry_on)
    print(
        f"rounds={ROUNDS} acknowledged={len(acknowledged)} multi_stream_appends={linked} "
        f"rounds_with_unacknowledged_commits={unacknowledged_commits} pid={os.getpid()}"
    )
