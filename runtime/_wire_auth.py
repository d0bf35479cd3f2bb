"""Mutual challenge-response authentication: a shared token or a per-principal credential.

No secret ever crosses the wire, in clear or otherwise.  The client names how it proves itself
(``method``) in its hello, and each side proves it knows its secret with an HMAC-SHA256 over a
transcript of fresh nonces from both sides::

    client -> server   ClientHello(version, role, name, nonce, method)
    server -> client   ServerChallenge(version, name, nonce, salt)
    client -> server   ClientProof(proof)
    server -> client   ServerProof(proof)   or Rejected(reason)

``method="token"``: both sides hold the same shared token and the proofs are
``HMAC(token, transcript)`` with a different label per direction.

``method="credential"``: the client holds a :class:`Credential` issued to one principal (a node
or a client, by name); the server holds only its :class:`CredentialVerifier` (SCRAM's stored
key and server key, RFC 5802), never the secret nor anything that would let a reader of the
server's records log in.  The client proves it knows the secret with
``ClientKey XOR HMAC(StoredKey, transcript)``; the server checks ``SHA256(ClientKey) ==
StoredKey`` and proves itself with ``HMAC(ServerKey, transcript)``.  Secrets are 256 random
bits, so one HMAC with a per-credential salt is the key derivation (no password stretching is
needed: there is nothing to guess).

The transcript binds both nonces, the protocol version, the client's role and name, the
server's name (and, for credentials, the method and the salt), so a proof cannot be replayed on
another connection or reflected back.  The server proves itself only after the client has, so
an unauthenticated caller never obtains an HMAC to attack offline.  Which secret a hello is
checked against, and what it is granted, is the server's :class:`Authority`'s decision.

The client speaks first so that a transport mismatch fails at once: a plain client's first
frame is not a TLS ClientHello, and a TLS ClientHello read as a frame header claims ~370 MB,
far over the handshake frame limit.  Handshake frames have their own small limit, so an
unauthenticated peer can never make the server buffer a full-size frame.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import os
import re
import secrets
import stat
from dataclasses import dataclass, field
from typing import Annotated, Final, Protocol, TypeVar

import msgspec

from ._errors import ConfigurationError
from ._message import Message
from ._wire import FrameCodec, _FrameStream
from ._wire_errors import AuthenticationError, WireError

__all__ = [
    "MIN_TOKEN_BYTES",
    "PROTOCOL_VERSION",
    "Admission",
    "Authority",
    "Credential",
    "CredentialVerifier",
    "Principal",
    "TokenAuthority",
    "create_token_file",
    "load_credential",
    "load_token",
    "write_private_file",
]

PROTOCOL_VERSION: Final = 1
"""The wire protocol version, checked by both sides during the handshake."""

MIN_TOKEN_BYTES: Final = 16
"""The shortest shared token accepted."""

CREDENTIAL_PREFIX: Final = "tfcred1"
"""The first field of a credential's text form (``tfcred1/KIND/NAME/SECRET``)."""

_MAX_TOKEN_FILE_BYTES: Final = 4096
_NONCE_BYTES: Final = 32
_SECRET_BYTES: Final = 32
_SALT_BYTES: Final = 16
_HANDSHAKE_FRAME_LIMIT: Final = 4096
_TRANSCRIPT_LABEL: Final = "taskfarm-wire"
_NAME = re.compile(r"[A-Za-z0-9_.@:-]{1,200}")

Nonce = Annotated[bytes, msgspec.Meta(min_length=_NONCE_BYTES, max_length=_NONCE_BYTES)]
Proof = Annotated[bytes, msgspec.Meta(min_length=32, max_length=32)]
Label = Annotated[str, msgspec.Meta(min_length=1, max_length=256)]
Salt = Annotated[bytes, msgspec.Meta(max_length=64)]


# Hello and challenge stay lenient about unknown fields on purpose: a newer peer's hello must
# still decode, so that a version mismatch gets a clear answer instead of a decode error.  The
# fields added after version 1 (``method``, ``salt``) have defaults that mean what version 1
# did, so a peer that predates credentials still authenticates with the shared token.
class ClientHello(Message, frozen=True, kw_only=True, tag="wire.client_hello"):
    version: int
    role: Label
    name: Label
    nonce: Nonce
    method: Label = "token"


class ServerChallenge(Message, frozen=True, kw_only=True, tag="wire.server_challenge"):
    version: int
    name: Label
    nonce: Nonce
    salt: Salt = b""


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
    retry: bool = False  # refused for now (a limit, a timeout), not for good: try again later


Handshake = ClientHello | ServerChallenge | ClientProof | ServerProof | Rejected
HANDSHAKE_CODEC: FrameCodec[Handshake] = FrameCodec(
    Handshake, max_frame_size=_HANDSHAKE_FRAME_LIMIT
)

_H = TypeVar("_H", ClientHello, ServerChallenge, ClientProof, ServerProof)
_transcript_encoder = msgspec.msgpack.Encoder()


# -- credentials ----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class CredentialVerifier:
    """What a server stores to check a credential: a salt, SCRAM's stored key and server key.

    Neither key lets anyone authenticate as the credential's principal (that takes the client
    key, which only the secret yields); the server key lets its holder pass as the *server*,
    which is why a deployment that fears a stolen journal also runs TLS.
    """

    salt: bytes
    stored_key: bytes
    server_key: bytes

    @classmethod
    def decoy(cls) -> CredentialVerifier:
        """Return a verifier no secret matches (for names that have no credential)."""
        return cls(
            salt=secrets.token_bytes(_SALT_BYTES),
            stored_key=secrets.token_bytes(32),
            server_key=secrets.token_bytes(32),
        )


def _client_and_server_keys(secret: bytes, salt: bytes) -> tuple[bytes, bytes]:
    salted = hmac.new(salt, secret, hashlib.sha256).digest()
    client_key = hmac.new(salted, b"Client Key", hashlib.sha256).digest()
    server_key = hmac.new(salted, b"Server Key", hashlib.sha256).digest()
    return client_key, server_key


def _credential_problem(kind: str, name: str, secret: bytes) -> str | None:
    if not re.fullmatch(r"[a-z]{1,32}", kind):
        return f"invalid credential kind {kind!r}"
    if not _NAME.fullmatch(name):
        return f"{name!r} is not a valid name (1-200 of letters, digits and _.@:-)"
    if len(secret) != _SECRET_BYTES:
        return f"the secret is not {_SECRET_BYTES} bytes of base64url"
    return None


@dataclass(frozen=True, slots=True, kw_only=True)
class Credential:
    """A principal's secret, as issued: ``kind`` (``"node"``, ``"client"``), ``name``, and 32
    random bytes.  Its text form is ``tfcred1/KIND/NAME/SECRET`` (base64url), one line.

    Build one with :meth:`generate` or :meth:`parse` (or :func:`load_credential`).
    """

    kind: str
    name: str
    secret: bytes = field(repr=False)

    def __post_init__(self) -> None:
        problem = _credential_problem(self.kind, self.name, self.secret)
        if problem is not None:
            raise ConfigurationError(problem, where="Credential")

    @classmethod
    def generate(cls, *, kind: str, name: str) -> Credential:
        """Return a new credential with a fresh random secret.

        Raises:
            ConfigurationError: the kind or the name is not valid.
        """
        return cls(kind=kind, name=name, secret=secrets.token_bytes(_SECRET_BYTES))

    @classmethod
    def parse(cls, text: str, *, where: str = "credential") -> Credential:
        """Parse a credential's text form.

        Raises:
            ConfigurationError: the text is not a credential; ``where`` names its source.
        """
        parts = text.strip().split("/")
        if len(parts) != 4 or parts[0] != CREDENTIAL_PREFIX:
            raise ConfigurationError(
                f"not a taskfarm credential (expected {CREDENTIAL_PREFIX}/KIND/NAME/SECRET)",
                where=where,
            )
        _, kind, name, encoded = parts
        try:
            secret = base64.urlsafe_b64decode(encoded + "=" * (-len(encoded) % 4))
        except (binascii.Error, ValueError):
            secret = b""
        problem = _credential_problem(kind, name, secret)
        if problem is not None:
            raise ConfigurationError(problem, where=where)
        return cls(kind=kind, name=name, secret=secret)

    def text(self) -> str:
        """Return the text form, ``tfcred1/KIND/NAME/SECRET`` (keep it secret)."""
        encoded = base64.urlsafe_b64encode(self.secret).decode().rstrip("=")
        return f"{CREDENTIAL_PREFIX}/{self.kind}/{self.name}/{encoded}"

    def verifier(self, *, salt: bytes | None = None) -> CredentialVerifier:
        """Return what a server stores to check this credential (a fresh salt by default)."""
        salt = secrets.token_bytes(_SALT_BYTES) if salt is None else salt
        client_key, server_key = _client_and_server_keys(self.secret, salt)
        return CredentialVerifier(
            salt=salt, stored_key=hashlib.sha256(client_key).digest(), server_key=server_key
        )


# -- what the server decides ------------------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class Principal:
    """Who is at the other end of an authenticated connection.

    ``name`` and ``role`` come from the hello (``"agent"``, ``"client"``); ``method`` is how the
    peer proved itself (``"token"``: the shared token, which anyone holding it can use under any
    name; ``"credential"``: a secret issued to ``name`` alone); ``grant`` is what the server's
    :class:`Authority` granted (opaque to the wire layer, e.g. a client's role).
    """

    name: str
    role: str
    method: str = "token"
    grant: str = ""


@dataclass(frozen=True, slots=True, kw_only=True)
class Admission:
    """An authority's answer to a hello: the secret to check the proof against and the grant.

    ``key`` is the shared token (method ``"token"``) or a :class:`CredentialVerifier` (method
    ``"credential"``).  ``refusal``, when set, refuses the peer even with a valid proof: it is
    told to the peer only once it has proved itself.  ``known`` False means ``key`` is a decoy
    (no such credential): the proof fails as for a wrong secret, and the log says which.
    """

    key: bytes | CredentialVerifier
    grant: str = ""
    refusal: str | None = None
    known: bool = True


class Authority(Protocol):
    """Decides, per hello, which secret a peer must prove and what it is granted."""

    async def admit(self, hello: ClientHello, *, peer: str) -> Admission:
        """Return how to check ``hello``'s proof.

        Raises:
            AuthenticationError: the hello is refused before any proof (told to the peer).
        """
        ...


class TokenAuthority:
    """The shared token alone: any role, any name, no credentials."""

    def __init__(self, token: bytes) -> None:
        """Raises:
        ConfigurationError: the token is unusable (see :func:`check_token`).
        """
        self._token = check_token(token)

    async def admit(self, hello: ClientHello, *, peer: str) -> Admission:
        if hello.method != "token":
            raise AuthenticationError(
                peer,
                reason=f"this server accepts only the shared token, not method {hello.method!r}",
                name=hello.name,
            )
        return Admission(key=self._token)


# -- the handshake --------------------------------------------------------------------------


def _transcript(side: str, hello: ClientHello, challenge: ServerChallenge) -> bytes:
    fields: tuple[object, ...] = (
        _TRANSCRIPT_LABEL,
        PROTOCOL_VERSION,
        side,
        hello.nonce,
        challenge.nonce,
        hello.role,
        hello.name,
        challenge.name,
    )
    if hello.method != "token":  # version-1 token transcripts stay exactly as they were
        fields = (*fields, hello.method, challenge.salt)
    return _transcript_encoder.encode(fields)


def _proof(token: bytes, side: str, hello: ClientHello, challenge: ServerChallenge) -> bytes:
    return hmac.new(token, _transcript(side, hello, challenge), hashlib.sha256).digest()


def _xor(left: bytes, right: bytes) -> bytes:
    return bytes(a ^ b for a, b in zip(left, right, strict=True))


def _credential_proof(
    credential: Credential, hello: ClientHello, challenge: ServerChallenge
) -> tuple[bytes, bytes]:
    """Return the client's proof and the server proof it expects back."""
    client_key, server_key = _client_and_server_keys(credential.secret, challenge.salt)
    stored_key = hashlib.sha256(client_key).digest()
    signature = _proof(stored_key, "client", hello, challenge)
    return _xor(client_key, signature), _proof(server_key, "server", hello, challenge)


def _check_credential_proof(
    verifier: CredentialVerifier, proof: bytes, hello: ClientHello, challenge: ServerChallenge
) -> bool:
    client_key = _xor(proof, _proof(verifier.stored_key, "client", hello, challenge))
    return hmac.compare_digest(hashlib.sha256(client_key).digest(), verifier.stored_key)


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
            frames.peer,
            reason=f"rejected by the peer: {message.reason}",
            name=name,
            retryable=message.retry,
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


async def send_rejected(frames: _FrameStream, reason: str, *, retry: bool = False) -> None:
    """Tell the peer why it is refused, and whether for now only (best effort: it may already
    be gone)."""
    try:
        await frames.send_frame(HANDSHAKE_CODEC.encode(Rejected(reason=reason[:512], retry=retry)))
    except WireError:
        pass  # the rejection stands either way


async def _reject(
    frames: _FrameStream, reason: str, *, name: str, logged: str | None = None
) -> AuthenticationError:
    """Tell the peer ``reason`` and return the error to raise (whose reason, for the server's
    log, is ``logged`` when the peer must not learn the details)."""
    await send_rejected(frames, reason)
    return AuthenticationError(frames.peer, reason=logged or reason, name=name)


async def client_handshake(
    frames: _FrameStream,
    *,
    token: bytes | None = None,
    credential: Credential | None = None,
    role: str,
    name: str,
) -> ServerChallenge:
    """Authenticate to a server with ``token`` or ``credential`` (whose name is the one
    presented) and check the server's proof; return its challenge (with its name).

    Raises:
        AuthenticationError: the server refused us, failed to prove it knows the secret, or
            broke the handshake.
    """
    if (token is None) == (credential is None):
        raise ConfigurationError("give exactly one of token and credential", where="handshake")
    hello = ClientHello(
        version=PROTOCOL_VERSION,
        role=role,
        name=credential.name if credential is not None else name,
        nonce=secrets.token_bytes(_NONCE_BYTES),
        method="credential" if credential is not None else "token",
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
    if credential is not None:
        if len(challenge.salt) < _SALT_BYTES:
            raise AuthenticationError(
                frames.peer,
                reason="the server does not support credentials (no salt in its challenge)",
                name=challenge.name,
            )
        proof, expected = _credential_proof(credential, hello, challenge)
    else:
        assert token is not None
        proof, expected = _proof(token, "client", hello, challenge), b""
    await _send(frames, ClientProof(proof=proof))
    server_proof = await _expect(frames, ServerProof, name=challenge.name)
    if token is not None:
        expected = _proof(token, "server", hello, challenge)
    if not hmac.compare_digest(server_proof.proof, expected):
        raise AuthenticationError(
            frames.peer,
            reason="the server could not prove it knows the secret (wrong secret or impostor)",
            name=challenge.name,
        )
    return challenge


async def server_handshake(
    frames: _FrameStream, *, authority: Authority, name: str
) -> tuple[ClientHello, Principal]:
    """Authenticate a client as ``authority`` says and prove ourselves back; return its hello
    and who it is.

    Raises:
        AuthenticationError: wrong secret, a refusal of the authority, unsupported version or
            method, or a broken handshake.
    """
    hello = await _expect(frames, ClientHello)
    if hello.version != PROTOCOL_VERSION:
        raise await _reject(
            frames,
            f"unsupported protocol version {hello.version} (server speaks {PROTOCOL_VERSION})",
            name=hello.name,
        )
    if hello.method not in ("token", "credential"):
        raise await _reject(
            frames, f"unsupported authentication method {hello.method!r}", name=hello.name
        )
    try:
        admission = await authority.admit(hello, peer=frames.peer)
    except AuthenticationError as error:
        raise await _reject(frames, error.reason, name=hello.name) from None
    key = admission.key
    if isinstance(key, CredentialVerifier) != (hello.method == "credential"):
        # The authority answered for another method: refuse rather than check the wrong way.
        raise await _reject(frames, "internal authority mismatch", name=hello.name)
    challenge = ServerChallenge(
        version=PROTOCOL_VERSION,
        name=name,
        nonce=secrets.token_bytes(_NONCE_BYTES),
        salt=key.salt if isinstance(key, CredentialVerifier) else b"",
    )
    await _send(frames, challenge, name=hello.name)
    proof = await _expect(frames, ClientProof, name=hello.name)
    if isinstance(key, CredentialVerifier):
        if not _check_credential_proof(key, proof.proof, hello, challenge):
            logged = "wrong secret" if admission.known else "no such credential"
            raise await _reject(
                frames,
                "wrong, revoked or unknown credential",
                name=hello.name,
                logged=f"{logged} for {hello.name!r}",
            )
        server_proof = _proof(key.server_key, "server", hello, challenge)
    else:
        if not hmac.compare_digest(proof.proof, _proof(key, "client", hello, challenge)):
            raise await _reject(frames, "wrong token", name=hello.name)
        server_proof = _proof(key, "server", hello, challenge)
    if admission.refusal is not None:
        raise await _reject(frames, admission.refusal, name=hello.name)
    await _send(frames, ServerProof(proof=server_proof))
    principal = Principal(
        name=hello.name, role=hello.role, method=hello.method, grant=admission.grant
    )
    return hello, principal


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


def _read_secret_file(path: str | os.PathLike[str], what: str) -> bytes:
    """Read a private secret file, stripped of surrounding whitespace."""
    where = os.fspath(path)
    try:
        with open(path, "rb") as file:
            status = os.fstat(file.fileno())
            if not stat.S_ISREG(status.st_mode):
                raise ConfigurationError(f"{what} file is not a regular file", where=where)
            if os.name == "posix" and status.st_mode & 0o077:
                raise ConfigurationError(
                    f"{what} file is accessible by group or others "
                    f"(mode {stat.S_IMODE(status.st_mode):04o}); run: chmod 600 {where}",
                    where=where,
                )
            data = file.read(_MAX_TOKEN_FILE_BYTES + 1)
    except FileNotFoundError:
        raise ConfigurationError(f"{what} file not found", where=where) from None
    except IsADirectoryError:
        raise ConfigurationError(f"{what} file is a directory", where=where) from None
    except PermissionError:
        raise ConfigurationError(
            f"{what} file is not readable (permission denied)", where=where
        ) from None
    except OSError as e:
        raise ConfigurationError(f"cannot read {what} file: {e.strerror}", where=where) from e
    if len(data) > _MAX_TOKEN_FILE_BYTES:
        raise ConfigurationError(
            f"{what} file is larger than {_MAX_TOKEN_FILE_BYTES} bytes", where=where
        )
    secret = data.strip()
    if not secret:
        raise ConfigurationError(f"{what} file is empty", where=where)
    return secret


def load_token(path: str | os.PathLike[str]) -> bytes:
    """Read a shared token from a file, without surrounding whitespace.

    The file must be private to its owner (``chmod 600``): a token that other users can read
    lets them impersonate any agent.

    Raises:
        ConfigurationError: the file is missing, unreadable, not a regular file, readable or
            writable by group or others, empty, too large, holds a credential instead of a
            token, or holds a token shorter than ``MIN_TOKEN_BYTES``; ``where`` names the file.
    """
    token = _read_secret_file(path, "token")
    if token.startswith(CREDENTIAL_PREFIX.encode() + b"/"):
        raise ConfigurationError(
            "this file holds a credential, not the shared token (pass it as a credential file)",
            where=os.fspath(path),
        )
    return check_token(token, where=os.fspath(path))


def load_credential(path: str | os.PathLike[str]) -> Credential:
    """Read a credential (``tfcred1/KIND/NAME/SECRET``) from a private file.

    Raises:
        ConfigurationError: the file is missing, unreadable, not a regular file, readable or
            writable by group or others, empty, too large, or not a credential; ``where``
            names the file.
    """
    data = _read_secret_file(path, "credential")
    try:
        text = data.decode("ascii")
    except UnicodeDecodeError:
        text = ""
    return Credential.parse(text, where=os.fspath(path))


def write_private_file(path: str | os.PathLike[str], text: str) -> None:
    """Write ``text`` and a newline to a new file readable only by its owner.

    Raises:
        ConfigurationError: the file already exists or cannot be created; ``where`` names it.
    """
    where = os.fspath(path)
    try:
        descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        raise ConfigurationError("file already exists", where=where) from None
    except OSError as e:
        raise ConfigurationError(f"cannot create file: {e.strerror}", where=where) from e
    with os.fdopen(descriptor, "w", encoding="ascii") as file:
        file.write(text + "\n")


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
