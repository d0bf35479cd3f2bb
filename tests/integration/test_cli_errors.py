"""No tracebacks for things a user did: every ``taskfarm`` command, given bad input, exits with
status 2 and one line on stderr that names what is wrong, as a real process.  Also the cases
that are not bad input: a clean SIGTERM exits 0, cancelling a finished job exits 1, an HTTP
peer is named in the coordinator's log, and work no node could fit is held with its reason.
"""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
from dataclasses import dataclass, field
from importlib.metadata import entry_points
from pathlib import Path
from typing import TYPE_CHECKING

import anyio
import pytest

from actors import ENGINE_CODEC
from persistence import open_sqlite_journal
from runtime import SystemClock

if TYPE_CHECKING:
    from conftest import Cluster

COMMANDS = sorted(ep.name for ep in entry_points(group="taskfarm.commands"))
ROOT = os.geteuid() == 0  # root reads and writes any file: no read-only case then
DEEP = 100_000
HELD = '[[jobs]]\nname = "held"\ncommand = ["true"]\nresources = { cores = 5000 }\n'


@dataclass(frozen=True)
class Case:
    """One bad invocation: its arguments, and what its one line of stderr must say."""

    args: tuple[str, ...]
    says: tuple[str, ...]
    env: dict[str, str] = field(default_factory=dict)
    client: bool = False  # add --connect/--token-file for the module's coordinator


async def files(folder: Path) -> dict[str, Path]:
    """Write the bad files the table refers to; return them by name."""
    made: dict[str, Path] = {}

    def put(name: str, content: bytes | str) -> Path:
        path = folder / name
        path.write_bytes(content.encode() if isinstance(content, str) else content)
        made[name] = path
        return path

    good = folder / "good.db"
    async with open_sqlite_journal(good, clock=SystemClock(), codec=ENGINE_CODEC):
        pass  # an empty journal, initialised
    made["good.db"] = good
    truncated = put("truncated.db", good.read_bytes()[:5000])
    assert truncated.stat().st_size < good.stat().st_size
    newer = put("newer.db", good.read_bytes())
    with sqlite3.connect(newer) as db:
        db.execute("PRAGMA user_version = 99")
    bad_payload = put("bad-payload.db", good.read_bytes())
    with sqlite3.connect(bad_payload) as db:
        db.execute(
            "INSERT INTO events (position, stream_id, version, tag, schema_version, timestamp,"
            " payload) VALUES (1, 'job:x', 1, 'engine.job_submitted', 1,"
            " '2026-01-01T00:00:00+00:00', '{not json')"
        )
    put("not-sqlite.db", "this is not a journal\n")
    (folder / "a-folder").mkdir()
    made["a-folder"] = folder / "a-folder"
    put("a-file", "")
    put("latin1.toml", b'[[jobs]]\nname = "caf\xe9"\ncommand = ["true"]\n')
    huge = folder / "huge.toml"
    with huge.open("wb") as file:
        file.truncate(50 * 2**20)  # sparse: 50 MB to read, nothing to write
    made["huge.toml"] = huge
    deep = "[" * DEEP + "]" * DEEP
    put("deep.toml", f'[[jobs]]\nname = "d"\ncommand = ["x"]\nmetadata = {{ a = {deep} }}\n')
    put(
        "backoff.toml",
        '[[jobs]]\nname = "b"\ncommand = ["x"]\nretries = { backoff = "99999999999999d" }\n',
    )
    put(
        "width.toml", '[[jobs]]\nname = "w"\nframes = "1-3"\ncommand = ["x", "{frame:>20000000}"]\n'
    )
    put("cores.toml", '[[jobs]]\nname = "c"\ncommand = ["x"]\nresources = { cores = 1e12 }\n')
    put("spec.txt", "")
    open_token = put("open.token", "a-token-that-anyone-can-read-0123456789\n")
    open_token.chmod(0o644)
    return made


def table(made: dict[str, Path], farm: Cluster) -> dict[str, Case]:
    """The bad-input table: at least one case for every registered command."""
    token = str(farm.token_file)

    def serve(*args: str) -> tuple[str, ...]:
        listen = () if "--listen" in args else ("--listen", "127.0.0.1:0")
        journal = () if "--journal" in args else ("--journal", str(made["a-folder"] / "new.db"))
        return ("serve", *journal, *listen, "--token-file", token, *args)

    def journal(name: str) -> tuple[str, ...]:
        return serve("--journal", str(made[name]))

    agent = ("agent", "--connect", "127.0.0.1:1", "--token-file", token)
    cases = {
        "serve-truncated-journal": Case(journal("truncated.db"), ("truncated.db", "truncated")),
        "serve-not-sqlite": Case(journal("not-sqlite.db"), ("not-sqlite.db", "not an SQLite")),
        "serve-newer-schema": Case(journal("newer.db"), ("newer.db", "newer")),
        "serve-directory": Case(journal("a-folder"), ("a-folder", "not a regular file")),
        "serve-bad-payload": Case(journal("bad-payload.db"), ("bad-payload.db", "position 1")),
        "serve-port-in-use": Case(
            serve("--listen", f"127.0.0.1:{farm.port}"), ("cannot listen", "in use")
        ),
        "serve-bad-listen": Case(serve("--listen", "everywhere"), ("--listen", "HOST:PORT")),
        "serve-heartbeat-nan": Case(serve("--heartbeat-timeout", "nan"), ("--heartbeat-timeout",)),
        "serve-too-many-agents": Case(serve("--local-agents", "100000"), ("--local-agents",)),
        "serve-work-dir-is-a-file": Case(
            serve("--work-dir", str(made["a-file"])), ("--work-dir", "not a directory")
        ),
        "serve-open-token": Case(
            ("serve", "--listen", "127.0.0.1:0", "--token-file", str(made["open.token"])),
            ("open.token", "chmod 600"),
        ),
        "agent-bad-connect": Case(
            ("agent", "--connect", "nowhere", "--token-file", token), ("--connect",)
        ),
        "agent-negative-cores": Case((*agent, "--cores", "-1"), ("--cores", "negative")),
        "token-bad-name": Case(
            ("token", "issue", "--node", "bad name", "--journal", str(made["a-folder"] / "t.db")),
            ("--node", "not a valid name"),
        ),
        "agent-no-token": Case(
            ("agent", "--connect", "127.0.0.1:1"), ("--token-file", "--credential-file")
        ),
        "submit-not-utf8": Case(
            ("submit", str(made["latin1.toml"])), ("latin1.toml", "not UTF-8", "0xe9"), client=True
        ),
        "submit-50-mb": Case(
            ("submit", str(made["huge.toml"])),
            ("huge.toml", "larger than the maximum"),
            client=True,
        ),
        "submit-missing": Case(
            ("submit", str(made["a-folder"] / "gone.toml")),
            ("gone.toml", "cannot read"),
            client=True,
        ),
        "submit-not-a-spec-name": Case(
            ("submit", str(made["spec.txt"])), ("spec.txt", ".toml or .json"), client=True
        ),
        "submit-deep": Case(
            ("submit", str(made["deep.toml"])), ("deep.toml", "nested more than"), client=True
        ),
        "submit-backoff": Case(
            ("submit", str(made["backoff.toml"])),
            ("backoff.toml", "jobs[0].retries.backoff", "longer than the maximum of 30d"),
            client=True,
        ),
        "submit-format-width": Case(
            ("submit", str(made["width.toml"])),
            ("width.toml", "jobs[0].command[1]", "format width 20000000"),
            client=True,
        ),
        "submit-cores-1e12": Case(
            ("submit", str(made["cores.toml"])),
            ("cores.toml", "jobs[0].resources.cores", "maximum of 1,000,000 cores"),
            client=True,
        ),
        "status-bad-connect": Case(("status", "--connect", "garbage"), ("--connect", "garbage")),
        "status-bad-environment": Case(
            ("status",),
            ("$TASKFARM_COORDINATOR", "garbage"),
            env={"TASKFARM_COORDINATOR": "garbage"},
        ),
        "status-token-from-environment": Case(
            ("status", "--connect", f"127.0.0.1:{farm.port}"),
            ("$TASKFARM_TOKEN_FILE", "not found"),
            env={"TASKFARM_TOKEN_FILE": str(made["a-folder"] / "none.token")},
        ),
        "status-unknown-job": Case(("status", "nosuchjob"), ("no job 'nosuchjob'",), client=True),
        "cancel-unknown-job": Case(("cancel", "nosuchjob"), ("no job 'nosuchjob'",), client=True),
        "nodes-no-token": Case(
            ("nodes", "--token-file", str(made["a-folder"] / "none.token")),
            ("token file not found",),
        ),
        "nodes-nobody-listening": Case(
            ("nodes", "--connect", "127.0.0.1:1", "--token-file", token), ("127.0.0.1:1",)
        ),
        "why-unknown-job": Case(("why", "nosuchjob"), ("no job 'nosuchjob'",), client=True),
        "logs-no-such-task": Case(("logs", "waiting", "99"), ("has no task '99'",), client=True),
        "logs-never-ran": Case(
            ("logs", "waiting", "0", "--attempt", "5"), ("has not run yet",), client=True
        ),
        "logs-negative-attempt": Case(
            ("logs", "waiting", "--attempt", "-1"), ("--attempt", "from 1"), client=True
        ),
        "logs-negative-task": Case(("logs", "waiting", "-1"), ("TASK",), client=True),
        "usage-bad-since": Case(("usage", "--since", "yesterday"), ("--since",), client=True),
        "usage-future-since": Case(
            ("usage", "--since", "2999-01-01T00:00:00Z"), ("--since", "future"), client=True
        ),
        "agent-bad-memory-limit-factor": Case(
            (*agent, "--memory-limit-factor", "-1"), ("--memory-limit-factor",)
        ),
        "agent-bad-sample-interval": Case(
            (*agent, "--sample-interval", "soon"), ("--sample-interval",)
        ),
        "serve-bad-usage-retention": Case(
            serve("--keep-usage-minutes", "forever"), ("--keep-usage-minutes",)
        ),
        "serve-unknown-policy": Case(
            serve("--policy", "fastest"), ("--policy", "unknown policy 'fastest'", "fifo")
        ),
        "serve-policy-config-missing": Case(
            serve("--policy-config", str(made["a-folder"] / "none.toml")),
            ("--policy-config", "no such file"),
        ),
        "serve-bad-counter": Case(serve("--counter", "nuke"), ("--counter", "NAME=N")),
        "agent-bad-counter": Case((*agent, "--counter", "nuke=lots"), ("--counter", "NAME=N")),
        "agent-empty-sleep-command": Case(
            (*agent, "--sleep-command", "  "), ("--sleep-command", "empty")
        ),
        "agent-unparsable-sleep-command": Case(
            (*agent, "--sleep-command", "systemctl 'suspend"), ("--sleep-command", "cannot split")
        ),
        "serve-empty-wake-command": Case(serve("--wake-command", ""), ("--wake-command", "empty")),
        "serve-unknown-wake-placeholder": Case(
            serve("--wake-command", "wakeonlan {ip}"),
            ("--wake-command", "unknown placeholder {ip}", "{mac}"),
        ),
        "serve-lone-brace-wake-command": Case(
            serve("--wake-command", "wakeonlan {mac"), ("--wake-command", "'{mac'")
        ),
        "amend-unknown-job": Case(
            ("amend", "nosuchjob", "--priority", "high"), ("no job 'nosuchjob'",), client=True
        ),
        "amend-nothing": Case(("amend", "waiting"), ("give --priority",), client=True),
        "amend-bad-set": Case(
            ("amend", "waiting", "--set", "novalue"), ("--set", "KEY=VALUE"), client=True
        ),
        "amend-bad-priority": Case(
            ("amend", "waiting", "--priority", "urgent"),
            ("unknown priority 'urgent'",),
            client=True,
        ),
        "pause-bad-mode": Case(("pause", "waiting", "--mode", "later"), ("--mode",), client=True),
        "pause-unknown-job": Case(("pause", "nosuchjob"), ("no job 'nosuchjob'",), client=True),
        "resume-unknown-job": Case(("resume", "nosuchjob"), ("no job 'nosuchjob'",), client=True),
        "retry-unknown-task": Case(
            ("retry", "waiting", "nope"), ("has no task 'nope'",), client=True
        ),
        "checkpoint-unknown-task": Case(
            ("checkpoint", "waiting", "7"), ("has no task '7'",), client=True
        ),
        "preempt-negative-task": Case(("preempt", "waiting", "-1"), ("task",), client=True),
        "node-unknown": Case(
            ("node", "drain", "nosuchnode"), ("NODE", "no node named 'nosuchnode'"), client=True
        ),
        "node-bad-at": Case(("node", "drain", "n1", "--at", "soon"), ("--at",), client=True),
        "node-at-on-sleep": Case(("node", "sleep", "n1", "--at", "+1h"), ("--at",), client=True),
        "journal-missing": Case(
            ("journal", "inspect", str(made["a-folder"] / "none.db")), ("none.db",)
        ),
        "journal-not-sqlite": Case(
            ("journal", "inspect", str(made["not-sqlite.db"])), ("not-sqlite.db",)
        ),
        "journal-no-action": Case(("journal",), ("required",)),
        "replay-truncated": Case(("replay", str(made["truncated.db"])), ("truncated.db",)),
        "replay-bad-until": Case(
            ("replay", str(made["good.db"]), "--until", "yesterday"), ("--until",)
        ),
        "bench-unknown-suite": Case(("bench", "nosuchsuite"), ("unknown suite",)),
        "demo-no-frames": Case(("demo", "--frames", "0"), ("--frames",)),
        "demo-dir-is-a-file": Case(("demo", "--dir", str(made["a-file"])), ("--dir",)),
        "slurm-no-subcommand": Case(("slurm",), ("required", "SUBCOMMAND")),
        "slurm-submit-bad-time": Case(
            (
                "slurm",
                "submit-agents",
                "--partition",
                "debug",
                "--time",
                "forever",
                "--connect",
                "login:7717",
                "--token-file",
                token,
                "--dry-run",
            ),
            ("--time", "forever"),
        ),
        "slurm-cancel-nothing": Case(("slurm", "cancel"), ("JOBID",)),
        "slurm-agent-outside-slurm": Case(
            ("slurm", "agent", "--connect", "127.0.0.1:1", "--token-file", token),
            ("$SLURM_JOB_ID", "--end-time"),
        ),
        "render-no-subcommand": Case(("render",), ("required", "COMMAND")),
        "render-bad-mode": Case(("render", "mode", "turbo"), ("invalid choice", "'turbo'")),
        "audit-missing-journal": Case(
            ("audit", "--journal", str(made["a-folder"] / "none.db")), ("--journal", "none.db")
        ),
        "audit-not-sqlite": Case(
            ("audit", "--journal", str(made["not-sqlite.db"])), ("not-sqlite.db", "not an SQLite")
        ),
        "audit-bad-since": Case(
            ("audit", "--journal", str(made["good.db"]), "--since", "yesterday"), ("--since",)
        ),
        "science-no-subcommand": Case(("science",), ("required", "COMMAND")),
        "science-reserve-no-nodes": Case(
            ("science", "reserve", "--start", "+1h", "--duration", "1h", "--for", "sim"),
            ("--nodes",),
        ),
        "science-report-no-out": Case(
            ("science", "report", "--journal", str(made["good.db"])), ("--out",)
        ),
        "no-command": Case((), ("required", "COMMAND")),
        "unknown-command": Case(("format-disk",), ("invalid choice",)),
    }
    if not ROOT:
        readonly = made["good.db"].with_name("readonly.db")
        readonly.write_bytes(made["good.db"].read_bytes())
        readonly.chmod(0o444)
        cases["serve-read-only-journal"] = Case(journal("readonly.db"), ("readonly.db",))
    return cases


@pytest.fixture(scope="module")
def farm(module_cluster: Cluster) -> Cluster:
    """A coordinator with no node and one job waiting for one (nothing can run)."""
    module_cluster.start_coordinator()
    submitted = anyio.run(module_cluster.submit, '[[jobs]]\nname = "waiting"\ncommand = ["true"]\n')
    assert submitted == ["waiting"]
    return module_cluster


async def run(farm: Cluster, case: Case, cwd: Path) -> subprocess.CompletedProcess[bytes]:
    args = [*case.args, *farm.client_args()] if case.client else list(case.args)
    environment = farm.env("cli")
    for variable in ("TASKFARM_COORDINATOR", "TASKFARM_TOKEN_FILE"):
        environment.pop(variable, None)
    environment.update(case.env)
    with anyio.fail_after(60):
        return await anyio.run_process(
            farm.command(*args), check=False, env=environment, cwd=cwd, stdin=subprocess.DEVNULL
        )


@pytest.mark.slow
@pytest.mark.timeout(600)  # about 80 processes, each importing the whole CLI
async def test_every_command_refuses_bad_input_in_one_line(
    farm: Cluster, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """Every command, given bad input, exits 2 with one line on stderr naming the fault."""
    folder = tmp_path_factory.mktemp("bad-input")
    cases = table(await files(folder), farm)
    covered = {case.args[0] for case in cases.values() if case.args}
    assert covered >= set(COMMANDS), f"no bad-input case for {set(COMMANDS) - covered}"
    journal_before = len(await farm.journal_events())
    results: dict[str, subprocess.CompletedProcess[bytes]] = {}
    limiter = anyio.CapacityLimiter(4)

    async def one(name: str) -> None:
        async with limiter:
            results[name] = await run(farm, cases[name], folder)

    async with anyio.create_task_group() as tg:
        for name in cases:
            tg.start_soon(one, name)
    problems = []
    for name, case in cases.items():
        result = results[name]
        stderr = result.stderr.decode(errors="replace")
        lines = stderr.splitlines()
        wrong = []
        if result.returncode != 2:
            wrong.append(f"exit status {result.returncode}")
        if len(lines) != 1 or "Traceback" in stderr:
            wrong.append(f"{len(lines)} lines on stderr")
        wrong += [f"does not say {word!r}" for word in case.says if word not in stderr]
        if result.stdout:
            wrong.append(f"stdout {result.stdout[:200]!r}")
        if wrong:
            problems.append(f"{name}: {', '.join(wrong)}\n{stderr[-2000:]}")
    assert not problems, "\n".join(problems)
    assert len(await farm.journal_events()) == journal_before  # nothing journaled
    assert farm.coordinator is not None
    assert farm.coordinator.poll() is None


async def test_an_http_peer_is_named_in_the_coordinator_log(farm: Cluster) -> None:
    """A peer that speaks HTTP (or TLS) to the coordinator is refused as such in its log."""
    for payload, what in (
        (b"GET / HTTP/1.1\r\nHost: taskfarm\r\n\r\n", "looks like HTTP"),
        (bytes.fromhex("16030100a5010000a10303") + bytes(64), "looks like a TLS handshake"),
    ):
        async with await anyio.connect_tcp("127.0.0.1", farm.port) as stream:
            await stream.send(payload)
            with anyio.fail_after(10):
                try:
                    while await stream.receive():
                        pass
                except (anyio.EndOfStream, anyio.BrokenResourceError):
                    pass

        async def logged(what: str = what) -> bool:
            return any(
                f"not a taskfarm peer: {what}" in str(e.get("reason"))
                for e in farm.coordinator_log()
                if e.get("event") == "wire_connection_rejected"
            )

        await farm.wait_until(logged, what=f"the {what} peer logged", limit=10)
    assert not [e for e in farm.coordinator_log() if "1213486160" in str(e.get("reason"))]


async def test_cancelling_a_finished_job_exits_1(cluster: Cluster) -> None:
    """`cancel` of a completed job says it already completed and exits 1; nothing changes."""
    cluster.start_coordinator()
    cluster.start_agent("a1")
    await cluster.wait_online("a1")
    spec = '[[jobs]]\nname = "done"\ncommand = ["true"]\nresources = { memory = "16MiB" }\n'
    assert await cluster.submit(spec) == ["done"]
    (done,) = (await cluster.wait_finished("done")).values()
    assert done.status == "completed"
    with anyio.fail_after(60):
        result = await cluster.cli("cancel", "done")
    assert result.returncode == 1
    assert result.stderr.decode().splitlines() == [
        "taskfarm: error: job done already completed: nothing to cancel"
    ]
    (after,) = await cluster.status("done")
    assert after.status == "completed"


async def test_sigterm_with_a_connected_agent_exits_0(cluster: Cluster) -> None:
    """SIGTERM stops a coordinator that has an agent connected cleanly: status 0, no traceback."""
    coordinator = cluster.start_coordinator()
    cluster.start_agent("a1")
    await cluster.wait_online("a1")
    coordinator.send_signal(signal.SIGTERM)
    with anyio.fail_after(30):
        while coordinator.poll() is None:  # noqa: ASYNC110 - a process, not a task
            await anyio.sleep(0.05)
    assert coordinator.returncode == 0, cluster.diagnostics()
    log = cluster.diagnostics(lines=400)
    assert "Traceback" not in log
    assert not [e for e in cluster.coordinator_log() if e.get("level") in ("error", "critical")]


async def test_work_no_node_could_fit_is_held_with_its_reason(cluster: Cluster) -> None:
    """Before any node joins, 5,000 cores is accepted and held, `why` saying so; once a node
    joins, `why` names its shortfall and a new such submission is refused; 1e12 cores is
    refused whatever the farm has."""
    cluster.start_coordinator()
    huge = '[[jobs]]\nname = "absurd"\ncommand = ["true"]\nresources = { cores = 1e12 }\n'
    path = cluster.root / "absurd.toml"
    path.write_text(huge)
    with anyio.fail_after(60):
        refused = await cluster.cli("submit", str(path))
    assert refused.returncode == 2
    assert "jobs[0].resources.cores" in refused.stderr.decode()
    assert await cluster.submit(HELD) == ["held"]
    with anyio.fail_after(60):
        why = await cluster.cli("why", "held")
    assert why.returncode == 0
    assert "held until a node that fits joins: needs 5000 cores; the farm has no nodes yet" in (
        why.stdout.decode()
    )
    cluster.start_agent("small", cores="2")
    await cluster.wait_online("small")
    with anyio.fail_after(60):
        why = await cluster.cli("why", "held")
    assert (
        "no node could ever fit it: needs 5000 cores; the largest node, small, lacks cores: "
        "needs 5000, has 2" in why.stdout.decode()
    ), why.stdout
    again = cluster.root / "again.toml"
    again.write_text(HELD.replace('"held"', '"held-again"'))
    with anyio.fail_after(60):
        refused = await cluster.cli("submit", str(again))
    assert refused.returncode == 2
    assert "no node could ever fit" in refused.stderr.decode()
    (held,) = await cluster.status("held")
    assert held.status not in ("completed", "failed", "cancelled")
