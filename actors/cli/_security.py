"""The security options the coordinator and client commands share: which secret a client
presents, and how ``serve`` treats the join token and idle clients."""

from __future__ import annotations

import argparse
import math
import os

from actors.cluster import ROLES, Role
from runtime import ConfigurationError, Credential, load_credential

__all__ = [
    "add_client_credential_argument",
    "add_serve_security_arguments",
    "client_credential",
    "serve_security",
]


def add_client_credential_argument(parser: argparse.ArgumentParser) -> None:
    """Add ``--credential-file`` (the client's own credential, instead of the join token)."""
    parser.add_argument(
        "--credential-file",
        default=os.environ.get("TASKFARM_CREDENTIAL_FILE") or None,
        metavar="FILE",
        help="this client's credential (taskfarm token issue --client NAME --role ROLE); "
        "used instead of the token file (default: $TASKFARM_CREDENTIAL_FILE)",
    )


def client_credential(args: argparse.Namespace) -> Credential | None:
    """Return the client credential a client command presents (None: it uses the join token).

    Raises:
        ConfigurationError: the file is unusable, or holds a node credential; ``where`` names
            the file.
    """
    path = getattr(args, "credential_file", None)
    if not path:
        return None
    credential = load_credential(path)
    if credential.kind != "client":
        raise ConfigurationError(
            f"a {credential.kind} credential cannot act as a client: issue one with "
            "taskfarm token issue --client NAME --role ROLE",
            where=path,
        )
    return credential


def add_serve_security_arguments(parser: argparse.ArgumentParser) -> None:
    """Add ``serve``'s join-token and client options."""
    parser.add_argument(
        "--no-join-token",
        action="store_true",
        help="accept only credentials: agents and clients holding the token file are refused",
    )
    parser.add_argument(
        "--join-token-client-role",
        default="admin",
        choices=(*ROLES, "none"),
        help="what a client holding the join token may do (default: admin; none: clients "
        "must use a credential)",
    )
    parser.add_argument(
        "--client-idle-timeout",
        type=float,
        default=60.0,
        metavar="S",
        help="disconnect a client that sends nothing for S seconds (default: 60)",
    )


def serve_security(args: argparse.Namespace) -> tuple[bool, Role | None, float]:
    """Return (join token on, the join token's client role, the client idle timeout).

    Raises:
        ConfigurationError: the idle timeout is not a positive number (names the flag).
    """
    idle = args.client_idle_timeout
    if not (math.isfinite(idle) and idle > 0):
        raise ConfigurationError(f"must be > 0, got {idle}", where="--client-idle-timeout")
    role = args.join_token_client_role
    chosen: Role | None = None
    for candidate in ROLES:
        if candidate == role:
            chosen = candidate
    return not args.no_join_token, chosen, idle
