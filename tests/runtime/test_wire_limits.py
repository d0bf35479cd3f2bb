"""Connection limits an anonymous peer cannot fill: handshakes in progress are bounded per
address and in total, the oldest is evicted for a newcomer, refused peers are told why.

Everything runs over real TCP on loopback.  Linux routes all of 127.0.0.0/8 to the loopback
interface, so the "attacker" binds its sockets to 127.0.0.2 (and up) while real clients come
from 127.0.0.1.  Waits are bounded by ``fail_after``; nothing asserts on speed.
"""

from __future__ import annotations

import struct
from collections.abc import AsyncIterator, MutableMapping
from contextlib import AsyncExitStack, asynccontextmanager
from typing import Any

import anyio
import pytest
import structlog
from anyio.abc import SocketStream

from runtime._message import Message
from runtime._wire import Connection, FrameCodec
from runtime._wire_auth import HANDSHAKE_CODEC, Rejected
from runtime._wire_errors import AuthenticationError
from runtime._wire_net import DEFAULT_HANDSHAKE_TIMEOUT, WireServer, open_connection, open_server

TOKEN = b"limits-test-shared-token-0123456"
WAIT = 10.0


class Ping(Message, frozen=True, kw_only=True, forbid_unknown_fields=True, tag="test.ping"):
    seq: int


CODEC: FrameCodec[Ping] = FrameCodec(Ping, max_frame_size=1 << 16)


async def echo(connection: Connection[Ping]) -> None:
    async for message in connection:
        await connection.send(message)


@asynccontextmanager
async def echo_server(**options: Any) -> AsyncIterator[WireServer]:
    async with open_server(handler=echo, codec=CODEC, token=TOKEN, **options) as server:
        yield server


async def real_client_is_served(server: WireServer) -> None:
    """A real client (from 127.0.0.1) connects, authenticates and gets its answer."""
    async with open_connection(
        server.host, server.port, codec=CODEC, token=TOKEN, name="real", role="client"
    ) as connection:
        await connection.send(Ping(seq=42))
        assert await connection.receive() == Ping(seq=42)


async def idle_peer(stack: AsyncExitStack, server: WireServer, address: str) -> SocketStream:
    """Open a TCP connection from ``address`` that never says anything."""
    stream = await anyio.connect_tcp(server.host, server.port, local_host=address)
    await stack.enter_async_context(stream)
    return stream


async def what_the_server_said(stream: SocketStream) -> Rejected | None:
    """Read until the server closes; return its Rejected frame (None if it sent nothing)."""
    data = bytearray()
    try:
        while True:
            data += await stream.receive()
    except (anyio.EndOfStream, anyio.BrokenResourceError):
        pass
    if not data:
        return None
    (size,) = struct.unpack(">I", data[:4])
    message = HANDSHAKE_CODEC.decode(bytes(data[4 : 4 + size]))
    assert isinstance(message, Rejected), message
    return message


async def wait_pending(server: WireServer, count: int) -> None:
    """Probe the server's statistics until ``count`` handshakes are in progress."""
    with anyio.fail_after(WAIT):
        while True:
            if server.statistics().unauthenticated >= count:
                return
            await anyio.sleep(0.01)


def refusals(logs: list[MutableMapping[str, Any]]) -> list[MutableMapping[str, Any]]:
    return [
        e
        for e in logs
        if e["event"] == "wire_connection_rejected" and e["error"] == "ConnectionLimit"
    ]


def test_the_handshake_deadline_is_short() -> None:
    """A peer has 3 seconds to authenticate (it used to be 10)."""
    assert DEFAULT_HANDSHAKE_TIMEOUT == 3.0


async def test_a_thousand_idle_connections_from_one_address_do_not_lock_clients_out() -> None:
    """1,100 idle connections from one address: past its quota each is told why and closed,
    the refusals are logged once, and a real client is still answered (within a bound far
    below the handshake deadline the flood holds its slots for)."""
    flood = 1100
    # A long deadline, so that the flood's handshakes hold their slots for the whole test (the
    # worst case; it also keeps the test independent of how fast this machine opens sockets).
    patience = 60.0
    with structlog.testing.capture_logs() as logs:
        async with echo_server(handshake_timeout=patience) as server, AsyncExitStack() as stack:
            with anyio.fail_after(WAIT):
                streams = [await idle_peer(stack, server, "127.0.0.2") for _ in range(flood)]
            with anyio.fail_after(WAIT):  # far below the deadline the flood holds slots for
                await real_client_is_served(server)
            with anyio.fail_after(WAIT):
                said = [await what_the_server_said(stream) for stream in streams[16:]]
            stats = server.statistics()
    assert {r.reason if r else None for r in said} == {
        "too many unauthenticated connections from 127.0.0.2 (limit 16)"
    }
    assert stats.connections_refused == flood - 16
    assert stats.connections_authenticated == 1
    [logged] = refusals(logs)  # one line for the whole flood (the rest are counted later)
    assert logged["reason"] == "too many unauthenticated connections from 127.0.0.2 (limit 16)"


async def test_a_flood_from_many_addresses_evicts_its_oldest_handshakes() -> None:
    """When the handshakes in progress reach the total limit, a newcomer evicts the oldest:
    a real client gets in, and the evicted peer is told why."""
    async with (
        echo_server(max_unauthenticated=8, max_unauthenticated_per_peer=4) as server,
        AsyncExitStack() as stack,
    ):
        flood = []
        for address in ("127.0.0.2", "127.0.0.3"):
            for _ in range(4):
                flood.append(await idle_peer(stack, server, address))
                await wait_pending(server, len(flood))
        with anyio.fail_after(WAIT):
            await real_client_is_served(server)
            evicted = await what_the_server_said(flood[0])
        assert evicted is not None
        assert evicted.reason == (
            "too many unauthenticated connections (limit 8); the oldest handshake was dropped"
        )
        assert server.statistics().unauthenticated == 7  # the real client took no slot for long


async def test_per_address_refusals_are_told_why_and_logged_once() -> None:
    """Past the per-address quota each new connection gets a Rejected frame naming the
    address; a real client from elsewhere is unaffected."""
    with structlog.testing.capture_logs() as logs:
        async with echo_server(max_unauthenticated_per_peer=2) as server, AsyncExitStack() as stack:
            streams = [await idle_peer(stack, server, "127.0.0.4") for _ in range(6)]
            with anyio.fail_after(WAIT):
                said = [await what_the_server_said(stream) for stream in streams[2:]]
                await real_client_is_served(server)
    assert [r.reason if r else None for r in said] == [
        "too many unauthenticated connections from 127.0.0.4 (limit 2)"
    ] * 4
    [logged] = refusals(logs)
    assert logged["peer"].startswith("127.0.0.4:")


async def test_a_silent_peer_is_told_its_handshake_timed_out() -> None:
    """A peer that never finishes its handshake gets a Rejected frame saying so."""
    async with echo_server(handshake_timeout=0.2) as server, AsyncExitStack() as stack:
        stream = await idle_peer(stack, server, "127.0.0.5")
        with anyio.fail_after(WAIT):
            said = await what_the_server_said(stream)
    assert said == Rejected(reason="handshake timed out after 0.2 s", retry=True)


async def test_a_client_refused_by_a_limit_is_told_it_may_retry() -> None:
    """A refusal by a connection limit is retryable (an agent reconnects later instead of
    giving up), and the retry succeeds once the slot is free."""
    async with echo_server(max_unauthenticated_per_peer=1) as server, AsyncExitStack() as stack:
        hog = await idle_peer(stack, server, "127.0.0.1")
        await wait_pending(server, 1)
        with pytest.raises(AuthenticationError) as caught, anyio.fail_after(WAIT):
            await real_client_is_served(server)
        assert caught.value.retryable
        assert "too many unauthenticated connections from 127.0.0.1" in caught.value.reason
        await hog.aclose()
        with anyio.fail_after(WAIT):
            while True:  # the server notices the hog left when its read ends
                if server.statistics().unauthenticated == 0:
                    break
                await anyio.sleep(0.01)
            await real_client_is_served(server)


@pytest.mark.parametrize(
    ("option", "value"),
    [
        ("max_unauthenticated", 0),
        ("max_unauthenticated_per_peer", 0),
        ("max_connections", 0),
        ("handshake_timeout", 0.0),
    ],
)
async def test_impossible_limits_are_refused_naming_the_option(option: str, value: float) -> None:
    """A limit below 1 (or a deadline of 0) is a configuration error naming the option."""
    from runtime._errors import ConfigurationError

    with pytest.raises(ConfigurationError, match=option):
        async with echo_server(**{option: value}):
            pass
