"""``taskfarm serve`` and an existing empty journal file: refused (and left empty) unless
``--init`` says to initialise it."""

from __future__ import annotations

import subprocess
from typing import TYPE_CHECKING

import anyio

from persistence import check_sqlite_journal

if TYPE_CHECKING:
    from conftest import Cluster


def test_serve_refuses_an_empty_journal_file(cluster: Cluster) -> None:
    """Without --init, serve exits with an error that names the file and --init, and the
    file stays empty with nothing created beside it."""
    cluster.journal.touch()
    result = subprocess.run(
        cluster.command(
            "serve",
            "--journal",
            str(cluster.journal),
            "--listen",
            "127.0.0.1:0",
            "--token-file",
            str(cluster.token_file),
            "--work-dir",
            str(cluster.root / "work"),
        ),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env=cluster.env("coordinator"),
    )
    assert result.returncode != 0
    assert result.stdout == ""
    # One line says it all (serve still wraps its refusals in a traceback: issue 7, section 3).
    [error] = [line for line in result.stderr.splitlines() if "an empty file" in line]
    assert f"journal file {cluster.journal}: an empty file, not a journal" in error
    assert "taskfarm serve --init" in error
    assert cluster.journal.stat().st_size == 0
    beside = sorted(p.name for p in cluster.root.iterdir() if p.name.startswith("taskfarm.db"))
    assert beside == ["taskfarm.db"]


def test_serve_init_initialises_an_empty_journal_file(cluster: Cluster) -> None:
    """With --init, serve makes the empty file a journal and serves from it."""
    cluster.journal.touch()
    cluster.start_coordinator("--init")

    async def submit_and_check() -> None:
        job_ids = await cluster.submit('[[jobs]]\nname = "init"\ncommand = ["true"]\n')
        assert len(job_ids) == 1

    anyio.run(submit_and_check)
    cluster.kill_coordinator()
    check = anyio.run(check_sqlite_journal, cluster.journal)
    assert check.ok
    assert check.good_events > 0
