"""The wire server and client: TCP (optionally TLS), the handshake, one task per connection.

A connection that misbehaves (bad frame, failed handshake, handler crash) is closed and logged
once; the server and every other connection carry on.
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
from ._wire import Connection, FrameCodec, _FrameStream, peer_of
from ._wire_auth import check_token, client_handshake, server_handshake
from ._wire_errors import AuthenticationError, ConnectError, ConnectionClosedError, WireError

__all__ = [
    "DEFAULT_HANDSHAKE_TIMEOUT",
    "ServerStatistics",
    "TLSConfig",
    "WireServer",
    "open_connection",
    "open_server",
    "serve",
]

M = TypeVar("M")

DEFAULT_HANDSHAKE_TIMEOUT = 10.0
"""Seconds allowed for connecting, TLS negotiation and authentication together."""

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
    (failed handshake, bad frame); ``handler_failures`` those closed because the handler
    itself raised something else.
    """

    connections_accepted: int
    connections_active: int
    connections_authenticated: int
    connections_rejected: int
    handler_failures: int


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
        )

    async def aclose(self) -> None:
        """Stop accepting, close every connection (cancelling handlers) and wait until done."""
        self._cancel_scope.cancel()
        await self._stopped.wait()


async def serve(
    *,
    handler: Handler[M],
    codec: FrameCodec[M],
    token: bytes,
    host: str = "127.0.0.1",
    port: int = 0,
    name: str = "taskfarm",
    tls: TLSConfig | None = None,
    handshake_timeout: float = DEFAULT_HANDSHAKE_TIMEOUT,
    max_connections: int = 1024,
    task_status: TaskStatus[WireServer] = anyio.TASK_STATUS_IGNORED,
) -> None:
    """Listen, authenticate each client, and run ``handler(conn)`` per connection until cancelled.

    Start it with ``server = await tg.start(partial(serve, handler=..., codec=..., token=...))``
    (or use ``open_server()``): once listening it reports a ``WireServer`` with the bound port.
    ``handshake_timeout`` bounds TLS negotiation plus authentication of each connection.  The
    connection is closed when the handler returns.  A handler ends a connection it does not
    want by raising a ``WireError`` (e.g. ``AuthenticationError`` for a role it refuses).

    Any failure of one connection closes only that connection and is logged once:
    ``wire_connection_rejected`` (the peer broke the rules), ``wire_handler_failed`` (the
    handler raised), ``wire_connection_closed`` (debug: the peer left).

    Raises:
        ConfigurationError: bad token, TLS files, limits, or the address cannot be bound.
    """
    listener, ssl_context = await _listen(
        token=token, host=host, port=port, tls=tls, max_connections=max_connections
    )
    async with listener:
        await _serve_on(
            listener,
            handler=handler,
            codec=codec,
            token=token,
            name=name,
            ssl_context=ssl_context,
            handshake_timeout=handshake_timeout,
            max_connections=max_connections,
            task_status=task_status,
        )


async def _listen(
    *, token: bytes, host: str, port: int, tls: TLSConfig | None, max_connections: int
) -> tuple[MultiListener[SocketStream], ssl.SSLContext | None]:
    """Check the options and bind, so configuration errors surface before anything runs."""
    check_token(token)
    if max_connections < 1:
        raise ConfigurationError(
            f"must be at least 1, got {max_connections}", where="max_connections"
        )
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
    token: bytes,
    name: str,
    ssl_context: ssl.SSLContext | None,
    handshake_timeout: float,
    max_connections: int,
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
                token=token,
                ssl_context=ssl_context,
                handshake_timeout=handshake_timeout,
                max_connections=max_connections,
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


class _ServerRun(Generic[M]):
    """The accept loop and per-connection lifecycle of one ``serve()`` call."""

    def __init__(
        self,
        server: WireServer,
        *,
        handler: Handler[M],
        codec: FrameCodec[M],
        token: bytes,
        ssl_context: ssl.SSLContext | None,
        handshake_timeout: float,
        max_connections: int,
    ) -> None:
        self._server = server
        self._handler = handler
        self._codec = codec
        self._token = token
        self._ssl_context = ssl_context
        self._handshake_timeout = handshake_timeout
        self._max_connections = max_connections

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
        server._accepted += 1
        server._active += 1
        frames: _FrameStream | None = None
        name = ""
        try:
            if server._active > self._max_connections:
                raise WireError(
                    peer, reason=f"too many connections (limit {self._max_connections})"
                )
            frames, name, role = await self._authenticate(stream, peer)
            server._authenticated += 1
            _log.info("wire_connection_authenticated", peer=peer, name=name, role=role)
            connection = Connection(frames, self._codec, remote_name=name, remote_role=role)
            await self._handler(connection)
        except Exception as e:
            self._record_failure(e, peer=peer, name=name)
        finally:
            server._active -= 1
            if frames is not None:
                await frames.aclose()
            else:
                await anyio.aclose_forcefully(stream)

    async def _authenticate(self, stream: SocketStream, peer: str) -> tuple[_FrameStream, str, str]:
        """Negotiate TLS and authenticate; on failure the caller closes the raw stream."""
        try:
            with anyio.fail_after(self._handshake_timeout):
                transport: AnyByteStream = stream
                if self._ssl_context is not None:
                    transport = await _wrap_tls(stream, peer, self._ssl_context, server_side=True)
                frames = _FrameStream(transport, peer)
                hello = await server_handshake(frames, token=self._token, name=self._server._name)
        except TimeoutError:
            raise AuthenticationError(
                peer, reason=f"handshake timed out after {self._handshake_timeout} s"
            ) from None
        return frames, hello.name, hello.role

    def _record_failure(self, error: Exception, *, peer: str, name: str) -> None:
        server = self._server
        kind, leaf = _classify(error)
        match kind:
            case "closed":
                _log.debug("wire_connection_closed", peer=peer, name=name, reason=_reason(leaf))
            case "rejected":
                server._rejected += 1
                fields = leaf.fields() if isinstance(leaf, WireError) else {"peer": peer}
                fields.setdefault("name", name)
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
    token: bytes,
    host: str = "127.0.0.1",
    port: int = 0,
    name: str = "taskfarm",
    tls: TLSConfig | None = None,
    handshake_timeout: float = DEFAULT_HANDSHAKE_TIMEOUT,
    max_connections: int = 1024,
) -> AsyncIterator[WireServer]:
    """Run ``serve()`` for the duration of an ``async with`` block; yield the ``WireServer``.

    Leaving the block stops the server and closes every connection.

    Raises:
        ConfigurationError: as ``serve()``.
    """
    listener, ssl_context = await _listen(
        token=token, host=host, port=port, tls=tls, max_connections=max_connections
    )
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
                token=token,
                name=name,
                ssl_context=ssl_context,
                handshake_timeout=handshake_timeout,
                max_connections=max_connections,
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
    token: bytes,
    name: str,
    role: str = "agent",
    tls: TLSConfig | None = None,
    handshake_timeout: float = DEFAULT_HANDSHAKE_TIMEOUT,
) -> AsyncIterator[Connection[M]]:
    """Connect to a server, authenticate both ways, and yield the connection; close it on exit.

    ``handshake_timeout`` bounds connecting, TLS negotiation and authentication together.

    Raises:
        ConfigurationError: bad token or TLS files.
        ConnectError: the server cannot be reached (refused, unreachable, timed out).
        AuthenticationError: the server refused the token, could not prove it knows it, or
            TLS negotiation failed.
    """
    check_token(token)
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
            challenge = await client_handshake(frames, token=token, role=role, name=name)
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
