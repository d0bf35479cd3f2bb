"""``taskfarm journal check|salvage``, empty files, read-only folders, a garbage WAL and closed
pipes, each run as a real ``taskfarm`` process: exit status, one line on stderr, no
traceback."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import sqlite3
import subprocess
import sys
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import anyio
import pytest

from persistence import Event, EventCodec, StreamAppend, open_sqlite_journal
from runtime import VirtualClock

START = datetime(2026, 6, 1, tzinfo=UTC)
TASKFARM = [sys.executable, "-m", "runtime.cli"]
STREAMS = 3000  # enough output to fill a pipe many times over


class Logged(Event, frozen=True, kw_only=True, tag="clitools.logged"):
    text: str


async def write_journal(path: Path, *, streams: int = 40) -> None:
    """One event per stream; stream ``log:20`` holds the text MARKER-0123 at position 21."""
    codec = EventCodec()
    codec.register(Logged)
    async with open_sqlite_journal(
        path, clock=VirtualClock(START), codec=codec, synchronous="OFF"
    ) as journal:
        await journal.append_many(
            [
                StreamAppend(
                    stream_id=f"log:{n}",
                    events=[Logged(text="MARKER-0123" if n == 20 else f"line {n}")],
                )
                for n in range(streams)
            ]
        )


def run(*args: str | Path, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*TASKFARM, *map(str, args)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        cwd=cwd,
    )


def one_line(stderr: str) -> str:
    """Assert stderr is exactly one line without a traceback; return it."""
    assert "Traceback" not in stderr, stderr
    lines = stderr.splitlines()
    assert len(lines) == 1, stderr
    return lines[0]


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def listing(folder: Path) -> dict[str, str]:
    return {path.name: digest(path) for path in sorted(folder.iterdir()) if path.is_file()}


def damage(path: Path) -> None:
    """Flip one bit inside the payload of position 21 (stream log:20)."""
    data = bytearray(path.read_bytes())
    at = data.index(b"MARKER-0123")
    data[at + 3] ^= 0x01
    path.write_bytes(bytes(data))


@pytest.fixture
def journal_file(tmp_path: Path) -> Path:
    path = tmp_path / "journal.db"
    anyio.run(write_journal, path)
    return path


@pytest.fixture
def big_journal(tmp_path: Path) -> Path:
    path = tmp_path / "big.db"
    anyio.run(lambda: write_journal(path, streams=STREAMS))
    return path


@contextlib.contextmanager
def read_only_folder(folder: Path) -> Iterator[None]:
    folder.chmod(0o555)
    try:
        yield
    finally:
        folder.chmod(0o755)


# -- journal check ----------------------------------------------------------------------------


def test_check_a_sound_journal(journal_file: Path) -> None:
    """check exits 0 and says ok for a sound journal; nothing goes to stderr."""
    result = run("journal", "check", journal_file)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[0] == f"journal {journal_file}: ok"
    assert "40 checked" in result.stdout
    assert result.stderr == ""


def test_check_a_damaged_journal(journal_file: Path) -> None:
    """check exits 1 for a damaged journal, names the first bad position and stream on one
    stderr line with the salvage command, and reports the details on stdout."""
    damage(journal_file)
    result = run("journal", "check", journal_file)
    assert result.returncode == 1
    line = one_line(result.stderr)
    assert f"journal {journal_file} is damaged" in line
    assert "position 21 (stream 'log:20')" in line
    assert f"taskfarm journal salvage {journal_file} --out NEW" in line
    assert "first bad position 21" in result.stdout
    as_json = run("journal", "check", journal_file, "--json")
    assert as_json.returncode == 1
    report = json.loads(as_json.stdout)
    assert report["ok"] is False
    assert report["first_bad"]["position"] == 21
    assert report["last_good_position"] == 20


def test_check_refuses_what_is_not_a_journal(tmp_path: Path) -> None:
    """A missing file, an empty file or a file that is not a journal exits 2 with one line."""
    empty = tmp_path / "empty.db"
    empty.touch()
    text = tmp_path / "notes.txt"
    text.write_text("not a database\n" * 20)
    for path, problem in (
        (tmp_path / "missing.db", "DB: no such journal file"),
        (empty, "an empty file, not a journal"),
        (text, "not an SQLite database"),
    ):
        result = run("journal", "check", path)
        assert result.returncode == 2, path
        assert problem in one_line(result.stderr)
        assert result.stdout == ""


# -- journal salvage --------------------------------------------------------------------------


def test_salvage_a_damaged_journal(journal_file: Path) -> None:
    """salvage exits 0, writes the events before the damage into a new journal that checks
    sound, and leaves the source as it was."""
    damage(journal_file)
    before = digest(journal_file)
    out = journal_file.with_name("salvaged.db")
    result = run("journal", "salvage", journal_file, "--out", out)
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    assert f"salvaged 20 events (positions 1-20) and 0 snapshots from {journal_file}" in (
        result.stdout
    )
    assert "stopped at position 21 (stream 'log:20')" in result.stdout
    assert digest(journal_file) == before
    assert run("journal", "check", out).returncode == 0
    again = run("journal", "salvage", journal_file, "--out", out)
    assert again.returncode == 2
    assert "already exists" in one_line(again.stderr)


def test_salvage_needs_out(journal_file: Path) -> None:
    """salvage without --out is a usage error (status 2) that names the flag."""
    result = run("journal", "salvage", journal_file)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert "--out" in result.stderr.splitlines()[-1]


# -- empty files and read-only tools ----------------------------------------------------------


@pytest.mark.parametrize(
    "command", [["journal", "inspect"], ["replay"], ["journal", "check"]], ids=" ".join
)
def test_an_empty_file_is_not_a_journal(tmp_path: Path, command: list[str]) -> None:
    """inspect, replay and check call a zero-byte file an empty file, not a journal (status
    2, one line), and leave it empty."""
    empty = tmp_path / "empty.db"
    empty.touch()
    result = run(*command, empty)
    assert result.returncode == 2
    assert f"journal file {empty}: an empty file, not a journal" in one_line(result.stderr)
    assert listing(tmp_path) == {"empty.db": digest(empty)}
    assert empty.stat().st_size == 0


@pytest.mark.parametrize(
    ("command", "options"),
    [
        (["journal", "inspect"], []),
        (["replay"], []),
        (["replay"], ["--until", "5", "--json"]),
        (["journal", "check"], []),
    ],
    ids=["inspect", "replay", "replay --until", "check"],
)
def test_tools_read_a_journal_in_a_read_only_folder(
    journal_file: Path, command: list[str], options: list[str]
) -> None:
    """inspect, replay and check work in a folder nobody may write to and create nothing
    there (the permission proves nothing when the tests run as root, the listing does)."""
    folder = journal_file.parent
    before = listing(folder)
    with read_only_folder(folder):
        result = run(*command, journal_file, *options)
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    assert listing(folder) == before


def test_a_garbage_wal_is_reported_on_one_line(journal_file: Path) -> None:
    """A WAL SQLite will ignore is reported by a warning line; the journal reads whole."""
    wal = journal_file.with_name(journal_file.name + "-wal")
    wal.write_bytes(os.urandom(4096))
    result = run("journal", "inspect", journal_file, "--json")
    assert result.returncode == 0
    line = one_line(result.stderr)
    assert "journal_wal_discarded" in line
    assert str(wal) in line
    assert json.loads(result.stdout)["event_count"] == 40


# -- closed pipes -------------------------------------------------------------------------------


@pytest.mark.parametrize("command", [["replay"], ["journal", "inspect"]], ids=" ".join)
def test_output_into_a_closed_pipe_ends_quietly(big_journal: Path, command: list[str]) -> None:
    """When the reader of its output goes away, the command stops with status 141 (as SIGPIPE
    ends cat or grep) and prints nothing on stderr."""
    process = subprocess.Popen(
        [*TASKFARM, *command, str(big_journal)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    assert process.stdout is not None
    assert process.stderr is not None
    assert process.stdout.readline()
    process.stdout.close()  # like `head -n 1` exiting
    stderr = process.stderr.read()
    process.stderr.close()
    assert process.wait(timeout=120) == 141
    assert stderr == b""


def test_replay_into_head(big_journal: Path) -> None:
    """`taskfarm replay DB | head -n 2` in a shell prints two lines, and taskfarm's status in
    the pipeline is 141 with nothing on stderr."""
    command = " ".join([*TASKFARM, "replay", str(big_journal)])
    result = subprocess.run(
        ["bash", "-c", f'{command} | head -n 2; echo "status=${{PIPESTATUS[0]}}" >&2'],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert len(result.stdout.splitlines()) == 2
    assert result.stdout.startswith(f"journal {big_journal}: replayed {STREAMS:,} events")
    assert result.stderr == "status=141\n"


def test_a_schema_that_needs_migrating_is_one_line(tmp_path: Path) -> None:
    """A journal of an older schema is refused by the read-only tools with one line saying
    how to migrate it."""
    path = tmp_path / "old.db"
    with contextlib.closing(sqlite3.connect(path)) as raw, raw:
        raw.execute("CREATE TABLE events (position INTEGER PRIMARY KEY)")
        raw.execute("PRAGMA application_id = 1952868913")
        raw.execute("PRAGMA user_version = 1")
    for command in (["journal", "inspect"], ["replay"], ["journal", "check"]):
        result = run(*command, path)
        assert result.returncode == 2
        assert "needs migrating" in one_line(result.stderr)
