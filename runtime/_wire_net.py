"""The wire server and client: TCP (optionally TLS), the handshake, one task per connection.

A connection that misbehaves (bad frame, failed handshake, handler crash) is closed and logged
once; the server and every other connection carry on.

Peers that have not authenticated yet cost the server a task and a descriptor each, so they
are bounded apart from authenticated ones, which keeps room for the latter whatever anonymous
peers do:

- at most ``max_unauthenticated_per_peer`` handshakes in progress per peer address: one more
  from the same address is refused at once;
- at most ``max_unauthenticated`` in total: one more evicts the *oldest* handshake in progress
  (refusing the newest instead would let a flood of addresses lock every newcomer out until the
  flood's handshakes time out; evicting the oldest means a real peer only has to finish its
  handshake, a few milliseconds, before the flood catches up with it);
- each handshake has ``handshake_timeout`` seconds (3 by default) to finish.

A refused or evicted peer is sent a ``Rejected`` frame that says why before the connection is
closed (on a TLS server only once TLS is up: a peer refused on arrival is closed without one,
so that a refusal never costs a TLS handshake).  Refusals of one address are logged once per
``_REFUSAL_LOG_INTERVAL`` with a count, so a flood cannot flood the log too.
"""

from __future__ import annotations

import errno
import os
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from functools import partial
from typing import Generic, Literal, TypeVar, assert_never

import anyio
from anyio.abc import AnyByteStream, SocketAttribute, SocketListener, SocketStream, TaskStatus
from anyio.streams.stapled import MultiListener
from anyio.streams.tls import TLSStream

from ._errors import ConfigurationError
from ._logging import get_logger
from ._wire import Connection, FrameCodec, _FrameStream, host_of, peer_of
from ._wire_auth import (
    Authority,
    Credential,
    Principal,
    TokenAuthority,
    check_token,
    client_handshake,
    send_rejected,
    server_handshake,
)
from ._wire_errors import AuthenticationError, ConnectError, ConnectionClosedError, WireError

__all__ = [
    "DEFAULT_CONNECT_TIMEOUT",
    "DEFAULT_HANDSHAKE_TIMEOUT",
    "DEFAULT_MAX_CONNECTIONS",
    "DEFAULT_MAX_UNAUTHENTICATED",
    "DEFAULT_MAX_UNAUTHENTICATED_PER_PEER",
    "ServerStatistics",
    "TLSConfig",
    "WireServer",
    "open_connection",
    "open_server",
    "serve",
]

M = TypeVar("M")

DEFAULT_HANDSHAKE_TIMEOUT = 3.0
"""Seconds a server allows a new connection for TLS negotiation and authentication together."""

DEFAULT_CONNECT_TIMEOUT = 10.0
"""Seconds a client allows for connecting, TLS negotiation and authentication together."""

DEFAULT_MAX_CONNECTIONS = 1024
"""Connections a server holds at once, authenticated or not."""

DEFAULT_MAX_UNAUTHENTICATED = 128
"""Connections still in their handshake a server holds at once (the oldest is evicted)."""

DEFAULT_MAX_UNAUTHENTICATED_PER_PEER = 16
"""Connections still in their handshake a server holds from one peer address."""

_REFUSAL_LOG_INTERVAL = 10.0  # seconds between two log lines about refusals of one address
_LINGER = 0.25  # seconds a refused connection waits for the peer to read its Rejected frame
_MAX_LINGERING = 64  # past this many, refused connections are closed without lingering

_ACCEPT_RETRY_DELAY = 0.1
# Running out of descriptors or buffers is transient: wait and accept again, as trio does.
_TRANSIENT_ACCEPT_ERRORS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})

_log = get_logger("wire")

Handler = Callable[[Connection[M]], Awaitable[None]]


@dataclass(frozen=True, slots=True, kw_only=True)
class TLSConfig:
    """Certificates for TLS.

    A server needs ``certfile`` and ``keyfile``; with ``cafile`` it also requires clients to
    present a certificate signed by that CA.  A client verifies the server against ``cafile``
    (the system's trust store when ``None``) and may present ``certfile``/``keyfile``.
    ``server_hostname`` is the name a client expects in the server's certificate (default:
    the host it connects to).
    """

    cafile: str | os.PathLike[str] | None = None
    certfile: str | os.PathLike[str] | None = None
    keyfile: str | os.PathLike[str] | None = None
    server_hostname: str | None = None

    def server_context(self) -> ssl.SSLContext:
        """Build the server's SSL context.

        Raises:
            ConfigurationError: no ``certfile``, or a file is missing or invalid (named).
        """
        if self.certfile is None:
            raise ConfigurationError("a TLS server needs a certificate", where="TLSConfig.certfile")
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        self._load_chain(context)
        if self.cafile is not None:
            _load(context.load_verify_locations, self.cafile)
            context.verify_mode = ssl.CERT_REQUIRED
        return context

    def client_context(self) -> ssl.SSLContext:
        """Build a client's SSL context.

        Raises:
            ConfigurationError: a file is missing or invalid (named).
        """
        context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH)
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        if self.cafile is not None:
            _load(context.load_verify_locations, self.cafile)
        if self.certfile is not None:
            self._load_chain(context)
        return context

    def _load_chain(self, context: ssl.SSLContext) -> None:
        assert self.certfile is not None
        where = os.fspath(self.keyfile if self.keyfile is not None else self.certfile)
        try:
            context.load_cert_chain(self.certfile, self.keyfile)
        except FileNotFoundError as e:
            missing = e.filename if e.filename else where
            raise ConfigurationError("file not found", where=os.fsdecode(missing)) from None
        except (ssl.SSLError, OSError) as e:
            raise ConfigurationError(
                f"invalid certificate or key: {e}", where=os.fspath(self.certfile)
            ) from e


def _load(load: Callable[[str | os.PathLike[str]], None], path: str | os.PathLike[str]) -> None:
    try:
        load(path)
    except FileNotFoundError:
        raise ConfigurationError("file not found", where=os.fspath(path)) from None
    except (ssl.SSLError, OSError) as e:
        raise ConfigurationError(f"invalid CA certificates: {e}", where=os.fspath(path)) from e


@dataclass(frozen=True, slots=True)
class ServerStatistics:
    """A snapshot of a server's connections.

    ``connections_rejected`` counts connections closed because the peer broke the rules
    (failed handshake, bad frame); ``connections_refused`` those refused or evicted by the
    connection limits; ``handler_failures`` those closed because the handler itself raised
    something else.  ``unauthenticated`` is the number of handshakes in progress.
    """

    connections_accepted: int
    connections_active: int
    connections_authenticated: int
    connections_rejected: int
    handler_failures: int
    connections_refused: int = 0
    unauthenticated: int = 0


class WireServer:
    """A running server, as reported by ``serve()`` through ``task_status.started()``."""

    def __init__(
        self,
        *,
        host: str,
        port: int,
        name: str,
        tls: bool,
        cancel_scope: anyio.CancelScope,
    ) -> None:
        self._host = host
        self._port = port
        self._name = name
        self._tls = tls
        self._cancel_scope = cancel_scope
        self._stopped = anyio.Event()
        self._accepted = 0
        self._active = 0
        self._authenticated = 0
        self._rejected = 0
        self._refused = 0
        self._unauthenticated = 0
        self._handler_failures = 0

    def __repr__(self) -> str:
        return f"<WireServer {self.address} name={self._name!r} tls={self._tls}>"

    @property
    def host(self) -> str:
        """The host the server listens on."""
        return self._host

    @property
    def port(self) -> int:
        """The bound port (the real one when ``port=0`` was asked for)."""
        return self._port

    @property
    def address(self) -> str:
        """``host:port``, ready for a client."""
        return f"[{self._host}]:{self._port}" if ":" in self._host else f"{self._host}:{self._port}"

    @property
    def tls(self) -> bool:
        """Whether connections are wrapped in TLS."""
        return self._tls

    def statistics(self) -> ServerStatistics:
        """Return a snapshot of the connection counters."""
        return ServerStatistics(
            connections_accepted=self._accepted,
            connections_active=self._active,
            connections_authenticated=self._authenticated,
            connections_rejected=self._rejected,
            handler_failures=self._handler_failures,
            connections_refused=self._refused,
            unauthenticated=self._unauthenticated,
        )

    async def aclose(self) -> None:
        """Stop accepting, close every connection (cancelling handlers) and wait until done."""
        self._cancel_scope.cancel()
        await self._stopped.wait()


@dataclass(frozen=True, slots=True, kw_only=True)
class _Limits:
    handshake_timeout: float
    max_connections: int
    max_unauthenticated: int
    max_unauthenticated_per_peer: int


def _limits(
    *,
    handshake_timeout: float,
    max_connections: int,
    max_unauthenticated: int,
    max_unauthenticated_per_peer: int,
) -> _Limits:
    for where, value in (
        ("max_connections", max_connections),
        ("max_unauthenticated", max_unauthenticated),
        ("max_unauthenticated_per_peer", max_unauthenticated_per_peer),
    ):
        if value < 1:
            raise ConfigurationError(f"must be at least 1, got {value}", where=where)
    if not handshake_timeout > 0:
        raise ConfigurationError(f"must be > 0, got {handshake_timeout}", where="handshake_timeout")
    unauthenticated = min(max_unauthenticated, max_connections)
    return _Limits(
        handshake_timeout=handshake_timeout,
        max_connections=max_connections,
        max_unauthenticated=unauthenticated,
        max_unauthenticated_per_peer=min(max_unauthenticated_per_peer, unauthenticated),
    )


def _authority(token: bytes | None, authority: Authority | None) -> Authority:
    if (token is None) == (authority is None):
        raise ConfigurationError("give exactly one of token and authority", where="serve")
    if authority is not None:
        return authority
    assert token is not None
    return TokenAuthority(token)


async def serve(
    *,
    handler: Handler[M],
    codec: FrameCodec[M],
    token: bytes | None = None,
    authority: Authority | None = None,
    host: str = "127.0.0.1",
    port: int = 0,
    name: str = "taskfarm",
    tls: TLSConfig | None = None,
    handshake_timeout: float = DEFAULT_HANDSHAKE_TIMEOUT,
    max_connections: int = DEFAULT_MAX_CONNECTIONS,
    max_unauthenticated: int = DEFAULT_MAX_UNAUTHENTICATED,
    max_unauthenticated_per_peer: int = DEFAULT_MAX_UNAUTHENTICATED_PER_PEER,
    task_status: TaskStatus[WireServer] = anyio.TASK_STATUS_IGNORED,
) -> None:
    """Listen, authenticate each client, and run ``handler(conn)`` per connection until cancelled.

    Start it with ``server = await tg.start(partial(serve, handler=..., codec=..., token=...))``
    (or use ``open_server()``): once listening it reports a ``WireServer`` with the bound port.
    Peers authenticate with the shared ``token``, or as ``authority`` decides (per-principal
    credentials); give exactly one.  ``handshake_timeout`` bounds TLS negotiation plus
    authentication of each connection; the ``max_*`` limits bound connections in total and
    those still in their handshake (see the module's docstring).  The connection is closed
    when the handler returns.  A handler ends a connection it does not want by raising a
    ``WireError`` (e.g. ``AuthenticationError`` for a role it refuses).

    Any failure of one connection closes only that connection and is logged once:
    ``wire_connection_rejected`` (the peer broke the rules or hit a limit),
    ``wire_handler_failed`` (the handler raised), ``wire_connection_closed`` (debug: the peer
    left).

    Raises:
        ConfigurationError: bad token, TLS files, limits, or the address cannot be bound.
    """
    chosen = _authority(token, authority)
    limits = _limits(
        handshake_timeout=handshake_timeout,
        max_connections=max_connections,
        max_unauthenticated=max_unauthenticated,
        max_unauthenticated_per_peer=max_unauthenticated_per_peer,
    )
    listener, ssl_context = await _listen(host=host, port=port, tls=tls)
    async with listener:
        await _serve_on(
            listener,
            handler=handler,
            codec=codec,
            authority=chosen,
            name=name,
            ssl_context=ssl_context,
            limits=limits,
            task_status=task_status,
        )


async def _listen(
    *, host: str, port: int, tls: TLSConfig | None
) -> tuple[MultiListener[SocketStream], ssl.SSLContext | None]:
    """Check the options and bind, so configuration errors surface before anything runs."""
    ssl_context = tls.server_context() if tls is not None else None
    try:
        listener = await anyio.create_tcp_listener(local_host=host, local_port=port)
    except OSError as e:
        raise ConfigurationError(f"cannot listen: {e.strerror or e}", where=f"{host}:{port}") from e
    return listener, ssl_context


async def _serve_on(
    listener: MultiListener[SocketStream],
    *,
    handler: Handler[M],
    codec: FrameCodec[M],
    authority: Authority,
    name: str,
    ssl_context: ssl.SSLContext | None,
    limits: _Limits,
    task_status: TaskStatus[WireServer],
) -> None:
    server: WireServer | None = None
    try:
        async with anyio.create_task_group() as tg:
            server = WireServer(
                host=listener.extra(SocketAttribute.local_address)[0],
                port=listener.extra(SocketAttribute.local_port),
                name=name,
                tls=ssl_context is not None,
                cancel_scope=tg.cancel_scope,
            )
            run = _ServerRun(
                server,
                handler=handler,
                codec=codec,
                authority=authority,
                ssl_context=ssl_context,
                limits=limits,
            )
            for sub_listener in listener.listeners:
                assert isinstance(sub_listener, SocketListener)
                tg.start_soon(run.accept_loop, sub_listener, tg)
            _log.info("wire_server_listening", address=server.address, name=name, tls=server.tls)
            task_status.started(server)
            await anyio.sleep_forever()
    finally:
        if server is not None:
            server._stopped.set()


class _Pending:
    """One connection still in its handshake (what eviction needs to end it)."""

    __slots__ = ("frames", "host", "reason", "scope")

    def __init__(self, host: str) -> None:
        self.host = host
        self.scope = anyio.CancelScope()
        self.frames: _FrameStream | None = None
        self.reason: str | None = None

    def evict(self, reason: str) -> None:
        self.reason = reason
        self.scope.cancel()


class _ServerRun(Generic[M]):
    """The accept loop and per-connection lifecycle of one ``serve()`` call."""

    def __init__(
        self,
        server: WireServer,
        *,
        handler: Handler[M],
        codec: FrameCodec[M],
        authority: Authority,
        ssl_context: ssl.SSLContext | None,
        limits: _Limits,
    ) -> None:
        self._server = server
        self._handler = handler
        self._codec = codec
        self._authority = authority
        self._ssl_context = ssl_context
        self._limits = limits
        # Handshakes in progress, oldest first (dicts keep insertion order), and per address.
        self._pending: dict[_Pending, None] = {}
        self._pending_by_host: dict[str, int] = {}
        self._lingering = 0
        # address -> (when its last refusal was logged, refusals since)
        self._refusals_logged: dict[str, tuple[float, int]] = {}

    async def accept_loop(self, listener: SocketListener, tg: anyio.abc.TaskGroup) -> None:
        while True:
            try:
                stream = await listener.accept()
            except OSError as e:
                if e.errno not in _TRANSIENT_ACCEPT_ERRORS:
                    raise
                _log.warning("wire_accept_failed", reason=os.strerror(e.errno or 0))
                await anyio.sleep(_ACCEPT_RETRY_DELAY)
                continue
            tg.start_soon(self.run_connection, stream)

    async def run_connection(self, stream: SocketStream) -> None:
        server = self._server
        peer = peer_of(stream)
        host = host_of(stream)
        server._accepted += 1
        server._active += 1
        frames: _FrameStream | None = None
        name = ""
        principal: Principal | None = None
        try:
            refusal = self._admit(host)
            if refusal is not None:
                await self._refuse(stream, None, peer=peer, host=host, reason=refusal)
                return
            pending = _Pending(host)
            self._enter(pending)
            authenticated: tuple[_FrameStream, Principal] | None = None
            try:
                with pending.scope:
                    authenticated = await self._authenticate(stream, peer, pending)
            finally:
                self._leave(pending)
            if authenticated is None:  # evicted to make room
                await self._refuse(
                    stream, pending.frames, peer=peer, host=host, reason=pending.reason or ""
                )
                return
            frames, principal = authenticated
            name = principal.name
            server._authenticated += 1
            _log.info(
                "wire_connection_authenticated",
                peer=peer,
                name=name,
                role=principal.role,
                method=principal.method,
                grant=principal.grant,
            )
            connection = Connection(
                frames,
                self._codec,
                remote_name=name,
                remote_role=principal.role,
                principal=principal,
            )
            await self._handler(connection)
        except Exception as e:
            self._record_failure(e, peer=peer, name=name, principal=principal)
        finally:
            server._active -= 1
            if frames is not None:
                await frames.aclose()
            else:
                await anyio.aclose_forcefully(stream)

    # -- limits --------------------------------------------------------------------------------

    def _admit(self, host: str) -> str | None:
        """Return why a new connection from ``host`` is refused, or None (evicting the oldest
        handshake in progress if the total is reached)."""
        limits = self._limits
        if self._server._active > limits.max_connections:
            return f"too many connections (limit {limits.max_connections})"
        if self._pending_by_host.get(host, 0) >= limits.max_unauthenticated_per_peer:
            return (
                f"too many unauthenticated connections from {host} "
                f"(limit {limits.max_unauthenticated_per_peer})"
            )
        if len(self._pending) >= limits.max_unauthenticated:
            oldest = next(iter(self._pending))
            self._leave(oldest)
            oldest.evict(
                f"too many unauthenticated connections (limit {limits.max_unauthenticated}); "
                "the oldest handshake was dropped"
            )
        return None

    def _enter(self, pending: _Pending) -> None:
        self._pending[pending] = None
        self._pending_by_host[pending.host] = self._pending_by_host.get(pending.host, 0) + 1
        self._server._unauthenticated = len(self._pending)

    def _leave(self, pending: _Pending) -> None:
        if pending in self._pending:  # an evicted one left when it was evicted
            del self._pending[pending]
            left = self._pending_by_host[pending.host] - 1
            if left:
                self._pending_by_host[pending.host] = left
            else:
                del self._pending_by_host[pending.host]
        self._server._unauthenticated = len(self._pending)

    async def _refuse(
        self,
        stream: SocketStream,
        frames: _FrameStream | None,
        *,
        peer: str,
        host: str,
        reason: str,
    ) -> None:
        """Send ``Rejected(reason)`` (when the transport allows), log, and let the caller close.

        On a plain connection the frame is followed by our end of the stream, and the
        connection lingers briefly, reading what the peer sent, so that closing does not reset
        the connection before the peer has read why.
        """
        self._server._refused += 1
        self._log_refusal(host, peer=peer, reason=reason)
        if frames is None and self._ssl_context is None:
            frames = _FrameStream(stream, peer)
        if frames is None:
            return  # TLS never came up: nothing can be said that the peer would read
        with anyio.move_on_after(_LINGER):
            await send_rejected(frames, reason, retry=True)
        if frames.stream is not stream or self._lingering >= _MAX_LINGERING:
            return
        self._lingering += 1
        try:
            with anyio.move_on_after(_LINGER):
                await stream.send_eof()
                received = 0
                while received < 65536:
                    received += len(await stream.receive())
        except (anyio.EndOfStream, anyio.BrokenResourceError, anyio.ClosedResourceError, OSError):
            pass  # the peer has read and gone: what we waited for
        finally:
            self._lingering -= 1

    def _log_refusal(self, host: str, *, peer: str, reason: str) -> None:
        now = anyio.current_time()
        last, suppressed = self._refusals_logged.get(host, (-_REFUSAL_LOG_INTERVAL, 0))
        if now - last < _REFUSAL_LOG_INTERVAL:
            self._refusals_logged[host] = (last, suppressed + 1)
            return
        if len(self._refusals_logged) > 4096:  # forget quiet addresses: bounded memory
            self._refusals_logged = {
                h: v for h, v in self._refusals_logged.items() if now - v[0] < _REFUSAL_LOG_INTERVAL
            }
        self._refusals_logged[host] = (now, 0)
        _log.warning(
            "wire_connection_rejected",
            error="ConnectionLimit",
            peer=peer,
            name="",
            reason=reason,
            suppressed=suppressed,
        )

    # -- authentication --------------------------------------------------------------------------

    async def _authenticate(
        self, stream: SocketStream, peer: str, pending: _Pending
    ) -> tuple[_FrameStream, Principal]:
        """Negotiate TLS and authenticate; on failure the caller closes the raw stream."""
        timeout = self._limits.handshake_timeout
        try:
            with anyio.fail_after(timeout):
                transport: AnyByteStream = stream
                if self._ssl_context is not None:
                    transport = await _wrap_tls(stream, peer, self._ssl_context, server_side=True)
                frames = pending.frames = _FrameStream(transport, peer)
                _hello, principal = await server_handshake(
                    frames, authority=self._authority, name=self._server._name
                )
        except TimeoutError:
            reason = f"handshake timed out after {timeout:g} s"
            if pending.frames is not None:
                with anyio.move_on_after(_LINGER):
                    await send_rejected(pending.frames, reason, retry=True)
            raise AuthenticationError(peer, reason=reason) from None
        return frames, principal

    def _record_failure(
        self, error: Exception, *, peer: str, name: str, principal: Principal | None
    ) -> None:
        server = self._server
        kind, leaf = _classify(error)
        match kind:
            case "closed":
                _log.debug("wire_connection_closed", peer=peer, name=name, reason=_reason(leaf))
            case "rejected":
                server._rejected += 1
                fields = leaf.fields() if isinstance(leaf, WireError) else {"peer": peer}
                fields.setdefault("name", name)
                if principal is not None:  # broke the rules after login: say as whom
                    fields.update(role=principal.role, method=principal.method)
                _log.warning("wire_connection_rejected", error=type(leaf).__name__, **fields)
            case "failed":
                server._handler_failures += 1
                _log.error(
                    "wire_handler_failed",
                    peer=peer,
                    name=name,
                    reason=_reason(leaf),
                    exc_info=error,
                )
            case _:
                assert_never(kind)


def _leaves(error: BaseException) -> list[BaseException]:
    if isinstance(error, BaseExceptionGroup):
        return [leaf for inner in error.exceptions for leaf in _leaves(inner)]
    return [error]


def _classify(
    error: BaseException,
) -> tuple[Literal["closed", "rejected", "failed"], BaseException]:
    """Sort a connection's failure and pick the exception that explains it.

    A handler running its own task group may raise a group: any non-wire error in it is a
    handler failure; otherwise any protocol or authentication error is a rejection; a group of
    nothing but closed-connection errors means the peer simply left.
    """
    leaves = _leaves(error)
    for leaf in leaves:
        if not isinstance(leaf, WireError):
            return "failed", leaf
    for leaf in leaves:
        if not isinstance(leaf, ConnectionClosedError):
            return "rejected", leaf
    return "closed", leaves[0]


def _reason(error: BaseException) -> str:
    if isinstance(error, WireError):
        return error.reason
    text = str(error)
    return f"{type(error).__name__}: {text}" if text else type(error).__name__


async def _wrap_tls(
    stream: AnyByteStream,
    peer: str,
    context: ssl.SSLContext,
    *,
    server_side: bool,
    hostname: str | None = None,
) -> TLSStream:
    # standard_compatible=False: no closing handshake, so closing never waits on the peer.
    # Truncation attacks are moot because every frame carries its own length.
    try:
        return await TLSStream.wrap(
            stream,
            server_side=server_side,
            hostname=hostname,
            ssl_context=context,
            standard_compatible=False,
        )
    except (ssl.SSLError, anyio.BrokenResourceError, anyio.EndOfStream, OSError) as e:
        detail = getattr(e, "reason", None) or str(e) or "connection closed by the peer"
        if isinstance(e, ssl.SSLCertVerificationError):
            detail = e.verify_message or detail
        raise AuthenticationError(peer, reason=f"TLS handshake failed: {detail}") from e


@asynccontextmanager
async def open_server(
    *,
    handler: Handler[M],
    codec: FrameCodec[M],
    token: bytes | None = None,
    authority: Authority | None = None,
    host: str = "127.0.0.1",
    port: int = 0,
    name: str = "taskfarm",
    tls: TLSConfig | None = None,
    handshake_timeout: float = DEFAULT_HANDSHAKE_TIMEOUT,
    max_connections: int = DEFAULT_MAX_CONNECTIONS,
    max_unauthenticated: int = DEFAULT_MAX_UNAUTHENTICATED,
    max_unauthenticated_per_peer: int = DEFAULT_MAX_UNAUTHENTICATED_PER_PEER,
) -> AsyncIterator[WireServer]:
    """Run ``serve()`` for the duration of an ``async with`` block; yield the ``WireServer``.

    Leaving the block stops the server and closes every connection.

    Raises:
        ConfigurationError: as ``serve()``.
    """
    chosen = _authority(token, authority)
    limits = _limits(
        handshake_timeout=handshake_timeout,
        max_connections=max_connections,
        max_unauthenticated=max_unauthenticated,
        max_unauthenticated_per_peer=max_unauthenticated_per_peer,
    )
    listener, ssl_context = await _listen(host=host, port=port, tls=tls)
    # The block's own exception is re-raised outside the task group, so callers see it as
    # raised rather than wrapped in an ExceptionGroup.
    failure: Exception | None = None
    async with listener, anyio.create_task_group() as tg:
        server: WireServer = await tg.start(
            partial(
                _serve_on,
                listener,
                handler=handler,
                codec=codec,
                authority=chosen,
                name=name,
                ssl_context=ssl_context,
                limits=limits,
            )
        )
        try:
            yield server
        except Exception as e:
            failure = e
        finally:
            tg.cancel_scope.cancel()
    if failure is not None:
        raise failure


@asynccontextmanager
async def open_connection(
    host: str,
    port: int,
    *,
    codec: FrameCodec[M],
    token: bytes | None = None,
    credential: Credential | None = None,
    name: str = "",
    role: str = "agent",
    tls: TLSConfig | None = None,
    handshake_timeout: float = DEFAULT_CONNECT_TIMEOUT,
) -> AsyncIterator[Connection[M]]:
    """Connect to a server, authenticate both ways, and yield the connection; close it on exit.

    Authenticate with the shared ``token`` under ``name``, or with ``credential`` (under the
    credential's name); give exactly one.  ``handshake_timeout`` bounds connecting, TLS
    negotiation and authentication together.

    Raises:
        ConfigurationError: bad token or TLS files, or not exactly one of token and
            credential.
        ConnectError: the server cannot be reached (refused, unreachable, timed out).
        AuthenticationError: the server refused the secret, could not prove it knows it, or
            TLS negotiation failed.
    """
    if (token is None) == (credential is None):
        raise ConfigurationError("give exactly one of token and credential", where="connect")
    if token is not None:
        check_token(token)
        if not name:
            raise ConfigurationError("a token client needs a name", where="connect")
    ssl_context = tls.client_context() if tls is not None else None
    peer = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    frames: _FrameStream | None = None
    stream: SocketStream | None = None
    try:
        with anyio.fail_after(handshake_timeout):
            try:
                stream = await anyio.connect_tcp(host, port)
            except OSError as e:
                raise ConnectError(peer, reason=f"cannot connect: {e.strerror or e}") from e
            transport: AnyByteStream = stream
            if ssl_context is not None:
                hostname = tls.server_hostname if tls is not None else None
                transport = await _wrap_tls(
                    stream, peer, ssl_context, server_side=False, hostname=hostname or host
                )
            frames = _FrameStream(transport, peer_of(stream))
            challenge = await client_handshake(
                frames, token=token, credential=credential, role=role, name=name
            )
    except TimeoutError:
        await _close_partial(frames, stream)
        if stream is None:
            raise ConnectError(
                peer, reason=f"connect timed out after {handshake_timeout} s"
            ) from None
        raise AuthenticationError(
            peer, reason=f"handshake timed out after {handshake_timeout} s"
        ) from None
    except BaseException:
        await _close_partial(frames, stream)
        raise
    connection = Connection(frames, codec, remote_name=challenge.name, remote_role="server")
    try:
        yield connection
    finally:
        await connection.aclose()


async def _close_partial(frames: _FrameStream | None, stream: SocketStream | None) -> None:
    if frames is not None:
        await frames.aclose()
    elif stream is not None:
        await anyio.aclose_forcefully(stream)
