"""The bounds of a job spec: every duration, number, container and expanded command has a
maximum, and a spec beyond one is refused at load with the file, the field and the maximum;
a spec at the maxima is accepted.  Also the fit rule for work no node could fit."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from actors import Resources, RetryPolicy, SpecError, load_spec, parse_spec, read_spec_text
from actors.engine import _limits as limits
from actors.engine._fit import never_fits

SOURCE = "shot.toml"
JOB = '[[jobs]]\nname = "a"\ncommand = ["true"]\n'
FRAMED = '[[jobs]]\nname = "a"\nframes = "1-10"\n'
DEEP = 100_000


def framed(command: str, extra: str = "") -> str:
    return f"{FRAMED}{extra}command = {command}\n"


# case: (spec text, field, words the problem must contain)
REFUSED: dict[str, tuple[str, str, tuple[str, ...]]] = {
    "backoff-days": (
        JOB + 'retries = { backoff = "99999999999999d" }\n',
        "jobs[0].retries.backoff",
        ("99999999999999d is longer than the maximum of 30d",),
    ),
    "backoff-seconds": (
        JOB + "retries = { backoff = 1e20 }\n",
        "jobs[0].retries.backoff",
        ("longer than the maximum of 30d",),
    ),
    "max-backoff": (
        JOB + 'retries = { max_backoff = "31d" }\n',
        "jobs[0].retries.max_backoff",
        ("31d is longer than the maximum of 30d",),
    ),
    "backoff-factor": (
        JOB + "retries = { backoff_factor = 1e300 }\n",
        "jobs[0].retries.backoff_factor",
        ("more than the maximum of 100",),
    ),
    "max-attempts": (
        JOB + "retries = { max_attempts = 1001 }\n",
        "jobs[0].retries.max_attempts",
        ("more than the maximum of 1,000",),
    ),
    "max-runtime": (
        JOB + 'timeouts = { max_runtime = "367d" }\n',
        "jobs[0].timeouts.max_runtime",
        ("367d is longer than the maximum of 366d",),
    ),
    "stall": (
        JOB + 'timeouts = { stall = "9999999h" }\n',
        "jobs[0].timeouts.stall",
        ("longer than the maximum of 30d",),
    ),
    "duration-text": (
        JOB + f'retries = {{ backoff = "{"9" * 100}s" }}\n',
        "jobs[0].retries.backoff",
        ("more than the maximum of 64 characters",),
    ),
    "cores-1e12": (
        JOB + "resources = { cores = 1e12 }\n",
        "jobs[0].resources.cores",
        ("more than the maximum of 1,000,000 cores",),
    ),
    "cores-text": (
        JOB + 'resources = { cores = "1000001" }\n',
        "jobs[0].resources.cores",
        ("more than the maximum of 1,000,000 cores",),
    ),
    "cores-1e300": (
        JOB + "resources = { cores = 1e300 }\n",
        "jobs[0].resources.cores",
        ("more than the maximum",),
    ),
    "memory": (
        JOB + 'resources = { memory = "2PiB" }\n',
        "jobs[0].resources.memory",
        ("2PiB is more than the maximum of 1PiB",),
    ),
    "memory-beyond-64-bits": (
        JOB + 'resources = { memory = "99999999999999999EiB" }\n',
        "jobs[0].resources.memory",
        ("more than the maximum of 1PiB",),
    ),
    "scratch": (
        JOB + "resources = { scratch = 1125899906842625 }\n",
        "jobs[0].resources.scratch",
        ("more than the maximum of 1PiB",),
    ),
    "gpus": (
        JOB + "resources = { gpus = 10001 }\n",
        "jobs[0].resources.gpus",
        ("more than the maximum of 10,000",),
    ),
    "gpu-memory": (
        JOB + 'resources = { gpus = 1, gpu_memory = "2TiB" }\n',
        "jobs[0].resources.gpu_memory",
        ("more than the maximum of 1TiB per GPU",),
    ),
    "counter": (
        JOB + "resources = { counters = { nuke = 1000001 } }\n",
        "jobs[0].resources.counters",
        ("more than the maximum of 1,000,000",),
    ),
    "counters": (
        JOB + "resources = { counters = { " + ", ".join(f"c{i} = 1" for i in range(65)) + " } }\n",
        "jobs[0].resources.counters",
        ("more than the maximum of 64 entries",),
    ),
    "task-cores": (
        '[[jobs]]\nname = "a"\ncommand = ["true"]\n[[jobs.tasks]]\nname = "big"\n'
        'resources = { cores = "2000000" }\n',
        "jobs[0].tasks[0].resources.cores",
        ("more than the maximum of 1,000,000 cores",),
    ),
    "frame-number": (
        '[[jobs]]\nname = "a"\nframes = "99999999999999999999"\ncommand = ["x"]\n',
        "jobs[0].frames",
        ("beyond the maximum frame number",),
    ),
    "frame-range": (
        '[[jobs]]\nname = "a"\nframes = "1-100000000"\nchunk = 1000\ncommand = ["x"]\n',
        "jobs[0].frames",
        ("at most 1000000",),
    ),
    "chunk": (
        '[[jobs]]\nname = "a"\nframes = "1-10"\nchunk = 99999999\ncommand = ["x"]\n',
        "jobs[0].chunk",
        ("more than the maximum of 1,000,000",),
    ),
    "tasks-in-a-job": (
        '[[jobs]]\nname = "a"\nframes = "1-100001"\ncommand = ["x"]\n',
        "jobs[0].chunk",
        ("at most 100000 in a job",),
    ),
    "jobs-in-a-file": (
        "".join(f'[[jobs]]\nname = "j{i}"\ncommand = ["x"]\n' for i in range(1001)),
        "jobs",
        ("more than the maximum of 1,000 entries",),
    ),
    "tasks-in-a-file": (
        "".join(
            f'[[jobs]]\nname = "j{i}"\nframes = "1-100000"\ncommand = ["x"]\n' for i in range(11)
        ),
        "jobs",
        ("1,100,000 tasks in all, more than the maximum of 1,000,000",),
    ),
    "labels": (
        JOB + "labels = [" + ", ".join(f'"l{i}"' for i in range(65)) + "]\n",
        "jobs[0].labels",
        ("more than the maximum of 64 entries",),
    ),
    "dependency-offset": (
        '[[jobs]]\nname = "p"\ncommand = ["x"]\n[[jobs]]\nname = "a"\ncommand = ["x"]\n'
        'depends_on = [{ job = "p", elementwise = { offset = 99999999999999999999 } }]\n',
        "jobs[1].depends_on[0].elementwise.offset",
        ("more than the maximum of 1,000,000,000",),
    ),
    "metadata": (
        JOB + f'metadata = {{ notes = "{"x" * 70_000}" }}\n',
        "jobs[0].metadata",
        ("more than the maximum of 65,536",),
    ),
    "argv-length": (
        JOB.replace('["true"]', "[" + ", ".join(['"x"'] * 4097) + "]"),
        "jobs[0].command",
        ("more than the maximum of 4,096 entries",),
    ),
    "env-size": (
        JOB + "env = { " + ", ".join(f"V{i} = '1'" for i in range(1025)) + " }\n",
        "jobs[0].env",
        ("more than the maximum of 1,024 entries",),
    ),
    "env-name": (
        JOB + 'env = { "A=B" = "x" }\n',
        "jobs[0].env",
        ("is not a variable name",),
    ),
    "nul-in-argv": (
        JOB.replace('["true"]', '["echo", "a\\u0000b"]'),
        "jobs[0].command[1]",
        ("NUL character",),
    ),
    "format-width": (
        framed('["echo", "{frame:>20000000}"]'),
        "jobs[0].command[1]",
        ("format width 20000000", "{frame:>20000000}", "131,072 bytes"),
    ),
    "format-width-of-a-hundred-digits": (
        framed('["echo", "{frame:>' + "9" * 100 + '}"]'),
        "jobs[0].command[1]",
        ("format width",),
    ),
    "format-precision": (
        framed('["echo", "{frame:.200000f}"]'),
        "jobs[0].command[1]",
        ("format width 200000",),
    ),
    "format-type-c": (
        framed('["echo", "{frame:c}"]'),
        "jobs[0].command[1]",
        ("format type 'c' is not allowed",),
    ),
    "expanded-argument": (
        framed('["echo", "{job:>100000}{task:>100000}"]'),
        "jobs[0].command[1]",
        ("expands to more than the maximum of 131,072 bytes", "for task 0 (frame 1)"),
    ),
    "expanded-process": (
        framed("[" + ", ".join(['"{frame:>100000}"'] * 11) + "]"),
        "jobs[0].command",
        ("for frame 1 of task 0", "more than the maximum of 1,048,576 for one process"),
    ),
    "expanded-env": (
        framed('["echo"]', 'env = { BIG = "{frame:>131072}" }\n'),
        "jobs[0].env.BIG",
        ("an environment entry may have",),
    ),
    "expanded-output": (
        framed('["echo", "{output}"]', 'output = "/out/{frame:>5000}.exr"\n'),
        "jobs[0].output",
        ("more than the maximum of 4,096 bytes",),
    ),
    "frame-sequence": (
        '[[jobs]]\nname = "a"\nframes = "1-2000"\nchunk = 2000\n'
        f'command = ["render", "{{frame}}", "{"x" * 100}"]\n',
        "jobs[0].command",
        ("2,000 frames of task 0 (frames 1-2000)", "one task's frame sequence", "smaller chunk"),
    ),
    "task-command": (
        '[[jobs]]\nname = "a"\ncommand = ["x"]\n[[jobs.tasks]]\nname = "s"\n'
        'command = ["echo", "{task:>200000}"]\n',
        "jobs[0].tasks[0].command[1]",
        ("format width 200000",),
    ),
    "nested-deeply": (
        JOB + "metadata = { a = " + "[" * DEEP + "]" * DEEP + " }\n",
        "",
        ("nested",),
    ),
    "nested-33-levels": (JOB + "metadata = { a = " + "[" * 33 + "]" * 33 + " }\n", "", ("32",)),
    "integer-of-5000-digits": (
        JOB + "metadata = { a = 1" + "0" * 5000 + " }\n",
        "",
        ("invalid TOML", "digits"),
    ),
}


@pytest.mark.parametrize("case", list(REFUSED))
def test_a_spec_beyond_a_maximum_is_refused(case: str) -> None:
    """A value beyond its maximum is refused at load, naming the file, the field and the bound."""
    text, field, words = REFUSED[case]
    with pytest.raises(SpecError) as caught:
        parse_spec(text, fmt="toml", source=SOURCE)
    error = caught.value
    assert (error.path, error.field) == (SOURCE, field), str(error)
    for word in words:
        assert word in error.problem, str(error)
    assert "\n" not in str(error)
    assert len(str(error)) < 400  # one readable line, whatever the input's size


def test_the_refusal_table_covers_every_bound() -> None:
    """Every documented bound is exercised by at least one refused spec (counted for the README)."""
    assert len(REFUSED) >= 40


def test_a_spec_at_the_maxima_is_accepted() -> None:
    """A spec with every value at its maximum loads: the bounds refuse typos, not real farms."""
    text = (
        '[[jobs]]\nname = "big"\nframes = "-1000000000--999999001"\nchunk = 1000\n'
        'command = ["render", "{frame:>60000}", "{job}"]\n'
        f'resources = {{ cores = {limits.MAX_CORES}, memory = "1PiB", scratch = "1PiB", '
        f'gpus = {limits.MAX_GPUS}, gpu_memory = "1TiB", counters = {{ nuke = 1000000 }} }}\n'
        'retries = { max_attempts = 1000, backoff = "30d", max_backoff = "30d", '
        "backoff_factor = 100 }\n"
        'timeouts = { max_runtime = "366d", stall = "30d" }\n'
        "labels = [" + ", ".join(f'"l{i}"' for i in range(64)) + "]\n"
    )
    # One frame per chunk would make a frame sequence of 1000 x 60 KB: use chunk = 1 here.
    text = text.replace("chunk = 1000", "chunk = 1")
    (job,) = parse_spec(text, fmt="toml", source=SOURCE).jobs
    assert len(job.tasks) == 1000
    assert job.resources.millicores == limits.MAX_CORES * 1000
    assert job.retries.backoff == limits.MAX_BACKOFF
    (run,) = job.invocations(999, attempt=1)
    assert len(run.argv[1]) == 60_000


def test_a_chunk_whose_frame_sequence_fits_is_accepted() -> None:
    """A chunk of 1,000 frames with a short command fits in one frame sequence and is kept."""
    text = '[[jobs]]\nname = "a"\nframes = "1-1000"\nchunk = 1000\ncommand = ["r", "{frame}"]\n'
    (job,) = parse_spec(text, fmt="toml", source=SOURCE).jobs
    assert len(job.invocations(0, attempt=1)) == 1000


def test_a_backoff_never_exceeds_the_maximum_whatever_the_policy_holds() -> None:
    """A policy built in code (or journaled before the bounds) still waits at most 30 days, and
    the wait can be added to a date: the OverflowError that wedged a job cannot happen."""
    huge = RetryPolicy(max_attempts=10_000, backoff=1e15, backoff_factor=1e10, max_backoff=1e300)
    now = datetime(2026, 1, 1, tzinfo=UTC)
    for attempt in (2, 3, 50, 9_999):
        wait = huge.delay(attempt)
        assert wait == limits.MAX_BACKOFF
        assert now + timedelta(seconds=wait) > now
    assert RetryPolicy(backoff=30, backoff_factor=2, max_backoff=600).delay(3) == 60
    assert RetryPolicy(backoff=0).delay(5) == 0


@pytest.mark.parametrize(
    ("content", "words"),
    [
        (b"\xff\xfe[[jobs]]\n", ("not UTF-8 text", "byte 0xff at offset 0", "line 1")),
        (b'[[jobs]]\nname = "caf\xe9"\n', ("not UTF-8 text", "offset 20", "line 2")),
    ],
)
def test_a_file_that_is_not_utf8_is_named(
    tmp_path: Path, content: bytes, words: tuple[str]
) -> None:
    """A spec file that is not UTF-8 is refused in one line naming the file and the byte."""
    path = tmp_path / "latin1.toml"
    path.write_bytes(content)
    with pytest.raises(SpecError) as caught:
        load_spec(path)
    assert caught.value.path == str(path)
    for word in words:
        assert word in str(caught.value)


def test_a_50_mb_file_is_refused_before_it_is_read(tmp_path: Path) -> None:
    """A 50 MB spec is refused naming the file and the maximum, reading at most the maximum."""
    path = tmp_path / "huge.toml"
    with path.open("wb") as file:
        file.truncate(50 * 2**20)  # sparse: nothing to write, but 50 MB to read
    with pytest.raises(SpecError) as caught:
        read_spec_text(path)
    assert caught.value.path == str(path)
    assert "larger than the maximum of 4 MiB" in str(caught.value)


def test_a_large_text_is_refused_before_it_is_parsed() -> None:
    """Spec text over the maximum (as the coordinator receives it) is refused by its size."""
    with pytest.raises(SpecError, match="larger than the maximum of 4 MiB"):
        parse_spec("#" * (limits.MAX_SPEC_BYTES + 1), fmt="toml", source=SOURCE)
    # Characters that take two bytes count as two.
    with pytest.raises(SpecError, match="larger than the maximum of 4 MiB"):
        parse_spec("#" + "é" * (limits.MAX_SPEC_BYTES // 2), fmt="toml", source=SOURCE)


def test_a_deep_json_spec_is_refused_in_one_line() -> None:
    """JSON nested 100,000 levels deep is refused naming the file (no RecursionError)."""
    deep = '{"jobs": [{"name": "a", "command": ["x"], "metadata": {"a": '
    deep += "[" * DEEP + "]" * DEEP + "}}]}"
    with pytest.raises(SpecError, match=r"^deep\.json: nested more than 32 levels deep"):
        parse_spec(deep, fmt="json", source="deep.json")


def test_an_unknown_field_of_any_length_stays_one_short_line() -> None:
    """An unknown field named by a 100,000-character key is shown cut short."""
    with pytest.raises(SpecError) as caught:
        parse_spec(JOB + f"{'k' * 100_000} = 1\n", fmt="toml", source=SOURCE)
    assert len(str(caught.value)) < 400


@pytest.mark.parametrize(
    ("template", "values", "limit", "size"),
    [
        ("render {frame:04d}", {"frame": 7}, 100, len("render 0007")),
        ("{job}-{task}", {"job": "shot", "task": "é"}, 100, len("shot-é".encode())),
        ("{frame:>50}", {"frame": 1}, 100, 50),
        ("{frame:>20000000}", {"frame": 1}, 100, 101),  # refused from its digits
        ("x" * 200 + "{frame}" + "y" * 1000, {"frame": 1}, 100, 201),  # stops once over
        ("{{literal}}", {}, 100, len("{literal}")),
    ],
)
def test_expanded_size(template: str, values: dict[str, object], limit: int, size: int) -> None:
    """The expanded size is exact up to the limit, and above it no larger string is built."""
    assert limits.expanded_size(template, values, limit=limit) == size


CPU = Resources.of(cores=16, memory="64GiB")
GPU = Resources.of(cores=8, memory="32GiB", gpus=2, gpu_memory="24GiB")


@pytest.mark.parametrize(
    ("request_", "nodes", "reason"),
    [
        (Resources.of(cores=5000), {}, "held until a node that fits joins: needs 5000 cores"),
        (Resources.of(cores=1), {}, "the farm has no nodes yet"),
        (Resources.of(cores=8), {"cpu": CPU}, None),
        (Resources.of(cores=4, gpus=1), {"cpu": CPU, "gpu": GPU}, None),
        (
            Resources.of(cores=64),
            {"cpu": CPU, "gpu": GPU},
            "the largest node, gpu, lacks cores: needs 64, has 8",
        ),
        (
            Resources.of(cores=64, memory="128GiB"),
            {"cpu": CPU},
            "no node could ever fit it: needs 64 cores, 128GiB memory; the largest node, cpu, "
            "lacks cores: needs 64, has 16; memory: needs 128GiB, has 64GiB",
        ),
        (
            Resources.of(cores=1, counters={"nuke": 1}),
            {"b": CPU, "a": CPU},
            "the largest node, a, lacks nuke: needs 1, has 0",
        ),
    ],
)
def test_never_fits(request_: Resources, nodes: dict[str, Resources], reason: str | None) -> None:
    """Work is held before any node joins; with nodes, the largest one names the shortfall."""
    result = never_fits(request_, nodes)
    if reason is None:
        assert result is None
    else:
        assert result is not None
        assert reason in result


def test_the_readme_lists_every_limit() -> None:
    """The README's limits table shows every bound as the code has it."""
    readme = (Path(__file__).parents[2] / "README.md").read_text()
    for field, maximum in limits.LIMITS:
        assert f"| {field} | {maximum} |" in readme, (field, maximum)
