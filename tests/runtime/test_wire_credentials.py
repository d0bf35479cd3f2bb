"""Per-principal credentials in the wire handshake: SCRAM-style proofs, the authority's say,
and credential files.

Everything runs over real TCP on 127.0.0.1 with port 0; waits are bounded by ``fail_after``.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, MutableMapping
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
import pytest
import structlog
from anyio.abc import ByteStream, SocketStream

from runtime._errors import ConfigurationError
from runtime._message import Message
from runtime._wire import Connection, FrameCodec, _FrameStream
from runtime._wire_auth import (
    Admission,
    ClientHello,
    Credential,
    CredentialVerifier,
    Principal,
    TokenAuthority,
    client_handshake,
    load_credential,
    load_token,
    write_private_file,
)
from runtime._wire_errors import AuthenticationError
from runtime._wire_net import WireServer, open_connection, open_server

TOKEN = b"credentials-test-shared-token-42"
WAIT = 10.0


class Ping(Message, frozen=True, kw_only=True, forbid_unknown_fields=True, tag="test.ping"):
    seq: int


CODEC: FrameCodec[Ping] = FrameCodec(Ping, max_frame_size=1 << 16)


class Table:
    """An authority over a dict of credentials: a node may be an agent, a client a client."""

    def __init__(self, *credentials: Credential, refuse: str | None = None) -> None:
        self.verifiers = {c.name: (c.kind, c.verifier()) for c in credentials}
        self.refuse = refuse

    async def admit(self, hello: ClientHello, *, peer: str) -> Admission:
        if hello.method == "token":
            return Admission(key=TOKEN, grant="token-user")
        entry = self.verifiers.get(hello.name)
        if entry is None:
            return Admission(key=CredentialVerifier.decoy(), known=False)
        kind, verifier = entry
        return Admission(key=verifier, grant=f"{kind}-grant", refusal=self.refuse)


def rejections(logs: list[MutableMapping[str, Any]]) -> list[MutableMapping[str, Any]]:
    return [entry for entry in logs if entry["event"] == "wire_connection_rejected"]


@asynccontextmanager
async def server_with(authority: Any) -> AsyncIterator[tuple[WireServer, list[Principal]]]:
    seen: list[Principal] = []

    async def handler(connection: Connection[Ping]) -> None:
        assert connection.principal is not None
        seen.append(connection.principal)
        async for message in connection:
            await connection.send(message)

    async with open_server(handler=handler, codec=CODEC, authority=authority) as server:
        yield server, seen


def connect(server: WireServer, **options: Any) -> Any:
    return open_connection(server.host, server.port, codec=CODEC, **options)


async def test_a_credential_authenticates_as_its_principal() -> None:
    """A client presenting a credential is authenticated under the credential's name, with
    what the authority granted, and the server proves itself back."""
    alice = Credential.generate(kind="client", name="alice")
    with anyio.fail_after(WAIT):
        async with (
            server_with(Table(alice)) as (server, seen),
            connect(server, credential=alice, role="client") as connection,
        ):
            await connection.send(Ping(seq=1))
            assert await connection.receive() == Ping(seq=1)
            async with connect(server, token=TOKEN, name="bob", role="agent") as other:
                await other.send(Ping(seq=2))
                assert await other.receive() == Ping(seq=2)
    assert seen == [
        Principal(name="alice", role="client", method="credential", grant="client-grant"),
        Principal(name="bob", role="agent", method="token", grant="token-user"),
    ]


async def test_a_wrong_secret_and_an_unknown_name_fail_alike_and_are_logged_apart() -> None:
    """The peer cannot tell a wrong secret from an unknown name; the server's log can."""
    alice = Credential.generate(kind="client", name="alice")
    impostor = Credential.generate(kind="client", name="alice")
    stranger = Credential.generate(kind="client", name="stranger")
    answers = []
    with structlog.testing.capture_logs() as logs, anyio.fail_after(WAIT):
        async with server_with(Table(alice)) as (server, seen):
            for credential in (impostor, stranger):
                with pytest.raises(AuthenticationError) as caught:
                    async with connect(server, credential=credential, role="client"):
                        pass
                answers.append(caught.value.reason)
    assert seen == []
    assert answers == ["rejected by the peer: wrong, revoked or unknown credential"] * 2
    assert [e["reason"] for e in rejections(logs)] == [
        "wrong secret for 'alice'",
        "no such credential for 'stranger'",
    ]


async def test_what_the_server_stores_does_not_authenticate() -> None:
    """Someone holding the server's verifier (a stolen journal) cannot log in with it."""
    alice = Credential.generate(kind="client", name="alice")
    verifier = alice.verifier()
    stolen = [
        Credential(kind="client", name="alice", secret=verifier.stored_key),
        Credential(kind="client", name="alice", secret=verifier.server_key),
    ]

    class Stored:
        async def admit(self, hello: ClientHello, *, peer: str) -> Admission:
            return Admission(key=verifier)

    with anyio.fail_after(WAIT):
        async with server_with(Stored()) as (server, seen):
            for credential in stolen:
                with pytest.raises(AuthenticationError, match="wrong, revoked or unknown"):
                    async with connect(server, credential=credential, role="client"):
                        pass
            async with connect(server, credential=alice, role="client"):
                pass
    assert [p.name for p in seen] == ["alice"]


async def test_a_refusal_is_told_only_after_the_proof() -> None:
    """The authority's refusal reaches a peer that proved its secret, not one that did not."""
    alice = Credential.generate(kind="node", name="alice")
    wrong = Credential.generate(kind="node", name="alice")
    with anyio.fail_after(WAIT):
        async with server_with(Table(alice, refuse="not as that role")) as (server, seen):
            with pytest.raises(AuthenticationError, match="not as that role"):
                async with connect(server, credential=alice, role="client"):
                    pass
            with pytest.raises(AuthenticationError, match="wrong, revoked or unknown"):
                async with connect(server, credential=wrong, role="client"):
                    pass
    assert seen == []


async def test_the_client_refuses_a_server_without_the_verifier() -> None:
    """A server that does not hold the credential's verifier cannot prove itself."""
    alice = Credential.generate(kind="client", name="alice")

    class Impostor:
        async def admit(self, hello: ClientHello, *, peer: str) -> Admission:
            # It accepts any proof it cannot check: it answers with a made-up server key.
            real = alice.verifier()
            return Admission(
                key=CredentialVerifier(
                    salt=real.salt, stored_key=real.stored_key, server_key=os.urandom(32)
                )
            )

    with anyio.fail_after(WAIT):
        async with server_with(Impostor()) as (server, _seen):
            with pytest.raises(AuthenticationError, match="could not prove"):
                async with connect(server, credential=alice, role="client"):
                    pass


async def test_the_secret_never_crosses_the_wire() -> None:
    """Neither side writes the credential's secret (raw or encoded) during the handshake."""
    alice = Credential.generate(kind="client", name="alice")
    traffic = bytearray()

    class Recorder(ByteStream):
        def __init__(self, inner: SocketStream) -> None:
            self.inner = inner

        async def send(self, item: bytes) -> None:
            traffic.extend(item)
            await self.inner.send(item)

        async def receive(self, max_bytes: int = 65536) -> bytes:
            data = await self.inner.receive(max_bytes)
            traffic.extend(data)
            return data

        async def send_eof(self) -> None:
            await self.inner.send_eof()

        async def aclose(self) -> None:
            await self.inner.aclose()

    with anyio.fail_after(WAIT):
        async with server_with(Table(alice)) as (server, _seen):
            raw = await anyio.connect_tcp(server.host, server.port)
            frames = _FrameStream(Recorder(raw), "test")
            try:
                await client_handshake(frames, credential=alice, role="client", name="")
            finally:
                await frames.aclose()
    assert len(traffic) > 200  # the whole handshake, both directions
    assert alice.secret not in traffic
    assert alice.text().rsplit("/", 1)[1].encode() not in traffic


async def test_a_token_only_server_refuses_credentials_with_a_reason() -> None:
    """A server built with just the shared token says it does not take credentials."""
    alice = Credential.generate(kind="client", name="alice")
    with anyio.fail_after(WAIT):
        async with server_with(TokenAuthority(TOKEN)) as (server, _seen):
            with pytest.raises(AuthenticationError, match="accepts only the shared token"):
                async with connect(server, credential=alice, role="client"):
                    pass


@pytest.mark.parametrize("both", [False, True])
async def test_a_client_needs_exactly_one_secret(both: bool) -> None:
    """Giving both or neither of token and credential is a configuration error."""
    alice = Credential.generate(kind="client", name="alice")
    options: dict[str, Any] = {"token": TOKEN, "credential": alice, "name": "x"} if both else {}
    with pytest.raises(ConfigurationError, match="exactly one"):
        async with open_connection("127.0.0.1", 1, codec=CODEC, **options):
            pass


# -- credential text and files --------------------------------------------------------------------


def test_credential_text_round_trips_and_hides_the_secret_from_repr() -> None:
    """A credential's text form parses back to it; its repr does not show the secret."""
    credential = Credential.generate(kind="node", name="render-07")
    text = credential.text()
    assert text.startswith("tfcred1/node/render-07/")
    assert Credential.parse(text) == credential
    assert text.rsplit("/", 1)[1] not in repr(credential)


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("hello", "not a taskfarm credential"),
        ("tfcred1/node/x", "not a taskfarm credential"),
        ("tfcred2/node/x/AAAA", "not a taskfarm credential"),
        ("tfcred1/Node/x/" + "A" * 43, "invalid credential kind"),
        ("tfcred1/node/bad name/" + "A" * 43, "not a valid name"),
        ("tfcred1/node/x/AAAA", "not 32 bytes"),
        ("tfcred1/node/x/!!!!", "not 32 bytes"),
    ],
)
def test_a_bad_credential_text_is_refused_naming_its_source(text: str, problem: str) -> None:
    """Each malformed credential gets an error naming what is wrong and where it came from."""
    with pytest.raises(ConfigurationError, match=problem) as caught:
        Credential.parse(text, where="node.cred")
    assert str(caught.value).startswith("node.cred: ")


def test_credential_files_are_private_and_checked(tmp_path: Path) -> None:
    """A credential file loads when private; open to others, or a token, it is refused."""
    credential = Credential.generate(kind="client", name="ops")
    path = tmp_path / "ops.cred"
    write_private_file(path, credential.text())
    assert load_credential(path) == credential
    with pytest.raises(ConfigurationError, match="holds a credential, not the shared token"):
        load_token(path)
    with pytest.raises(ConfigurationError, match="already exists"):
        write_private_file(path, "again")
    os.chmod(path, 0o644)
    with pytest.raises(ConfigurationError, match="chmod 600"):
        load_credential(path)
    token_file = tmp_path / "token"
    write_private_file(token_file, TOKEN.decode())
    with pytest.raises(ConfigurationError, match="not a taskfarm credential") as caught:
        load_credential(token_file)
    assert str(token_file) in str(caught.value)
