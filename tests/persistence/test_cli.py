"""``taskfarm journal inspect`` and ``taskfarm replay``, in-process and as a real subprocess."""

from __future__ import annotations

import json
import subprocess
import sys
import types
from collections.abc import Iterator
from datetime import UTC, datetime
from importlib.metadata import EntryPoint
from pathlib import Path
from typing import Any

import anyio
import msgspec
import pytest
import structlog

from persistence import SCHEMA_VERSION, Event, EventCodec, open_sqlite_journal
from persistence import _cli as journal_cli
from runtime import VirtualClock
from runtime.cli import main

START = datetime(2026, 5, 1, 8, tzinfo=UTC)
PLUGIN_MODULE = "taskfarm_test_cli_plugins"


class Deposited(Event, frozen=True, kw_only=True, tag="clitest.deposited"):
    amount: int


class Noted(Event, frozen=True, kw_only=True, tag="clitest.noted"):
    text: str


class Secret(Event, frozen=True, kw_only=True, tag="clitest.secret"):
    code: int


class Balance(msgspec.Struct, frozen=True):
    total: int = 0


class AccountAggregate:
    state_type = Balance
    schema_version = 1

    def initial_state(self, stream_id: str) -> Balance:
        return Balance()

    def apply(self, state: Balance, event: Event) -> Balance:
        if isinstance(event, Deposited):
            return Balance(total=state.total + event.amount)
        return state


async def write_journal(path: Path) -> None:
    """Positions 1-3 at START, 4-6 one hour later; position 5 has a tag the CLI cannot know."""
    codec = EventCodec()
    for cls in (Deposited, Noted, Secret):
        codec.register(cls)
    clock = VirtualClock(START)
    async with open_sqlite_journal(path, clock=clock, codec=codec) as journal:
        await journal.append("account:alice", [Deposited(amount=10), Deposited(amount=5)])
        await journal.append("notes:1", [Noted(text="hello")])
        await clock.advance(3600)
        await journal.append("account:alice", [Deposited(amount=100)])
        await journal.append("account:bob", [Secret(code=7), Deposited(amount=1)])
        await journal.save_snapshot("account:alice", version=2, state=Balance(total=15))


@pytest.fixture(autouse=True)
def restore_logging() -> Iterator[None]:
    """main() points structlog at the captured stderr; undo that for the tests that follow."""
    yield
    structlog.reset_defaults()


@pytest.fixture
def journal_file(tmp_path: Path) -> Path:
    path = tmp_path / "journal.db"
    anyio.run(write_journal, path)
    return path


@pytest.fixture
def plugins(monkeypatch: pytest.MonkeyPatch) -> None:
    """Install entry points for the events (minus Secret) and the account aggregate."""
    module = types.ModuleType(PLUGIN_MODULE)
    codec = EventCodec()
    codec.register(Deposited)
    codec.register(Noted)
    module.CODEC = codec  # type: ignore[attr-defined]
    module.AccountAggregate = AccountAggregate  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, PLUGIN_MODULE, module)
    groups = {
        journal_cli.EVENTS_GROUP: [
            EntryPoint("clitest", f"{PLUGIN_MODULE}:CODEC", journal_cli.EVENTS_GROUP),
            EntryPoint("broken", f"{PLUGIN_MODULE}:MISSING", journal_cli.EVENTS_GROUP),
        ],
        journal_cli.AGGREGATES_GROUP: [
            EntryPoint("account", f"{PLUGIN_MODULE}:AccountAggregate", journal_cli.AGGREGATES_GROUP)
        ],
    }
    monkeypatch.setattr(journal_cli, "_entry_points", lambda group: groups.get(group, []))


def run_json(capsys: pytest.CaptureFixture[str], *argv: str) -> Any:
    assert main([*argv, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def test_inspect_shows_the_journal(journal_file: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """journal inspect prints size, schema, counts, time range and every stream."""
    assert main(["journal", "inspect", str(journal_file)]) == 0
    text = capsys.readouterr().out
    assert f"schema version  {SCHEMA_VERSION}" in text
    assert "events          6 (last position 6)" in text
    assert "snapshots       1" in text
    assert "2026-05-01T08:00:00+00:00 .. 2026-05-01T09:00:00+00:00" in text
    assert "account:alice" in text
    assert "notes:1" in text
    data = run_json(capsys, "journal", "inspect", str(journal_file))
    assert data["event_count"] == 6
    assert data["size_bytes"] > 0
    assert [s["stream_id"] for s in data["streams"]] == ["account:alice", "account:bob", "notes:1"]
    assert data["streams"][0] == {
        "stream_id": "account:alice",
        "version": 3,
        "first_position": 1,
        "last_position": 4,
        "event_count": 3,
    }


@pytest.mark.usefixtures("plugins")
def test_replay_everything(journal_file: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """replay folds streams with an aggregate, summarises the others and shows unknown
    events raw."""
    data = run_json(capsys, "replay", str(journal_file))
    assert data["position"] == 6
    assert data["streams"]["account:alice"]["state"] == {"total": 115}
    assert data["streams"]["account:bob"] == {
        "version": 2,
        "aggregate": "account",
        "state": {"total": 1},
        "skipped_undecodable": 1,
        "error": None,
    }
    assert data["streams"]["notes:1"]["events_by_tag"] == {"clitest.noted": 1}
    assert data["streams"]["notes:1"]["aggregate"] is None
    [raw] = data["undecoded"]
    assert (raw["position"], raw["tag"]) == (5, "clitest.secret")
    assert raw["payload"] == {"type": "clitest.secret", "code": 7}
    assert "unknown tag" in raw["reason"]
    assert any("broken" in note for note in data["notes"])

    assert main(["replay", str(journal_file)]) == 0
    captured = capsys.readouterr()
    assert 'state: {"total":115}' in captured.out
    assert "1 events could not be decoded; shown raw" in captured.out
    assert '{"type":"clitest.secret","code":7}' in captured.out
    assert "events plugin 'broken'" in captured.err


@pytest.mark.usefixtures("plugins")
def test_replay_until_position_and_time(
    journal_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """--until takes a position or a tz-aware ISO time; --stream limits to one stream."""
    at_two = run_json(capsys, "replay", str(journal_file), "--until", "2")
    assert at_two["streams"] == {
        "account:alice": {
            "version": 2,
            "aggregate": "account",
            "state": {"total": 15},
            "skipped_undecodable": 0,
            "error": None,
        }
    }
    by_time = run_json(capsys, "replay", str(journal_file), "--until", "2026-05-01T08:30:00Z")
    assert by_time["position"] == 3
    assert set(by_time["streams"]) == {"account:alice", "notes:1"}
    one = run_json(
        capsys, "replay", str(journal_file), "--stream", "account:alice", "--until", "10"
    )
    assert list(one["streams"]) == ["account:alice"]
    assert one["streams"]["account:alice"]["state"] == {"total": 115}


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--until", "yesterday"], "--until: 'yesterday' is neither a position"),
        (["--until", "2026-05-01T08:30:00"], "--until: '2026-05-01T08:30:00' has no timezone"),
        (["--stream", "account:nobody"], "--stream: no stream 'account:nobody'"),
    ],
)
def test_replay_bad_arguments(
    journal_file: Path, capsys: pytest.CaptureFixture[str], argv: list[str], message: str
) -> None:
    """Bad replay arguments give exit status 2 and an error naming the argument."""
    assert main(["replay", str(journal_file), *argv]) == 2
    assert message in capsys.readouterr().err


def test_missing_or_bad_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A missing DB names the argument; a non-journal file names the file and the problem."""
    assert main(["replay", str(tmp_path / "nope.db")]) == 2
    assert "DB: no such journal file" in capsys.readouterr().err
    bad = tmp_path / "bad.db"
    bad.write_text("not a database\n" * 20)
    assert main(["journal", "inspect", str(bad)]) == 2
    assert f"journal file {bad}: not an SQLite database" in capsys.readouterr().err


def test_cli_as_a_real_process(journal_file: Path) -> None:
    """The installed CLI runs as its own process: inspect prints JSON, replay exits cleanly,
    and a bad --until exits with status 2."""
    command = [sys.executable, "-m", "runtime.cli"]
    inspect = subprocess.run(
        [*command, "journal", "inspect", str(journal_file), "--json"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert inspect.returncode == 0, inspect.stderr
    assert json.loads(inspect.stdout)["last_position"] == 6
    replay = subprocess.run(
        [*command, "replay", str(journal_file), "--until", "3", "--json"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert replay.returncode == 0, replay.stderr
    assert json.loads(replay.stdout)["events_replayed"] == 3
    bad = subprocess.run(
        [*command, "replay", str(journal_file), "--until", "soon"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert bad.returncode == 2
    assert "--until" in bad.stderr
