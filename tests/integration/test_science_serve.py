"""``taskfarm serve --policy science --policy-config cluster.toml`` and ``taskfarm science ...``
over TCP against that real coordinator process: reservations, maintenance windows, pins, the
scenario ranking and node reliability; the roles each command needs; one-line errors; and the
policy's journaled decisions surviving a SIGKILLed coordinator."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any

import anyio
import pytest

from actors import ENGINE_CODEC
from domains.scientific import SCIENCE_CODEC, MaintenanceScheduled, ReservationMade
from persistence import EventCodec, open_sqlite_journal
from runtime import SystemClock

if TYPE_CHECKING:
    from conftest import Cluster

pytestmark = pytest.mark.slow

LIMIT = 60.0
CLUSTER_TOML = """
cycle_interval = "1m"
[projects.climate]
weight = 2
[[maintenance]]
name = "cooling"
start = 2040-01-10T08:00:00Z
end = 2040-01-10T12:00:00Z
severity = "minor"
"""


async def run(cluster: Cluster, *args: str, client: bool = True) -> tuple[int, str, str]:
    """Run a taskfarm command (pointed at the coordinator when ``client``); return its exit
    status, stdout and stderr."""
    with anyio.fail_after(LIMIT):
        if client:
            result = await cluster.cli(*args)
        else:
            result = await anyio.run_process(
                cluster.command(*args), check=False, env=cluster.env("cli")
            )
    return result.returncode, result.stdout.decode(), result.stderr.decode()


async def science(cluster: Cluster, *args: str) -> Any:
    """Run ``taskfarm science ARGS --json`` that must succeed; return its JSON reply."""
    code, out, err = await run(cluster, "science", *args, "--json")
    assert code == 0, err
    return json.loads(out)


def later(days: float) -> str:
    """An ISO time ``days`` from now (the coordinator runs on the system clock)."""
    return (datetime.now(UTC) + timedelta(days=days)).replace(microsecond=0).isoformat()


async def test_science_commands_run_over_tcp_with_their_roles_and_survive_a_restart(
    cluster: Cluster,
) -> None:
    """serve --policy science --policy-config cluster.toml loads the file's maintenance window;
    ``taskfarm science reserve|maintenance|pin|unpin|reservations|windows|nodes|scenarios``
    run over TCP; read commands need role read, changing ones role operator; the decisions are
    journaled in policy:science and a SIGKILLed coordinator comes back with them."""
    config = cluster.root / "cluster.toml"
    config.write_text(CLUSTER_TOML)
    policy = ("--policy", "science", "--policy-config", str(config))
    cluster.start_coordinator(*policy)
    cluster.start_agent("a1")
    cluster.start_agent("a2")
    await cluster.wait_online("a1", "a2")

    start = later(30)
    made = await science(
        cluster, "reserve", "--for", "coupled-7", "--start", start, "--duration", "2d",
        "--nodes", "1", "--name", "coupled",
    )  # fmt: skip
    assert made["reservation"] == "coupled"
    assert made["for"] == "coupled-7"
    assert len(made["nodes"]) == 1
    assert made["nodes"][0] in ("a1", "a2")
    window = await science(
        cluster, "maintenance", "--name", "firmware", "--severity", "major", "--nodes", "a2",
        "--start", later(40), "--end", later(40.25), "--reason", "BIOS update",
    )  # fmt: skip
    assert (window["name"], window["nodes"], window["status"]) == ("firmware", ["a2"], "planned")
    # A sweep member, so that pin has a simulation to pin and scenarios a sweep to rank.
    member = (
        '[[jobs]]\nname = "mixing-1"\ncommand = ["true"]\n'
        'resources = { cores = "100m", memory = "16MiB" }\n'
        'metadata = { owner = "ana", project = "climate", sweep = "mixing" }\n'
    )
    assert await cluster.submit(member) == ["mixing-1"]
    await cluster.wait_finished("mixing-1")
    assert await science(cluster, "pin", "mixing-1") == {"job": "mixing-1", "pinned": True}
    (sweep,) = await science(cluster, "scenarios")
    assert sweep["scenario"] == "mixing"
    assert [(m["member"], m["status"]) for m in sweep["members"]] == [("mixing-1", "pinned")]

    # A reader sees everything and changes nothing.
    reader = cluster.root / "reader.cred"
    code, _out, err = await run(
        cluster, "token", "issue", "--client", "reader", "--role", "read", "--out", str(reader)
    )
    assert code == 0, err
    as_reader = ("--credential-file", str(reader))
    for verb in ("reservations", "windows", "nodes", "scenarios"):
        assert (await run(cluster, "science", verb, *as_reader))[0] == 0, verb
    code, _out, err = await run(cluster, "science", "unreserve", "coupled", *as_reader)
    assert code == 2
    assert err.splitlines() == [
        "taskfarm: error: access denied: 'reader' (role read) may not run the policy command "
        "'unreserve': that needs the role operator or above"
    ]

    async def state() -> tuple[Any, Any, Any]:
        return (
            await science(cluster, "reservations"),
            await science(cluster, "windows"),
            await science(cluster, "scenarios"),
        )

    reservations, windows, scenarios = await state()
    assert [(r["name"], r["status"], r["nodes"]) for r in reservations] == [
        ("coupled", "planned", made["nodes"])
    ]
    assert [(w["name"], w["severity"], w["status"]) for w in windows] == [
        ("firmware", "major", "planned"),
        ("cooling", "minor", "planned"),  # from cluster.toml (in 2040)
    ]
    nodes = await science(cluster, "nodes")
    assert {n["node"]: n["reserved_for"] for n in nodes} == {
        made["nodes"][0]: "coupled-7",
        ({"a1", "a2"} - set(made["nodes"])).pop(): None,
    }
    assert all(n["reliability"] == 1 for n in nodes)

    # The human-readable forms.
    code, out, err = await run(cluster, "science", "reservations")
    assert code == 0, err
    assert out.splitlines()[0].split() == [
        "name", "for", "start", "end", "count", "requires", "by", "status", "nodes", "short"
    ]  # fmt: skip
    assert out.splitlines()[1].split()[:2] == ["coupled", "coupled-7"]
    code, out, err = await run(cluster, "science", "scenarios")
    assert code == 0, err
    assert out.splitlines()[0] == "scenario mixing: 0 rung(s) decided"

    cluster.kill_coordinator()
    cluster.start_coordinator(*policy)
    await cluster.wait_until(
        lambda: _same(cluster, state, (reservations, windows, scenarios)),
        what="the restarted coordinator replayed policy:science",
    )
    code, out, err = await run(
        cluster, "replay", str(cluster.journal), "--stream", "policy:science", "--json",
        client=False,
    )  # fmt: skip
    assert code == 0, err
    stream = json.loads(out)["streams"]["policy:science"]
    assert stream["events_by_tag"] == {
        "science.reservation_made": 1,
        "science.maintenance_scheduled": 1,
        "science.member_pinned": 1,
    }
    # Withdrawing is journaled too.
    assert await science(cluster, "unreserve", "coupled", "--reason", "moved") == {
        "cancelled": "coupled"
    }
    assert await science(cluster, "cancel-maintenance", "firmware") == {"cancelled": "firmware"}
    assert await science(cluster, "unpin", "mixing-1") == {"job": "mixing-1", "pinned": False}
    assert await science(cluster, "reservations") == []


async def _same(cluster: Cluster, state: Any, expected: tuple[Any, Any, Any]) -> bool:
    return bool(await state() == expected)


async def test_a_reservation_says_which_client_made_it_and_a_restart_keeps_it(
    cluster: Cluster,
) -> None:
    """A reservation and a window made over TCP with alice's operator credential say ``by
    alice`` in ``reservations`` and ``windows`` (table and --json) and in the journal's
    policy:science events, and still do after the coordinator is SIGKILLed and restarted;
    one made with the join token names no one."""
    config = cluster.root / "cluster.toml"
    config.write_text("")
    policy = ("--policy", "science", "--policy-config", str(config))
    cluster.start_coordinator(*policy)
    cluster.start_agent("a1")
    cluster.start_agent("a2")
    await cluster.wait_online("a1", "a2")
    alice = cluster.root / "alice.cred"
    code, _out, err = await run(
        cluster, "token", "issue", "--client", "alice", "--role", "operator", "--out", str(alice)
    )
    assert code == 0, err
    as_alice = ("--credential-file", str(alice))

    made = await science(
        cluster, "reserve", "--for", "coupled-7", "--start", later(30), "--duration", "1d",
        "--nodes", "1", "--name", "coupled", *as_alice,
    )  # fmt: skip
    assert made["by"] == "alice"
    await science(
        cluster, "maintenance", "--name", "firmware", "--nodes", "a1", "--start", later(40),
        "--end", later(40.25), "--reason", "BIOS", *as_alice,
    )  # fmt: skip
    await science(
        cluster, "reserve", "--for", "spinup", "--start", later(35), "--duration", "1h",
        "--nodes", "1", "--name", "by-token",
    )  # fmt: skip

    async def who() -> tuple[list[tuple[str, Any]], list[tuple[str, Any]]]:
        reservations = await science(cluster, "reservations")
        windows = await science(cluster, "windows")
        return (
            [(r["name"], r["by"]) for r in reservations],
            [(w["name"], w["by"]) for w in windows],
        )

    expected = ([("coupled", "alice"), ("by-token", None)], [("firmware", "alice")])
    assert await who() == expected
    code, out, err = await run(cluster, "science", "reservations")
    assert code == 0, err
    header, *rows = (line.split() for line in out.splitlines())
    assert [row[header.index("by")] for row in rows] == ["alice", "-"]
    code, out, err = await run(cluster, "science", "windows")
    assert code == 0, err
    header, row = (line.split() for line in out.splitlines())
    assert row[header.index("by")] == "alice"

    cluster.kill_coordinator()
    journaled = [
        (e.reservation.name, e.reservation.by)
        if isinstance(e, ReservationMade)
        else (e.window.name, e.window.by)
        for e in await _policy_events(cluster)
        if isinstance(e, ReservationMade | MaintenanceScheduled)
    ]
    assert journaled == [("coupled", "alice"), ("firmware", "alice"), ("by-token", "")]
    cluster.start_coordinator(*policy)

    async def replayed() -> bool:
        return await who() == expected

    await cluster.wait_until(replayed, what="the restarted coordinator names alice")


async def _policy_events(cluster: Cluster) -> list[Any]:
    """Read the science policy's stream from the journal file (read-only)."""
    codec = EventCodec()
    codec.update(ENGINE_CODEC)
    codec.update(SCIENCE_CODEC)
    async with open_sqlite_journal(
        cluster.journal, clock=SystemClock(), codec=codec, read_only=True
    ) as journal:
        return [record.event for record in await journal.read_stream("policy:science")]


@pytest.mark.parametrize(
    ("args", "line"),
    [
        (
            ("reserve", "--for", "s", "--start", "yesterday", "--duration", "1d", "--nodes", "1"),
            "taskfarm: error: --start: 'yesterday' is not a time (expected ISO 8601 with an "
            "offset, e.g. 2027-03-01T08:00Z)",
        ),
        (
            ("reserve", "--for", "s", "--start", "2020-01-01T00:00Z", "--duration", "1d",
             "--nodes", "1"),
            "taskfarm: error: --start: 2020-01-01T00:00:00+00:00 is in the past",
        ),
        (
            ("reserve", "--for", "s", "--start", "2040-01-01T00:00Z", "--duration", "soon",
             "--nodes", "1"),
            "taskfarm: error: --duration: ",
        ),
        (
            ("reserve", "--for", "s", "--start", "2040-01-01T00:00Z", "--duration", "1d",
             "--nodes", "5"),
            "taskfarm: error: --nodes: only 1 node(s) can be held for s then",
        ),
        (
            ("reserve", "--for", "s", "--start", "2040-01-01T00:00Z", "--duration", "1d",
             "--requires", "gpu"),
            "taskfarm: error: --requires: no node has the label 'gpu'",
        ),
        (
            ("maintenance", "--name", "m", "--start", "2040-01-02T00:00Z", "--end",
             "2040-01-01T00:00Z"),
            "taskfarm: error: --end: must be after --start",
        ),
        (("pin", "nobody"), "taskfarm: error: job: no simulation 'nobody'"),
        (
            ("unreserve", "nothing"),
            "taskfarm: error: name: no reservation 'nothing' (known: none)",
        ),
    ],
    ids=["time", "past", "duration", "too-many", "label", "window", "pin", "unreserve"],
)  # fmt: skip
async def test_a_bad_science_argument_is_one_clear_line(
    module_cluster: Cluster, args: tuple[str, ...], line: str
) -> None:
    """A science command the coordinator's policy refuses exits 2 with one line naming the
    flag and what is wrong, and journals nothing."""
    cluster = module_cluster
    if cluster.coordinator is None:
        config = cluster.root / "cluster.toml"
        config.write_text("")
        cluster.start_coordinator("--policy", "science", "--policy-config", str(config))
        cluster.start_agent("solo")
        await cluster.wait_online("solo")
    code, out, err = await run(cluster, "science", *args)
    assert (code, out) == (2, ""), err
    (only,) = err.splitlines()
    assert only.startswith(line), only
    assert await science(cluster, "reservations") == []


async def test_serve_refuses_a_bad_cluster_toml_naming_file_and_field(cluster: Cluster) -> None:
    """serve --policy science with a cluster.toml holding a wrong field exits 2 naming the file
    and the field, before it opens a journal."""
    config = cluster.root / "cluster.toml"
    config.write_text('[protection]\nminimum_runtime = "an hour"\n')
    code, _out, err = await run(
        cluster, "serve", "--journal", str(cluster.root / "x.db"), "--listen", "127.0.0.1:0",
        "--token-file", str(cluster.token_file), "--policy", "science", "--policy-config",
        str(config), client=False,
    )  # fmt: skip
    assert code == 2
    (only,) = err.splitlines()
    assert str(config) in only
    assert "protection.minimum_runtime" in only
    assert not (cluster.root / "x.db").exists()
