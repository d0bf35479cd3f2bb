"""The power commands' parsing and running (``actors/cluster/_power.py``): a command line is
split like a shell's and checked for placeholders; a command's failure is described by its
exit status and the last line of its standard error, a hung one is killed at its limit."""

from __future__ import annotations

import shlex
import sys
from pathlib import Path

import pytest
import structlog

from actors.cluster import WAKE_PLACEHOLDERS, parse_command
from actors.cluster._power import run_command, sleep_node
from runtime import ConfigurationError


@pytest.mark.parametrize(
    ("text", "argv"),
    [
        ("systemctl suspend", ("systemctl", "suspend")),
        ("wakeonlan {mac}", ("wakeonlan", "{mac}")),
        ("ipmitool -H '{address}' power on", ("ipmitool", "-H", "{address}", "power", "on")),
        ("echo {{literal}} {node}", ("echo", "{{literal}}", "{node}")),
    ],
)
def test_parse_command_splits_like_a_shell(text: str, argv: tuple[str, ...]) -> None:
    """A command line is split as a POSIX shell would, placeholders kept for later."""
    assert parse_command(text, where="--wake-command", placeholders=WAKE_PLACEHOLDERS) == argv


@pytest.mark.parametrize(
    ("text", "placeholders", "says"),
    [
        ("", WAKE_PLACEHOLDERS, "empty"),
        ("   ", (), "empty"),
        ("systemctl 'suspend", (), "cannot split"),
        ("wakeonlan {ip}", WAKE_PLACEHOLDERS, "unknown placeholder {ip}"),
        ("suspend-node {node}", (), "placeholders: none"),
        ("wakeonlan {mac", WAKE_PLACEHOLDERS, "'{mac'"),
        ("wakeonlan mac}", WAKE_PLACEHOLDERS, "literal brace"),
    ],
)
def test_parse_command_refuses_naming_the_flag(
    text: str, placeholders: tuple[str, ...], says: str
) -> None:
    """An empty, unsplittable or badly braced command is refused, naming the flag."""
    with pytest.raises(ConfigurationError) as raised:
        parse_command(text, where="--the-flag", placeholders=placeholders)
    assert raised.value.where == "--the-flag"
    assert says in str(raised.value)


async def test_run_command_reports_status_and_last_stderr_line() -> None:
    """A failing command's exit status and the last line of its stderr are returned."""
    script = "import sys; print('first', file=sys.stderr); sys.exit('last words')"
    result = await run_command([sys.executable, "-c", script])
    assert (result.ok, result.status, result.stderr) == (False, 1, "last words")
    assert (await run_command([sys.executable, "-c", "pass"])).ok


async def test_run_command_kills_a_hung_command_and_names_a_missing_one() -> None:
    """A command past its time limit is killed; one that cannot start says why."""
    hung = await run_command(shlex.split("sleep 30"), time_limit=0.2)
    assert hung.status is None
    assert "timed out after 0.2 s" in hung.error
    missing = await run_command(["/nonexistent/wake-node"])
    assert missing.status is None
    assert "cannot run /nonexistent/wake-node" in missing.error


async def test_the_agent_refuses_to_sleep_while_attempts_run(tmp_path: Path) -> None:
    """SleepNode reaching an agent that runs attempts is refused (logged), nothing is run."""
    marker = tmp_path / "slept"
    command = (sys.executable, "-c", f"open({str(marker)!r}, 'w').close()")
    with structlog.testing.capture_logs() as logs:
        await sleep_node(command, node_id="n1", reason="idle", running=2)
    assert [(e["event"], e["running"]) for e in logs] == [("node_sleep_refused", 2)]
    assert not marker.exists()
    with structlog.testing.capture_logs() as logs:
        await sleep_node(command, node_id="n1", reason="idle", running=0)
    assert [e["event"] for e in logs] == ["node_sleeping", "node_sleep_command_done"]
    assert marker.exists()


async def test_without_a_sleep_command_the_node_sleeps_only_logically() -> None:
    """With no sleep command the agent logs node_sleeping and runs nothing."""
    with structlog.testing.capture_logs() as logs:
        await sleep_node((), node_id="n1", reason="night", running=0)
    assert [(e["event"], e["reason"], e["command"]) for e in logs] == [
        ("node_sleeping", "night", "")
    ]
