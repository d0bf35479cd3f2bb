"""Job specs: the example files, error reporting with file and field path, and the commands."""

from __future__ import annotations

from pathlib import Path

import msgspec
import pytest

from actors import (
    Condition,
    DependencyGraph,
    ElementMap,
    Outcome,
    Priority,
    Resources,
    RetryPolicy,
    SpecError,
    SubmitJobs,
    TaskRef,
    load_spec,
    parse_duration,
    parse_spec,
)

SPECS = Path(__file__).parent / "specs"
GiB = 2**30


def test_render_example() -> None:
    """The render example: chunked frames, frame-wise comp, a progress-threshold review."""
    spec = load_spec(SPECS / "render.toml")
    render, comp, review = spec.jobs
    assert [t.name for t in render.tasks][:2] == ["1-10", "11-20"]
    assert len(render.tasks) == 10
    assert (render.tasks[-1].start, render.tasks[-1].end) == (91, 100)
    assert render.resources == Resources.of(
        cores=8, memory="32GiB", gpus=1, gpu_memory="12GiB", scratch="50GiB"
    )
    assert render.priority is Priority.HIGH
    assert render.timeouts.max_runtime == 7200.0
    assert render.labels == ("animation", "gpu")
    assert len(comp.tasks) == 100
    assert comp.dependencies[0].elementwise == ElementMap()
    assert comp.resources.millicores == 1500
    assert review.dependencies[0].threshold == 0.5
    graph = DependencyGraph()
    graph.add_jobs(job.graph_job() for job in spec.jobs)
    assert [b.waits_on for b in graph.blockers(TaskRef("shot010-comp", 14))] == [
        "shot010-render[1]"
    ]


def test_simulation_example() -> None:
    """The simulation example: three stages chained inside one checkpointable job."""
    (job,) = load_spec(SPECS / "simulation.toml").jobs
    assert [t.name for t in job.tasks] == ["atmosphere", "ocean", "analysis"]
    assert job.checkpointable
    assert job.task_resources(1).memory == 128 * GiB
    assert job.task_resources(0).memory == 64 * GiB
    assert job.retries.delay(2) == 300.0
    assert job.dependencies[1].condition is Condition.ON_ANY_OUTCOME
    graph = DependencyGraph()
    graph.add_jobs([job.graph_job()])
    assert graph.ready_tasks() == (TaskRef("climate-run-42", 0),)
    (run,) = job.invocations(2, attempt=1)
    assert run.argv == ("python", "-m", "model.analysis", "--run", "climate-run-42")
    assert job.metadata_as(dict) == {"owner": "dana", "project": "cmip7", "scenario": "ssp245"}


def test_fanout_example() -> None:
    """The fan-out/fan-in example (JSON): prepare, a 4-member sweep, aggregate and alert."""
    spec = load_spec(SPECS / "fanout.json")
    assert [j.job_id for j in spec.jobs] == ["prepare", "sweep", "aggregate", "alert"]
    graph = DependencyGraph()
    graph.add_jobs(job.graph_job() for job in spec.jobs)
    graph.record_outcome(TaskRef("prepare", 0), Outcome.SUCCEEDED)
    update = graph.record_outcome("prepare", Outcome.SUCCEEDED)
    assert update.newly_ready == tuple(TaskRef("sweep", i) for i in range(4))
    for i in range(4):
        graph.record_outcome(TaskRef("sweep", i), Outcome.SUCCEEDED)
    update = graph.record_outcome("sweep", Outcome.SUCCEEDED)
    assert update.newly_ready == (TaskRef("aggregate", 0),)
    assert update.newly_unreachable == (TaskRef("alert", 0),)
    invocations = spec.jobs[1].invocations(2, attempt=3)
    assert invocations[0].argv[-4:] == ("--member", "m2", "--attempt", "3")


BASE = '[[jobs]]\nname = "a"\ncommand = ["run"]\n'


@pytest.mark.parametrize(
    ("text", "field", "problem"),
    [
        pytest.param(
            BASE + "[jobs.resources]\nmemroy = '1GiB'\n",
            "jobs[0].resources.memroy",
            "unknown field 'memroy' (did you mean 'memory'?)",
            id="unknown-field",
        ),
        pytest.param(
            BASE + "colour = 'red'\n", "jobs[0].colour", "unknown field", id="unknown-job-field"
        ),
        pytest.param(
            BASE + "chunk = 'ten'\n", "jobs[0].chunk", "expected int, got str", id="wrong-type"
        ),
        pytest.param(
            BASE + "priority = 'urgent'\n",
            "jobs[0].priority",
            "expected one of: background, low",
            id="bad-priority",
        ),
        pytest.param(
            BASE + BASE.replace('"a"', '"b"') + "resources = { memory = '-4GiB' }\n",
            "jobs[1].resources.memory",
            "must not be negative",
            id="negative-memory",
        ),
        pytest.param(
            BASE + "resources = { cores = -2 }\n",
            "jobs[0].resources.cores",
            "must not be negative",
            id="negative-cores",
        ),
        pytest.param(
            BASE + "resources = { gpus = -1 }\n",
            "jobs[0].resources.gpus",
            "expected int >= 0",
            id="negative-gpus",
        ),
        pytest.param(
            BASE + "resources = { memory = '16G' }\n",
            "jobs[0].resources.memory",
            "ambiguous",
            id="ambiguous-size",
        ),
        pytest.param(
            '[[jobs]]\nname = "a"\nframes = "1-3"\ncommand = ["r", "{frmae}"]\n',
            "jobs[0].command[1]",
            "unknown placeholder {frmae}",
            id="unknown-placeholder",
        ),
        pytest.param(
            '[[jobs]]\nname = "a"\ncommand = ["r", "{frame}"]\n',
            "jobs[0].command[1]",
            "the tasks have no frames",
            id="frame-without-frames",
        ),
        pytest.param(
            '[[jobs]]\nname = "a"\ncommand = ["r", "{output}"]\n',
            "jobs[0].command[1]",
            "no output is set",
            id="output-without-output",
        ),
        pytest.param(
            '[[jobs]]\nname = "a"\ncommand = ["r", "{task:04d}"]\n',
            "jobs[0].command[1]",
            "invalid format spec",
            id="bad-format-spec",
        ),
        pytest.param(
            BASE + "env = { X = '{nope}' }\n",
            "jobs[0].env.X",
            "unknown placeholder {nope}",
            id="env-placeholder",
        ),
        pytest.param(
            BASE + 'depends_on = ["bb"]\n' + BASE.replace('"a"', '"b"'),
            "jobs[0].depends_on[0]",
            "unknown dependency: no job 'bb' (did you mean 'b'?)",
            id="unknown-dependency",
        ),
        pytest.param(
            BASE
            + 'depends_on = ["b"]\n'
            + BASE.replace('"a"', '"b"')
            + 'depends_on = ["c"]\n'
            + BASE.replace('"a"', '"c"')
            + 'depends_on = ["a"]\n',
            "jobs[0].depends_on",
            "dependency cycle: a -> b -> c -> a",
            id="cycle",
        ),
        pytest.param(
            '[[jobs]]\nname = "a"\ncommand = ["r"]\n'
            '[[jobs.tasks]]\nname = "p"\ndepends_on = ["q"]\n'
            '[[jobs.tasks]]\nname = "q"\ndepends_on = ["p"]\n',
            "jobs[0].tasks[0].depends_on",
            "dependency cycle: a[p] -> a[q] -> a[p]",
            id="task-cycle",
        ),
        pytest.param(
            BASE + 'frames = "10-1"\n', "jobs[0].frames", "empty frame range", id="empty-frames"
        ),
        pytest.param(
            BASE + 'frames = "ten"\n', "jobs[0].frames", "expected a frame range", id="bad-frames"
        ),
        pytest.param(
            BASE + "chunk = 5\n", "jobs[0].chunk", "chunk needs frames", id="chunk-without-frames"
        ),
        pytest.param(
            BASE + BASE,
            "jobs[1].name",
            "duplicate job name 'a' (also jobs[0].name)",
            id="duplicate-job",
        ),
        pytest.param(
            '[[jobs]]\ncommand = ["r"]\n',
            "jobs[0].name",
            "required field is missing",
            id="missing-name",
        ),
        pytest.param(
            '[[jobs]]\nname = "a b"\ncommand = ["r"]\n',
            "jobs[0].name",
            "expected a name of letters",
            id="bad-name",
        ),
        pytest.param(
            '[[jobs]]\nname = "a"\n', "jobs[0].command", "a command is required", id="no-command"
        ),
        pytest.param(BASE + "command = []\n", "", "invalid TOML", id="toml-duplicate-key"),
        pytest.param("version = 1\n", "jobs", "required field is missing", id="no-jobs"),
        pytest.param(
            BASE + "timeouts = { stall = '5 mins' }\n",
            "jobs[0].timeouts.stall",
            "is not a duration",
            id="bad-duration",
        ),
        pytest.param(
            BASE + 'frames = "1-10"\n' + BASE.replace('"a"', '"b"') + 'frames = "5-20"\n'
            'depends_on = [{ job = "a", elementwise = true }]\n',
            "jobs[1].depends_on[0]",
            "no task of it covers",
            id="element-not-covered",
        ),
        pytest.param(
            BASE
            + 'depends_on = [{ job = "b", condition = "on_sucess" }]\n'
            + BASE.replace('"a"', '"b"'),
            "jobs[0].depends_on[0].condition",
            "expected one of: on_success, on_failure, on_any_outcome",
            id="bad-condition",
        ),
        pytest.param(
            BASE + "resources = { gpu_memory = '8GiB' }\n",
            "jobs[0].resources.gpu_memory",
            "needs gpus",
            id="gpu-memory-without-gpus",
        ),
    ],
)
def test_spec_errors_name_file_and_field(text: str, field: str, problem: str) -> None:
    """Every invalid spec raises SpecError naming the file, the field path and the problem."""
    with pytest.raises(SpecError) as info:
        parse_spec(text, fmt="toml", source="jobs/shot.toml")
    error = info.value
    assert error.path == "jobs/shot.toml"
    assert error.field == field
    assert problem in error.problem
    assert str(error).startswith(f"jobs/shot.toml: {field}" if field else "jobs/shot.toml: ")


def test_load_spec_error_names_the_file(tmp_path: Path) -> None:
    """load_spec errors carry the file's path, for JSON too."""
    path = tmp_path / "bad.json"
    path.write_text('{"jobs": [{"name": "a", "command": ["r"], "retries": {"max_attempts": 0}}]}')
    with pytest.raises(SpecError) as info:
        load_spec(path)
    assert info.value.path == str(path)
    assert info.value.field == "jobs[0].retries.max_attempts"
    assert "expected int >= 1" in info.value.problem
    with pytest.raises(SpecError, match="cannot read"):
        load_spec(tmp_path / "missing.toml")
    path.write_text("{not json")
    with pytest.raises(SpecError, match="invalid JSON"):
        load_spec(path)


def test_known_jobs_satisfy_external_dependencies() -> None:
    """A dependency on an already-submitted job is accepted when it is known."""
    text = BASE + 'depends_on = ["earlier-job"]\n'
    with pytest.raises(SpecError, match="unknown dependency"):
        parse_spec(text, fmt="toml")
    spec = parse_spec(text, fmt="toml", known_jobs={"earlier-job"})
    assert spec.jobs[0].dependencies[0].parent == "earlier-job"


def test_priorities_order_by_rank_not_name() -> None:
    """Priorities sort by rank (background < low < medium < high < critical)."""
    shuffled = [
        Priority.HIGH,
        Priority.BACKGROUND,
        Priority.CRITICAL,
        Priority.LOW,
        Priority.MEDIUM,
    ]
    assert sorted(shuffled) == [
        Priority.BACKGROUND,
        Priority.LOW,
        Priority.MEDIUM,
        Priority.HIGH,
        Priority.CRITICAL,
    ]
    assert Priority.LOW < Priority.HIGH
    assert max(Priority.MEDIUM, Priority.CRITICAL) is Priority.CRITICAL
    assert msgspec.json.encode(Priority.HIGH) == b'"high"'


def test_frame_placeholder_runs_once_per_frame() -> None:
    """A chunk whose command uses {frame} runs once per frame; {start}/{end} once per chunk."""
    text = (
        '[[jobs]]\nname = "r"\nframes = "1-5"\nchunk = 2\n'
        'command = ["render", "{frame:03d}", "{output}", "try{attempt}"]\n'
        'output = "out/{job}_{frame:04d}.png"\n'
        '[[jobs]]\nname = "s"\nframes = "1-5"\nchunk = 2\ncommand = ["r", "{start}", "{end}"]\n'
    )
    per_frame, per_chunk = parse_spec(text, fmt="toml").jobs
    runs = per_frame.invocations(1, attempt=2)
    assert [r.argv for r in runs] == [
        ("render", "003", "out/r_0003.png", "try2"),
        ("render", "004", "out/r_0004.png", "try2"),
    ]
    assert [r.argv for r in per_chunk.invocations(2, attempt=1)] == [("r", "5", "5")]


def test_to_commands_renames_jobs_and_references() -> None:
    """to_commands assigns job ids and rewrites the dependencies that name them."""
    spec = load_spec(SPECS / "fanout.json")
    commands = spec.to_commands(job_ids={"sweep": "job-0002", "prepare": "job-0001"})
    assert [j.job_id for j in commands.jobs] == ["job-0001", "job-0002", "aggregate", "alert"]
    assert commands.jobs[1].dependencies[0].parent == "job-0001"
    assert commands.jobs[2].dependencies[0].parent == "job-0002"


def test_submission_round_trips_with_its_tag() -> None:
    """SubmitJobs encodes with its namespaced tag and decodes to an equal value."""
    commands = load_spec(SPECS / "render.toml").to_commands()
    data = msgspec.json.decode(msgspec.json.encode(commands))
    assert data["type"] == "engine.submit_jobs"
    assert data["jobs"][0]["type"] == "engine.submit_job"
    assert msgspec.msgpack.decode(msgspec.msgpack.encode(commands), type=SubmitJobs) == commands


@pytest.mark.parametrize(
    ("value", "seconds"),
    [
        (90, 90.0),
        (1.5, 1.5),
        ("90s", 90.0),
        ("5m", 300.0),
        ("1h30m", 5400.0),
        ("2d", 172800.0),
        ("250ms", 0.25),
    ],
)
def test_parse_duration(value: int | float | str, seconds: float) -> None:
    """Durations parse from seconds or unit strings."""
    assert parse_duration(value) == seconds


@pytest.mark.parametrize("value", ["-5m", "5 mins", "", -1, True])
def test_parse_duration_rejects(value: int | str) -> None:
    """Negative or malformed durations raise ValueError."""
    with pytest.raises(ValueError):
        parse_duration(value)


@pytest.mark.parametrize(
    ("attempt", "delay"),
    [(1, 0.0), (2, 300.0), (3, 600.0), (4, 1200.0), (5, 2400.0), (6, 3600.0), (9, 3600.0)],
)
def test_retry_backoff(attempt: int, delay: float) -> None:
    """Backoff doubles from its start and is capped (5, 10, 20, 40, 60 minutes)."""
    policy = RetryPolicy(max_attempts=10, backoff=300.0, backoff_factor=2.0, max_backoff=3600.0)
    assert policy.delay(attempt) == delay
