"""Framing for the wire protocol: length-prefixed msgpack frames over an anyio byte stream.

A frame is a 4-byte big-endian payload length followed by the payload, one msgspec msgpack
message of a tagged union chosen by the caller.  This module knows no domain: the coordinator,
the node agents and the CLI each bring their own union of messages.

Authentication, the server and the client live in ``_wire_auth`` and ``_wire_net``.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Generic, TypeVar, overload

import anyio
import msgspec
from anyio.abc import AnyByteStream, AsyncResource, SocketAttribute
from anyio.streams.buffered import BufferedByteReceiveStream

from ._errors import ConfigurationError
from ._wire_errors import (
    ConnectionClosedError,
    FrameDecodeError,
    FrameTooLargeError,
    FrameValidationError,
    ProtocolError,
    TruncatedFrameError,
)

if TYPE_CHECKING:
    from ._wire_auth import Principal

__all__ = [
    "DEFAULT_MAX_FRAME_SIZE",
    "Connection",
    "ConnectionStatistics",
    "FrameCodec",
]

M = TypeVar("M")

DEFAULT_MAX_FRAME_SIZE = 16 * 1024 * 1024
"""The default limit on one frame's payload: 16 MiB."""

_HEADER = struct.Struct(">I")
_MAX_REPRESENTABLE = 2**32 - 1


class FrameCodec(Generic[M]):
    """Encode and decode frames of one tagged union of messages, with a frame size limit.

    One codec (one msgspec ``Encoder`` and ``Decoder``) serves every connection that speaks the
    union.  Annotate it to get typed connections from a union::

        codec: FrameCodec[AgentMessage] = FrameCodec(AgentMessage, max_frame_size=1 << 20)

    Whether unknown fields are rejected is the message classes' choice
    (``forbid_unknown_fields=True``); the decoder reports it as ``FrameValidationError``.
    """

    __slots__ = ("_decoder", "_encoder", "_max_frame_size", "_message_type")

    @overload
    def __init__(
        self: FrameCodec[M], message_type: type[M], *, max_frame_size: int = ...
    ) -> None: ...

    @overload
    def __init__(
        self: FrameCodec[Any], message_type: object, *, max_frame_size: int = ...
    ) -> None: ...

    def __init__(
        self, message_type: object, *, max_frame_size: int = DEFAULT_MAX_FRAME_SIZE
    ) -> None:
        """Build the codec.

        Raises:
            ConfigurationError: ``max_frame_size`` is not in 1..2**32-1, or msgspec cannot
                decode ``message_type`` (e.g. a union of structs without tags).
        """
        if not 1 <= max_frame_size <= _MAX_REPRESENTABLE:
            raise ConfigurationError(
                f"must be between 1 and {_MAX_REPRESENTABLE}, got {max_frame_size}",
                where="max_frame_size",
            )
        try:
            self._decoder: msgspec.msgpack.Decoder[Any] = msgspec.msgpack.Decoder(message_type)
        except TypeError as e:
            raise ConfigurationError(str(e), where="FrameCodec message_type") from e
        self._encoder = msgspec.msgpack.Encoder()
        self._message_type = message_type
        self._max_frame_size = max_frame_size

    @property
    def message_type(self) -> object:
        """The type (usually a tagged union) that incoming frames must decode as."""
        return self._message_type

    @property
    def max_frame_size(self) -> int:
        """The largest payload, in bytes, this codec sends or accepts."""
        return self._max_frame_size

    def encode(self, message: M, *, peer: str = "") -> bytes:
        """Return ``message`` as one complete frame (length header + payload).

        Raises:
            FrameTooLargeError: the payload exceeds ``max_frame_size`` (nothing is sent, so the
                connection stays usable).
        """
        buffer = bytearray(_HEADER.size)
        self._encoder.encode_into(message, buffer, _HEADER.size)
        size = len(buffer) - _HEADER.size
        if size > self._max_frame_size:
            raise FrameTooLargeError(peer, size=size, limit=self._max_frame_size)
        _HEADER.pack_into(buffer, 0, size)
        return bytes(buffer)

    def decode(self, payload: bytes, *, peer: str = "") -> M:
        """Decode one frame's payload (without its header).

        Raises:
            FrameValidationError: valid msgpack that is not one of the expected messages.
            FrameDecodeError: not valid msgpack at all.
        """
        try:
            message: M = self._decoder.decode(payload)
        except msgspec.ValidationError as e:
            raise FrameValidationError(
                peer, size=len(payload), reason=f"invalid message: {e}"
            ) from None
        except msgspec.DecodeError as e:
            raise FrameDecodeError(
                peer, size=len(payload), reason=f"malformed frame: {e}"
            ) from None
        except Exception as e:
            # A message's own __post_init__ check refused the values (msgspec converts only
            # TypeError and ValueError): still a bad frame from the peer, not our failure.
            raise FrameValidationError(
                peer, size=len(payload), reason=f"invalid message: {e}"
            ) from None
        return message


@dataclass(frozen=True, slots=True)
class ConnectionStatistics:
    """A snapshot of one connection's traffic; bytes include the 4-byte frame headers."""

    frames_sent: int
    frames_received: int
    bytes_sent: int
    bytes_received: int


class _FrameStream:
    """Frames over a byte stream: the transport a handshake and then a ``Connection`` share.

    Sharing one buffered reader matters: a peer may pipeline its first messages right behind
    its last handshake frame, and those bytes may already sit in the buffer.
    """

    __slots__ = (
        "_bytes_received",
        "_bytes_sent",
        "_closed",
        "_frames_received",
        "_frames_sent",
        "_pending_size",
        "_reader",
        "_receive_failure",
        "_receive_guard",
        "_send_failure",
        "_send_lock",
        "peer",
        "stream",
    )

    def __init__(self, stream: AnyByteStream, peer: str) -> None:
        self.stream = stream
        self.peer = peer
        self._reader = BufferedByteReceiveStream(stream)
        self._send_lock = anyio.Lock()
        # Two concurrent receivers would each read half a frame: fail loudly instead.
        self._receive_guard = anyio.ResourceGuard("receiving from")
        # Set once the header of the frame being read has been consumed, so a receive()
        # cancelled mid-body resumes the same frame instead of reading body bytes as a header.
        self._pending_size: int | None = None
        self._send_failure: str | None = None
        # Why receiving is over, and whether that was an orderly close by the peer.
        self._receive_failure: tuple[str, bool] | None = None
        self._closed = False
        self._frames_sent = 0
        self._frames_received = 0
        self._bytes_sent = 0
        self._bytes_received = 0

    def statistics(self) -> ConnectionStatistics:
        return ConnectionStatistics(
            frames_sent=self._frames_sent,
            frames_received=self._frames_received,
            bytes_sent=self._bytes_sent,
            bytes_received=self._bytes_received,
        )

    async def send_frame(self, frame: bytes) -> None:
        async with self._send_lock:
            if self._closed:
                raise ConnectionClosedError(self.peer, reason="the connection is closed")
            if self._send_failure is not None:
                raise ConnectionClosedError(self.peer, reason=self._send_failure)
            try:
                await self.stream.send(frame)
            except (anyio.BrokenResourceError, anyio.ClosedResourceError, OSError) as e:
                self._send_failure = f"connection lost while sending: {_describe(e)}"
                raise ConnectionClosedError(self.peer, reason=self._send_failure) from e
            except BaseException:
                # Cancelled (or failed) inside the write: part of the frame may be on the wire,
                # and any later frame would be read from the middle of this one.
                self._send_failure = "an earlier send was interrupted mid-frame"
                raise
            self._frames_sent += 1
            self._bytes_sent += len(frame)

    async def receive_payload(self, limit: int) -> bytes:
        with self._receive_guard:
            if self._closed:
                raise ConnectionClosedError(self.peer, reason="the connection is closed")
            if self._receive_failure is not None:
                reason, orderly = self._receive_failure
                raise ConnectionClosedError(self.peer, reason=reason, orderly=orderly)
            if self._pending_size is None:
                header = await self._read(_HEADER.size, part="header")
                (size,) = _HEADER.unpack(header)
                if size > limit:
                    self._receive_failure = ("an earlier frame was too large to read", False)
                    foreign = foreign_protocol(header)
                    if foreign is not None:
                        raise ProtocolError(self.peer, reason=f"not a taskfarm peer: {foreign}")
                    raise FrameTooLargeError(self.peer, size=size, limit=limit)
                self._pending_size = size
            size = self._pending_size
            payload = await self._read(size, part="body")
            self._pending_size = None
            self._frames_received += 1
            self._bytes_received += _HEADER.size + size
            return payload

    async def _read(self, nbytes: int, *, part: str) -> bytes:
        try:
            return await self._reader.receive_exactly(nbytes)
        except anyio.IncompleteRead:
            received = len(self._reader.buffer)
            if part == "header" and received == 0:
                self._receive_failure = ("the peer closed the connection", True)
                raise ConnectionClosedError(
                    self.peer, reason="the peer closed the connection", orderly=True
                ) from None
            self._receive_failure = ("the peer closed the connection mid-frame", False)
            raise TruncatedFrameError(
                self.peer, part=part, expected=nbytes, received=received
            ) from None
        except anyio.ClosedResourceError:
            raise ConnectionClosedError(self.peer, reason="the connection is closed") from None
        except (anyio.BrokenResourceError, OSError) as e:
            reason = f"connection lost while receiving: {_describe(e)}"
            self._receive_failure = (reason, False)
            raise ConnectionClosedError(self.peer, reason=reason) from e

    async def aclose(self) -> None:
        if self._closed:
            return
        self._closed = True
        # Closing a socket (or a TLS stream without the closing handshake) never waits on the
        # peer, so a forceful close is bounded and safe to run even while being cancelled.
        await anyio.aclose_forcefully(self.stream)


class Connection(AsyncResource, Generic[M]):
    """One authenticated connection: typed messages in and out, one frame at a time.

    Built by ``serve()`` (one per accepted client, handed to the handler) and by
    ``open_connection()``; never directly.  ``send()`` may be called from many tasks at once
    (frames never interleave); ``receive()`` from one task at a time.

    ``async for message in conn`` receives until the peer closes the connection cleanly.
    """

    __slots__ = ("_codec", "_frames", "_principal", "_remote_name", "_remote_role")

    def __init__(
        self,
        frames: _FrameStream,
        codec: FrameCodec[M],
        *,
        remote_name: str,
        remote_role: str,
        principal: Principal | None = None,
    ) -> None:
        self._frames = frames
        self._codec = codec
        self._remote_name = remote_name
        self._remote_role = remote_role
        self._principal = principal

    def __repr__(self) -> str:
        return (
            f"<Connection peer={self.peer} remote_name={self._remote_name!r} "
            f"remote_role={self._remote_role!r}>"
        )

    @property
    def peer(self) -> str:
        """The other end's address as ``host:port`` (``[host]:port`` for IPv6)."""
        return self._frames.peer

    @property
    def remote_name(self) -> str:
        """The name the other end authenticated with (an agent's name, the server's name)."""
        return self._remote_name

    @property
    def remote_role(self) -> str:
        """The role the other end authenticated as (``"agent"``, ``"cli"``; ``"server"``)."""
        return self._remote_role

    @property
    def principal(self) -> Principal | None:
        """Who the other end authenticated as, and how (server side; None on a client)."""
        return self._principal

    @property
    def codec(self) -> FrameCodec[M]:
        """The codec that encodes and decodes this connection's messages."""
        return self._codec

    @property
    def transport_stream(self) -> AnyByteStream:
        """The byte stream underneath (for tests and protocol upgrades).

        Writing to it directly bypasses the framing and the send lock.
        """
        return self._frames.stream

    def statistics(self) -> ConnectionStatistics:
        """Return a snapshot of the frames and bytes sent and received (handshake included)."""
        return self._frames.statistics()

    async def send(self, message: M) -> None:
        """Send one message as one frame.

        Cancelling a send that is writing may leave half a frame on the wire, so the connection
        then refuses further sends: time out whole conversations, not single sends.

        Raises:
            FrameTooLargeError: the encoded message exceeds the codec's limit (nothing was
                sent; the connection stays usable).
            ConnectionClosedError: the connection is closed, lost, or broken by an earlier
                interrupted send.
        """
        await self._frames.send_frame(self._codec.encode(message, peer=self.peer))

    async def receive(self) -> M:
        """Receive the next message (cancel-safe: a cancelled receive loses no bytes).

        Raises:
            ConnectionClosedError: the peer closed (``orderly`` when between frames), the
                connection was lost, or it is closed.
            FrameTooLargeError: the frame's length header exceeds the limit (checked before
                the body is read; the connection cannot be read any further).
            TruncatedFrameError: the peer closed the connection mid-frame.
            FrameValidationError: the frame decoded but is not one of the expected messages.
            FrameDecodeError: the frame is not valid msgpack.
        """
        payload = await self._frames.receive_payload(self._codec.max_frame_size)
        return self._codec.decode(payload, peer=self.peer)

    def __aiter__(self) -> Connection[M]:
        return self

    async def __anext__(self) -> M:
        try:
            return await self.receive()
        except ConnectionClosedError as e:
            if e.orderly:
                raise StopAsyncIteration from None
            raise

    async def aclose(self) -> None:
        """Close the connection (idempotent, never blocks on the peer)."""
        await self._frames.aclose()


def peer_of(stream: AnyByteStream) -> str:
    """Return the remote address of a socket-backed stream as ``host:port``."""
    address = stream.extra(SocketAttribute.remote_address, None)
    if isinstance(address, tuple):
        host, port = str(address[0]), address[1]
        return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    return "unknown" if address is None else str(address)


# What other protocols send first: their opening bytes, read as a length, are a frame of
# hundreds of megabytes.  Saying which protocol it looks like tells the operator what is wrong.
_FOREIGN_PREFIXES = (
    (
        (b"GET ", b"POST", b"PUT ", b"HEAD", b"DELE", b"OPTI", b"PATC", b"CONN", b"TRAC", b"HTTP"),
        "looks like HTTP",
    ),
    ((b"PRI ",), "looks like HTTP/2"),
    ((b"SSH-",), "looks like SSH"),
    ((b"\x16\x03",), "looks like a TLS handshake (this endpoint does not use TLS)"),
)


def foreign_protocol(header: bytes) -> str | None:
    """Return which protocol a frame header's 4 bytes look like (``"looks like HTTP"``), or
    None when they are no protocol's opening that this module knows."""
    for prefixes, what in _FOREIGN_PREFIXES:
        if header.startswith(prefixes):
            return what
    return None


def host_of(stream: AnyByteStream) -> str:
    """Return the remote host (address without the port) of a socket-backed stream."""
    address = stream.extra(SocketAttribute.remote_address, None)
    if isinstance(address, tuple):
        return str(address[0])
    return "unknown" if address is None else str(address)


def _describe(error: BaseException) -> str:
    cause = error.__cause__ or error.__context__
    if isinstance(error, anyio.BrokenResourceError) and cause is not None:
        error = cause
    text = str(error)
    return f"{type(error).__name__}: {text}" if text else type(error).__name__
