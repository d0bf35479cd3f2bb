"""The client side of every command that talks to a coordinator: where it is, which secret
to present, one request and its reply, and what a refusal means for the exit status.

Domain command modules (``taskfarm render ...``, ``taskfarm science ...``) build on two names
from here: :func:`add_client_arguments` and :func:`run_policy_command`.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, TypeVar

import anyio
import msgspec

from actors.cluster import (
    WIRE_CODEC,
    ClientRequest,
    ErrorReply,
    PolicyCommandRequest,
    PolicyReply,
    Reply,
    WireMessage,
)
from runtime import (
    ConfigurationError,
    Connection,
    TaskfarmError,
    TLSConfig,
    create_token_file,
    load_token,
    open_connection,
)

from ._security import add_client_credential_argument, client_credential

__all__ = [
    "DEFAULT_ADDRESS",
    "DEFAULT_TOKEN_FILE",
    "RequestError",
    "add_client_arguments",
    "blaming",
    "ensure_token_file",
    "open_client",
    "parse_address",
    "reply_of",
    "request",
    "run_policy_command",
    "setting",
    "tls_config",
]

T = TypeVar("T")

DEFAULT_ADDRESS = "127.0.0.1:7717"
DEFAULT_TOKEN_FILE = "taskfarm.token"

# What the coordinator's refusals mean for the exit status: these kinds blame the request.
_INPUT_ERRORS = frozenset(
    {
        "AccessDeniedError",
        "ConfigurationError",
        "DependencyCycleError",
        "DependencyError",
        "JobNotFoundError",
        "ResourceError",
        "SpecError",
        "TaskNotFoundError",
        "UnknownDependencyError",
    }
)
_REPLY_TIMEOUT = 60.0  # seconds for one reply (a submission of a large spec included)


class RequestError(TaskfarmError):
    """Raised when the coordinator refuses a request (the message says why); ``kind`` is the
    coordinator's error class, and the exit status is 2 when it blames the request, else 1."""

    def __init__(self, message: str, *, kind: str = "") -> None:
        self.kind = kind
        self.exit_status = 2 if kind in _INPUT_ERRORS else 1
        super().__init__(message)


def setting(value: str | None, *, flag: str, variable: str, default: str) -> tuple[str, str]:
    """Return a client setting and what to blame if it is wrong: the flag when given, else
    the environment variable when set, else the flag (whose default it is)."""
    if value is not None:
        return value, flag
    from_environment = os.environ.get(variable)
    if from_environment is not None:
        return from_environment, f"${variable} (environment)"
    return default, flag


def parse_address(text: str, *, where: str) -> tuple[str, int]:
    """Parse ``HOST:PORT`` (``[v6]:PORT`` too).

    Raises:
        ConfigurationError: not HOST:PORT, or the port is not 0-65535; ``where`` names the flag.
    """
    host, sep, port_text = text.rpartition(":")
    host = host.strip("[]")
    if not sep or not host or not port_text.isdigit() or not 0 <= int(port_text) <= 65535:
        raise ConfigurationError(f"expected HOST:PORT, got {text!r}", where=where)
    return host, int(port_text)


def ensure_token_file(path: str | Path) -> tuple[Path, bytes]:
    """Return the token file's absolute path and its token, creating it (mode 600) if missing."""
    absolute = Path(os.path.abspath(path))
    return absolute, load_token(absolute) if absolute.is_file() else create_token_file(absolute)


def tls_config(args: argparse.Namespace, *, server: bool) -> TLSConfig | None:
    """Return the TLS settings of ``--tls-ca``/``--tls-cert``/``--tls-key`` (None: plain TCP).

    Raises:
        ConfigurationError: a file is missing, or a server lacks its certificate or key.
    """
    ca, cert, key = args.tls_ca, getattr(args, "tls_cert", None), getattr(args, "tls_key", None)
    if not (ca or cert or key):
        return None
    if server and not (cert and key):
        raise ConfigurationError(
            "a TLS server needs both --tls-cert and --tls-key", where="--tls-cert"
        )
    for flag, value in (("--tls-ca", ca), ("--tls-cert", cert), ("--tls-key", key)):
        if value and not Path(value).is_file():
            raise ConfigurationError(f"no such file: {value}", where=flag)
    return TLSConfig(cafile=ca, certfile=cert, keyfile=key)


def blaming(blame: str, load: Callable[[], T]) -> T:
    """Run ``load``; a ConfigurationError from it also names where the value came from."""
    try:
        return load()
    except ConfigurationError as error:
        if blame.startswith("--"):
            raise
        raise ConfigurationError(str(error), where=blame) from None


def add_client_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the flags every client command takes: ``--connect``, ``--token-file``,
    ``--credential-file`` and the TLS files (defaults from the environment, resolved when
    the command connects, so an error blames the flag or the variable it came from)."""
    parser.add_argument(
        "--connect",
        metavar="HOST:PORT",
        help="the coordinator (default: $TASKFARM_COORDINATOR or 127.0.0.1:7717)",
    )
    parser.add_argument(
        "--token-file",
        help="the shared secret (default: $TASKFARM_TOKEN_FILE or ./taskfarm.token)",
    )
    add_client_credential_argument(parser)
    parser.add_argument("--tls-ca", help="CA certificate to verify the coordinator")
    parser.add_argument("--tls-cert", help="this client's certificate (mutual TLS)")
    parser.add_argument("--tls-key", help="the key of --tls-cert")


@asynccontextmanager
async def open_client(args: argparse.Namespace) -> AsyncIterator[Connection[WireMessage]]:
    """Connect and authenticate to the coordinator the client arguments name.

    Raises:
        ConfigurationError: a flag, file or environment variable is unusable (named).
        WireError: the coordinator cannot be reached or refused the handshake.
    """
    address, blame = setting(
        args.connect, flag="--connect", variable="TASKFARM_COORDINATOR", default=DEFAULT_ADDRESS
    )
    host, port = parse_address(address, where=blame)
    token: bytes | None = None
    credential = client_credential(args)
    if credential is None:
        token_file, blame = setting(
            args.token_file,
            flag="--token-file",
            variable="TASKFARM_TOKEN_FILE",
            default=DEFAULT_TOKEN_FILE,
        )
        token = blaming(blame, lambda: load_token(token_file))
    async with open_connection(
        host,
        port,
        codec=WIRE_CODEC,
        token=token,
        credential=credential,
        name="cli",
        role="client",
        tls=tls_config(args, server=False),
    ) as connection:
        yield connection


async def request(connection: Connection[WireMessage], message: ClientRequest) -> Reply:
    """Send one request and return its reply.

    Raises:
        RequestError: the coordinator refused it (the message says why), or did not answer
            within a minute.
    """
    await connection.send(message)
    with anyio.move_on_after(_REPLY_TIMEOUT):
        reply = await connection.receive()
        if isinstance(reply, ErrorReply):
            raise RequestError(reply.error, kind=reply.kind)
        return reply  # type: ignore[return-value]
    raise RequestError(
        f"the coordinator at {connection.peer} did not answer within {_REPLY_TIMEOUT:g} s"
    )


async def run_policy_command(
    args: argparse.Namespace, name: str, arguments: Mapping[str, Any] | None = None
) -> Any:
    """Run the coordinator policy's command ``name`` with ``arguments`` (JSON-able); return
    its result, decoded from JSON.

    ``args`` carries the flags of :func:`add_client_arguments`.  The role the command needs
    is the policy's (``Policy.command_roles``; ``operator`` by default).

    Raises:
        RequestError: the coordinator refused it: an unknown command or a bad argument (exit
            status 2), or the policy failed (1).
        ConfigurationError: ``arguments`` is not JSON-able, or a client flag is unusable.
    """
    try:
        text = msgspec.json.encode(dict(arguments or {})).decode()
    except (TypeError, msgspec.EncodeError) as error:
        raise ConfigurationError(f"not JSON-able: {error}", where="arguments") from None
    async with open_client(args) as connection:
        reply = await request(connection, PolicyCommandRequest(name=name, arguments=text))
    if not isinstance(reply, PolicyReply):
        raise RequestError(f"unexpected reply to a policy command: {type(reply).__name__}")
    return msgspec.json.decode(reply.result)


def reply_of(reply: Reply, kind: type[T]) -> T:
    """Return ``reply`` as the kind a request expects.

    Raises:
        RequestError: the coordinator answered with another kind (a version mismatch).
    """
    if not isinstance(reply, kind):
        raise RequestError(
            f"unexpected reply from the coordinator: {type(reply).__name__}, expected "
            f"{kind.__name__} (is it another taskfarm version?)"
        )
    return reply
