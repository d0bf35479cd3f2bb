"""The operator verbs' pure parts, as tables: TIME and KEY=VALUE and NAME=N parsing, the role
table, what ``status`` shows of tasks, the ETA, the verbs' arguments, and loading policies."""

from __future__ import annotations

import argparse
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import msgspec
import pytest

from actors import FifoPolicy, JobSummary, PriorityPreemptionPolicy, TaskSummary
from actors.cli import load_event_codecs, load_policy
from actors.cli._format import (
    EtaEstimator,
    format_counts,
    format_jobs,
    format_progress,
    jobs_json,
)
from actors.cli._parsing import (
    RelativeTime,
    format_elapsed,
    parse_assignment,
    parse_counters,
    parse_time,
)
from actors.cli._verbs import configure_node, configure_retry
from actors.cluster import (
    ACCESS,
    AmendJobRequest,
    CancelJobRequest,
    CheckpointTaskRequest,
    ListNodesRequest,
    LogsRequest,
    PauseJobRequest,
    PolicyCommandRequest,
    PreemptTaskRequest,
    ResumeJobRequest,
    RetryTasksRequest,
    SetNodeHealthRequest,
    StatusRequest,
    SubmitRequest,
    WhyRequest,
    decide,
)
from runtime import ConfigurationError, Message, Principal

PLUGIN = Path(__file__).parents[1] / "integration" / "plugin"
NOW = datetime(2025, 3, 14, 12, 0, tzinfo=UTC)
PLUS_ONE = timezone(timedelta(hours=1))

# -- TIME ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("2025-03-14T18:00:00Z", datetime(2025, 3, 14, 18, tzinfo=UTC)),
        ("2025-03-14T18:00:00+01:00", datetime(2025, 3, 14, 18, tzinfo=PLUS_ONE)),
        ("2025-03-14 18:00", datetime(2025, 3, 14, 18, tzinfo=PLUS_ONE)),  # local: +01:00
        ("2025-03-14", datetime(2025, 3, 14, tzinfo=PLUS_ONE)),
        ("+2h", RelativeTime(7200)),
        ("+90m", RelativeTime(5400)),
        ("+1h30m", RelativeTime(5400)),
        ("+1d", RelativeTime(86_400)),
        ("+45s", RelativeTime(45)),
        ("+1.5h", RelativeTime(5400)),
        ("+2w", RelativeTime(14 * 86_400)),
    ],
)
def test_parse_time_accepts_iso_8601_and_times_from_now(text: str, expected: object) -> None:
    """ISO-8601 (local time without an offset) and +DURATION both parse, to the right value."""
    parsed = parse_time(text, where="--at", local=PLUS_ONE)
    assert parsed == expected
    assert type(parsed) is type(expected)


@pytest.mark.parametrize(
    ("text", "says"),
    [
        ("tomorrow", "ISO-8601"),
        ("+2", "ISO-8601"),
        ("+0h", "later than now"),
        ("+400d", "366 days"),
        ("2025-13-01T00:00:00Z", "ISO-8601"),
        ("", "ISO-8601"),
        ("-2h", "ISO-8601"),
    ],
)
def test_parse_time_refuses_what_is_not_a_time(text: str, says: str) -> None:
    """A bad TIME is one ConfigurationError naming the flag and what was expected."""
    with pytest.raises(ConfigurationError, match=says) as raised:
        parse_time(text, where="--at")
    assert str(raised.value).startswith("--at: ")


# -- KEY=VALUE -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("retries=3", ("retries", 3)),
        ("ratio=0.5", ("ratio", 0.5)),
        ("urgent=true", ("urgent", True)),
        ("client=null", ("client", None)),
        ('client="acme"', ("client", "acme")),
        ("shots=[10, 20]", ("shots", [10, 20])),
        ('window={"start": 1}', ("window", {"start": 1})),
        ("deadline=2025-03-14T18:00:00Z", ("deadline", "2025-03-14T18:00:00Z")),
        ("deadline=2025-03-14T18:00:00+01:00", ("deadline", "2025-03-14T18:00:00+01:00")),
        ("deadline=2025-03-14 18:00:00", ("deadline", "2025-03-14T18:00:00")),
        ("day=2025-03-14", ("day", "2025-03-14")),
        ("at=07:30:00", ("at", "07:30:00")),
        ("client=acme", ("client", "acme")),
        ("note=two words", ("note", "two words")),
        ("empty=", ("empty", "")),
        ("x=NaN", ("x", "NaN")),  # not portable JSON: kept as text
        ("expr=a=b", ("expr", "a=b")),
        ("version=2025-03", ("version", "2025-03")),  # not a TOML date: a string
    ],
)
def test_parse_assignment_reads_json_then_toml_datetimes_then_strings(
    text: str, expected: tuple[str, Any]
) -> None:
    """VALUE is JSON when it is JSON, else a TOML date-time (as ISO text), else a string."""
    assert parse_assignment(text) == expected


@pytest.mark.parametrize("text", ["novalue", "=3", " =3"])
def test_parse_assignment_refuses_a_missing_key_or_equals_sign(text: str) -> None:
    """KEY=VALUE without a key or an = is refused naming --set."""
    with pytest.raises(ConfigurationError, match="--set: expected KEY=VALUE"):
        parse_assignment(text)


def test_a_toml_datetime_is_stored_as_the_spec_stores_one() -> None:
    """``--set deadline=...`` gives the same JSON as the spec's ``deadline = ...`` metadata."""
    _, value = parse_assignment("deadline=2025-03-14T18:00:00Z")
    from_spec = msgspec.json.encode(msgspec.to_builtins({"deadline": NOW.replace(hour=18)}))
    assert msgspec.json.encode({"deadline": value}) == from_spec


# -- NAME=N ----------------------------------------------------------------------------------------


def test_parse_counters_reads_repeated_name_equals_count() -> None:
    """--counter nuke=10 --counter houdini=2 gives both counters."""
    assert parse_counters(["nuke=10", "houdini=2"]) == {"nuke": 10, "houdini": 2}
    assert parse_counters([]) == {}


@pytest.mark.parametrize(
    ("items", "says"),
    [
        (["nuke"], "expected NAME=N"),
        (["nuke=-1"], "expected NAME=N"),
        (["nuke=1.5"], "expected NAME=N"),
        (["=3"], "expected NAME=N"),
        (["nuke=1", "nuke=2"], "given twice"),
        (["nuke=1000001"], "maximum of 1,000,000"),
        ([f"c{i}=1" for i in range(65)], "at most 64 counters"),
    ],
)
def test_parse_counters_refuses_bad_counters(items: list[str], says: str) -> None:
    """A bad --counter is refused naming the flag."""
    with pytest.raises(ConfigurationError, match=says) as raised:
        parse_counters(items)
    assert str(raised.value).startswith("--counter: ")


# -- the role table --------------------------------------------------------------------------------

REQUESTS: dict[str, Message] = {
    "status": StatusRequest(),
    "nodes": ListNodesRequest(),
    "why": WhyRequest(job_id="j"),
    "logs": LogsRequest(job_id="j", task="stage-2"),
    "submit": SubmitRequest(text="", format="toml", source="s.toml"),
    "cancel": CancelJobRequest(job_id="j"),
    "amend": AmendJobRequest(job_id="j", priority="high"),
    "pause": PauseJobRequest(job_id="j"),
    "resume": ResumeJobRequest(job_id="j"),
    "retry": RetryTasksRequest(job_id="j"),
    "checkpoint": CheckpointTaskRequest(job_id="j", task=0),
    "preempt": PreemptTaskRequest(job_id="j", task="stage-2"),
    "node": SetNodeHealthRequest(node="n1", health="draining"),
    "policy": PolicyCommandRequest(name="report"),
}
# Per role: what it may send ("own": only for jobs it submitted); everything else is denied.
ALLOWED: dict[str, dict[str, str]] = {
    "read": {"status": "allow", "nodes": "allow", "why": "allow", "logs": "allow"},
    "submit": {
        "status": "allow",
        "nodes": "allow",
        "why": "allow",
        "logs": "allow",
        "submit": "allow",
        "cancel": "own",
    },
    "operator": dict.fromkeys(REQUESTS, "allow"),
    "admin": dict.fromkeys(REQUESTS, "allow"),
}


@pytest.mark.parametrize("role", ["read", "submit", "operator", "admin"])
@pytest.mark.parametrize("name", sorted(REQUESTS))
def test_the_role_table_lets_each_role_do_what_it_should(role: str, name: str) -> None:
    """read sees; submit submits and cancels its own; operator runs job and node verbs and
    (by default) policy commands on any job; admin everything."""
    principal = Principal(name="p", role="client", method="credential", grant=role)
    assert decide(principal, REQUESTS[name]) == ALLOWED[role].get(name, "deny")


def test_every_verb_has_a_row_naming_operator() -> None:
    """The operator verbs and policy commands have rows, each needing the role operator."""
    for name in ("amend", "pause", "resume", "retry", "checkpoint", "preempt", "node", "policy"):
        rule = ACCESS[type(REQUESTS[name])]
        assert (rule.role, rule.any_job) == ("operator", None), name


@pytest.mark.parametrize(
    ("command", "role", "expected"),
    [
        ("report", "read", "allow"),  # the policy says read
        ("report", "submit", "allow"),
        ("bump", "read", "deny"),  # submit
        ("bump", "submit", "allow"),
        ("reset", "operator", "deny"),  # admin
        ("reset", "admin", "allow"),
        ("typo", "operator", "deny"),  # an unknown role name is read as admin
        ("typo", "admin", "allow"),
        ("unlisted", "submit", "deny"),  # not listed: the row's operator
        ("unlisted", "operator", "allow"),
    ],
)
def test_a_policy_command_needs_the_role_the_policy_names(
    command: str, role: str, expected: str
) -> None:
    """command_roles decides per command; unlisted commands need operator; a role name
    the protocol does not know needs admin."""
    roles = {"report": "read", "bump": "submit", "reset": "admin", "typo": "opertor"}
    principal = Principal(name="p", role="client", method="credential", grant=role)
    assert decide(principal, PolicyCommandRequest(name=command), roles) == expected


# -- what status shows -----------------------------------------------------------------------------


def _task(**fields: Any) -> TaskSummary:
    base: dict[str, Any] = {"index": 0, "status": "running", "name": "stage-1", "attempt": 1}
    return TaskSummary(**(base | fields))


@pytest.mark.parametrize(
    ("task", "shown"),
    [
        (_task(started_at=(NOW - timedelta(seconds=41)).isoformat()), "running 0:41"),
        (_task(started_at=(NOW - timedelta(minutes=72, seconds=3)).isoformat()), "running 1:12:03"),
        (_task(), "running"),  # in doubt after a restart: its start is unknown
        (_task(progress=0.42, started_at=NOW.isoformat()), "42%"),
        (_task(status="pending"), "0%"),
        (_task(status="blocked"), "0%"),
        (_task(status="completed", progress=1.0), "100%"),
    ],
)
def test_a_task_without_progress_shows_how_long_it_has_run(task: TaskSummary, shown: str) -> None:
    """A running task that reports no progress shows 'running M:SS' from its attempt's start."""
    assert format_progress(task, NOW) == shown


@pytest.mark.parametrize(
    ("seconds", "shown"),
    [(0, "0:00"), (41, "0:41"), (600, "10:00"), (3723, "1:02:03"), (90_061, "1d 1:01:01")],
)
def test_format_elapsed_reads_like_a_clock(seconds: float, shown: str) -> None:
    """Durations are shown as a clock: M:SS, H:MM:SS, then days."""
    assert format_elapsed(seconds) == shown


def test_format_counts_puts_what_runs_and_waits_first() -> None:
    """Counts read running, pending, blocked, held, then what finished."""
    counts = {"completed": 3, "blocked": 1, "pending": 5, "running": 2, "skipped": 1}
    assert format_counts(counts) == "2 running, 5 pending, 1 blocked, 3 completed, 1 skipped"


def _job(**fields: Any) -> JobSummary:
    base: dict[str, Any] = {
        "job_id": "shot010",
        "name": "shot010",
        "status": "active",
        "priority": "high",
        "submitted_at": NOW.isoformat(),
    }
    return JobSummary(**(base | fields))


def test_status_shows_tasks_by_name_with_frames_node_attempt_preview_and_metrics() -> None:
    """A job's tasks appear by name (not 'task N'), with node, attempt, the latest preview
    and metrics, held reasons, and the job's policy columns and metrics."""
    job = _job(
        task_counts={"running": 1, "held": 1, "blocked": 1},
        domain={"deadline": "18:00 (6h left)"},
        metrics={"frame_time": 12.5},
        tasks=(
            _task(
                index=0,
                name="1-10",
                frames=(1, 10),
                node="render-07",
                attempt=2,
                started_at=(NOW - timedelta(seconds=41)).isoformat(),
                preview="/previews/0005.png",
                metrics={"frame_time": 12.5},
            ),
            _task(index=1, name="11-20", frames=(11, 20), status="held", held_reason="oom"),
            _task(index=2, name="21-30", frames=(21, 30), status="blocked", attempt=0),
        ),
    )
    text = format_jobs([job], as_of=NOW)
    assert "task 0" not in text
    assert "FRAMES" not in text
    lines = text.splitlines()
    assert lines[1].split() == [
        "shot010",
        "active",
        "high",
        "0%",
        "1",
        "running,",
        "1",
        "blocked,",
        "1",
        "held",
    ]
    assert "    deadline: 18:00 (6h left)" in lines
    assert "    metrics: frame_time=12.5" in lines
    row = next(line for line in lines if line.lstrip().startswith("1-10"))
    assert row.split() == ["1-10", "running", "render-07", "2", "running", "0:41"]
    assert any("preview: /previews/0005.png" in line for line in lines)
    assert any(line.split()[:2] == ["11-20", "held"] for line in lines)
    assert any("held: oom" in line for line in lines)
    assert any(line.split()[:2] == ["21-30", "blocked"] for line in lines)


def test_status_shows_frames_beside_names_that_are_not_frames() -> None:
    """Named tasks that carry frames get a FRAMES column; a single frame is one number."""
    job = _job(tasks=(_task(name="beauty", frames=(5, 5), status="pending", attempt=0),))
    lines = format_jobs([job], as_of=NOW).splitlines()
    assert "FRAMES" in lines[2]
    assert lines[3].split()[:3] == ["beauty", "5", "pending"]


def test_status_json_leaves_out_tasks_it_did_not_fetch_and_adds_elapsed() -> None:
    """Without tasks the JSON has no 'tasks' key (not a misleading []); with them, a running
    task carries elapsed_s and the job its metric series."""
    job = _job(
        metric_series={"psnr": ((0, 30.5), (0, 31.0))},
        tasks=(_task(started_at=(NOW - timedelta(seconds=41)).isoformat()),),
    )
    (bare,) = jobs_json([job], as_of=NOW, with_tasks=False)
    assert "tasks" not in bare
    assert "metric_series" not in bare
    (full,) = jobs_json([job], as_of=NOW, with_tasks=True)
    assert full["tasks"][0]["elapsed_s"] == 41.0
    as_json = msgspec.json.decode(msgspec.json.encode(full))
    assert as_json["metric_series"] == {"psnr": [[0, 30.5], [0, 31.0]]}


def test_the_eta_follows_the_progress_seen_while_watching() -> None:
    """ETA = what is left at the rate seen since the first sample; unknown until it moves."""
    eta = EtaEstimator()
    assert eta.describe(_job(progress=0.2), NOW) == "ETA -"
    assert eta.eta_s(_job(progress=0.2), NOW + timedelta(seconds=10)) is None
    later = NOW + timedelta(seconds=60)
    assert eta.eta_s(_job(progress=0.5), later) == pytest.approx(100.0)  # 0.3 a minute, 0.5 left
    assert eta.describe(_job(progress=0.5), later) == "ETA 1:40"
    assert eta.describe(_job(progress=1.0, status="completed"), later) == "completed"


# -- the verbs' arguments --------------------------------------------------------------------------


def _parser(configure: Any) -> argparse.ArgumentParser:
    class Strict(argparse.ArgumentParser):
        def error(self, message: str) -> Any:
            raise ValueError(message)

    parser = Strict(prog="taskfarm")
    configure(parser)
    return parser


def test_node_takes_at_only_for_a_drain() -> None:
    """node drain takes --at; sleep, resume and release refuse it; NODE is required."""
    parser = _parser(configure_node)
    args = parser.parse_args(["drain", "n1", "--at", "+2h", "--reason", "kernel"])
    assert (args.node_action, args.node, args.at, args.reason) == ("drain", "n1", "+2h", "kernel")
    for action in ("sleep", "resume", "release"):
        assert parser.parse_args([action, "n1"]).node_action == action
        with pytest.raises(ValueError, match="unrecognized arguments: --at"):
            parser.parse_args([action, "n1", "--at", "+2h"])
    with pytest.raises(ValueError, match="NODE"):
        parser.parse_args(["drain"])
    with pytest.raises(ValueError, match="invalid choice"):
        parser.parse_args(["reboot", "n1"])


def test_retry_takes_task_names_or_indices_but_not_negative_numbers() -> None:
    """retry JOB [TASK...]: names and indices pass through as given; -1 is refused."""
    parser = _parser(configure_retry)
    assert parser.parse_args(["j", "stage-2", "3", "11-20"]).tasks == ["stage-2", "3", "11-20"]
    assert parser.parse_args(["j"]).tasks == []
    with pytest.raises(ValueError):
        parser.parse_args(["j", "--", "-1"])


# -- policies --------------------------------------------------------------------------------------


def test_the_engine_registers_fifo_and_priority_preemption() -> None:
    """serve --policy fifo|priority-preemption load the engine's policies."""
    assert type(load_policy("fifo")) is FifoPolicy
    assert type(load_policy("priority-preemption")) is PriorityPreemptionPolicy


def test_an_unknown_policy_lists_the_known_ones() -> None:
    """A policy name nobody registered is refused naming --policy and every known name."""
    with pytest.raises(ConfigurationError) as raised:
        load_policy("fastest")
    message = str(raised.value)
    assert message.startswith("--policy: unknown policy 'fastest'")
    assert "fifo" in message
    assert "priority-preemption" in message


def test_the_engine_policies_refuse_a_configuration_file(tmp_path: Path) -> None:
    """fifo takes no configuration: a --policy-config is refused, naming the flag."""
    config = tmp_path / "fifo.toml"
    config.write_text("")
    with pytest.raises(ConfigurationError, match="--policy-config: the fifo policy takes no"):
        load_policy("fifo", config)
    with pytest.raises(ConfigurationError, match="--policy-config: no such file"):
        load_policy("fifo", tmp_path / "missing.toml")


def test_a_plugin_policy_and_its_events_load_through_entry_points(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A policy registered under taskfarm.policies gets its config file; one that refuses it
    names file and field; its taskfarm.events codec is among the coordinator's codecs."""
    monkeypatch.syspath_prepend(str(PLUGIN))
    config = tmp_path / "policy.toml"
    config.write_text('label = "night"\n')
    policy = load_policy("test-deadline", config)
    assert (policy.name, getattr(policy, "label", None)) == ("test-deadline", "night")
    config.write_text("label = 3\n")
    with pytest.raises(ConfigurationError, match=r"policy\.toml: label: expected a string"):
        load_policy("test-deadline", config)
    tags = {tag for codec in load_event_codecs() for tag in codec.tags()}
    assert {"verbstest.bumped", "engine.job_submitted", "auth.credential_issued"} <= tags
