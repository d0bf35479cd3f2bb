"""The child process of ``test_journal_crash``: append in groups until killed.

Usage: ``python journal_crash_child.py DB SEED``.  Prints ``ready`` once the journal is open,
then, after each append returns (its commit is durable), one line per event:
``ack POSITION STREAM VERSION``.  Four writers append groups of 1-6 events with
``expected_version`` and save a snapshot now and then; two more make atomic multi-stream
appends (``append_many``) to 2-5 of their own streams, 1-3 events each, every event carrying
its multi-append's id and size, so the test can tell a whole one from a partial one.
"""

from __future__ import annotations

import hashlib
import random
import sys

import anyio
import msgspec

from persistence import Event, EventCodec, StreamAppend, open_sqlite_journal
from runtime import SystemClock, configure_logging

WRITERS = 4
LINKERS = 2
LINKED_STREAMS = 6  # per linker


class Written(Event, frozen=True, kw_only=True, tag="crash.written"):
    writer: int
    seq: int
    filler: str
    check: str


class Linked(Event, frozen=True, kw_only=True, tag="crash.linked"):
    batch: str
    index: int
    size: int
    filler: str
    check: str


class Progress(msgspec.Struct, frozen=True):
    writer: int
    seq: int


def checksum(writer: int, seq: int, filler: str) -> str:
    """Return the digest that proves a record was stored whole."""
    return hashlib.sha256(f"{writer}:{seq}:{filler}".encode()).hexdigest()


def linked_checksum(batch: str, index: int, size: int, filler: str) -> str:
    """Return the digest that proves a linked record was stored whole."""
    return hashlib.sha256(f"{batch}:{index}:{size}:{filler}".encode()).hexdigest()


def make_codec() -> EventCodec:
    """Return the codec both the child and the test use."""
    codec = EventCodec()
    codec.register(Written)
    codec.register(Linked)
    return codec


def written(writer: int, seq: int, rng: random.Random) -> Written:
    filler = "x" * rng.randrange(0, 3000)
    return Written(writer=writer, seq=seq, filler=filler, check=checksum(writer, seq, filler))


def linked_appends(
    batch: str, streams: list[str], versions: dict[str, int], rng: random.Random
) -> tuple[list[StreamAppend], list[int]]:
    """Return one multi-stream append over 2-5 of ``streams`` and its per-stream sizes."""
    chosen = rng.sample(streams, rng.randint(2, 5))
    sizes = [rng.randint(1, 3) for _ in chosen]
    size = sum(sizes)
    index = 0
    appends = []
    for stream_id, length in zip(chosen, sizes, strict=True):
        events: list[Event] = []
        for _ in range(length):
            filler = "y" * rng.randrange(0, 3000)
            check = linked_checksum(batch, index, size, filler)
            events.append(Linked(batch=batch, index=index, size=size, filler=filler, check=check))
            index += 1
        appends.append(
            StreamAppend(stream_id=stream_id, events=events, expected_version=versions[stream_id])
        )
    return appends, sizes


async def run(path: str, seed: int) -> None:
    async with open_sqlite_journal(path, clock=SystemClock(), codec=make_codec()) as journal:
        print("ready", flush=True)

        async def writer(index: int) -> None:
            rng = random.Random(seed * 1000 + index)
            stream_id = f"crash:{index}"
            version = await journal.stream_version(stream_id)
            while True:
                events = [written(index, version + i + 1, rng) for i in range(rng.randint(1, 6))]
                result = await journal.append(stream_id, events, expected_version=version)
                first_version = version + 1
                version = result.version
                lines = [
                    f"ack {result.first_position + i} {stream_id} {first_version + i}"
                    for i in range(len(events))
                ]
                print("\n".join(lines), flush=True)
                if rng.random() < 0.1:
                    await journal.save_snapshot(
                        stream_id, version=version, state=Progress(writer=index, seq=version)
                    )

        async def linker(index: int) -> None:
            rng = random.Random(seed * 1000 + 100 + index)
            streams = [f"linked:{index}-{n}" for n in range(LINKED_STREAMS)]
            versions = {stream_id: await journal.stream_version(stream_id) for stream_id in streams}
            count = 0
            while True:
                count += 1
                appends, sizes = linked_appends(f"{seed}-{index}-{count}", streams, versions, rng)
                results = await journal.append_many(appends)
                lines: list[str] = []
                for result, length in zip(results, sizes, strict=True):
                    first_version = result.version - length + 1
                    lines.extend(
                        f"ack {result.first_position + i} {result.stream_id} {first_version + i}"
                        for i in range(length)
                    )
                    versions[result.stream_id] = result.version
                print("\n".join(lines), flush=True)

        async with anyio.create_task_group() as task_group:
            for index in range(WRITERS):
                task_group.start_soon(writer, index)
            for index in range(LINKERS):
                task_group.start_soon(linker, index)


if __name__ == "__main__":
    configure_logging(renderer="console", level="warning")  # logs to stderr, not stdout
    anyio.run(run, sys.argv[1], int(sys.argv[2]))
