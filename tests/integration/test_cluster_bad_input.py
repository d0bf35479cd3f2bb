"""Bad input against a live coordinator process: malformed, oversized, truncated and
unauthenticated frames, wrong tokens and impostors on its socket, and invalid job specs through
``taskfarm submit``.  Each bad connection is closed and logged, each bad spec refused with an
error naming the file and the field, and nothing reaches the journal; everyone else is served.
"""

from __future__ import annotations

import random
import struct
import sys
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import anyio
import msgspec
import pytest
from anyio.abc import SocketAttribute, SocketStream

from actors import ENGINE_CODEC, Resources
from actors.cli._commands import request
from actors.cluster import WIRE_CODEC, AgentHello, JobsReply, StatusRequest
from persistence import open_sqlite_journal
from runtime import AuthenticationError, SystemClock, WireError, open_connection

if TYPE_CHECKING:
    from conftest import Cluster

PYTHON = sys.executable
STEADY = "steady"  # the agent that must stay connected through everything
FUZZ_CONNECTIONS = 3000
FUZZ_WORKERS = 8
FUZZ_SEED = 20260427
HANDSHAKE_LIMIT = 4096  # runtime._wire_auth: frames before authentication
FRAME_LIMIT = WIRE_CODEC.max_frame_size


@pytest.fixture(scope="module")
def farm(module_cluster: Cluster) -> Cluster:
    """One coordinator with one agent, shared by this module's tests (each leaves it as found)."""
    module_cluster.start_coordinator(heartbeat_timeout=3.0)
    module_cluster.start_agent(STEADY, cores="2")
    anyio.run(module_cluster.wait_online, STEADY)
    return module_cluster


def frame(payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + payload


def local_address(stream: SocketStream) -> str:
    address = stream.extra(SocketAttribute.local_address)
    assert isinstance(address, tuple)
    return f"{address[0]}:{address[1]}"


async def closed_by_server(stream: SocketStream, payload: bytes, *, eof: bool = True) -> None:
    """Send ``payload`` (then half-close) and read until the server closes the connection."""
    with anyio.fail_after(10):
        try:
            if payload:
                await stream.send(payload)
            if eof:
                await stream.send_eof()
            while True:
                await stream.receive()
        except (anyio.EndOfStream, anyio.BrokenResourceError, anyio.ClosedResourceError):
            return


async def still_serving(farm: Cluster, connection: Any) -> None:
    """The long-lived client, a new client and the steady agent are all still served."""
    reply = await request(connection, StatusRequest())
    assert isinstance(reply, JobsReply)
    nodes = await farm.nodes()
    assert nodes[STEADY].health == "online"
    assert farm.coordinator is not None
    assert farm.coordinator.poll() is None


def rejections(farm: Cluster) -> list[dict[str, Any]]:
    return [e for e in farm.coordinator_log() if e.get("event") == "wire_connection_rejected"]


# -- one bad connection at a time -------------------------------------------------------------


async def raw_unauthenticated(farm: Cluster, payload: bytes) -> str:
    async with await anyio.connect_tcp("127.0.0.1", farm.port) as stream:
        address = local_address(stream)
        await closed_by_server(stream, payload)
    return address


async def raw_authenticated(
    farm: Cluster, payload: bytes, *, role: str = "client", eof: bool = True
) -> str:
    async with open_connection(
        "127.0.0.1", farm.port, codec=WIRE_CODEC, token=farm.token, name="rogue", role=role
    ) as connection:
        stream = connection.transport_stream
        assert isinstance(stream, SocketStream)
        address = local_address(stream)
        await closed_by_server(stream, payload, eof=eof)
    return address


def status_frame() -> bytes:
    return WIRE_CODEC.encode(StatusRequest())


def hello_of(name: str) -> bytes:
    hello = AgentHello(name=name, capacity=Resources(millicores=1000, memory=1 << 30))
    return WIRE_CODEC.encode(hello)


BadConnection = Callable[["Cluster"], Awaitable[str]]

BAD_CONNECTIONS: dict[str, tuple[BadConnection, str]] = {
    "garbage": (
        lambda farm: raw_unauthenticated(farm, b"GET / HTTP/1.1\r\nHost: taskfarm\r\n\r\n"),
        "AuthenticationError",
    ),
    "oversized-before-auth": (
        lambda farm: raw_unauthenticated(farm, struct.pack(">I", 2**31) + b"x" * 64),
        "AuthenticationError",
    ),
    "truncated-before-auth": (
        lambda farm: raw_unauthenticated(farm, struct.pack(">I", 100) + b"x" * 10),
        "AuthenticationError",
    ),
    "request-before-handshake": (
        lambda farm: raw_unauthenticated(farm, status_frame()),
        "AuthenticationError",
    ),
    "oversized-after-auth": (
        lambda farm: raw_authenticated(farm, struct.pack(">I", FRAME_LIMIT + 1) + b"x" * 64),
        "FrameTooLargeError",
    ),
    "truncated-after-auth": (
        lambda farm: raw_authenticated(farm, struct.pack(">I", 1000) + b"\x81" * 10),
        "TruncatedFrameError",
    ),
    "garbage-after-auth": (
        lambda farm: raw_authenticated(farm, frame(b"\xc1\xc1\xc1 not msgpack")),
        "FrameDecodeError",
    ),
    "unknown-message-after-auth": (
        lambda farm: raw_authenticated(
            farm, frame(msgspec.msgpack.encode({"type": "client.format_disk", "now": True}))
        ),
        "FrameValidationError",
    ),
    "unknown-field-after-auth": (
        lambda farm: raw_authenticated(
            farm, frame(msgspec.msgpack.encode({"type": "client.status", "sudo": True}))
        ),
        "FrameValidationError",
    ),
    "agent-sends-a-request": (
        lambda farm: raw_authenticated(farm, status_frame(), role="agent"),
        "ProtocolError",
    ),
    "impostor-agent": (
        lambda farm: raw_authenticated(farm, hello_of(STEADY), role="agent"),
        "ProtocolError",
    ),
    "silent-agent": (
        lambda farm: raw_authenticated(farm, b"", role="agent", eof=False),
        "ProtocolError",
    ),
    "hello-fails-its-own-checks": (
        lambda farm: raw_authenticated(
            farm,
            frame(
                msgspec.msgpack.encode(
                    {
                        "type": "agent.hello",
                        "name": "dup-counters",
                        "capacity": {"millicores": 1000, "counters": [["lic", 1], ["lic", 2]]},
                    }
                )
            ),
            role="agent",
        ),
        "FrameValidationError",
    ),
    "unknown-role": (
        lambda farm: raw_authenticated(farm, status_frame(), role="admin"),
        "ProtocolError",
    ),
}


@pytest.mark.parametrize("case", list(BAD_CONNECTIONS))
async def test_a_bad_connection_is_closed_and_logged(farm: Cluster, case: str) -> None:
    """A bad connection is closed and logged; connected and new clients and the agent are served."""
    bad, error = BAD_CONNECTIONS[case]
    async with farm.connect() as connection:
        await still_serving(farm, connection)
        address = await bad(farm)
        await still_serving(farm, connection)

    async def rejected() -> bool:
        return any(e.get("peer") == address for e in rejections(farm))

    await farm.wait_until(rejected, what=f"the rejection of {address} logged", limit=10)
    logged = [e for e in rejections(farm) if e.get("peer") == address]
    assert [e["error"] for e in logged] == [error], logged


async def test_a_wrong_token_is_refused(farm: Cluster) -> None:
    """A client with the wrong token is refused during the handshake, and it is logged."""
    before = Counter(e["reason"] for e in rejections(farm))
    with pytest.raises(AuthenticationError, match="wrong token"):
        async with open_connection(
            "127.0.0.1",
            farm.port,
            codec=WIRE_CODEC,
            token=b"not-the-token-at-all-0123456789",
            name="intruder",
            role="client",
        ):
            pass

    async def logged() -> bool:
        # The coordinator writes its log line after refusing us: wait for it, do not race it.
        return bool(Counter(e["reason"] for e in rejections(farm)) - before)

    await farm.wait_until(logged, what="the refusal logged", limit=10)
    after = Counter(e["reason"] for e in rejections(farm))
    assert after - before == Counter({"wrong token": 1})
    async with farm.connect() as connection:
        await still_serving(farm, connection)


async def test_a_wrong_token_stops_the_agent_cli(farm: Cluster, tmp_path: Path) -> None:
    """`taskfarm agent` with a wrong token exits with status 2 and says so; no node appears."""
    token_file = tmp_path / "wrong.token"
    token_file.write_text("a-wrong-token-of-enough-length-000\n")
    token_file.chmod(0o600)
    command = farm.command(
        "agent", "--connect", f"127.0.0.1:{farm.port}", "--token-file", str(token_file)
    )
    with anyio.fail_after(30):
        result = await anyio.run_process(
            [*command, "--name", "intruder", "--work-dir", str(tmp_path / "w")], check=False
        )
    assert result.returncode == 2
    assert b"refused this agent" in result.stderr, result.stderr
    assert "intruder" not in await farm.nodes()


# -- a storm of malformed frames ----------------------------------------------------------------


def junk_value(rng: random.Random, depth: int = 0) -> object:
    kinds: list[Callable[[], object]] = [
        lambda: rng.randrange(-(2**63), 2**63),
        lambda: rng.random(),
        lambda: rng.randbytes(rng.randrange(8)).hex(),
        lambda: rng.randbytes(rng.randrange(8)),
        lambda: None,
    ]
    if depth < 2:
        kinds.append(lambda: [junk_value(rng, depth + 1) for _ in range(rng.randrange(4))])
        kinds.append(lambda: {str(i): junk_value(rng, depth + 1) for i in range(rng.randrange(4))})
    return rng.choice(kinds)()


TAGS = [
    "client.submit",
    "client.status",
    "client.cancel",
    "client.logs",
    "agent.hello",
    "agent.report",
    "agent.heartbeat",
    "coordinator.welcome",
    "wire.client_hello",
    "nope",
]


def wrong_shape(rng: random.Random) -> bytes:
    """Valid msgpack that is no valid message: junk, real tags with bad or extra fields."""
    shapes: list[Callable[[], object]] = [
        lambda: junk_value(rng),
        lambda: {"type": rng.choice(TAGS)},
        lambda: {"type": rng.choice(TAGS), rng.randbytes(3).hex(): junk_value(rng)},
        lambda: {"type": "client.submit", "text": junk_value(rng), "format": "toml"},
        lambda: {"type": "client.logs", "job_id": "x", "task": rng.choice(["0", 1.5, [1]])},
        lambda: {"type": "agent.hello", "name": rng.choice(["", "a b", "x" * 300, 7])},
    ]
    return frame(msgspec.msgpack.encode(rng.choice(shapes)()))


def random_bytes(rng: random.Random, limit: int) -> bytes:
    return rng.randbytes(rng.randrange(1, 64))


def truncated_header(rng: random.Random, limit: int) -> bytes:
    return rng.randbytes(rng.randrange(1, 4))


def oversize_header(rng: random.Random, limit: int) -> bytes:
    return struct.pack(">I", rng.randrange(limit + 1, 2**32)) + rng.randbytes(rng.randrange(33))


def truncated_body(rng: random.Random, limit: int) -> bytes:
    size = rng.randrange(1, limit + 1)
    return struct.pack(">I", size) + rng.randbytes(rng.randrange(min(size, 512)))


def garbage_body(rng: random.Random, limit: int) -> bytes:
    return frame(rng.randbytes(rng.randrange(0, 256)))


def shaped(rng: random.Random, limit: int) -> bytes:
    return wrong_shape(rng)


MAKERS = [random_bytes, truncated_header, oversize_header, truncated_body, garbage_body, shaped]


@dataclass(frozen=True)
class Plan:
    role: str | None  # None: never authenticates
    kind: str
    payload: bytes


def starts_with_a_valid_message(payload: bytes) -> bool:
    """Whether random bytes happen to begin with a valid frame (then the plan is redrawn)."""
    if len(payload) < 4:
        return False
    (size,) = struct.unpack(">I", payload[:4])
    if size > FRAME_LIMIT or len(payload) < 4 + size:
        return False
    try:
        WIRE_CODEC.decode(payload[4 : 4 + size])
    except WireError:
        return False
    return True


def make_plans(rng: random.Random) -> list[Plan]:
    plans = []
    for _ in range(FUZZ_CONNECTIONS):
        role = rng.choice([None, None, "client", "agent"])
        make = rng.choice(MAKERS)
        limit = HANDSHAKE_LIMIT if role is None else FRAME_LIMIT
        payload = make(rng, limit)
        while role is not None and starts_with_a_valid_message(payload):
            payload = make(rng, limit)
        plans.append(Plan(role, make.__name__, payload))
    return plans


async def run_plan(farm: Cluster, plan: Plan) -> None:
    if plan.role is None:
        await raw_unauthenticated(farm, plan.payload)
    else:
        await raw_authenticated(farm, plan.payload, role=plan.role)


@pytest.mark.slow
async def test_thousands_of_malformed_frames_leave_the_coordinator_serving(farm: Cluster) -> None:
    """3,000 seeded malformed connections are each rejected and logged once; all else is served."""
    plans = make_plans(random.Random(FUZZ_SEED))
    assert {plan.kind for plan in plans} == {make.__name__ for make in MAKERS}
    rejected_before = len(rejections(farm))
    records_before = len(await farm.journal_events())

    async def worker(first: int) -> None:
        for index in range(first, len(plans), FUZZ_WORKERS):
            await run_plan(farm, plans[index])

    async with farm.connect() as connection:
        with anyio.fail_after(90):
            async with anyio.create_task_group() as tg:
                for first in range(FUZZ_WORKERS):
                    tg.start_soon(worker, first)
        await still_serving(farm, connection)

    async def all_logged() -> bool:
        return len(rejections(farm)) - rejected_before >= FUZZ_CONNECTIONS

    await farm.wait_until(all_logged, what="every rejection logged", limit=30)
    log = farm.coordinator_log()
    rejected = [e for e in log if e.get("event") == "wire_connection_rejected"][rejected_before:]
    assert len(rejected) == FUZZ_CONNECTIONS
    assert not [e for e in log if e.get("event") == "wire_handler_failed"]
    assert not [e for e in log if e.get("level") in ("error", "critical")]
    assert not [
        e for e in log if e.get("event") == "agent_disconnected" and e.get("node_id") == STEADY
    ]
    assert len(await farm.journal_events()) == records_before  # no rogue hello was admitted
    assert await farm.submit(_echo_job("after-storm")) == ["after-storm"]
    (done,) = (await farm.wait_finished("after-storm")).values()
    assert done.status == "completed"
    assert {t.node for t in done.tasks} == {STEADY}


def _echo_job(name: str) -> str:
    return f"""
[[jobs]]
name = "{name}"
command = ["{PYTHON}", "-c", "print('ok')"]
resources = {{ cores = 1, memory = "16MiB" }}
"""


# -- invalid specs through `taskfarm submit` ---------------------------------------------------

INVALID_SPECS: dict[str, tuple[str, str, list[str]]] = {
    # case: (file name, contents, what stderr must say besides the file name)
    "unknown-field": (
        "unknown.toml",
        '[[jobs]]\nname = "a"\ncommand = ["true"]\ncolour = "red"\n',
        ["jobs[0].colour", "unknown field"],
    ),
    "wrong-type": (
        "wrong-type.toml",
        '[[jobs]]\nname = "a"\ncommand = ["true"]\nretries = { max_attempts = "three" }\n',
        ["jobs[0].retries.max_attempts", "expected int"],
    ),
    "wrong-type-json": (
        "wrong-type.json",
        '{"jobs": [{"name": "a", "command": "true"}]}',
        ["jobs[0].command", "expected list"],
    ),
    "cycle": (
        "cycle.toml",
        '[[jobs]]\nname = "x"\ncommand = ["true"]\ndepends_on = ["y"]\n'
        '[[jobs]]\nname = "y"\ncommand = ["true"]\ndepends_on = ["x"]\n',
        ["depends_on", "cycle", "x -> y -> x"],
    ),
    "unknown-dependency": (
        "ghost.toml",
        '[[jobs]]\nname = "a"\ncommand = ["true"]\ndepends_on = ["ghost"]\n',
        ["jobs[0].depends_on[0]", "ghost"],
    ),
    "negative-cores": (
        "negative.toml",
        '[[jobs]]\nname = "a"\ncommand = ["true"]\nresources = { cores = -2 }\n',
        ["jobs[0].resources.cores", "negative"],
    ),
    "negative-memory": (
        "negative-memory.toml",
        '[[jobs]]\nname = "a"\ncommand = ["true"]\nresources = { memory = "-1GiB" }\n',
        ["jobs[0].resources.memory", "negative"],
    ),
    "fits-no-node": (
        "huge.toml",
        '[[jobs]]\nname = "a"\ncommand = ["true"]\nresources = { cores = 64 }\n',
        ["resources", "no node could ever fit", "cores"],
    ),
    "fits-no-node-gpu": (
        "gpu.toml",
        '[[jobs]]\nname = "a"\ncommand = ["true"]\nresources = { gpus = 1 }\n',
        ["resources", "no node could ever fit", "gpus"],
    ),
    "second-job-fits-no-node": (
        "half.toml",
        '[[jobs]]\nname = "fine"\ncommand = ["true"]\n'
        '[[jobs]]\nname = "greedy"\ncommand = ["true"]\nresources = { memory = "1TiB" }\n',
        ["greedy", "no node could ever fit", "memory"],
    ),
    "too-many-tasks": (
        "frames.toml",
        '[[jobs]]\nname = "a"\nframes = "1-100000000"\ncommand = ["true"]\n',
        ["jobs[0].frames", "at most"],
    ),
    "bad-toml": (
        "syntax.toml",
        '[[jobs]]\nname = "a\ncommand = ["true"]\n',
        ["line"],
    ),
    # Values that were accepted and then wedged a job, overflowed a date or built an argv no
    # exec could take: refused at submission now (the whole table: tests/actors/test_spec_bounds).
    "backoff-overflow": (
        "backoff.toml",
        '[[jobs]]\nname = "a"\ncommand = ["true"]\nretries = { backoff = "99999999999999d" }\n',
        ["jobs[0].retries.backoff", "99999999999999d is longer than the maximum of 30d"],
    ),
    "runtime-of-ten-years": (
        "runtime.toml",
        '[[jobs]]\nname = "a"\ncommand = ["true"]\ntimeouts = { max_runtime = "3650d" }\n',
        ["jobs[0].timeouts.max_runtime", "maximum of 366d"],
    ),
    "format-width": (
        "width.toml",
        '[[jobs]]\nname = "a"\nframes = "1-4"\ncommand = ["echo", "{frame:>20000000}"]\n',
        ["jobs[0].command[1]", "format width 20000000"],
    ),
    "frame-sequence-too-long": (
        "chunk.toml",
        f'[[jobs]]\nname = "a"\nframes = "1-5000"\nchunk = 5000\ncommand = ["echo", "{{frame}}", '
        f'"{"x" * 64}"]\n',
        ["jobs[0].command", "5,000 frames of task 0", "smaller chunk"],
    ),
    "cores-1e12": (
        "cores.toml",
        '[[jobs]]\nname = "a"\ncommand = ["true"]\nresources = { cores = 1e12 }\n',
        ["jobs[0].resources.cores", "maximum of 1,000,000 cores"],
    ),
    "nested-100000-deep": (
        "deep.toml",
        '[[jobs]]\nname = "a"\ncommand = ["true"]\nmetadata = { a = '
        + "[" * 100_000
        + "]" * 100_000
        + " }\n",
        ["nested more than 32 levels deep"],
    ),
    "nul-in-argv": (
        "nul.toml",
        '[[jobs]]\nname = "a"\ncommand = ["echo", "a\\u0000b"]\n',
        ["jobs[0].command[1]", "NUL"],
    ),
}


async def last_position(farm: Cluster) -> int:
    async with open_sqlite_journal(
        farm.journal, clock=SystemClock(), codec=ENGINE_CODEC, read_only=True
    ) as journal:
        return await journal.last_position()


@pytest.mark.parametrize("case", list(INVALID_SPECS))
async def test_an_invalid_spec_is_refused_and_journals_nothing(
    farm: Cluster, tmp_path: Path, case: str
) -> None:
    """`taskfarm submit SPEC` fails naming the file and the problem; the journal is unchanged."""
    name, text, expected = INVALID_SPECS[case]
    spec = tmp_path / name
    spec.write_text(text)
    before = await last_position(farm)
    with anyio.fail_after(30):
        result = await farm.cli("submit", str(spec))
    assert result.returncode != 0
    assert result.stdout == b""
    stderr = result.stderr.decode()
    for part in [str(spec), *expected]:
        assert part in stderr, stderr
    assert "Traceback" not in stderr
    assert len(stderr.splitlines()) == 1
    assert await last_position(farm) == before
    assert farm.coordinator is not None
    assert farm.coordinator.poll() is None


# -- decoded sizes ------------------------------------------------------------------------------


def peak_memory(pid: int) -> int:
    """Return a process's peak resident memory (VmHWM), in bytes."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmHWM")


MILLIONS: dict[str, object] = {
    # Millions of one-byte strings fit one 16 MiB frame, and each costs ~50 bytes decoded.
    "labels-of-an-agent-hello": {
        "type": "agent.hello",
        "name": "x",
        "capacity": {},
        "labels": ["a"] * 7_000_000,
    },
    "summaries-of-a-reply": {
        "type": "coordinator.jobs",
        "jobs": [{"job_id": "", "name": "", "status": "", "priority": "", "submitted_at": ""}]
        * 200_000,
    },
}


@pytest.mark.parametrize("case", list(MILLIONS))
async def test_a_frame_of_millions_of_elements_is_refused_without_building_them(
    cluster: Cluster, case: str
) -> None:
    """A client frame that would decode to millions of objects is refused by its bounds (or its
    tag) while decoding: the coordinator's peak memory grows by about the frame, not 10x it."""
    cluster.start_coordinator()
    assert cluster.coordinator is not None
    pid = cluster.coordinator.pid
    payload = msgspec.msgpack.encode(MILLIONS[case])
    assert len(payload) < FRAME_LIMIT
    before = peak_memory(pid)
    address = await raw_authenticated(cluster, frame(payload))

    async def rejected() -> bool:
        return any(e.get("peer") == address for e in rejections(cluster))

    await cluster.wait_until(rejected, what="the rejection logged", limit=20)
    (entry,) = [e for e in rejections(cluster) if e.get("peer") == address]
    assert entry["error"] == "FrameValidationError"
    grown = peak_memory(pid) - before
    # Reading the frame costs its size (and a copy); decoding it whole cost 150 MB and more.
    assert grown < 3 * len(payload), f"peak memory grew by {grown / 2**20:.0f} MiB"
    async with cluster.connect() as connection:
        assert isinstance(await request(connection, StatusRequest()), JobsReply)
