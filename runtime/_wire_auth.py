"""Mutual challenge-response authentication with a shared token, and token files.

The token never crosses the wire, in clear or otherwise; each side proves it knows it with an
HMAC-SHA256 over fresh nonces from both sides::

    client -> server   ClientHello(version, role, name, client_nonce)
    server -> client   ServerChallenge(version, name, server_nonce)
    client -> server   ClientProof(HMAC(token, "client" transcript))
    server -> client   ServerProof(HMAC(token, "server" transcript))   or Rejected(reason)

The transcript binds both nonces, the protocol version, the client's role and name and the
server's name, so a proof cannot be replayed on another connection or reflected back (the two
directions use different labels).  The server proves itself only after the client has, so an
unauthenticated caller never obtains an HMAC to attack offline.

The client speaks first so that a transport mismatch fails at once: a plain client's first
frame is not a TLS ClientHello, and a TLS ClientHello read as a frame header claims ~370 MB,
far over the handshake frame limit.  Handshake frames have their own small limit, so an
unauthenticated peer can never make the server buffer a full-size frame.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
import stat
from typing import Annotated, Final, TypeVar

import msgspec

from ._errors import ConfigurationError
from ._message import Message
from ._wire import FrameCodec, _FrameStream
from ._wire_errors import AuthenticationError, WireError

__all__ = ["MIN_TOKEN_BYTES", "PROTOCOL_VERSION", "create_token_file", "load_token"]

PROTOCOL_VERSION: Final = 1
"""The wire protocol version, checked by both sides during the handshake."""

MIN_TOKEN_BYTES: Final = 16
"""The shortest shared token accepted."""

_MAX_TOKEN_FILE_BYTES: Final = 4096
_NONCE_BYTES: Final = 32
_HANDSHAKE_FRAME_LIMIT: Final = 4096
_TRANSCRIPT_LABEL: Final = "taskfarm-wire"

Nonce = Annotated[bytes, msgspec.Meta(min_length=_NONCE_BYTES, max_length=_NONCE_BYTES)]
Proof = Annotated[bytes, msgspec.Meta(min_length=32, max_length=32)]
Label = Annotated[str, msgspec.Meta(min_length=1, max_length=256)]


# Hello and challenge stay lenient about unknown fields on purpose: a newer peer's hello must
# still decode, so that a version mismatch gets a clear answer instead of a decode error.
class ClientHello(Message, frozen=True, kw_only=True, tag="wire.client_hello"):
    version: int
    role: Label
    name: Label
    nonce: Nonce


class ServerChallenge(Message, frozen=True, kw_only=True, tag="wire.server_challenge"):
    version: int
    name: Label
    nonce: Nonce


class ClientProof(
    Message, frozen=True, kw_only=True, forbid_unknown_fields=True, tag="wire.client_proof"
):
    proof: Proof


class ServerProof(
    Message, frozen=True, kw_only=True, forbid_unknown_fields=True, tag="wire.server_proof"
):
    proof: Proof


class Rejected(Message, frozen=True, kw_only=True, tag="wire.rejected"):
    reason: Annotated[str, msgspec.Meta(max_length=512)]


Handshake = ClientHello | ServerChallenge | ClientProof | ServerProof | Rejected
HANDSHAKE_CODEC: FrameCodec[Handshake] = FrameCodec(
    Handshake, max_frame_size=_HANDSHAKE_FRAME_LIMIT
)

_H = TypeVar("_H", ClientHello, ServerChallenge, ClientProof, ServerProof)
_transcript_encoder = msgspec.msgpack.Encoder()


def _proof(token: bytes, side: str, hello: ClientHello, challenge: ServerChallenge) -> bytes:
    transcript = _transcript_encoder.encode(
        (
            _TRANSCRIPT_LABEL,
            PROTOCOL_VERSION,
            side,
            hello.nonce,
            challenge.nonce,
            hello.role,
            hello.name,
            challenge.name,
        )
    )
    return hmac.new(token, transcript, hashlib.sha256).digest()


async def _expect(frames: _FrameStream, expected: type[_H], *, name: str = "") -> _H:
    """Receive the next handshake frame, which must be an ``expected``."""
    try:
        payload = await frames.receive_payload(_HANDSHAKE_FRAME_LIMIT)
        message = HANDSHAKE_CODEC.decode(payload, peer=frames.peer)
    except WireError as e:
        raise AuthenticationError(
            frames.peer, reason=f"handshake failed: {e.reason}", name=name
        ) from e
    if isinstance(message, expected):
        return message
    if isinstance(message, Rejected):
        raise AuthenticationError(
            frames.peer, reason=f"rejected by the peer: {message.reason}", name=name
        )
    raise AuthenticationError(
        frames.peer,
        reason=f"handshake out of order: expected {expected.__name__}, got "
        f"{type(message).__name__}",
        name=name,
    )


async def _send(frames: _FrameStream, message: Handshake, *, name: str = "") -> None:
    try:
        await frames.send_frame(HANDSHAKE_CODEC.encode(message, peer=frames.peer))
    except WireError as e:
        raise AuthenticationError(
            frames.peer, reason=f"handshake failed: {e.reason}", name=name
        ) from e


async def _reject(frames: _FrameStream, reason: str, *, name: str) -> AuthenticationError:
    """Tell the peer why it is refused (best effort) and return the error to raise."""
    try:
        await frames.send_frame(HANDSHAKE_CODEC.encode(Rejected(reason=reason)))
    except WireError:
        pass  # the peer is already gone; the rejection stands either way
    return AuthenticationError(frames.peer, reason=reason, name=name)


async def client_handshake(
    frames: _FrameStream, *, token: bytes, role: str, name: str
) -> ServerChallenge:
    """Authenticate to a server and check its proof; return its challenge (with its name).

    Raises:
        AuthenticationError: the server refused us, failed to prove it knows the token, or
            broke the handshake.
    """
    hello = ClientHello(
        version=PROTOCOL_VERSION, role=role, name=name, nonce=secrets.token_bytes(_NONCE_BYTES)
    )
    await _send(frames, hello)
    challenge = await _expect(frames, ServerChallenge)
    if challenge.version != PROTOCOL_VERSION:
        raise AuthenticationError(
            frames.peer,
            reason=f"server speaks protocol version {challenge.version}, "
            f"this client speaks {PROTOCOL_VERSION}",
            name=challenge.name,
        )
    await _send(frames, ClientProof(proof=_proof(token, "client", hello, challenge)))
    proof = await _expect(frames, ServerProof, name=challenge.name)
    if not hmac.compare_digest(proof.proof, _proof(token, "server", hello, challenge)):
        raise AuthenticationError(
            frames.peer,
            reason="the server could not prove it knows the token (wrong token or impostor)",
            name=challenge.name,
        )
    return challenge


async def server_handshake(frames: _FrameStream, *, token: bytes, name: str) -> ClientHello:
    """Authenticate a client and prove ourselves back; return its hello (role and name).

    Raises:
        AuthenticationError: wrong token, unsupported version or a broken handshake.
    """
    hello = await _expect(frames, ClientHello)
    if hello.version != PROTOCOL_VERSION:
        raise await _reject(
            frames,
            f"unsupported protocol version {hello.version} (server speaks {PROTOCOL_VERSION})",
            name=hello.name,
        )
    challenge = ServerChallenge(
        version=PROTOCOL_VERSION, name=name, nonce=secrets.token_bytes(_NONCE_BYTES)
    )
    await _send(frames, challenge, name=hello.name)
    proof = await _expect(frames, ClientProof, name=hello.name)
    if not hmac.compare_digest(proof.proof, _proof(token, "client", hello, challenge)):
        raise await _reject(frames, "wrong token", name=hello.name)
    await _send(frames, ServerProof(proof=_proof(token, "server", hello, challenge)))
    return hello


def check_token(token: bytes, *, where: str = "token") -> bytes:
    """Return ``token`` if it is usable as a shared secret.

    Raises:
        ConfigurationError: not bytes, or shorter than ``MIN_TOKEN_BYTES``.
    """
    if not isinstance(token, bytes):
        raise ConfigurationError(f"must be bytes, got {type(token).__name__}", where=where)
    if len(token) < MIN_TOKEN_BYTES:
        raise ConfigurationError(
            f"too short: {len(token)} bytes, at least {MIN_TOKEN_BYTES} needed", where=where
        )
    return token


def load_token(path: str | os.PathLike[str]) -> bytes:
    """Read a shared token from a file, without surrounding whitespace.

    The file must be private to its owner (``chmod 600``): a token that other users can read
    lets them impersonate any agent.

    Raises:
        ConfigurationError: the file is missing, unreadable, not a regular file, readable or
            writable by group or others, empty, too large, or holds a token shorter than
            ``MIN_TOKEN_BYTES``; ``where`` names the file.
    """
    where = os.fspath(path)
    try:
        with open(path, "rb") as file:
            status = os.fstat(file.fileno())
            if not stat.S_ISREG(status.st_mode):
                raise ConfigurationError("token file is not a regular file", where=where)
            if os.name == "posix" and status.st_mode & 0o077:
                raise ConfigurationError(
                    f"token file is accessible by group or others "
                    f"(mode {stat.S_IMODE(status.st_mode):04o}); run: chmod 600 {where}",
                    where=where,
                )
            data = file.read(_MAX_TOKEN_FILE_BYTES + 1)
    except FileNotFoundError:
        raise ConfigurationError("token file not found", where=where) from None
    except IsADirectoryError:
        raise ConfigurationError("token file is a directory", where=where) from None
    except PermissionError:
        raise ConfigurationError(
            "token file is not readable (permission denied)", where=where
        ) from None
    except OSError as e:
        raise ConfigurationError(f"cannot read token file: {e.strerror}", where=where) from e
    if len(data) > _MAX_TOKEN_FILE_BYTES:
        raise ConfigurationError(
            f"token file is larger than {_MAX_TOKEN_FILE_BYTES} bytes", where=where
        )
    token = data.strip()
    if not token:
        raise ConfigurationError("token file is empty", where=where)
    return check_token(token, where=where)


def create_token_file(path: str | os.PathLike[str]) -> bytes:
    """Write a new random token to a new file readable only by its owner; return the token.

    Raises:
        ConfigurationError: the file already exists or cannot be created; ``where`` names it.
    """
    where = os.fspath(path)
    token = secrets.token_urlsafe(32).encode()
    try:
        descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        raise ConfigurationError("token file already exists", where=where) from None
    except OSError as e:
        raise ConfigurationError(f"cannot create token file: {e.strerror}", where=where) from e
    with os.fdopen(descriptor, "wb") as file:
        file.write(token + b"\n")
    return token
