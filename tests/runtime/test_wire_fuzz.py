"""A seeded storm of malformed frames: the server rejects each bad connection and serves on.

Half of the connections misbehave before authenticating (garbage where the handshake should
be, half-valid handshakes), half after (bad frames behind a genuine handshake and a few good
messages).  Every one of them must be rejected, counted and logged exactly once, and a
well-behaved client must still be served afterwards.
"""

from __future__ import annotations

import random
import struct
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

import anyio
import msgspec
import structlog
from anyio.abc import ByteStream, SocketStream

from runtime._message import Message
from runtime._wire import Connection, FrameCodec
from runtime._wire_errors import WireError
from runtime._wire_net import WireServer, open_connection, open_server

TOKEN = b"fuzzing-token-0123456789"
LIMIT = 2048
CONNECTIONS = 2000
WORKERS = 16
SEED = 20260101


class Ping(Message, frozen=True, kw_only=True, forbid_unknown_fields=True, tag="fuzz.ping"):
    seq: int


class Note(Message, frozen=True, kw_only=True, forbid_unknown_fields=True, tag="fuzz.note"):
    text: str
    tags: tuple[str, ...] = ()


FuzzMessage = Ping | Note
CODEC: FrameCodec[FuzzMessage] = FrameCodec(FuzzMessage, max_frame_size=LIMIT)


def frame(payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + payload


def random_bytes(rng: random.Random) -> bytes:
    return rng.randbytes(rng.randrange(1, 64))


def truncated_header(rng: random.Random) -> bytes:
    return rng.randbytes(rng.randrange(1, 4))


def oversize_header(rng: random.Random) -> bytes:
    return struct.pack(">I", rng.randrange(LIMIT + 1, 2**32)) + rng.randbytes(rng.randrange(33))


def truncated_body(rng: random.Random) -> bytes:
    size = rng.randrange(1, LIMIT + 1)
    return struct.pack(">I", size) + rng.randbytes(rng.randrange(min(size, 512)))


def garbage_body(rng: random.Random) -> bytes:
    return frame(rng.randbytes(rng.randrange(0, 256)))


def junk_value(rng: random.Random, depth: int = 0) -> object:
    kinds: list[Callable[[], object]] = [
        lambda: rng.randrange(-(2**63), 2**63),
        lambda: rng.random(),
        lambda: rng.randbytes(rng.randrange(8)).hex(),
        lambda: rng.randbytes(rng.randrange(8)),
        lambda: None,
        lambda: rng.random() < 0.5,
    ]
    if depth < 2:
        kinds.append(lambda: [junk_value(rng, depth + 1) for _ in range(rng.randrange(4))])
        kinds.append(lambda: {str(i): junk_value(rng, depth + 1) for i in range(rng.randrange(4))})
    return rng.choice(kinds)()


def wrong_shape(rng: random.Random) -> bytes:
    """Valid msgpack that is not a valid message: junk, bad tags, bad or extra fields."""
    shapes: list[Callable[[], object]] = [
        lambda: junk_value(rng),
        lambda: {"type": rng.choice(["fuzz.pong", "", "wire.nope"]), "seq": 1},
        lambda: {"type": "fuzz.ping"},
        lambda: {"type": "fuzz.ping", "seq": rng.choice([1.5, "1", b"1", None, [1], {}])},
        lambda: {"type": "fuzz.ping", "seq": 1, rng.randbytes(3).hex(): 1},
        lambda: {"type": "fuzz.note", "text": "t", "tags": rng.choice([1, "a", [1], [None], {}])},
        lambda: {
            "type": "wire.client_hello",
            "version": 1,
            "role": "agent",
            "name": "x",
            "nonce": rng.randbytes(rng.choice([0, 31, 33])),
        },
        lambda: {"type": "wire.client_proof", "proof": rng.randbytes(32)},
    ]
    return frame(msgspec.msgpack.encode(rng.choice(shapes)()))


def forged_handshake(rng: random.Random) -> bytes:
    """A well-formed hello followed, without waiting, by a proof made up without the token."""
    hello = {
        "type": "wire.client_hello",
        "version": 1,
        "role": "agent",
        "name": f"forger-{rng.randrange(100)}",
        "nonce": rng.randbytes(32),
    }
    proof = {"type": "wire.client_proof", "proof": rng.randbytes(32)}
    return frame(msgspec.msgpack.encode(hello)) + frame(msgspec.msgpack.encode(proof))


PRE_AUTH = [
    random_bytes,
    truncated_header,
    oversize_header,
    truncated_body,
    garbage_body,
    wrong_shape,
    forged_handshake,
]
POST_AUTH = [
    random_bytes,
    truncated_header,
    oversize_header,
    truncated_body,
    garbage_body,
    wrong_shape,
]


@dataclass(frozen=True)
class Plan:
    authenticate: bool
    good_messages: int
    kind: str
    payload: bytes


def make_plans(rng: random.Random) -> list[Plan]:
    plans = []
    for _ in range(CONNECTIONS):
        authenticate = rng.random() < 0.5
        make = rng.choice(POST_AUTH if authenticate else PRE_AUTH)
        good = rng.randrange(3) if authenticate else 0
        payload = make(rng)
        while authenticate and starts_with_a_valid_message(payload):
            payload = make(rng)
        plans.append(Plan(authenticate, good, make.__name__, payload))
    return plans


def starts_with_a_valid_message(payload: bytes) -> bool:
    """Whether random bytes happen to begin with a complete, valid frame (then redraw)."""
    if len(payload) < 4:
        return False
    (size,) = struct.unpack(">I", payload[:4])
    if size > LIMIT or len(payload) < 4 + size:
        return False
    try:
        CODEC.decode(payload[4 : 4 + size])
    except WireError:
        return False
    return True


async def misbehave(raw: ByteStream, payload: bytes) -> None:
    """Send the bad bytes, half-close, and read until the server closes the connection."""
    try:
        await raw.send(payload)
        await raw.send_eof()
        while True:
            await raw.receive()
    except (anyio.EndOfStream, anyio.BrokenResourceError, anyio.ClosedResourceError):
        return


async def run_plan(server: WireServer, plan: Plan, index: int) -> None:
    if not plan.authenticate:
        async with await anyio.connect_tcp(server.host, server.port) as stream:
            await misbehave(stream, plan.payload)
        return
    async with open_connection(
        server.host, server.port, codec=CODEC, token=TOKEN, name=f"fuzz-{index}"
    ) as conn:
        for seq in range(plan.good_messages):
            await conn.send(Ping(seq=seq))
            assert await conn.receive() == Ping(seq=seq)
        raw = conn.transport_stream
        assert isinstance(raw, SocketStream)
        await misbehave(raw, plan.payload)


async def echo(conn: Connection[FuzzMessage]) -> None:
    async for message in conn:
        await conn.send(message)


async def test_thousands_of_malformed_frames_leave_the_server_serving() -> None:
    """Each of 2,000 seeded malformed connections is rejected and logged once; service goes on."""
    plans = make_plans(random.Random(SEED))
    assert {plan.kind for plan in plans} == {make.__name__ for make in PRE_AUTH}

    async def worker(first: int) -> None:
        for index in range(first, len(plans), WORKERS):
            await run_plan(server, plans[index], index)

    with structlog.testing.capture_logs() as logs, anyio.fail_after(60):
        async with open_server(handler=echo, codec=CODEC, token=TOKEN) as server:
            async with anyio.create_task_group() as tg:
                for first in range(WORKERS):
                    tg.start_soon(worker, first)
            async with open_connection(
                server.host, server.port, codec=CODEC, token=TOKEN, name="well-behaved"
            ) as conn:
                for seq in range(10):
                    await conn.send(Note(text=f"still serving {seq}", tags=("ok",)))
                    assert await conn.receive() == Note(text=f"still serving {seq}", tags=("ok",))
                stats = server.statistics()

    assert stats.connections_rejected == CONNECTIONS
    assert stats.handler_failures == 0
    assert stats.connections_accepted == CONNECTIONS + 1
    assert stats.connections_authenticated == sum(plan.authenticate for plan in plans) + 1
    assert stats.connections_active == 1
    rejected = [entry for entry in logs if entry["event"] == "wire_connection_rejected"]
    assert len(rejected) == CONNECTIONS
    assert not [entry for entry in logs if entry["event"] == "wire_handler_failed"]
    errors = Counter(entry["error"] for entry in rejected)
    assert set(errors) == {
        "AuthenticationError",
        "FrameTooLargeError",
        "TruncatedFrameError",
        "FrameDecodeError",
        "FrameValidationError",
    }
    assert errors["AuthenticationError"] == sum(not plan.authenticate for plan in plans)
