"""Errors of the wire layer: one branch of the hierarchy, structured fields on every leaf.

``WireError`` splits three ways, and the server counts them differently:

- ``ConnectionClosedError``: the connection ended (peer closed, reset, closed locally); nobody
  misbehaved.
- ``ProtocolError`` and ``AuthenticationError``: the peer broke the rules; the server *rejects*
  the connection (closes it, logs ``wire_connection_rejected`` once, counts it).
- ``ConnectError``: a client could not reach the server at all.
"""

from __future__ import annotations

from ._errors import TaskfarmError

__all__ = [
    "AuthenticationError",
    "ConnectError",
    "ConnectionClosedError",
    "FrameDecodeError",
    "FrameTooLargeError",
    "FrameValidationError",
    "ProtocolError",
    "TruncatedFrameError",
    "WireError",
]


class WireError(TaskfarmError):
    """Raised when a wire connection fails; ``peer`` is ``host:port`` and ``reason`` says why."""

    def __init__(self, peer: str, *, reason: str) -> None:
        self.peer = peer
        self.reason = reason
        super().__init__(f"{peer}: {reason}" if peer else reason)

    def fields(self) -> dict[str, object]:
        """Return the structured fields, ready to be logged as keys (``peer``, ``reason``...)."""
        return {"peer": self.peer, "reason": self.reason}


class ConnectError(WireError):
    """Raised when ``open_connection()`` cannot reach the server (refused, unreachable, timeout)."""


class ConnectionClosedError(WireError):
    """Raised when sending on or receiving from a connection that has ended.

    ``orderly`` is true when the peer closed its side cleanly between two frames: the normal
    end of a conversation (``async for`` over a connection stops there instead of raising).
    """

    def __init__(self, peer: str, *, reason: str, orderly: bool = False) -> None:
        self.orderly = orderly
        super().__init__(peer, reason=reason)


class ProtocolError(WireError):
    """Raised when the peer sends bytes that break the framing or the message schema."""


class FrameTooLargeError(ProtocolError):
    """Raised when a frame's length header (or an outgoing message) exceeds the frame limit.

    Raised before the body is read (or anything is sent), so an oversized frame never costs
    memory; on receive the stream is left mid-frame and the connection cannot be used again.
    """

    def __init__(self, peer: str, *, size: int, limit: int) -> None:
        self.size = size
        self.limit = limit
        super().__init__(peer, reason=f"frame of {size} bytes exceeds the {limit}-byte limit")

    def fields(self) -> dict[str, object]:
        return {**super().fields(), "size": self.size, "limit": self.limit}


class TruncatedFrameError(ProtocolError):
    """Raised when the peer closes the connection in the middle of a frame.

    ``part`` is ``"header"`` or ``"body"``; ``expected`` bytes of that part were due and only
    ``received`` arrived.
    """

    def __init__(self, peer: str, *, part: str, expected: int, received: int) -> None:
        self.part = part
        self.expected = expected
        self.received = received
        super().__init__(
            peer,
            reason=f"connection closed mid-frame: {received} of {expected} {part} bytes received",
        )

    def fields(self) -> dict[str, object]:
        return {
            **super().fields(),
            "part": self.part,
            "expected": self.expected,
            "received": self.received,
        }


class FrameDecodeError(ProtocolError):
    """Raised when a frame's payload is not valid msgpack.

    The frame was consumed whole, so the connection is still in step and may go on being used
    (the server's default is still to reject the peer).
    """

    def __init__(self, peer: str, *, size: int, reason: str) -> None:
        self.size = size
        super().__init__(peer, reason=reason)

    def fields(self) -> dict[str, object]:
        return {**super().fields(), "size": self.size}


class FrameValidationError(FrameDecodeError):
    """Raised when a frame is valid msgpack but not one of the expected messages.

    Covers an unknown ``type`` tag, a missing or wrongly typed field, and an unknown field on a
    message that forbids them; ``reason`` carries msgspec's explanation with the field path.
    """


class AuthenticationError(WireError):
    """Raised when the handshake fails: wrong token, malformed or out-of-order handshake frames,
    unsupported protocol version, failed TLS negotiation, or a handshake that timed out.

    ``name`` is the name the peer claimed, when it got far enough to claim one.  ``retryable``
    is true when the server refused for now, not for good (a connection limit, a handshake that
    ran out of time): trying again later may succeed.
    """

    def __init__(self, peer: str, *, reason: str, name: str = "", retryable: bool = False) -> None:
        self.name = name
        self.retryable = retryable
        super().__init__(peer, reason=reason)

    def fields(self) -> dict[str, object]:
        fields = super().fields()
        if self.name:
            fields["name"] = self.name
        if self.retryable:
            fields["retryable"] = True
        return fields
