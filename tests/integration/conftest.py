"""A real cluster on loopback for the integration tests: ``taskfarm serve`` and ``taskfarm agent``
subprocesses with their own journal, token and work folders, and a client that speaks the
coordinator's protocol.

Waits poll the coordinator over the client protocol inside ``anyio.fail_after`` (or read a
process's output lines); nothing sleeps to synchronise.  Every process a test starts, and every
attempt its agents started, carries a marker in its environment, and the teardown kills them all.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
import pytest

from actors import ENGINE_CODEC, JobSummary, NodeSummary
from actors.cli._commands import request
from actors.cluster import (
    WIRE_CODEC,
    ClientRequest,
    JobsReply,
    ListNodesRequest,
    NodesReply,
    Reply,
    StatusRequest,
    SubmitRequest,
    SubmittedReply,
)
from persistence import RecordedEvent, open_sqlite_journal
from runtime import Connection, SystemClock, WireError, create_token_file, open_connection

HOST = "127.0.0.1"
FINISHED = ("completed", "failed", "cancelled")
MARKER_VARIABLE = "TASKFARM_INTEGRATION_RUN"
_LISTENING = re.compile(r"taskfarm coordinator on [^:]+:(\d+),")
_POLL = 0.1  # seconds between two polls of the coordinator


class Cluster:
    """A coordinator and its agents, each a real process, all in one temporary folder."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.token_file = root / "taskfarm.token"
        self.token = create_token_file(self.token_file)
        self.journal = root / "taskfarm.db"
        self.port = 0
        self.marker = uuid.uuid4().hex
        self.coordinator: subprocess.Popen[str] | None = None
        self.agents: dict[str, subprocess.Popen[bytes]] = {}
        self._processes: list[subprocess.Popen[Any]] = []
        self._logs: list[Path] = []

    # -- processes ------------------------------------------------------------------------------

    def command(self, *args: str) -> list[str]:
        """Return the argv of a ``taskfarm`` command run by this interpreter."""
        return [sys.executable, "-m", "runtime.cli", *args]

    def env(self, tag: str) -> dict[str, str]:
        """Return the environment of a process: ours, plus the marker the teardown looks for."""
        return {**os.environ, MARKER_VARIABLE: f"{self.marker}:{tag}:"}

    def client_args(self) -> list[str]:
        """Return the flags that point a client command at this coordinator."""
        return ["--connect", f"{HOST}:{self.port}", "--token-file", str(self.token_file)]

    def _log_file(self, name: str) -> Path:
        path = self.root / "logs" / f"{name}-{len(self._logs)}.log"
        path.parent.mkdir(parents=True, exist_ok=True)
        self._logs.append(path)
        return path

    def start_coordinator(
        self, *extra: str, heartbeat_timeout: float = 2.0, restart_grace: float = 4.0
    ) -> subprocess.Popen[str]:
        """Start ``taskfarm serve`` (on a free port, then on the same one) and wait until it
        listens: it prints its address once it does."""
        assert self.coordinator is None, "a coordinator is already running"
        log = self._log_file("coordinator")
        with log.open("wb") as stderr:
            process = subprocess.Popen(
                self.command(
                    "--log-format",
                    "json",
                    "--log-level",
                    "info",
                    "serve",
                    "--journal",
                    str(self.journal),
                    "--listen",
                    f"{HOST}:{self.port}",
                    "--token-file",
                    str(self.token_file),
                    "--work-dir",
                    str(self.root / "coordinator-work"),
                    "--heartbeat-timeout",
                    str(heartbeat_timeout),
                    "--restart-grace",
                    str(restart_grace),
                    *extra,
                ),
                stdout=subprocess.PIPE,
                stderr=stderr,
                stdin=subprocess.DEVNULL,
                text=True,
                env=self.env("coordinator"),
                start_new_session=True,
            )
        self._processes.append(process)
        self.coordinator = process
        assert process.stdout is not None
        line = process.stdout.readline()  # the process's first output line, or EOF if it died
        match = _LISTENING.match(line)
        assert match, f"the coordinator did not start: {line!r}\n{self.diagnostics()}"
        self.port = int(match.group(1))
        return process

    def kill_coordinator(self) -> None:
        """SIGKILL the coordinator (no clean-up of any kind) and reap it."""
        process = self.coordinator
        assert process is not None
        _kill(process)
        self.coordinator = None

    def start_agent(
        self,
        name: str,
        *,
        cores: str = "1",
        work_dir: Path | None = None,
        extra: tuple[str, ...] = (),
        port: int | None = None,
    ) -> subprocess.Popen[bytes]:
        """Start ``taskfarm agent --name NAME`` with a fixed capacity (its folder is kept, so a
        restart with the same name finds its outbox), connecting to ``port`` (a proxy's) if
        given, else to the coordinator."""
        assert name not in self.agents, f"agent {name} is already running"
        work = work_dir or self.root / "agents" / name
        log = self._log_file(f"agent-{name}")
        with log.open("wb") as output:
            process = subprocess.Popen(
                self.command(
                    "--log-format",
                    "json",
                    "--log-level",
                    "info",
                    "agent",
                    "--connect",
                    f"{HOST}:{port or self.port}",
                    "--token-file",
                    str(self.token_file),
                    "--name",
                    name,
                    "--work-dir",
                    str(work),
                    "--cores",
                    cores,
                    "--memory",
                    "2GiB",
                    "--scratch",
                    "10GiB",
                    "--terminate-grace",
                    "1",
                    *extra,
                ),
                stdout=output,
                stderr=output,
                stdin=subprocess.DEVNULL,
                env=self.env(f"agent:{name}"),
                start_new_session=True,
            )
        self._processes.append(process)
        self.agents[name] = process
        return process

    def kill_agent(self, name: str) -> None:
        """SIGKILL an agent and the work it runs, as if its host lost power."""
        _kill(self.agents.pop(name))
        _kill_marked(f"{self.marker}:agent:{name}:")

    def pause_agent(self, name: str) -> None:
        """SIGSTOP an agent (a hung process: its connection stays open, its work runs on)."""
        self.agents[name].send_signal(signal.SIGSTOP)

    def resume_agent(self, name: str) -> None:
        """SIGCONT an agent paused by :meth:`pause_agent`."""
        self.agents[name].send_signal(signal.SIGCONT)

    def close(self) -> None:
        """Kill every process this cluster started, and every attempt its agents started."""
        for process in self._processes:
            _kill(process)
        _kill_marked(self.marker)

    # -- the client protocol --------------------------------------------------------------------

    @asynccontextmanager
    async def connect(self, name: str = "integration-client") -> AsyncIterator[Connection[Any]]:
        """Open an authenticated client connection to the coordinator."""
        async with open_connection(
            HOST, self.port, codec=WIRE_CODEC, token=self.token, name=name, role="client"
        ) as connection:
            yield connection

    async def ask(self, message: ClientRequest) -> Reply:
        """Send one request on a new connection and return the reply."""
        async with self.connect() as connection:
            return await request(connection, message)

    async def status(self, job_id: str | None = None) -> list[JobSummary]:
        """Return the coordinator's job summaries (with tasks when ``job_id`` is given)."""
        reply = await self.ask(StatusRequest(job_id=job_id))
        assert isinstance(reply, JobsReply)
        return list(reply.jobs)

    async def nodes(self) -> dict[str, NodeSummary]:
        """Return the coordinator's nodes by name."""
        reply = await self.ask(ListNodesRequest())
        assert isinstance(reply, NodesReply)
        return {node.name: node for node in reply.nodes}

    async def submit(self, text: str, *, source: str = "spec.toml") -> list[str]:
        """Submit spec text (TOML, or JSON when ``source`` ends in .json); return the job ids."""
        fmt = "json" if source.endswith(".json") else "toml"
        reply = await self.ask(SubmitRequest(text=text, format=fmt, source=source))
        assert isinstance(reply, SubmittedReply)
        return list(reply.job_ids)

    async def cli(self, *args: str) -> subprocess.CompletedProcess[bytes]:
        """Run a ``taskfarm`` client command against the coordinator; return its result."""
        return await anyio.run_process(
            [*self.command(*args), *self.client_args()], check=False, env=self.env("cli")
        )

    # -- waiting --------------------------------------------------------------------------------

    async def wait_until(
        self, probe: Callable[[], Awaitable[bool]], *, what: str, limit: float = 30.0
    ) -> None:
        """Poll ``probe`` until it returns True; a coordinator that is not (yet) reachable
        counts as False."""
        try:
            with anyio.fail_after(limit):
                while True:
                    try:
                        if await probe():
                            return
                    except WireError:
                        pass  # restarting: try again
                    await anyio.sleep(_POLL)
        except TimeoutError:
            raise AssertionError(f"timed out waiting for {what}\n{self.diagnostics()}") from None

    async def wait_online(self, *names: str, limit: float = 30.0) -> dict[str, NodeSummary]:
        """Wait until every named node is online; return the nodes."""
        nodes: dict[str, NodeSummary] = {}

        async def online() -> bool:
            nonlocal nodes
            nodes = await self.nodes()
            return all(name in nodes and nodes[name].health == "online" for name in names)

        await self.wait_until(online, what=f"nodes {names} online", limit=limit)
        return nodes

    async def wait_job(
        self,
        job_id: str,
        until: Callable[[JobSummary], bool],
        *,
        what: str,
        limit: float = 30.0,
    ) -> JobSummary:
        """Poll one job's status (with its tasks) until ``until`` holds; return it."""
        summary: JobSummary | None = None

        async def probe() -> bool:
            nonlocal summary
            (summary,) = await self.status(job_id)
            return until(summary)

        await self.wait_until(probe, what=f"job {job_id}: {what}", limit=limit)
        assert summary is not None
        return summary

    async def wait_finished(self, *job_ids: str, limit: float = 60.0) -> dict[str, JobSummary]:
        """Wait until every job has finished; return their summaries (with tasks)."""
        done: dict[str, JobSummary] = {}
        for job_id in job_ids:
            done[job_id] = await self.wait_job(
                job_id, lambda job: job.status in FINISHED, what="finished", limit=limit
            )
        return done

    # -- what the processes left behind ---------------------------------------------------------

    async def journal_events(self) -> list[RecordedEvent]:
        """Read the whole journal (read-only; the coordinator may be running)."""
        async with open_sqlite_journal(
            self.journal, clock=SystemClock(), codec=ENGINE_CODEC, read_only=True
        ) as journal:
            return [record async for batch in journal.read_all() for record in batch]

    def log_entries(self, process: str) -> list[dict[str, Any]]:
        """Return the JSON log entries of ``process`` ("coordinator", "agent-NAME"), oldest
        first, across its restarts."""
        entries = []
        for path in self._logs:
            if path.name.rpartition("-")[0] == process:
                for line in path.read_text(errors="replace").splitlines():
                    try:
                        entry = json.loads(line)
                    except ValueError:
                        continue  # e.g. a traceback
                    if isinstance(entry, dict):
                        entries.append(entry)
        return entries

    def coordinator_log(self) -> list[dict[str, Any]]:
        """Return the coordinators' JSON log entries, oldest first."""
        return self.log_entries("coordinator")

    async def wait_for_log(
        self, process: str, event: str, *, limit: float = 30.0, **fields: object
    ) -> dict[str, Any]:
        """Wait until ``process`` logs ``event`` with ``fields``; return the entry."""
        found: list[dict[str, Any]] = []

        async def logged() -> bool:
            found[:] = [
                entry
                for entry in self.log_entries(process)
                if entry.get("event") == event
                and all(entry.get(key) == value for key, value in fields.items())
            ]
            return bool(found)

        await self.wait_until(logged, what=f"{process} to log {event} {fields}", limit=limit)
        return found[0]

    def diagnostics(self, lines: int = 25) -> str:
        """Return the tail of every process log (for assertion messages)."""
        parts = []
        for path in self._logs:
            tail = path.read_text(errors="replace").splitlines()[-lines:]
            parts.append(f"--- {path.name}\n" + "\n".join(tail))
        return "\n".join(parts)


def _kill(process: subprocess.Popen[Any]) -> None:
    if process.poll() is None:
        process.kill()
    process.wait(timeout=30)
    if process.stdout is not None:
        process.stdout.close()


def _kill_marked(marker: str) -> None:
    """SIGKILL every process whose environment carries ``marker`` (a prefix of the value)."""
    needle = f"{MARKER_VARIABLE}={marker}".encode()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            environ = (entry / "environ").read_bytes()
        except OSError:
            continue
        if any(item.startswith(needle) for item in environ.split(b"\0")):
            try:
                os.kill(int(entry.name), signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[Cluster]:
    """A cluster in ``tmp_path``; nothing runs until the test starts it; all is killed after."""
    running = Cluster(tmp_path)
    try:
        yield running
    finally:
        running.close()


@pytest.fixture(scope="module")
def module_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    """A cluster shared by one test module (each test must leave it as it found it)."""
    running = Cluster(tmp_path_factory.mktemp("cluster"))
    try:
        yield running
    finally:
        running.close()
