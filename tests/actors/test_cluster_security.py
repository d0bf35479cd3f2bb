"""Who may do what on a coordinator: attempts belong to their node, credentials bind names,
roles bound requests, and violations are logged with who and why.

Each test runs a real coordinator (``open_coordinator``: real TCP on loopback, a real SQLite
journal) in the test's process; agents are the real agent code (``run_agent``) with an
in-process executor whose work waits on an event the test sets, or raw wire clients that
forge what an honest agent never sends.  Logs are captured as structlog event dicts.
"""

from __future__ import annotations

import argparse
from collections.abc import AsyncIterator, Callable, MutableMapping
from contextlib import asynccontextmanager
from functools import partial
from pathlib import Path
from typing import Any, get_args

import anyio
import pytest
import structlog

from actors import AgentConfig, Resources, open_coordinator, run_agent
from actors.cli._agent import config_from_args, configure
from actors.cli._format import format_nodes
from actors.cluster import (
    ACCESS,
    AUTH_STREAM,
    WIRE_CODEC,
    AgentHello,
    AmendJobRequest,
    CancelAttempt,
    CancelJobRequest,
    CheckpointTaskRequest,
    ClientRequest,
    Coordinator,
    CoordinatorConfig,
    CredentialIssued,
    CredentialsReply,
    ErrorReply,
    IssueCredentialRequest,
    IssuedCredentialReply,
    JobsReply,
    ListCredentialsRequest,
    ListNodesRequest,
    LogChunk,
    LogsRequest,
    NodesReply,
    PauseJobRequest,
    PreemptTaskRequest,
    Report,
    ReportAck,
    ResumeJobRequest,
    RetriedReply,
    RetryTasksRequest,
    RevokeCredentialRequest,
    Role,
    SetNodeHealthRequest,
    StatusRequest,
    SubmitRequest,
    SubmittedReply,
    TaskVerbReply,
    TextReply,
    Welcome,
    WhyRequest,
    WireMessage,
)
from actors.cluster._access import describe_request
from actors.cluster._agent import _transient
from actors.engine import (
    JobAmended,
    JobCancelRequested,
    JobPaused,
    JobReopened,
    JobResumed,
    NodeHealthChanged,
    TaskAssigned,
    TaskCheckpointRequested,
    TaskCompleted,
    TaskPreempted,
    job_stream,
    node_stream,
)
from actors.executors import (
    AttemptContext,
    AttemptFinished,
    RunningAttempt,
    open_inprocess_executor,
)
from runtime import (
    AuthenticationError,
    ConfigurationError,
    Connection,
    ConnectionClosedError,
    Credential,
    open_connection,
    write_private_file,
)

TOKEN = b"security-test-join-token-0123456789"
WAIT = 20.0
HOST = "127.0.0.1"
CAPACITY = Resources.of(cores=2, memory="1GiB")

Logs = list[MutableMapping[str, Any]]

GATE_JOB = """
[[jobs]]
name = "{name}"
command = ["inprocess:gate"]
resources = {{ cores = 1, memory = "16MiB" }}
"""


class Gate:
    """In-process work that runs until the test opens the gate."""

    def __init__(self) -> None:
        self.opened = anyio.Event()
        self.started = anyio.Event()

    async def __call__(self, attempt: AttemptContext) -> None:
        self.started.set()
        await self.opened.wait()


def events(logs: Logs, name: str) -> list[MutableMapping[str, Any]]:
    return [entry for entry in logs if entry["event"] == name]


@asynccontextmanager
async def coordinator(tmp_path: Path, **options: Any) -> AsyncIterator[Coordinator]:
    """A coordinator on a free loopback port with a journal in ``tmp_path``."""
    settings: dict[str, Any] = {
        "journal": tmp_path / "farm.db",
        "token": TOKEN,
        "port": 0,
        "work_dir": tmp_path / "work",
        "heartbeat_timeout": 5.0,
        **options,
    }
    async with open_coordinator(CoordinatorConfig(**settings)) as running:
        yield running


def client(farm: Coordinator, credential: Credential | None = None, name: str = "cli") -> Any:
    """Open a client connection with ``credential`` (else the join token)."""
    if credential is not None:
        return open_connection(
            HOST, farm.port, codec=WIRE_CODEC, credential=credential, role="client"
        )
    return open_connection(HOST, farm.port, codec=WIRE_CODEC, token=TOKEN, name=name, role="client")


async def ask(connection: Connection[WireMessage], message: ClientRequest) -> WireMessage:
    await connection.send(message)
    with anyio.fail_after(WAIT):
        return await connection.receive()


async def until_closed(connection: Connection[WireMessage]) -> None:
    """Receive until the server closes the connection (which raises)."""
    while True:
        await connection.receive()


async def wait_until(predicate: Callable[[], Any], *, what: str) -> None:
    """Poll a cheap in-process predicate (an async one too) until it holds."""
    with anyio.fail_after(WAIT):
        while True:
            result = predicate()
            if not isinstance(result, bool):
                result = await result
            if result:
                return
            await anyio.sleep(0.02)


def gate_executor(gate: Gate) -> Callable[..., Any]:
    def open_executor(**options: Any) -> Any:
        return open_inprocess_executor(
            {"gate": gate}, clock=options["clock"], terminate_grace=options["terminate_grace"]
        )

    return open_executor


async def start_agent(
    tg: anyio.abc.TaskGroup,
    farm: Coordinator,
    tmp_path: Path,
    name: str,
    *,
    gate: Gate,
    credential: Credential | None = None,
) -> None:
    """Run the real agent code as node ``name`` (credential file, else the join token)."""
    work = tmp_path / "agents" / name
    work.mkdir(parents=True)
    secret: dict[str, Any]
    if credential is None:
        token_file = tmp_path / "join.token"
        if not token_file.exists():
            write_private_file(token_file, TOKEN.decode())
        secret = {"token_file": str(token_file)}
    else:
        path = work / "credential"
        write_private_file(path, credential.text())
        secret = {"credential_file": str(path)}
    config = AgentConfig(
        host=HOST, port=farm.port, name=name, work_dir=str(work), capacity=CAPACITY, **secret
    )
    await tg.start(partial(run_agent, config, open_executor=gate_executor(gate)))


async def nodes_online(farm: Coordinator, *names: str) -> bool:
    nodes = {node.name: node for node in await farm.engine.nodes()}
    return all(name in nodes and nodes[name].health == "online" for name in names)


async def assignment(farm: Coordinator, job_id: str) -> TaskAssigned:
    """Return the job's one TaskAssigned, once committed (a job actor commits its batch of
    events after telling the node to start, so the attempt may start first)."""
    found: list[TaskAssigned] = []

    async def committed() -> bool:
        records = await farm.engine.journal.read_stream(job_stream(job_id))
        found[:] = [r.event for r in records if isinstance(r.event, TaskAssigned)]
        return bool(found)

    await wait_until(committed, what=f"{job_id} assigned")
    [assigned] = found
    return assigned


# -- 1. an attempt's frames come only from its node -----------------------------------------------


async def test_a_forged_report_claim_or_log_answer_for_another_nodes_attempt_is_refused(
    tmp_path: Path,
) -> None:
    """Another node's forged claim, log answer and completion report change nothing; the real
    attempt runs on and completes, and each refusal is logged as a security event."""
    gate = Gate()
    with structlog.testing.capture_logs() as logs:
        async with (
            coordinator(tmp_path) as farm,
            anyio.create_task_group() as tg,
        ):
            await start_agent(tg, farm, tmp_path, "honest", gate=gate)
            await wait_until(lambda: nodes_online(farm, "honest"), what="honest online")
            forger_credential = await farm.credentials.issue(kind="node", name="forger", by="test")
            await farm.engine.submit_text(GATE_JOB.format(name="shot"), fmt="toml", source="t")
            with anyio.fail_after(WAIT):
                await gate.started.wait()
            real = await assignment(farm, "shot")
            assert real.node == "honest"

            async def started() -> bool:  # the agent reports a start without waiting for it
                [summary] = await farm.engine.status("shot", tasks=True)
                return summary.tasks[0].status == "running"

            await wait_until(started, what="the start journaled")

            running = RunningAttempt(
                job_id="shot", task_id="0", attempt=real.attempt, fencing_token=real.token
            )
            async with open_connection(
                HOST, farm.port, codec=WIRE_CODEC, credential=forger_credential, role="agent"
            ) as forger:
                await forger.send(AgentHello(name="forger", capacity=CAPACITY, running=(running,)))
                with anyio.fail_after(WAIT):
                    assert isinstance(await forger.receive(), Welcome)
                    # The claim is refused: the coordinator tells the claimer to stop its copy.
                    cancel = await forger.receive()
                assert isinstance(cancel, CancelAttempt)
                assert cancel.fencing_token == real.token
                await forger.send(LogChunk(request=7, text="forged log"))
                finished = AttemptFinished(
                    job_id="shot",
                    task_id="0",
                    attempt=real.attempt,
                    fencing_token=real.token,
                    outcome="completed",
                )
                await forger.send(Report(sequence=1, report=finished))
                with anyio.fail_after(WAIT):
                    ack = await forger.receive()
                # Acknowledged, so an agent's outbox does not re-send it forever; not delivered.
                assert ack == ReportAck(sequence=1)
                [summary] = await farm.engine.status("shot", tasks=True)
                assert summary.tasks[0].status == "running"
                assert summary.tasks[0].node == "honest"

            gate.opened.set()
            with anyio.fail_after(WAIT):
                done = await farm.engine.wait_job("shot")
            assert done.status == "completed"
            records = await farm.engine.journal.read_stream(job_stream("shot"))
            completed = [r.event for r in records if isinstance(r.event, TaskCompleted)]
            assert [event.token for event in completed] == [real.token]
            tg.cancel_scope.cancel()

    refused = events(logs, "security_refused")
    assert [entry["reason"].split(" ")[0] for entry in refused] == ["claim", "log", "report"]
    for entry in refused:
        assert entry["node_id"] == "forger"
        assert entry["peer"].startswith("127.0.0.1:")
    claim, log_answer, report = refused
    assert (claim["claimed_node"], claim["job_id"], claim["task"]) == ("honest", "shot", "0")
    assert (report["claimed_node"], report["job_id"], report["task"]) == ("honest", "shot", "0")
    assert log_answer["claimed_node"] is None


async def test_an_agent_cannot_take_another_nodes_name(tmp_path: Path) -> None:
    """A node credential acts only under its own name, and the join token cannot take a name
    that a credential binds: both are refused and logged; the real node stays online."""
    gate = Gate()
    with structlog.testing.capture_logs() as logs:
        async with (
            coordinator(tmp_path) as farm,
            anyio.create_task_group() as tg,
        ):
            own = await farm.credentials.issue(kind="node", name="n1", by="test")
            other = await farm.credentials.issue(kind="node", name="n2", by="test")
            await start_agent(tg, farm, tmp_path, "n1", gate=gate, credential=own)
            await wait_until(lambda: nodes_online(farm, "n1"), what="n1 online")

            # n2's credential, claiming to be n1 in its hello.
            async with open_connection(
                HOST, farm.port, codec=WIRE_CODEC, credential=other, role="agent"
            ) as impostor:
                await impostor.send(AgentHello(name="n1", capacity=CAPACITY))
                with pytest.raises(ConnectionClosedError), anyio.fail_after(WAIT):
                    await impostor.receive()
            # The join token, under the bound name n1: refused at the handshake.
            with pytest.raises(AuthenticationError, match="bound to a node credential"):
                async with open_connection(
                    HOST, farm.port, codec=WIRE_CODEC, token=TOKEN, name="n1", role="agent"
                ):
                    pass
            assert await nodes_online(farm, "n1")
            assert farm._connections["n1"].principal is not None
            assert farm._connections["n1"].principal.method == "credential"
            tg.cancel_scope.cancel()

    [refused] = events(logs, "security_refused")
    assert (refused["node_id"], refused["claimed_node"]) == ("n2", "n1")
    rejected = [e for e in events(logs, "wire_connection_rejected") if e.get("name") == "n1"]
    assert any("bound to a node credential" in e["reason"] for e in rejected)


@pytest.mark.parametrize(
    ("kind", "role", "expected"),
    [
        ("node", "client", "a node credential cannot act as a client"),
        ("client", "agent", "a client credential cannot act as a node"),
    ],
)
async def test_a_credential_acts_only_as_its_kind(
    tmp_path: Path, kind: str, role: str, expected: str
) -> None:
    """A node credential cannot be used by a client, nor a client credential by an agent."""
    async with coordinator(tmp_path) as farm:
        credential = await farm.credentials.issue(
            kind=kind, name="someone", role="admin" if kind == "client" else None, by="test"
        )
        with pytest.raises(AuthenticationError, match=expected):
            async with open_connection(
                HOST, farm.port, codec=WIRE_CODEC, credential=credential, role=role
            ):
                pass


async def test_wrong_and_revoked_credentials_fail_alike_and_are_logged_apart(
    tmp_path: Path,
) -> None:
    """A wrong secret and a revoked name get the same answer; the log says which it was."""
    with structlog.testing.capture_logs() as logs:
        async with coordinator(tmp_path) as farm:
            issued = await farm.credentials.issue(
                kind="client", name="alice", role="read", by="test"
            )
            forged = Credential.generate(kind="client", name="alice")
            answers = []
            for attempt in (forged, issued):
                if attempt is issued:
                    await farm.credentials.revoke("alice", by="test")
                with pytest.raises(AuthenticationError) as caught:
                    async with client(farm, attempt):
                        pass
                answers.append(caught.value.reason)
    assert answers == ["rejected by the peer: wrong, revoked or unknown credential"] * 2
    reasons = [e["reason"] for e in events(logs, "wire_connection_rejected")]
    assert reasons == ["wrong secret for 'alice'", "no such credential for 'alice'"]


async def test_revoking_closes_live_connections_and_issuing_evicts_a_join_token_agent(
    tmp_path: Path,
) -> None:
    """Revoking a credential closes the connections made with it; binding a name with a new
    credential closes the join-token agent that used that name."""
    gate = Gate()
    with structlog.testing.capture_logs() as logs:
        async with (
            coordinator(tmp_path) as farm,
            anyio.create_task_group() as tg,
        ):
            bob = await farm.credentials.issue(kind="client", name="bob", role="read", by="t")
            await start_agent(tg, farm, tmp_path, "w1", gate=gate)
            await wait_until(lambda: nodes_online(farm, "w1"), what="w1 online")
            joined = farm._connections["w1"]
            async with client(farm, bob) as connection:
                assert isinstance(await ask(connection, StatusRequest()), JobsReply)
                async with client(farm) as admin:
                    reply = await ask(admin, RevokeCredentialRequest(name="bob"))
                    assert isinstance(reply, TextReply)
                    w1 = Credential.generate(kind="node", name="w1")
                    reply = await ask(admin, IssueCredentialRequest.of(w1))
                    assert isinstance(reply, IssuedCredentialReply)
                with pytest.raises(ConnectionClosedError), anyio.fail_after(WAIT):
                    await ask(connection, StatusRequest())
            # The join-token agent under the now bound name was closed, and cannot come back.
            await wait_until(lambda: farm._connections.get("w1") is not joined, what="w1 closed")
            assert "w1" not in farm._connections
            tg.cancel_scope.cancel()
    closed = {
        (e["principal"], e["change"])
        for e in events(logs, "connection_closed_by_credential_change")
    }
    assert closed == {("bob", "revoked"), ("w1", "issued")}


async def test_one_process_writes_a_journal_at_a_time(tmp_path: Path) -> None:
    """A second coordinator (or an offline token command) on a journal in use is refused,
    naming the journal; once the first stops, the journal is free again."""
    async with coordinator(tmp_path):
        with pytest.raises(ConfigurationError, match="in use by another process") as caught:
            async with coordinator(tmp_path):
                pass
        assert caught.value.where == str(tmp_path / "farm.db")
    async with coordinator(tmp_path) as again:
        assert again.port > 0


async def test_the_join_token_can_be_turned_off(tmp_path: Path) -> None:
    """Without the join token only credentials authenticate, agents and clients alike."""
    async with coordinator(tmp_path, token=None) as farm:
        for role in ("agent", "client"):
            with pytest.raises(AuthenticationError, match="join token is turned off"):
                async with open_connection(
                    HOST, farm.port, codec=WIRE_CODEC, token=TOKEN, name="x", role=role
                ):
                    pass
        dave = await farm.credentials.issue(kind="client", name="dave", role="read", by="t")
        async with client(farm, dave) as connection:
            assert isinstance(await ask(connection, StatusRequest()), JobsReply)


async def test_the_journal_holds_no_secret_and_replays_the_credentials(tmp_path: Path) -> None:
    """Issued credentials are journaled as verifiers only; the stream decodes and folds."""
    async with coordinator(tmp_path) as farm:
        credential = await farm.credentials.issue(kind="node", name="n9", by="t")
        records = await farm.engine.journal.read_stream(AUTH_STREAM)
        [issued] = [r.event for r in records]
    assert isinstance(issued, CredentialIssued)
    data = (tmp_path / "farm.db").read_bytes()
    wal = tmp_path / "farm.db-wal"
    data += wal.read_bytes() if wal.exists() else b""
    secret_text = credential.text().rsplit("/", 1)[1]
    assert credential.secret not in data
    assert secret_text.encode() not in data
    assert issued.stored_key != credential.secret


# -- 2. roles -------------------------------------------------------------------------------------


REQUEST_KINDS = (
    "status",
    "nodes",
    "why",
    "logs",
    "submit",
    "cancel-own",
    "cancel-other",
    "token-list",
    "token-issue",
    "token-revoke",
)

# role -> the request kinds it may send (everything else is refused).
ALLOWED: dict[Role, set[str]] = {
    "read": {"status", "nodes", "why", "logs"},
    "submit": {"status", "nodes", "why", "logs", "submit", "cancel-own"},
    "operator": {"status", "nodes", "why", "logs", "submit", "cancel-own", "cancel-other"},
    "admin": set(REQUEST_KINDS),
}


def role_request(kind: str, role: Role) -> ClientRequest:
    match kind:
        case "status":
            return StatusRequest(job_id="other")
        case "nodes":
            return ListNodesRequest()
        case "why":
            return WhyRequest(job_id="other")
        case "logs":
            return LogsRequest(job_id="other")
        case "submit":
            return SubmitRequest(
                text=GATE_JOB.format(name=f"new-{role}"), format="toml", source="s.toml"
            )
        case "cancel-own":
            return CancelJobRequest(job_id=f"own-{role}")
        case "cancel-other":
            return CancelJobRequest(job_id="other")
        case "token-list":
            return ListCredentialsRequest()
        case "token-issue":
            return IssueCredentialRequest.of(
                Credential.generate(kind="node", name=f"issued-by-{role}")
            )
        case "token-revoke":
            return RevokeCredentialRequest(name="victim")
    raise AssertionError(kind)


@pytest.mark.parametrize("role", list(ALLOWED))
async def test_each_role_against_each_request_kind(tmp_path: Path, role: Role) -> None:
    """Over real TCP, a client of each role is answered or refused per the role table; each
    refusal is an ErrorReply naming the rule, logged with who tried."""
    with structlog.testing.capture_logs() as logs:
        async with coordinator(tmp_path) as farm:
            await farm.engine.submit_text(GATE_JOB.format(name="other"), fmt="toml", source="o")
            await farm.credentials.issue(kind="client", name="victim", role="read", by="t")
            me = await farm.credentials.issue(kind="client", name=f"{role}-user", role=role, by="t")
            submitter = await farm.credentials.issue(
                kind="client", name=f"{role}-submitter", role="submit", by="t"
            )
            async with client(farm, submitter) as connection:
                reply = await ask(
                    connection,
                    SubmitRequest(
                        text=GATE_JOB.format(name=f"own-{role}"), format="toml", source="x"
                    ),
                )
                assert isinstance(reply, SubmittedReply), reply
            # "own-ROLE" belongs to the submitter: make it this principal's own job.
            if role == "submit":
                me = submitter
            outcomes: dict[str, bool] = {}
            async with client(farm, me) as connection:
                for kind in REQUEST_KINDS:
                    reply = await ask(connection, role_request(kind, role))
                    refused = isinstance(reply, ErrorReply) and reply.kind == "AccessDeniedError"
                    if not refused:
                        assert not isinstance(reply, ErrorReply), (kind, reply)
                    outcomes[kind] = not refused
    assert {kind for kind, allowed in outcomes.items() if allowed} == ALLOWED[role]
    refusals = events(logs, "access_refused")
    refused_kinds = [k for k in REQUEST_KINDS if k not in ALLOWED[role]]
    expected = [describe_request(role_request(k, role)) for k in refused_kinds]
    assert sorted(e["request"] for e in refusals) == sorted(expected)
    assert {e["principal"] for e in refusals} <= {me.name}
    assert {e["role"] for e in refusals} <= {role, "submit"}


async def test_a_submit_client_cancels_only_its_own_jobs(tmp_path: Path) -> None:
    """The submitting principal is recorded on the job; another submit client cannot cancel
    it, the owner can, and the reply says why."""
    async with coordinator(tmp_path) as farm:
        alice = await farm.credentials.issue(kind="client", name="alice", role="submit", by="t")
        mallory = await farm.credentials.issue(kind="client", name="mallory", role="submit", by="t")
        async with client(farm, alice) as connection:
            reply = await ask(
                connection,
                SubmitRequest(text=GATE_JOB.format(name="a1"), format="toml", source="x"),
            )
            assert isinstance(reply, SubmittedReply)
        [summary] = await farm.engine.status("a1")
        assert summary.owner == "alice"
        async with client(farm, mallory) as connection:
            reply = await ask(connection, CancelJobRequest(job_id="a1"))
        assert isinstance(reply, ErrorReply)
        assert "may cancel only jobs it submitted; a1 was submitted by alice" in reply.error
        async with client(farm, alice) as connection:
            reply = await ask(connection, CancelJobRequest(job_id="a1"))
        assert isinstance(reply, JobsReply)
        assert reply.jobs[0].status in ("cancelled", "cancelling")


async def test_operator_verbs_journal_and_show_the_client_that_asked(tmp_path: Path) -> None:
    """Each operator verb over the wire journals the credential's name with its change (and
    the default reason names it); a join-token client keeps the old "by operator" wording."""
    gate = Gate()
    async with coordinator(tmp_path) as farm, anyio.create_task_group() as tg:
        await start_agent(tg, farm, tmp_path, "n1", gate=gate)
        await wait_until(lambda: nodes_online(farm, "n1"), what="n1 online")
        alice = await farm.credentials.issue(kind="client", name="alice", role="operator", by="t")
        await farm.engine.submit_text(GATE_JOB.format(name="j1"), fmt="toml", source="t")
        with anyio.fail_after(WAIT):
            await gate.started.wait()
        await assignment(farm, "j1")
        async with client(farm, alice) as connection:
            reply = await ask(connection, CheckpointTaskRequest(job_id="j1", task=0))
            assert isinstance(reply, TaskVerbReply)
            assert reply.done
            reply = await ask(connection, AmendJobRequest(job_id="j1", priority="high"))
            assert isinstance(reply, JobsReply)
            reply = await ask(connection, PauseJobRequest(job_id="j1", mode="finish"))
            assert isinstance(reply, JobsReply)
            reply = await ask(connection, ResumeJobRequest(job_id="j1"))
            assert isinstance(reply, JobsReply)
            reply = await ask(connection, PreemptTaskRequest(job_id="j1", task=0))
            assert isinstance(reply, TaskVerbReply)
            assert reply.done
            reply = await ask(
                connection, SetNodeHealthRequest(node="n1", health="draining", reason="disk swap")
            )
            assert isinstance(reply, NodesReply)
            assert [node.by for node in reply.nodes] == ["alice"]
            assert "disk swap (by alice)" in format_nodes(reply.nodes)
            reply = await ask(connection, CancelJobRequest(job_id="j1"))
            assert isinstance(reply, JobsReply)
            with anyio.fail_after(WAIT):
                cancelled = await farm.engine.wait_job("j1")
            assert (cancelled.status, cancelled.reason) == ("cancelled", "cancelled by alice")
            reply = await ask(connection, RetryTasksRequest(job_id="j1"))
            assert isinstance(reply, RetriedReply)
            assert reply.tasks == (0,)
        async with client(farm) as connection:  # the join token: a name anyone could claim
            reply = await ask(connection, PauseJobRequest(job_id="j1"))
            assert isinstance(reply, JobsReply)
        records = await farm.engine.journal.read_stream(job_stream("j1"))
        verbs = (
            TaskCheckpointRequested,
            JobAmended,
            JobPaused,
            JobResumed,
            TaskPreempted,
            JobCancelRequested,
            JobReopened,
        )
        said = [
            (type(r.event).__name__, r.event.by, getattr(r.event, "reason", ""))
            for r in records
            if isinstance(r.event, verbs)
        ]
        assert said == [
            ("TaskCheckpointRequested", "alice", "operator"),
            ("JobAmended", "alice", ""),
            ("JobPaused", "alice", "paused by alice"),
            ("JobResumed", "alice", "resumed by alice"),
            ("TaskPreempted", "alice", "preempted by alice"),
            ("JobCancelRequested", "alice", "cancelled by alice"),
            ("JobReopened", "alice", "retried by alice"),
            ("JobPaused", None, "paused by operator"),
        ]
        node_records = await farm.engine.journal.read_stream(node_stream("n1"))
        [drained] = [r.event for r in node_records if isinstance(r.event, NodeHealthChanged)]
        assert (drained.by, drained.operator, drained.reason) == ("operator", "alice", "disk swap")
        tg.cancel_scope.cancel()


def test_every_client_request_has_a_row_in_the_access_table() -> None:
    """The role table covers every request kind a client can send."""
    assert set(get_args(ClientRequest)) == set(ACCESS)


async def test_token_requests_over_the_wire_issue_list_and_revoke(tmp_path: Path) -> None:
    """An admin registers a credential it generated (only the verifier travels), which then
    works; lists it; cannot register the name twice; revokes it."""
    async with coordinator(tmp_path) as farm, client(farm) as admin:
        eve = Credential.generate(kind="client", name="eve")
        frame = WIRE_CODEC.encode(IssueCredentialRequest.of(eve, role="read"))
        assert eve.secret not in frame
        assert eve.text().rsplit("/", 1)[1].encode() not in frame
        reply = await ask(admin, IssueCredentialRequest.of(eve, role="read"))
        assert isinstance(reply, IssuedCredentialReply)
        assert (reply.info.name, reply.info.role) == ("eve", "read")
        async with client(farm, eve) as connection:
            assert isinstance(await ask(connection, StatusRequest()), JobsReply)
        listing = await ask(admin, ListCredentialsRequest())
        assert isinstance(listing, CredentialsReply)
        assert [(c.name, c.kind, c.role) for c in listing.credentials] == [
            ("eve", "client", "read")
        ]
        again = await ask(admin, IssueCredentialRequest.of(eve, role="admin"))
        assert isinstance(again, ErrorReply)
        assert "already has a client credential" in again.error
        assert isinstance(await ask(admin, RevokeCredentialRequest(name="eve")), TextReply)
        missing = await ask(admin, RevokeCredentialRequest(name="eve"))
        assert isinstance(missing, ErrorReply)
        assert "no credential named 'eve'" in missing.error


# -- 3 and 4. idle clients, violations ------------------------------------------------------------


async def test_an_idle_client_is_disconnected(tmp_path: Path) -> None:
    """A client that sends nothing for the idle timeout is closed and it is logged."""
    with structlog.testing.capture_logs() as logs:
        async with coordinator(tmp_path, client_idle_timeout=0.2) as farm, client(farm) as idle:
            with pytest.raises(ConnectionClosedError), anyio.fail_after(WAIT):
                await idle.receive()
    [entry] = events(logs, "client_idle_closed")
    assert entry["principal"] == "cli"


VIOLATIONS: dict[str, tuple[str, Callable[[Connection[Any]], Any], str]] = {
    "agent sends a client request": (
        "agent",
        lambda c: c.send(StatusRequest()),
        "an agent may not send client.status",
    ),
    "client sends an agent message": (
        "client",
        lambda c: c.send(LogChunk(request=1, text="")),
        "a client may not send agent.log_chunk",
    ),
    "malformed frame": (
        "agent",
        lambda c: c.transport_stream.send(b"\x00\x00\x00\x03\xc1\xc1\xc1"),
        "malformed frame",
    ),
    "frame too big": (
        "client",
        lambda c: c.transport_stream.send(b"\x7f\xff\xff\xff"),
        "exceeds the",
    ),
}


@pytest.mark.parametrize("case", list(VIOLATIONS))
async def test_a_protocol_violation_after_login_is_logged_once_with_who_and_why(
    tmp_path: Path, case: str
) -> None:
    """A violation by an authenticated peer closes its connection and is logged once, with
    its peer, principal, role and reason."""
    role, violate, reason = VIOLATIONS[case]
    with structlog.testing.capture_logs() as logs:
        async with coordinator(tmp_path) as farm:
            async with open_connection(
                HOST, farm.port, codec=WIRE_CODEC, token=TOKEN, name="rogue", role=role
            ) as connection:
                if role == "agent":
                    await connection.send(AgentHello(name="rogue", capacity=CAPACITY))
                    with anyio.fail_after(WAIT):
                        assert isinstance(await connection.receive(), Welcome)
                await violate(connection)
                with pytest.raises(ConnectionClosedError), anyio.fail_after(WAIT):
                    await until_closed(connection)
            await wait_until(
                lambda: bool(events(logs, "wire_connection_rejected")), what="the violation"
            )
    [entry] = events(logs, "wire_connection_rejected")
    assert (entry["name"], entry["role"]) == ("rogue", role)
    assert entry["peer"].startswith("127.0.0.1:")
    assert reason in entry["reason"]


# Local agents are detached on purpose (they outlive a coordinator crash and reconnect), so the
# coordinator keeps their pids, not their Popen objects.
@pytest.mark.filterwarnings("ignore::ResourceWarning")
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
async def test_local_agents_join_with_credentials_when_the_join_token_is_off(
    tmp_path: Path,
) -> None:
    """``--local-agents`` without a join token issues each local agent a node credential
    (kept in its folder) and the real agent process joins with it."""
    async with coordinator(tmp_path, token=None, local_agents=1) as farm:
        await wait_until(lambda: nodes_online(farm, "local-1"), what="local-1 online")
        record = farm.credentials.bound("local-1")
        assert record is not None
        assert record.kind == "node"
        connection = farm._connections["local-1"]
        assert connection.principal is not None
        assert connection.principal.method == "credential"
        farm.stop_local_agents()


# -- the agent's command line ------------------------------------------------------------------


def agent_args(tmp_path: Path, *flags: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    configure(parser)
    return parser.parse_args(
        ["--connect", "127.0.0.1:7717", "--work-dir", str(tmp_path / "work"), *flags]
    )


def test_an_agent_takes_its_name_from_its_node_credential(tmp_path: Path) -> None:
    """``--credential-file`` alone names the node; a clashing ``--name`` or another kind of
    credential is refused naming the file; exactly one secret is required."""
    node = tmp_path / "n.cred"
    write_private_file(node, Credential.generate(kind="node", name="render-07").text())
    config = config_from_args(agent_args(tmp_path, "--credential-file", str(node)))
    assert (config.name, config.credential_file, config.token_file) == ("render-07", str(node), "")

    with pytest.raises(ConfigurationError, match="for node 'render-07', not 'other'") as caught:
        config_from_args(agent_args(tmp_path, "--credential-file", str(node), "--name", "other"))
    assert caught.value.where == str(node)

    client_file = tmp_path / "c.cred"
    write_private_file(client_file, Credential.generate(kind="client", name="ops").text())
    with pytest.raises(ConfigurationError, match="a client credential cannot run an agent"):
        config_from_args(agent_args(tmp_path, "--credential-file", str(client_file)))

    token = tmp_path / "t"
    write_private_file(token, TOKEN.decode())
    for flags in ((), ("--token-file", str(token), "--credential-file", str(node))):
        with pytest.raises(ConfigurationError, match=r"--token-file.*or this node's credential"):
            config_from_args(agent_args(tmp_path, *flags))


def test_an_agent_retries_a_refusal_for_now_and_gives_up_on_a_refusal_for_good() -> None:
    """The agent's reconnect loop treats retryable refusals as transient, others as fatal."""
    assert _transient(AuthenticationError("c:1", reason="rejected: busy", retryable=True))
    assert not _transient(AuthenticationError("c:1", reason="rejected by the peer: wrong token"))
