"""``taskfarm token`` and credentials end to end: real ``serve``, ``agent`` and client
processes, a real journal file, exit codes and one-line errors.
"""

from __future__ import annotations

import json
import os
import stat
import subprocess
from pathlib import Path
from typing import TYPE_CHECKING

import anyio
import pytest

if TYPE_CHECKING:
    from conftest import Cluster

SPEC = """
[[jobs]]
name = "{name}"
command = ["true"]
resources = {{ cores = 1, memory = "16MiB" }}
"""


async def run(cluster: Cluster, *args: str) -> subprocess.CompletedProcess[bytes]:
    """Run a ``taskfarm`` command that is not a client (no --connect or --token-file)."""
    return await anyio.run_process(cluster.command(*args), check=False, env=cluster.env("cli"))


def start_agent_with_credential(cluster: Cluster, credential: Path, work: Path) -> None:
    """Start ``taskfarm agent --credential-file`` (its name comes from the credential)."""
    process = subprocess.Popen(
        cluster.command(
            "agent",
            "--connect",
            f"127.0.0.1:{cluster.port}",
            "--credential-file",
            str(credential),
            "--work-dir",
            str(work),
            "--cores",
            "1",
            "--memory",
            "1GiB",
            "--scratch",
            "1GiB",
        ),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env=cluster.env("agent:credential"),
        start_new_session=True,
    )
    cluster._processes.append(process)


def one_line_error(result: subprocess.CompletedProcess[bytes]) -> str:
    """Assert the command failed with status 2 and one stderr line; return that line."""
    stderr = result.stderr.decode()
    assert result.returncode == 2, (result.returncode, stderr, result.stdout)
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, stderr
    assert "Traceback" not in stderr
    return lines[0]


async def test_an_admin_issues_client_credentials_and_roles_bound_them(
    cluster: Cluster, tmp_path: Path
) -> None:
    """The join token (admin) issues a read credential to a file; the read client can look
    but not submit (exit 2, one line), and once revoked it cannot connect at all."""
    cluster.start_coordinator()
    cred = tmp_path / "ops.cred"
    issued = await cluster.cli(
        "token", "issue", "--client", "ops", "--role", "read", "--out", str(cred)
    )
    assert issued.returncode == 0, issued.stderr
    assert stat.S_IMODE(os.stat(cred).st_mode) == 0o600
    assert cred.read_text().startswith("tfcred1/client/ops/")

    as_ops = ("--credential-file", str(cred))
    status = await cluster.cli("status", *as_ops)
    assert status.returncode == 0, status.stderr
    spec = tmp_path / "job.toml"
    spec.write_text(SPEC.format(name="j1"))
    refused = await cluster.cli("submit", str(spec), *as_ops)
    line = one_line_error(refused)
    assert line == (
        "taskfarm: error: access denied: 'ops' (role read) may not submit: that needs the "
        "role submit or above"
    )
    listing = await cluster.cli("token", "list", "--json")
    assert listing.returncode == 0, listing.stderr
    [entry] = json.loads(listing.stdout)
    assert (entry["name"], entry["kind"], entry["role"]) == ("ops", "client", "read")
    assert "join token" in entry["issued_by"]

    revoked = await cluster.cli("token", "revoke", "ops")
    assert revoked.returncode == 0, revoked.stderr
    assert revoked.stdout.decode().strip() == "revoked the client credential of ops"
    line = one_line_error(await cluster.cli("status", *as_ops))
    assert "wrong, revoked or unknown credential" in line
    events = [e for e in cluster.coordinator_log() if e.get("event") == "access_refused"]
    assert [(e["principal"], e["request"]) for e in events] == [("ops", "submit")]


async def test_an_agent_joins_with_its_node_credential_and_no_join_token(
    cluster: Cluster, tmp_path: Path
) -> None:
    """Credentials issued offline on the journal let an agent and an admin in while the join
    token is off (and the token file is refused)."""
    cluster.start_coordinator()
    cluster.kill_coordinator()  # the journal exists; the coordinator is stopped
    admin, node = tmp_path / "admin.cred", tmp_path / "n1.cred"
    journal = ("--journal", str(cluster.journal))
    for args in (
        ("--client", "boss", "--role", "admin", "--out", str(admin)),
        ("--node", "n1", "--out", str(node)),
    ):
        result = await cluster.cli("token", "issue", *args, *journal)
        assert result.returncode == 0, result.stderr

    cluster.start_coordinator("--no-join-token")
    start_agent_with_credential(cluster, node, tmp_path / "n1")

    async def online() -> bool:
        result = await cluster.cli("nodes", "--json", "--credential-file", str(admin))
        return result.returncode == 0 and any(
            n["name"] == "n1" and n["health"] == "online" for n in json.loads(result.stdout)
        )

    await cluster.wait_until(online, what="n1 online with its credential")
    line = one_line_error(await cluster.cli("status"))  # the join token, now off
    assert "the join token is turned off on this coordinator" in line


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("issue", "--client", "x"), "--role: a client credential needs a role"),
        (("issue", "--node", "x", "--role", "read"), "--role: a node credential has no role"),
        (("issue", "--node", "bad name"), "--node: 'bad name' is not a valid name"),
        (("list", "--journal", "missing.db"), "missing.db: no such journal file"),
        (("revoke", "nobody", "--journal", "{journal}"), "no credential named 'nobody'"),
    ],
)
async def test_token_command_mistakes_are_one_line_errors(
    cluster: Cluster, args: tuple[str, ...], message: str
) -> None:
    """Bad token command input exits 2 with one line naming what is wrong."""
    cluster.start_coordinator()
    cluster.kill_coordinator()
    argv = [a.format(journal=cluster.journal) for a in args]
    line = one_line_error(await cluster.cli("token", *argv))
    assert message in line


async def test_offline_token_commands_refuse_a_journal_in_use(cluster: Cluster) -> None:
    """``--journal`` on the journal of a running coordinator is refused with what to do."""
    cluster.start_coordinator()
    line = one_line_error(await cluster.cli("token", "list", "--journal", str(cluster.journal)))
    assert line == (
        f"taskfarm: error: {cluster.journal}: the journal is in use by another process (a "
        "running coordinator, or a token command on it); stop the coordinator, or run the "
        "command without --journal"
    )


async def test_replay_and_inspect_decode_the_credentials_stream(cluster: Cluster) -> None:
    """``replay`` folds the auth stream (no undecodable events) and shows no secret."""
    cluster.start_coordinator()
    issued = await cluster.cli("token", "issue", "--node", "n7")
    assert issued.returncode == 0, issued.stderr
    secret = issued.stdout.decode().strip().rsplit("/", 1)[1]
    replay = await run(cluster, "replay", str(cluster.journal), "--json")
    assert replay.returncode == 0, replay.stderr
    report = json.loads(replay.stdout)
    stream = report["streams"]["auth:credentials"]
    assert stream["aggregate"] == "auth"
    assert list(stream["state"]["active"]) == ["n7"]
    assert secret not in replay.stdout.decode()
    inspect = await run(cluster, "journal", "inspect", str(cluster.journal))
    assert inspect.returncode == 0, inspect.stderr
    assert "auth:credentials" in inspect.stdout.decode()
