"""The child process of ``test_journal_crash``: append in groups until killed.

Usage: ``python journal_crash_child.py DB SEED``.  Prints ``ready`` once the journal is open,
then, after each append returns (its commit is durable), one line per event:
``ack POSITION STREAM VERSION``.  Four writers append groups of 1-6 events with
``expected_version`` and save a snapshot now and then.
"""

from __future__ import annotations

import hashlib
import random
import sys

import anyio
import msgspec

from persistence import Event, EventCodec, open_sqlite_journal
from runtime import SystemClock, configure_logging

WRITERS = 4


class Written(Event, frozen=True, kw_only=True, tag="crash.written"):
    writer: int
    seq: int
    filler: str
    check: str


class Progress(msgspec.Struct, frozen=True):
    writer: int
    seq: int


def checksum(writer: int, seq: int, filler: str) -> str:
    """Return the digest that proves a record was stored whole."""
    return hashlib.sha256(f"{writer}:{seq}:{filler}".encode()).hexdigest()


def make_codec() -> EventCodec:
    """Return the codec both the child and the test use."""
    codec = EventCodec()
    codec.register(Written)
    return codec


def written(writer: int, seq: int, rng: random.Random) -> Written:
    filler = "x" * rng.randrange(0, 3000)
    return Written(writer=writer, seq=seq, filler=filler, check=checksum(writer, seq, filler))


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

        async with anyio.create_task_group() as task_group:
            for index in range(WRITERS):
                task_group.start_soon(writer, index)


if __name__ == "__main__":
    configure_logging(renderer="console", level="warning")  # logs to stderr, not stdout
    anyio.run(run, sys.argv[1], int(sys.argv[2]))
