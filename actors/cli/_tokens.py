"""``taskfarm token``: issue, revoke and list node and client credentials.

The commands go to the running coordinator over the wire, authenticated as an ``admin``
client (the join token acts as ``admin`` unless ``serve`` says otherwise, which is how the first
credentials are issued).  With ``--journal DB`` they write the journal file directly instead,
for a coordinator that is stopped (or, safely, one that runs: it re-reads the credentials
stream at its next handshake).
"""

from __future__ import annotations

import argparse
import getpass
import sys
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from pathlib import Path

import anyio
import msgspec

from actors.cluster import (
    COORDINATOR_CODEC,
    ROLES,
    CredentialInfo,
    CredentialsReply,
    CredentialStore,
    IssueCredentialRequest,
    IssuedCredentialReply,
    ListCredentialsRequest,
    RevokeCredentialRequest,
    Role,
    TextReply,
    lock_journal,
)
from persistence import open_sqlite_journal
from runtime import ConfigurationError, Credential, SystemClock, write_private_file

from ._commands import _add_client_arguments, _client, request

__all__ = ["configure"]


def configure(parser: argparse.ArgumentParser) -> None:
    """Add ``token``'s actions (``issue``, ``revoke``, ``list``) and their arguments."""
    actions = parser.add_subparsers(dest="token_action", metavar="ACTION", required=True)

    issue = actions.add_parser(
        "issue",
        help="issue a credential to a node or a client (printed once)",
        description="Issue a credential to a node, or to a client with a role, and print it "
        "(or write it to --out, mode 600). The coordinator keeps only a verifier.",
    )
    who = issue.add_mutually_exclusive_group(required=True)
    who.add_argument("--node", metavar="NAME", help="a node agent's name")
    who.add_argument("--client", metavar="NAME", help="a client's name")
    issue.add_argument(
        "--role", choices=ROLES, help="the client's role: read < submit < operator < admin"
    )
    issue.add_argument(
        "--replace", action="store_true", help="replace the credential the name already has"
    )
    issue.add_argument("--out", metavar="FILE", help="write it to a new file, mode 600")
    _add_target_arguments(issue)
    issue.set_defaults(handler=_issue)

    revoke = actions.add_parser(
        "revoke",
        help="revoke a node's or client's credential (its connections are closed)",
        description="Revoke a credential: it authenticates no one from now on, and the "
        "connections made with it are closed.",
    )
    revoke.add_argument("name", metavar="NAME")
    _add_target_arguments(revoke)
    revoke.set_defaults(handler=_revoke)

    listing = actions.add_parser(
        "list", help="list the active credentials", description="List the active credentials."
    )
    listing.add_argument("--json", action="store_true", help="print JSON instead of a table")
    _add_target_arguments(listing)
    listing.set_defaults(handler=_list)


def _add_target_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--journal",
        metavar="DB",
        help="change the journal file directly (offline) instead of asking the coordinator",
    )
    _add_client_arguments(parser)


def _credential_to_issue(args: argparse.Namespace) -> tuple[Credential, Role | None]:
    """Generate the credential ``issue`` asks for (here: its secret never leaves this host)."""
    role: Role | None = None
    for candidate in ROLES:
        if candidate == args.role:
            role = candidate
    if args.node is not None:
        if role is not None:
            raise ConfigurationError("a node credential has no role", where="--role")
        kind, name = "node", args.node
    else:
        if role is None:
            raise ConfigurationError(
                f"a client credential needs a role: one of {', '.join(ROLES)}", where="--role"
            )
        kind, name = "client", args.client
    try:
        return Credential.generate(kind=kind, name=name), role
    except ConfigurationError:
        raise ConfigurationError(
            f"{name!r} is not a valid name (1-200 of letters, digits and _.@:-)",
            where=f"--{kind}",
        ) from None


async def _issue(args: argparse.Namespace) -> int:
    credential, role = _credential_to_issue(args)
    if args.out is not None and await anyio.Path(args.out).exists():
        raise ConfigurationError("file already exists", where=args.out)
    if args.journal is not None:
        async with _offline(args.journal) as store:
            await store.register(
                kind=credential.kind,
                name=credential.name,
                role=role,
                verifier=credential.verifier(),
                by=_offline_by(),
                replace=args.replace,
            )
    else:
        message = IssueCredentialRequest.of(credential, role=role, replace=args.replace)
        async with _client(args) as connection:
            reply = await request(connection, message)
        assert isinstance(reply, IssuedCredentialReply)
    if args.out is not None:
        write_private_file(args.out, credential.text())
        print(f"wrote the {credential.kind} credential of {credential.name} to {args.out}")
    else:
        print(credential.text())
    return 0


async def _revoke(args: argparse.Namespace) -> int:
    message = RevokeCredentialRequest(name=args.name)
    if args.journal is not None:
        async with _offline(args.journal) as store:
            record = await store.revoke(message.name, by=_offline_by())
        print(f"revoked the {record.kind} credential of {message.name}")
        return 0
    async with _client(args) as connection:
        reply = await request(connection, message)
    assert isinstance(reply, TextReply)
    print(reply.text)
    return 0


async def _list(args: argparse.Namespace) -> int:
    if args.journal is not None:
        async with _offline(args.journal) as store:
            infos = tuple(record.info() for record in store.records())
    else:
        async with _client(args) as connection:
            reply = await request(connection, ListCredentialsRequest())
        assert isinstance(reply, CredentialsReply)
        infos = reply.credentials
    if args.json:
        sys.stdout.write(msgspec.json.encode(infos).decode() + "\n")
    else:
        print(format_credentials(infos))
    return 0


def format_credentials(infos: Sequence[CredentialInfo]) -> str:
    """Render credentials as a table."""
    lines = [f"{'NAME':<24} {'KIND':<7} {'ROLE':<9} {'ISSUED':<26} BY"]
    lines.extend(
        f"{info.name:<24} {info.kind:<7} {info.role or '-':<9} {info.issued_at:<26} "
        f"{info.issued_by}"
        for info in infos
    )
    return "\n".join(lines)


def _offline_by() -> str:
    try:
        user = getpass.getuser()
    except (KeyError, OSError):
        user = "unknown user"
    return f"{user} (offline, on the journal file)"


@asynccontextmanager
async def _offline(path: str) -> AsyncIterator[CredentialStore]:
    """Open a journal file (which must exist) and its credentials store."""
    if not await anyio.Path(path).is_file():
        raise ConfigurationError("no such journal file", where=path)
    clock = SystemClock()
    async with open_sqlite_journal(Path(path), clock=clock, codec=COORDINATOR_CODEC) as journal:
        with lock_journal(
            Path(path), hint="stop the coordinator, or run the command without --journal"
        ):
            store = CredentialStore(journal, clock, join_token=None)
            await store.load()
            yield store
