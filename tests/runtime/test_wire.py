"""The wire layer: framing, connections, authentication, the server, TLS and token files.

Everything runs over real TCP on 127.0.0.1 with port 0.  Waits are bounded by ``fail_after``;
nothing sleeps to synchronise: a client learns the server is done with it when its receive
ends, and the server counts and logs a rejection before it closes the connection.
"""

from __future__ import annotations

import os
import random
import shutil
import stat
import struct
import subprocess
from collections.abc import AsyncIterator, MutableMapping
from contextlib import asynccontextmanager
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import anyio
import msgspec
import pytest
import structlog
from anyio.abc import ByteStream, SocketStream
from anyio.streams.tls import TLSStream

from runtime._errors import ConfigurationError
from runtime._message import Message
from runtime._wire import Connection, FrameCodec, _FrameStream
from runtime._wire_auth import (
    HANDSHAKE_CODEC,
    MIN_TOKEN_BYTES,
    ClientHello,
    ClientProof,
    ServerChallenge,
    ServerProof,
    create_token_file,
    load_token,
)
from runtime._wire_errors import (
    AuthenticationError,
    ConnectError,
    ConnectionClosedError,
    FrameDecodeError,
    FrameTooLargeError,
    FrameValidationError,
    TruncatedFrameError,
    WireError,
)
from runtime._wire_net import TLSConfig, WireServer, open_connection, open_server, serve

TOKEN = b"correct-horse-battery-staple-42"
WAIT = 10.0  # generous bound on every wait: a hang fails fast instead of at the test timeout


class Ping(Message, frozen=True, kw_only=True, forbid_unknown_fields=True, tag="test.ping"):
    seq: int


class Note(Message, frozen=True, kw_only=True, forbid_unknown_fields=True, tag="test.note"):
    text: str
    blob: bytes = b""


class Report(Message, frozen=True, kw_only=True, forbid_unknown_fields=True, tag="test.report"):
    sender: int
    seq: int
    data: bytes


class Shout(Message, frozen=True, kw_only=True, tag="test.shout"):
    """Lenient: unknown fields allowed, to show that is the message's choice."""

    words: tuple[str, ...]


TestMessage = Ping | Note | Report | Shout
CODEC: FrameCodec[TestMessage] = FrameCodec(TestMessage, max_frame_size=1 << 20)


async def echo(conn: Connection[TestMessage]) -> None:
    async for message in conn:
        await conn.send(message)


@asynccontextmanager
async def echo_server(**options: Any) -> AsyncIterator[WireServer]:
    settings: dict[str, Any] = {"handler": echo, "codec": CODEC, "token": TOKEN, **options}
    async with open_server(**settings) as server:
        yield server


def connect(server: WireServer, **options: Any) -> Any:
    settings: dict[str, Any] = {"codec": CODEC, "token": TOKEN, "name": "agent-1", **options}
    return open_connection(server.host, server.port, **settings)


async def drain_until_closed(stream: ByteStream) -> bytes:
    """Read until the server closes the connection; return what it sent."""
    received = bytearray()
    try:
        while True:
            received += await stream.receive()
    except (anyio.EndOfStream, anyio.BrokenResourceError):
        return bytes(received)


def rejections(logs: list[MutableMapping[str, Any]]) -> list[MutableMapping[str, Any]]:
    return [entry for entry in logs if entry["event"] == "wire_connection_rejected"]


# --- the codec -----------------------------------------------------------------------------


def test_codec_round_trips_each_message_type() -> None:
    """Every message of the union survives encode/decode, behind a correct length header."""
    messages: list[TestMessage] = [
        Ping(seq=7),
        Note(text="héllo", blob=b"\x00\xff"),
        Report(sender=1, seq=2, data=b"x" * 1000),
        Shout(words=("a", "b")),
    ]
    for message in messages:
        frame = CODEC.encode(message)
        (size,) = struct.unpack(">I", frame[:4])
        assert size == len(frame) - 4
        assert CODEC.decode(frame[4:]) == message


def test_codec_refuses_to_encode_an_oversized_message() -> None:
    """Encoding past the limit raises FrameTooLargeError with the size and the limit."""
    small: FrameCodec[TestMessage] = FrameCodec(TestMessage, max_frame_size=64)
    with pytest.raises(FrameTooLargeError) as caught:
        small.encode(Note(text="x" * 100), peer="1.2.3.4:5")
    assert caught.value.limit == 64
    assert caught.value.size > 64
    assert caught.value.peer == "1.2.3.4:5"


@pytest.mark.parametrize(
    ("payload", "error", "mentions"),
    [
        (b"\xc1", FrameDecodeError, "malformed"),
        (b"", FrameDecodeError, "truncated"),
        (msgspec.msgpack.encode({"type": "test.nope", "seq": 1}), FrameValidationError, "$.type"),
        (msgspec.msgpack.encode({"type": "test.ping"}), FrameValidationError, "seq"),
        (msgspec.msgpack.encode({"type": "test.ping", "seq": "1"}), FrameValidationError, "seq"),
        (
            msgspec.msgpack.encode({"type": "test.ping", "seq": 1, "extra": 2}),
            FrameValidationError,
            "extra",
        ),
        (msgspec.msgpack.encode([1, 2, 3]), FrameValidationError, "Expected `object`"),
    ],
)
def test_codec_decode_errors_are_precise(
    payload: bytes, error: type[FrameDecodeError], mentions: str
) -> None:
    """Garbage, unknown tags, missing/mistyped/unknown fields each raise a precise error."""
    with pytest.raises(error) as caught:
        CODEC.decode(payload, peer="p:1")
    assert type(caught.value) is error
    assert mentions in caught.value.reason
    assert caught.value.size == len(payload)


def test_codec_unknown_fields_are_the_message_classes_choice() -> None:
    """A message without forbid_unknown_fields accepts (and drops) unknown fields."""
    payload = msgspec.msgpack.encode({"type": "test.shout", "words": ["hi"], "volume": 11})
    assert CODEC.decode(payload) == Shout(words=("hi",))


@pytest.mark.parametrize("limit", [0, -1, 2**32])
def test_codec_rejects_an_impossible_limit(limit: int) -> None:
    """A frame limit outside 1..2**32-1 is a configuration error naming the option."""
    with pytest.raises(ConfigurationError, match="max_frame_size"):
        FrameCodec(TestMessage, max_frame_size=limit)


def test_codec_rejects_an_untagged_union() -> None:
    """A union msgspec cannot tell apart is refused when the codec is built."""

    class A(msgspec.Struct):
        x: int

    class B(msgspec.Struct):
        y: int

    with pytest.raises(ConfigurationError, match="message_type"):
        FrameCodec(A | B)


# --- connections over TCP ------------------------------------------------------------------


async def test_round_trip_of_several_message_types() -> None:
    """Messages of every type go out and come back intact; both ends know who the other is."""
    seen: list[tuple[str, str]] = []

    async def handler(conn: Connection[TestMessage]) -> None:
        seen.append((conn.remote_name, conn.remote_role))
        await echo(conn)

    messages: list[TestMessage] = [
        Ping(seq=1),
        Note(text="frame 12 done", blob=bytes(range(256))),
        Report(sender=3, seq=4, data=b"\x00" * 300_000),
        Shout(words=("render", "farm")),
    ]
    with anyio.fail_after(WAIT):
        async with (
            echo_server(handler=handler, name="coordinator") as server,
            connect(server, name="agent-7", role="cli") as conn,
        ):
            for message in messages:
                await conn.send(message)
            assert [await conn.receive() for _ in messages] == messages
            assert (conn.remote_name, conn.remote_role) == ("coordinator", "server")
            assert conn.peer == f"127.0.0.1:{server.port}"
            stats = conn.statistics()
    assert seen == [("agent-7", "cli")]
    # Two handshake frames each way, then the four messages each way.
    assert stats.frames_sent == stats.frames_received == 6
    assert stats.bytes_sent > 300_000
    assert stats.bytes_received > 300_000
    final = server.statistics()
    assert (final.connections_accepted, final.connections_authenticated) == (1, 1)
    assert (final.connections_rejected, final.handler_failures) == (0, 0)


async def test_serve_runs_under_tg_start_and_stops_with_aclose() -> None:
    """serve() reports the bound port through task_status; aclose() stops it and its peers."""
    async with anyio.create_task_group() as tg:
        server: WireServer = await tg.start(partial(serve, handler=echo, codec=CODEC, token=TOKEN))
        assert server.port > 0
        assert server.address == f"127.0.0.1:{server.port}"
        with anyio.fail_after(WAIT):
            async with connect(server) as conn:
                await conn.send(Ping(seq=1))
                assert await conn.receive() == Ping(seq=1)
                await server.aclose()
                with pytest.raises(ConnectionClosedError) as caught:
                    await conn.receive()
                assert caught.value.orderly
    assert server.statistics().connections_active == 0


@pytest.mark.parametrize("transport", ["plain", "tls"])
async def test_concurrent_senders_never_interleave_frames(
    transport: str, request: pytest.FixtureRequest
) -> None:
    """Many tasks sending large frames at once on one connection never interleave bytes."""
    tls_options: dict[str, Any] = {}
    client_options: dict[str, Any] = {}
    if transport == "tls":
        certs: Certificates = request.getfixturevalue("certs")
        tls_options = {"tls": certs.server_config()}
        client_options = {"tls": TLSConfig(cafile=certs.ca)}
    senders, per_sender = 8, 25
    rng = random.Random(1234)
    sizes = {
        (s, n): rng.choice([1, 100, 20_000, 150_000])
        for s in range(senders)
        for n in range(per_sender)
    }

    async def send_all(conn: Connection[TestMessage], sender: int) -> None:
        for seq in range(per_sender):
            size = sizes[sender, seq]
            await conn.send(Report(sender=sender, seq=seq, data=bytes([sender]) * size))

    with anyio.fail_after(WAIT * 3):
        async with (
            echo_server(**tls_options) as server,
            connect(server, **client_options) as conn,
            anyio.create_task_group() as tg,
        ):
            for sender in range(senders):
                tg.start_soon(send_all, conn, sender)
            next_seq = [0] * senders
            for _ in range(senders * per_sender):
                report = await conn.receive()
                assert isinstance(report, Report)
                assert report.seq == next_seq[report.sender]
                assert report.data == bytes([report.sender]) * sizes[report.sender, report.seq]
                next_seq[report.sender] += 1
    assert next_seq == [per_sender] * senders
    assert server.statistics().connections_rejected == 0


async def test_oversized_frame_closes_only_that_connection() -> None:
    """A frame over the server's limit closes that connection; another client is unaffected."""
    strict: FrameCodec[TestMessage] = FrameCodec(TestMessage, max_frame_size=1024)

    async def handler(conn: Connection[TestMessage]) -> None:
        await echo(conn)

    with structlog.testing.capture_logs() as logs, anyio.fail_after(WAIT):
        async with (
            echo_server(handler=handler, codec=strict) as server,
            connect(server, name="good") as good,
            connect(server, name="bad") as bad,
        ):
            await good.send(Ping(seq=1))
            assert await good.receive() == Ping(seq=1)
            await bad.send(Note(text="big", blob=b"b" * 10_000))
            with pytest.raises(ConnectionClosedError):
                await bad.receive()
            await good.send(Note(text="still here"))
            assert await good.receive() == Note(text="still here")
            stats = server.statistics()
    assert (stats.connections_rejected, stats.connections_authenticated) == (1, 2)
    [event] = rejections(logs)
    assert event["error"] == "FrameTooLargeError"
    assert event["name"] == "bad"
    assert event["limit"] == 1024
    assert event["size"] > 10_000
    assert event["peer"].startswith("127.0.0.1:")


async def test_send_of_an_oversized_message_raises_and_keeps_the_connection() -> None:
    """A message over our own limit is refused before anything is sent."""
    small: FrameCodec[TestMessage] = FrameCodec(TestMessage, max_frame_size=256)
    with anyio.fail_after(WAIT):
        async with echo_server() as server, connect(server, codec=small) as conn:
            with pytest.raises(FrameTooLargeError):
                await conn.send(Note(text="x" * 1000))
            await conn.send(Ping(seq=2))
            assert await conn.receive() == Ping(seq=2)


@dataclass(frozen=True)
class Malformed:
    name: str
    data: bytes
    error: str
    detail: str


MALFORMED_AFTER_AUTH = [
    Malformed("truncated body", struct.pack(">I", 100) + b"x" * 10, "TruncatedFrameError", "body"),
    Malformed("truncated header", b"\x00\x00", "TruncatedFrameError", "header"),
    Malformed(
        "garbage body", struct.pack(">I", 3) + b"\xc1\xc1\xc1", "FrameDecodeError", "malformed"
    ),
    Malformed(
        "unknown tag",
        CODEC.encode(Ping(seq=1)).replace(b"test.ping", b"test.pong"),
        "FrameValidationError",
        "test.pong",
    ),
    Malformed(
        "unknown field",
        (lambda p: struct.pack(">I", len(p)) + p)(
            msgspec.msgpack.encode({"type": "test.ping", "seq": 1, "sneaky": True})
        ),
        "FrameValidationError",
        "sneaky",
    ),
]


@pytest.mark.parametrize("case", MALFORMED_AFTER_AUTH, ids=lambda case: case.name)
async def test_malformed_frame_after_auth_is_rejected_and_logged_once(case: Malformed) -> None:
    """Truncated, garbage and invalid frames close that connection with a precise, logged error."""
    with structlog.testing.capture_logs() as logs, anyio.fail_after(WAIT):
        async with echo_server() as server, connect(server) as conn:
            await conn.send(Ping(seq=1))
            assert await conn.receive() == Ping(seq=1)
            raw = conn.transport_stream
            assert isinstance(raw, SocketStream)
            await raw.send(case.data)
            await raw.send_eof()
            await drain_until_closed(raw)
            stats = server.statistics()
    assert stats.connections_rejected == 1
    [event] = rejections(logs)
    assert event["error"] == case.error
    assert case.detail in event["reason"] or case.detail == event.get("part")


async def test_pipelined_messages_right_after_the_handshake_are_not_lost() -> None:
    """Messages sent back to back with the handshake are buffered and delivered in order."""
    with anyio.fail_after(WAIT):
        async with echo_server() as server, connect(server) as conn:
            for seq in range(100):
                await conn.send(Ping(seq=seq))
            assert [await conn.receive() for _ in range(100)] == [Ping(seq=n) for n in range(100)]


async def test_errors_in_the_server_block_are_not_wrapped() -> None:
    """An exception raised inside ``async with open_server()`` comes out as itself."""
    with anyio.fail_after(WAIT), pytest.raises(LookupError, match="mine"):
        async with echo_server():
            raise LookupError("mine")


async def test_receive_after_an_orderly_close_keeps_saying_so() -> None:
    """After the peer's clean close every receive says so; after aclose() sends are refused."""

    async def hang_up(conn: Connection[TestMessage]) -> None:
        await conn.receive()

    with anyio.fail_after(WAIT):
        async with echo_server(handler=hang_up) as server, connect(server) as conn:
            await conn.send(Ping(seq=1))
            for _ in range(2):
                with pytest.raises(ConnectionClosedError) as caught:
                    await conn.receive()
                assert caught.value.orderly
            assert [message async for message in conn] == []
            await conn.aclose()
            with pytest.raises(ConnectionClosedError, match="closed"):
                await conn.send(Ping(seq=2))


# --- authentication ------------------------------------------------------------------------


async def test_unauthenticated_frame_is_rejected_before_the_handler() -> None:
    """A message sent before the handshake is refused; the handler never sees the peer."""
    handled: list[str] = []

    async def handler(conn: Connection[TestMessage]) -> None:
        handled.append(conn.remote_name)

    with structlog.testing.capture_logs() as logs, anyio.fail_after(WAIT):
        async with echo_server(handler=handler) as server:
            async with await anyio.connect_tcp(server.host, server.port) as raw:
                await raw.send(CODEC.encode(Ping(seq=1)))
                await drain_until_closed(raw)
            stats = server.statistics()
    assert handled == []
    assert (stats.connections_rejected, stats.connections_authenticated) == (1, 0)
    [event] = rejections(logs)
    assert event["error"] == "AuthenticationError"
    assert "test.ping" in event["reason"]


async def test_wrong_token_is_rejected_on_both_sides() -> None:
    """A client with the wrong token is refused, and told so; nothing reaches the handler."""
    handled: list[str] = []

    async def handler(conn: Connection[TestMessage]) -> None:
        handled.append(conn.remote_name)
        await echo(conn)

    with structlog.testing.capture_logs() as logs, anyio.fail_after(WAIT):
        async with echo_server(handler=handler) as server:
            with pytest.raises(AuthenticationError) as caught:
                async with connect(server, token=b"not-the-right-token-at-all", name="mallory"):
                    pytest.fail("authenticated with the wrong token")
            async with connect(server) as conn:
                await conn.send(Ping(seq=3))
                assert await conn.receive() == Ping(seq=3)
            stats = server.statistics()
    assert "wrong token" in caught.value.reason
    assert handled == ["agent-1"]
    assert stats.connections_rejected == 1
    [event] = rejections(logs)
    assert (event["name"], event["reason"]) == ("mallory", "wrong token")


async def test_token_is_never_sent_on_the_wire() -> None:
    """Neither the client nor the server writes the token's bytes during the handshake."""
    sent = bytearray()

    class Recorder(ByteStream):
        def __init__(self, inner: SocketStream) -> None:
            self.inner = inner

        async def send(self, item: bytes) -> None:
            sent.extend(item)
            await self.inner.send(item)

        async def receive(self, max_bytes: int = 65536) -> bytes:
            data = await self.inner.receive(max_bytes)
            sent.extend(data)
            return data

        async def send_eof(self) -> None:
            await self.inner.send_eof()

        async def aclose(self) -> None:
            await self.inner.aclose()

    from runtime._wire_auth import client_handshake

    with anyio.fail_after(WAIT):
        async with echo_server() as server:
            raw = await anyio.connect_tcp(server.host, server.port)
            frames = _FrameStream(Recorder(raw), "test")
            try:
                challenge = await client_handshake(frames, token=TOKEN, role="agent", name="n")
            finally:
                await frames.aclose()
    assert challenge.name == "taskfarm"
    assert TOKEN not in sent
    assert len(sent) > 100


async def test_client_rejects_a_server_that_cannot_prove_the_token() -> None:
    """Authentication is mutual: an impostor server that accepts anyone is refused."""

    async def impostor(stream: SocketStream) -> None:
        frames = _FrameStream(stream, "client")
        async with stream:
            hello = HANDSHAKE_CODEC.decode(await frames.receive_payload(4096))
            assert isinstance(hello, ClientHello)
            challenge = ServerChallenge(version=1, name="evil", nonce=os.urandom(32))
            await frames.send_frame(HANDSHAKE_CODEC.encode(challenge))
            proof = HANDSHAKE_CODEC.decode(await frames.receive_payload(4096))
            assert isinstance(proof, ClientProof)
            await frames.send_frame(HANDSHAKE_CODEC.encode(ServerProof(proof=os.urandom(32))))
            await drain_until_closed(stream)

    with anyio.fail_after(WAIT):
        async with await anyio.create_tcp_listener(local_host="127.0.0.1") as listener:
            port = listener.extra(anyio.abc.SocketAttribute.local_port)
            async with anyio.create_task_group() as tg:
                tg.start_soon(listener.serve, impostor)
                with pytest.raises(AuthenticationError) as caught:
                    async with open_connection(
                        "127.0.0.1", port, codec=CODEC, token=TOKEN, name="agent-1"
                    ):
                        pytest.fail("trusted an impostor")
                tg.cancel_scope.cancel()
    assert "could not prove" in caught.value.reason
    assert caught.value.name == "evil"


async def test_silent_client_is_rejected_after_the_handshake_timeout() -> None:
    """A peer that connects and says nothing is cut off after the handshake timeout."""
    with structlog.testing.capture_logs() as logs, anyio.fail_after(WAIT):
        async with echo_server(handshake_timeout=0.2) as server:
            async with await anyio.connect_tcp(server.host, server.port) as raw:
                await drain_until_closed(raw)
            stats = server.statistics()
    assert stats.connections_rejected == 1
    [event] = rejections(logs)
    assert "timed out" in event["reason"]


async def test_client_handshake_times_out_against_a_mute_server() -> None:
    """open_connection() gives up after its handshake timeout if the server never answers."""

    async def mute(stream: SocketStream) -> None:
        async with stream:
            await anyio.sleep_forever()

    with anyio.fail_after(WAIT):
        async with (
            await anyio.create_tcp_listener(local_host="127.0.0.1") as listener,
            anyio.create_task_group() as tg,
        ):
            port = listener.extra(anyio.abc.SocketAttribute.local_port)
            tg.start_soon(listener.serve, mute)
            with pytest.raises(AuthenticationError, match="timed out"):
                async with open_connection(
                    "127.0.0.1", port, codec=CODEC, token=TOKEN, name="a", handshake_timeout=0.2
                ):
                    pass
            tg.cancel_scope.cancel()


async def test_connection_refused_raises_connect_error() -> None:
    """Connecting to a port nobody listens on raises ConnectError naming the address."""
    listener = await anyio.create_tcp_listener(local_host="127.0.0.1")
    port = listener.extra(anyio.abc.SocketAttribute.local_port)
    await listener.aclose()
    with anyio.fail_after(WAIT), pytest.raises(ConnectError) as caught:
        async with open_connection("127.0.0.1", port, codec=CODEC, token=TOKEN, name="a"):
            pass
    assert caught.value.peer == f"127.0.0.1:{port}"


async def test_handler_exception_closes_only_that_connection() -> None:
    """A handler that crashes on one connection is logged once; the server serves on."""

    async def handler(conn: Connection[TestMessage]) -> None:
        async for message in conn:
            if message == Ping(seq=13):
                raise ValueError("unlucky")
            await conn.send(message)

    with structlog.testing.capture_logs() as logs, anyio.fail_after(WAIT):
        async with (
            echo_server(handler=handler) as server,
            connect(server, name="a") as a,
            connect(server, name="b") as b,
        ):
            await a.send(Ping(seq=13))
            with pytest.raises(ConnectionClosedError):
                await a.receive()
            await b.send(Ping(seq=1))
            assert await b.receive() == Ping(seq=1)
            stats = server.statistics()
    assert (stats.handler_failures, stats.connections_rejected) == (1, 0)
    [event] = [entry for entry in logs if entry["event"] == "wire_handler_failed"]
    assert (event["name"], event["reason"]) == ("a", "ValueError: unlucky")
    assert rejections(logs) == []


async def test_protocol_error_inside_a_handler_task_group_counts_as_rejected() -> None:
    """A bad frame surfacing through the handler's own task group is still a rejection."""

    async def handler(conn: Connection[TestMessage]) -> None:
        async with anyio.create_task_group() as tg:
            tg.start_soon(echo, conn)

    with structlog.testing.capture_logs() as logs, anyio.fail_after(WAIT):
        async with echo_server(handler=handler) as server, connect(server) as conn:
            raw = conn.transport_stream
            assert isinstance(raw, SocketStream)
            await raw.send(b"\x00\x00\x00\x01\xc1")
            await drain_until_closed(raw)
            stats = server.statistics()
    assert (stats.connections_rejected, stats.handler_failures) == (1, 0)
    assert [event["error"] for event in rejections(logs)] == ["FrameDecodeError"]


async def test_connection_limit_rejects_the_extra_connection() -> None:
    """Past max_connections a new connection is closed at once; existing ones carry on."""
    with structlog.testing.capture_logs() as logs, anyio.fail_after(WAIT):
        async with echo_server(max_connections=1) as server, connect(server) as first:
            with pytest.raises(AuthenticationError):
                async with connect(server, name="second"):
                    pass
            await first.send(Ping(seq=1))
            assert await first.receive() == Ping(seq=1)
    [event] = rejections(logs)
    assert "too many connections" in event["reason"]


# --- cancel-safety, with a stream whose deliveries the test controls --------------------------


class ScriptedStream(ByteStream):
    """Delivers chunks the test feeds; announces each time a receive blocks."""

    def __init__(self) -> None:
        self.send_chunks, self.chunks = anyio.create_memory_object_stream[bytes](16)
        self.blocked = anyio.Event()

    async def receive(self, max_bytes: int = 65536) -> bytes:
        try:
            return self.chunks.receive_nowait()
        except anyio.WouldBlock:
            self.blocked.set()
            return await self.chunks.receive()

    async def send(self, item: bytes) -> None:
        raise NotImplementedError

    async def send_eof(self) -> None:
        raise NotImplementedError

    async def aclose(self) -> None:
        self.send_chunks.close()
        self.chunks.close()


async def test_cancelled_receive_resumes_the_same_frame() -> None:
    """A receive cancelled mid-frame loses no bytes: the next receive completes that frame."""
    stream = ScriptedStream()
    frames = _FrameStream(stream, "scripted")
    frame = CODEC.encode(Note(text="resume me", blob=b"z" * 100))
    with anyio.fail_after(WAIT):
        async with frames.stream:
            stream.send_chunks.send_nowait(frame[:2])
            stream.send_chunks.send_nowait(frame[2:50])
            with anyio.CancelScope() as scope:
                async with anyio.create_task_group() as tg:
                    tg.start_soon(frames.receive_payload, 1024)
                    # Wait for the reader to have consumed both chunks and blocked for more.
                    while not (
                        stream.blocked.is_set()
                        and stream.chunks.statistics().current_buffer_used == 0
                    ):
                        stream.blocked = anyio.Event()
                        await stream.blocked.wait()
                    scope.cancel()
            stream.send_chunks.send_nowait(frame[50:])
            assert CODEC.decode(await frames.receive_payload(1024)) == Note(
                text="resume me", blob=b"z" * 100
            )


async def test_concurrent_receivers_are_refused() -> None:
    """A second task receiving on the same connection fails loudly instead of corrupting it."""
    stream = ScriptedStream()
    frames = _FrameStream(stream, "scripted")
    with anyio.fail_after(WAIT):
        async with frames.stream, anyio.create_task_group() as tg:
            tg.start_soon(frames.receive_payload, 1024)
            await stream.blocked.wait()
            with pytest.raises(anyio.BusyResourceError):
                await frames.receive_payload(1024)
            tg.cancel_scope.cancel()


# --- TLS ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Certificates:
    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    rogue_ca: Path

    def server_config(self, *, require_client_cert: bool = False) -> TLSConfig:
        return TLSConfig(
            certfile=self.server_cert,
            keyfile=self.server_key,
            cafile=self.ca if require_client_cert else None,
        )


def _openssl(*args: str | Path, cwd: Path) -> None:
    subprocess.run(["openssl", *map(str, args)], cwd=cwd, check=True, capture_output=True)


def _issue(folder: Path, name: str, ca: str, usage: str, san: str) -> None:
    (folder / f"{name}.ext").write_text(
        f"basicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature\n"
        f"extendedKeyUsage={usage}\nsubjectAltName={san}\n"
        "subjectKeyIdentifier=hash\nauthorityKeyIdentifier=keyid,issuer\n"
    )
    _openssl(
        "req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
        "-keyout", f"{name}.key", "-out", f"{name}.csr", "-subj", f"/CN={name}",
        cwd=folder,
    )  # fmt: skip
    _openssl(
        "x509", "-req", "-in", f"{name}.csr", "-CA", f"{ca}.pem", "-CAkey", f"{ca}.key",
        "-set_serial", str(random.Random(name).randrange(1, 2**63)), "-days", "2",
        "-extfile", f"{name}.ext", "-out", f"{name}.pem",
        cwd=folder,
    )  # fmt: skip


def _make_ca(folder: Path, name: str) -> None:
    _openssl(
        "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
        "-keyout", f"{name}.key", "-out", f"{name}.pem", "-days", "2", "-subj", f"/CN={name}",
        "-addext", "basicConstraints=critical,CA:TRUE",
        "-addext", "keyUsage=critical,keyCertSign,cRLSign",
        cwd=folder,
    )  # fmt: skip


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Certificates:
    """A test CA, a server certificate for 127.0.0.1, a client certificate, a rogue CA."""
    if shutil.which("openssl") is None:
        pytest.skip("the openssl CLI is needed to generate test certificates")
    folder = tmp_path_factory.mktemp("certs")
    _make_ca(folder, "ca")
    _make_ca(folder, "rogue-ca")
    _issue(folder, "server", "ca", "serverAuth", "IP:127.0.0.1,DNS:localhost")
    _issue(folder, "client", "ca", "clientAuth", "DNS:agent-1")
    return Certificates(
        ca=folder / "ca.pem",
        server_cert=folder / "server.pem",
        server_key=folder / "server.key",
        client_cert=folder / "client.pem",
        client_key=folder / "client.key",
        rogue_ca=folder / "rogue-ca.pem",
    )


async def test_tls_round_trip_with_authentication_inside(certs: Certificates) -> None:
    """Over TLS the messages round-trip, and the token handshake still runs inside TLS."""
    with anyio.fail_after(WAIT):
        async with (
            echo_server(tls=certs.server_config()) as server,
            connect(server, tls=TLSConfig(cafile=certs.ca)) as conn,
        ):
            assert server.tls
            assert isinstance(conn.transport_stream, TLSStream)
            await conn.send(Note(text="secret frame"))
            assert await conn.receive() == Note(text="secret frame")
            with pytest.raises(AuthenticationError, match="wrong token"):
                async with connect(server, tls=TLSConfig(cafile=certs.ca), token=b"w" * 20):
                    pass


async def test_plain_client_against_tls_server_fails_cleanly(certs: Certificates) -> None:
    """A client without TLS is refused at once by a TLS server, which carries on serving."""
    with structlog.testing.capture_logs() as logs, anyio.fail_after(WAIT):
        async with echo_server(tls=certs.server_config()) as server:
            with pytest.raises(AuthenticationError):
                async with connect(server):
                    pass
            async with connect(server, tls=TLSConfig(cafile=certs.ca)) as conn:
                await conn.send(Ping(seq=1))
                assert await conn.receive() == Ping(seq=1)
    [event] = rejections(logs)
    assert "TLS handshake failed" in event["reason"]


async def test_tls_client_against_plain_server_fails_cleanly(certs: Certificates) -> None:
    """A TLS client talking to a plain server gets an AuthenticationError, not a hang."""
    with anyio.fail_after(WAIT):
        async with echo_server() as server:
            with pytest.raises(AuthenticationError, match="TLS handshake failed"):
                async with connect(server, tls=TLSConfig(cafile=certs.ca)):
                    pass
            assert server.statistics().connections_rejected == 1


async def test_tls_client_rejects_a_certificate_from_an_unknown_ca(certs: Certificates) -> None:
    """A server certificate not signed by the client's CA is refused."""
    with anyio.fail_after(WAIT):
        async with echo_server(tls=certs.server_config()) as server:
            with pytest.raises(AuthenticationError, match="certificate"):
                async with connect(server, tls=TLSConfig(cafile=certs.rogue_ca)):
                    pass


async def test_tls_server_can_require_client_certificates(certs: Certificates) -> None:
    """With a CA on the server, a client must present a certificate signed by it."""
    client_tls = TLSConfig(cafile=certs.ca, certfile=certs.client_cert, keyfile=certs.client_key)
    with anyio.fail_after(WAIT):
        async with echo_server(tls=certs.server_config(require_client_cert=True)) as server:
            async with connect(server, tls=client_tls) as conn:
                await conn.send(Ping(seq=5))
                assert await conn.receive() == Ping(seq=5)
            with pytest.raises(AuthenticationError):
                async with connect(server, tls=TLSConfig(cafile=certs.ca)):
                    pytest.fail("connected without a client certificate")
            assert server.statistics().connections_rejected == 1


def test_tls_config_names_a_missing_file(tmp_path: Path) -> None:
    """A missing certificate file is a configuration error that names the file."""
    missing = tmp_path / "nope.pem"
    with pytest.raises(ConfigurationError) as caught:
        TLSConfig(certfile=missing, keyfile=missing).server_context()
    assert caught.value.where == str(missing)
    with pytest.raises(ConfigurationError) as caught:
        TLSConfig(cafile=missing).client_context()
    assert caught.value.where == str(missing)
    with pytest.raises(ConfigurationError, match="certificate"):
        TLSConfig().server_context()


# --- tokens -------------------------------------------------------------------------------


def _token_file(tmp_path: Path, content: bytes, mode: int = 0o600) -> Path:
    path = tmp_path / "token"
    path.write_bytes(content)
    path.chmod(mode)
    return path


def test_load_token_strips_whitespace(tmp_path: Path) -> None:
    """A private token file yields its token without surrounding whitespace."""
    path = _token_file(tmp_path, b"  " + TOKEN + b"\n\n")
    assert load_token(path) == TOKEN


@pytest.mark.parametrize(
    ("content", "mode", "message"),
    [
        (b"", 0o600, "empty"),
        (b" \n\t ", 0o600, "empty"),
        (b"x" * (MIN_TOKEN_BYTES - 1), 0o600, "too short"),
        (TOKEN, 0o644, "chmod 600"),
        (TOKEN, 0o640, "group or others"),
        (TOKEN, 0o602, "group or others"),
        (b"x" * 5000, 0o600, "larger than"),
    ],
    ids=["empty", "blank", "short", "world-readable", "group-readable", "world-writable", "huge"],
)
def test_load_token_refuses_bad_files_naming_them(
    tmp_path: Path, content: bytes, mode: int, message: str
) -> None:
    """Empty, short, oversized or non-private token files are refused with the file's name."""
    path = _token_file(tmp_path, content, mode)
    with pytest.raises(ConfigurationError, match=message) as caught:
        load_token(path)
    assert caught.value.where == str(path)
    assert str(path) in str(caught.value)


def test_load_token_names_a_missing_file(tmp_path: Path) -> None:
    """A missing token file is reported by name."""
    path = tmp_path / "absent"
    with pytest.raises(ConfigurationError, match="not found") as caught:
        load_token(path)
    assert caught.value.where == str(path)


def test_load_token_refuses_a_directory(tmp_path: Path) -> None:
    """A directory where the token file should be is refused by name."""
    with pytest.raises(ConfigurationError, match=r"directory|regular file") as caught:
        load_token(tmp_path)
    assert caught.value.where == str(tmp_path)


@pytest.mark.skipif(os.geteuid() == 0, reason="root can read any file")
def test_load_token_names_an_unreadable_file(tmp_path: Path) -> None:
    """A token file we may not read is reported by name."""
    path = _token_file(tmp_path, TOKEN, 0o000)
    with pytest.raises(ConfigurationError, match="permission denied") as caught:
        load_token(path)
    assert caught.value.where == str(path)


def test_create_token_file_writes_a_private_loadable_token(tmp_path: Path) -> None:
    """A created token file is owner-only, loads back, and is never overwritten."""
    path = tmp_path / "farm.token"
    token = create_token_file(path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert load_token(path) == token
    assert len(token) >= MIN_TOKEN_BYTES
    with pytest.raises(ConfigurationError, match="already exists") as caught:
        create_token_file(path)
    assert caught.value.where == str(path)


@pytest.mark.parametrize("token", [b"short", "a-str-token-that-is-long-enough"])
async def test_server_and_client_refuse_unusable_tokens(token: Any) -> None:
    """A token that is too short (or not bytes) is refused before any socket is opened."""
    with pytest.raises(ConfigurationError, match="token"):
        async with open_server(handler=echo, codec=CODEC, token=token):
            pass
    with pytest.raises(ConfigurationError, match="token"):
        async with open_connection("127.0.0.1", 1, codec=CODEC, token=token, name="a"):
            pass


def test_wire_errors_share_the_taskfarm_root() -> None:
    """Every wire error is a TaskfarmError carrying the peer and reason."""
    error = FrameTooLargeError("h:1", size=10, limit=5)
    assert isinstance(error, WireError)
    assert error.fields() == {"peer": "h:1", "reason": error.reason, "size": 10, "limit": 5}
    assert str(error).startswith("h:1: frame of 10 bytes")
    truncated = TruncatedFrameError("h:1", part="body", expected=9, received=3)
    assert truncated.fields()["received"] == 3
