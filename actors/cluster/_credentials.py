"""Who may connect to the coordinator: the join token, per-node and per-client credentials.

Design notes:

- **A credential belongs to one principal**, a node or a client, by name: names form one
  namespace.  ``taskfarm token issue`` creates it where it runs (a fresh 256-bit secret,
  shown once) and sends the coordinator only its *verifier* (SCRAM's salt, stored key and
  server key; see ``runtime``'s wire authentication), which the coordinator journals: the
  secret never crosses the network, and reading the journal does not let anyone log in as
  the principal.
- **Credentials are journaled facts** in their own stream, ``auth:credentials``
  (:class:`CredentialIssued`, :class:`CredentialRevoked`), decoded by :data:`AUTH_CODEC`
  (registered under the ``taskfarm.events`` entry point, so ``replay`` and ``journal
  inspect`` show them) and folded by :class:`CredentialsAggregate`.  The store's table is a
  projection of that stream, loaded when the coordinator starts; issuing or revoking appends
  with the stream's expected version.  One process writes a journal at a time (the
  coordinator, or ``taskfarm token --journal`` while it is stopped: see ``lock_journal``), so
  the table never misses a change.
- **The join token** (the shared token file) lets an agent join under any name that has no
  credential bound to it, and lets a client act with ``join_client_role`` (``admin`` by
  default: the token is how the first admin issues credentials; ``None`` refuses clients).
  The coordinator can run without it (``serve --no-join-token``): then only credentials work.
- **A credential acts only as its kind**: a node credential cannot act as a client and a
  client credential cannot join as an agent.  A refusal is told to the peer only after it
  has proved it holds the secret it presented; an unknown or revoked name fails like a wrong
  secret (the coordinator's log says which).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Annotated, Literal

import msgspec

from actors._errors import CredentialError
from persistence import Event, EventCodec, Journal, VersionConflictError
from runtime import (
    Admission,
    AuthenticationError,
    ClientHello,
    Clock,
    Credential,
    CredentialVerifier,
    Message,
    get_logger,
)

__all__ = [
    "AUTH_CODEC",
    "AUTH_STREAM",
    "ROLES",
    "Change",
    "CredentialInfo",
    "CredentialIssued",
    "CredentialRecord",
    "CredentialRevoked",
    "CredentialStore",
    "CredentialTable",
    "CredentialsAggregate",
    "CredentialsReply",
    "IssueCredentialRequest",
    "IssuedCredentialReply",
    "ListCredentialsRequest",
    "RevokeCredentialRequest",
    "Role",
    "role_rank",
]

_log = get_logger("actors.credentials")

AUTH_STREAM = "auth:credentials"
"""The stream that holds every credential issued and revoked."""

AUTH_CODEC = EventCodec()
"""The codec of the credential events (merged into the coordinator's journal codec)."""

Role = Literal["read", "submit", "operator", "admin"]
"""A client's role; each includes the ones before it."""

ROLES: tuple[Role, ...] = ("read", "submit", "operator", "admin")
"""The client roles, weakest first."""

Kind = Literal["node", "client"]

# The handshake role a credential of each kind may take.
_ROLE_OF_KIND: Mapping[str, str] = {"node": "agent", "client": "client"}

Name = Annotated[str, msgspec.Meta(min_length=1, max_length=200, pattern=r"^[A-Za-z0-9_.@:-]+$")]


def role_rank(role: str) -> int:
    """Return a role's rank (``read`` is 0), or -1 for anything that is not a role."""
    return next((rank for rank, name in enumerate(ROLES) if name == role), -1)


# -- events -----------------------------------------------------------------------------------


@AUTH_CODEC.register
class CredentialIssued(Event, frozen=True, kw_only=True, tag="auth.credential_issued"):
    """A credential was issued to ``name`` (replacing any earlier one of that name); only its
    verifier is recorded."""

    name: str
    kind: str
    role: str | None = None
    salt: bytes
    stored_key: bytes
    server_key: bytes
    issued_by: str = ""
    issued_at: datetime


@AUTH_CODEC.register
class CredentialRevoked(Event, frozen=True, kw_only=True, tag="auth.credential_revoked"):
    """The credential of ``name`` no longer authenticates anyone."""

    name: str
    revoked_by: str = ""
    revoked_at: datetime


class CredentialRecord(msgspec.Struct, frozen=True, kw_only=True):
    """One active credential: who it is for, what it may do, and its verifier."""

    name: str
    kind: str
    role: str | None
    salt: bytes
    stored_key: bytes
    server_key: bytes
    issued_by: str
    issued_at: datetime

    def verifier(self) -> CredentialVerifier:
        """Return the verifier the handshake checks proofs against."""
        return CredentialVerifier(
            salt=self.salt, stored_key=self.stored_key, server_key=self.server_key
        )

    def info(self) -> CredentialInfo:
        """Return what ``token list`` shows (no key material)."""
        return CredentialInfo(
            name=self.name,
            kind=self.kind,
            role=self.role,
            issued_by=self.issued_by,
            issued_at=self.issued_at.isoformat(),
        )


class CredentialTable(msgspec.Struct, kw_only=True):
    """The active credentials by name (the state of the ``auth:credentials`` stream)."""

    active: dict[str, CredentialRecord] = {}
    revoked: int = 0


class CredentialsAggregate:
    """Folds the ``auth:credentials`` stream into a :class:`CredentialTable` (no I/O)."""

    state_type = CredentialTable
    schema_version = 1

    def initial_state(self, stream_id: str) -> CredentialTable:
        return CredentialTable(active={})

    def apply(self, state: CredentialTable, event: Event) -> CredentialTable:
        match event:
            case CredentialIssued():
                state.active[event.name] = CredentialRecord(
                    name=event.name,
                    kind=event.kind,
                    role=event.role,
                    salt=event.salt,
                    stored_key=event.stored_key,
                    server_key=event.server_key,
                    issued_by=event.issued_by,
                    issued_at=event.issued_at,
                )
            case CredentialRevoked():
                if state.active.pop(event.name, None) is not None:
                    state.revoked += 1
            case _:
                pass  # an event of a newer version of this stream: nothing known to fold
        return state


# -- the wire messages of ``taskfarm token`` ----------------------------------------------------


class _Request(Message, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Base for the credential requests a client sends (inbound: unknown fields refused)."""


class IssueCredentialRequest(_Request, frozen=True, kw_only=True, tag="client.token_issue"):
    """Register a credential for a node, or for a client with a role (``replace``: a new
    secret for a name that has one).

    The client generates the secret and sends only its verifier, so the secret never crosses
    the network, not even to the coordinator.
    """

    kind: Kind
    name: Name
    role: Role | None = None
    replace: bool = False
    salt: Annotated[bytes, msgspec.Meta(min_length=16, max_length=64)]
    stored_key: Annotated[bytes, msgspec.Meta(min_length=32, max_length=32)]
    server_key: Annotated[bytes, msgspec.Meta(min_length=32, max_length=32)]

    @classmethod
    def of(
        cls, credential: Credential, *, role: Role | None = None, replace: bool = False
    ) -> IssueCredentialRequest:
        """Return the request that registers ``credential`` (a fresh salt each time)."""
        verifier = credential.verifier()
        return msgspec.convert(
            {
                "kind": credential.kind,
                "name": credential.name,
                "role": role,
                "replace": replace,
                "salt": verifier.salt,
                "stored_key": verifier.stored_key,
                "server_key": verifier.server_key,
            },
            cls,
        )

    def verifier(self) -> CredentialVerifier:
        """Return the verifier to register."""
        return CredentialVerifier(
            salt=self.salt, stored_key=self.stored_key, server_key=self.server_key
        )


class RevokeCredentialRequest(_Request, frozen=True, kw_only=True, tag="client.token_revoke"):
    """Revoke the credential of ``name`` (its live connections are closed)."""

    name: Name


class ListCredentialsRequest(_Request, frozen=True, kw_only=True, tag="client.token_list"):
    """List the active credentials (never their secrets: the coordinator has none)."""


class CredentialInfo(msgspec.Struct, frozen=True, kw_only=True):
    """One active credential, as ``taskfarm token list`` shows it."""

    name: str
    kind: str
    role: str | None = None
    issued_by: str = ""
    issued_at: str = ""


class IssuedCredentialReply(Message, frozen=True, kw_only=True, tag="coordinator.credential"):
    """The credential is registered (the client that generated it holds its secret)."""

    info: CredentialInfo


class CredentialsReply(Message, frozen=True, kw_only=True, tag="coordinator.credentials"):
    """The active credentials."""

    credentials: tuple[CredentialInfo, ...]


# -- the store --------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Change:
    """A change of the table that live connections may have to follow: ``revoked`` (or
    replaced: connections made with the old secret must go), ``issued`` (a name is bound now:
    a join-token agent under it must go)."""

    name: str
    what: Literal["issued", "revoked"]


class CredentialStore:
    """The coordinator's :class:`runtime.Authority`: the credentials table, kept in step with
    the journal, and the join token policy.

    Build it, then ``await load()`` before the first handshake.
    """

    def __init__(
        self,
        journal: Journal,
        clock: Clock,
        *,
        join_token: bytes | None,
        join_client_role: Role | None = "admin",
        on_change: Callable[[Change], None] | None = None,
    ) -> None:
        if join_client_role is not None and join_client_role not in ROLES:
            raise CredentialError(f"unknown role {join_client_role!r}", name="(join token)")
        self._journal = journal
        self._clock = clock
        self._join_token = join_token
        self._join_client_role = join_client_role
        self._aggregate = CredentialsAggregate()
        self._table = CredentialTable(active={})
        self._version = 0
        self._on_change = on_change

    @property
    def join_token(self) -> bytes | None:
        """The join token, or None when it is turned off."""
        return self._join_token

    # -- the table -------------------------------------------------------------------------------

    async def load(self) -> None:
        """Read the stream (again) from the start."""
        self._table = CredentialTable(active={})
        self._version = 0
        await self._catch_up()

    async def _catch_up(self) -> None:
        before = dict(self._table.active)
        for record in await self._journal.read_stream(AUTH_STREAM, after_version=self._version):
            self._table = self._aggregate.apply(self._table, record.event)
            self._version = record.version
        if self._on_change is None:
            return
        for name in sorted(set(before) | set(self._table.active)):
            old, new = before.get(name), self._table.active.get(name)
            if old is not None and (new is None or new.stored_key != old.stored_key):
                self._on_change(Change(name, "revoked"))
            if new is not None and old is None:
                self._on_change(Change(name, "issued"))

    def bound(self, name: str) -> CredentialRecord | None:
        """Return the active credential of ``name``, or None."""
        return self._table.active.get(name)

    def records(self) -> list[CredentialRecord]:
        """Return the active credentials, by name."""
        return [self._table.active[name] for name in sorted(self._table.active)]

    # -- issue and revoke --------------------------------------------------------------------------

    async def issue(
        self,
        *,
        kind: str,
        name: str,
        role: str | None = None,
        by: str,
        replace: bool = False,
    ) -> Credential:
        """Generate a credential for ``name`` and register it; return it (the only time its
        secret exists outside the principal's file).

        Raises:
            CredentialError: as :meth:`register`.
            ConfigurationError: ``kind`` or ``name`` is not valid.
        """
        credential = Credential.generate(kind=kind, name=name)
        await self.register(
            kind=kind, name=name, role=role, verifier=credential.verifier(), by=by, replace=replace
        )
        return credential

    async def register(
        self,
        *,
        kind: str,
        name: str,
        role: str | None,
        verifier: CredentialVerifier,
        by: str,
        replace: bool = False,
    ) -> CredentialRecord:
        """Journal the verifier of a credential issued to ``name``; return the record.

        Raises:
            CredentialError: the kind or role is wrong for it, or ``name`` already has a
                credential and ``replace`` is False.
        """
        if kind not in _ROLE_OF_KIND:
            raise CredentialError(f"unknown credential kind {kind!r}", name=name)
        if kind == "client" and role not in ROLES:
            raise CredentialError(
                f"a client credential needs a role: one of {', '.join(ROLES)}", name=name
            )
        if kind == "node" and role is not None:
            raise CredentialError("a node credential has no role", name=name)
        event = CredentialIssued(
            name=name,
            kind=kind,
            role=role,
            salt=verifier.salt,
            stored_key=verifier.stored_key,
            server_key=verifier.server_key,
            issued_by=by,
            issued_at=self._clock.now(),
        )

        def check() -> None:
            existing = self.bound(name)
            if existing is not None and not replace:
                raise CredentialError(
                    f"{name!r} already has a {existing.kind} credential; revoke it first "
                    "(taskfarm token revoke) or issue with --replace",
                    name=name,
                )

        await self._append(event, check)
        _log.warning(
            "credential_issued", principal=name, kind=kind, role=role, by=by, replaced=replace
        )
        record = self.bound(name)
        assert record is not None
        return record

    async def revoke(self, name: str, *, by: str) -> CredentialRecord:
        """Revoke the credential of ``name``; return what it was.

        Raises:
            CredentialError: ``name`` has no credential.
        """
        record: list[CredentialRecord] = []

        def check() -> None:
            existing = self.bound(name)
            if existing is None:
                raise CredentialError(f"no credential named {name!r}", name=name)
            record[:] = [existing]

        await self._append(
            CredentialRevoked(name=name, revoked_by=by, revoked_at=self._clock.now()), check
        )
        _log.warning("credential_revoked", principal=name, kind=record[0].kind, by=by)
        return record[0]

    async def _append(
        self, event: CredentialIssued | CredentialRevoked, check: Callable[[], None]
    ) -> None:
        """Append ``event`` after ``check()`` holds on an up-to-date table, retrying once if
        another writer appended meanwhile."""
        await self._catch_up()
        for last_try in (False, True):
            check()
            try:
                await self._journal.append(AUTH_STREAM, [event], expected_version=self._version)
            except VersionConflictError:
                await self._catch_up()
                if last_try:
                    raise
                continue
            await self._catch_up()
            return

    # -- the authority -----------------------------------------------------------------------------

    async def admit(self, hello: ClientHello, *, peer: str) -> Admission:
        """Decide how ``hello`` authenticates (see the module's notes).

        Raises:
            AuthenticationError: the join token is off, or the method is unknown.
        """
        method = hello.method
        if method == "token":
            return self._admit_token(hello, peer)
        if method == "credential":
            return self._admit_credential(hello)
        raise AuthenticationError(
            peer, reason=f"unsupported authentication method {method!r}", name=hello.name
        )

    def _admit_token(self, hello: ClientHello, peer: str) -> Admission:
        token = self._join_token
        if token is None:
            raise AuthenticationError(
                peer,
                reason="the join token is turned off on this coordinator: use a credential",
                name=hello.name,
            )
        if hello.role == "agent":
            bound = self.bound(hello.name)
            refusal = None
            if bound is not None:
                refusal = (
                    f"the name {hello.name!r} is bound to a {bound.kind} credential: "
                    "authenticate with that credential"
                )
            return Admission(key=token, grant="node", refusal=refusal)
        if hello.role != "client":
            return Admission(key=token)  # no grant: the coordinator refuses the role itself
        role = self._join_client_role
        if role is None:
            return Admission(
                key=token,
                refusal="the join token is not accepted for clients here: use a credential",
            )
        return Admission(key=token, grant=role)

    def _admit_credential(self, hello: ClientHello) -> Admission:
        record = self.bound(hello.name)
        if record is None:
            return Admission(key=CredentialVerifier.decoy(), known=False)
        wanted = _ROLE_OF_KIND.get(record.kind)
        refusal = None
        if wanted != hello.role:
            kind = "node" if hello.role == "agent" else "client"
            refusal = f"a {record.kind} credential cannot act as a {kind}"
        grant = "node" if record.kind == "node" else (record.role or "")
        return Admission(key=record.verifier(), grant=grant, refusal=refusal)
