"""The bounds of a job spec: the largest value every field may take, and the measures
(nesting depth, expanded command size) that the spec loader checks against them.

A spec is input from outside: a typo (``backoff = "99999999999999d"``, ``cores = 1e12``,
``{frame:>20000000}``) must be refused at submission with the file and the field, not accepted
and then wedge a job actor, overflow a date, or build an argv no ``exec`` can take.  The
maxima are generous for real farms (a 30-day backoff, a year-long attempt, a million cores)
and small enough that every derived quantity (a datetime, a SQLite or msgpack integer, a
process's argument list, a wire frame) stays representable.

``LIMITS`` lists them for the README (a test keeps the two in step).
"""

from __future__ import annotations

import re
import string
from collections.abc import Iterator, Mapping
from typing import Final

__all__ = [
    "LIMITS",
    "MAX_ARGS",
    "MAX_ARG_BYTES",
    "MAX_ATTEMPTS",
    "MAX_BACKOFF",
    "MAX_BACKOFF_FACTOR",
    "MAX_CORES",
    "MAX_COUNTER",
    "MAX_COUNTERS",
    "MAX_DEPENDENCIES",
    "MAX_ENV_VARS",
    "MAX_FRAMES",
    "MAX_FRAME_NUMBER",
    "MAX_GANG_NODES",
    "MAX_GPUS",
    "MAX_GPU_MEMORY",
    "MAX_JOBS",
    "MAX_LABELS",
    "MAX_LABEL_LENGTH",
    "MAX_MEMORY",
    "MAX_METADATA_BYTES",
    "MAX_PATH_BYTES",
    "MAX_PROCESS_BYTES",
    "MAX_RUNTIME",
    "MAX_SCRATCH",
    "MAX_SEQUENCE_BYTES",
    "MAX_SPEC_BYTES",
    "MAX_SPEC_DEPTH",
    "MAX_STALL",
    "MAX_TASKS",
    "MAX_TASKS_PER_FILE",
    "MAX_VALUE_TEXT",
    "WORST_ATTEMPT",
    "expanded_size",
    "format_duration",
    "largest_format_number",
    "nesting_depth",
    "shown",
]

_KiB: Final = 1024
_MiB: Final = 1024 * _KiB
_TiB: Final = 1024**4
_PiB: Final = 1024**5
_DAY: Final = 86_400.0

# -- the file -------------------------------------------------------------------------------------
MAX_SPEC_BYTES: Final = 4 * _MiB  # one spec file (it travels in one 16 MiB wire frame)
MAX_SPEC_DEPTH: Final = 32  # nested tables and lists, metadata included
MAX_JOBS: Final = 1_000  # jobs in one file
MAX_TASKS_PER_FILE: Final = 1_000_000  # tasks of all its jobs together
MAX_VALUE_TEXT: Final = 64  # characters of a duration, size, core count or frame range

# -- a job ---------------------------------------------------------------------------------------
MAX_TASKS: Final = 100_000  # tasks in one job
MAX_FRAMES: Final = 1_000_000  # frames in one range (and the largest chunk)
MAX_FRAME_NUMBER: Final = 1_000_000_000  # |frame| (frame numbers are 64-bit everywhere else)
MAX_DEPENDENCIES: Final = 10_000  # depends_on entries of a job, and of each task
MAX_LABELS: Final = 64
MAX_GANG_NODES: Final = 4_096  # nodes one multi-node task runs on at once
MAX_LABEL_LENGTH: Final = 200
MAX_METADATA_BYTES: Final = 64 * _KiB  # the metadata table, as JSON

# -- retries and timeouts (seconds) ------------------------------------------------------------
MAX_ATTEMPTS: Final = 1_000
MAX_BACKOFF: Final = 30 * _DAY  # backoff and max_backoff
MAX_BACKOFF_FACTOR: Final = 100.0
MAX_RUNTIME: Final = 366 * _DAY  # one attempt (long simulations checkpoint and resume)
MAX_STALL: Final = 30 * _DAY
MAX_CHECKPOINT_WARNING: Final = MAX_RUNTIME  # before max_runtime or a planned drain
MAX_CHECKPOINT_RETENTION: Final = (
    20  # checkpoints kept per task (their manifests travel with each attempt)
)

# -- resources (one task's request) -------------------------------------------------------------
MAX_CORES: Final = 1_000_000
MAX_MEMORY: Final = _PiB
MAX_SCRATCH: Final = _PiB
MAX_GPUS: Final = 10_000
MAX_GPU_MEMORY: Final = _TiB  # per GPU
MAX_COUNTERS: Final = 64  # named counters in one request
MAX_COUNTER: Final = 1_000_000  # one counter's count

# -- commands, as expanded for one attempt --------------------------------------------------------
MAX_ARGS: Final = 4_096  # arguments of a command template
MAX_ENV_VARS: Final = 1_024  # variables of a job's (or a task's) env
# Linux refuses a single argument or environment string above 32 pages (MAX_ARG_STRLEN).
MAX_ARG_BYTES: Final = 128 * _KiB
# argv and env of one process together (Linux allows 2 MiB with the default stack limit).
MAX_PROCESS_BYTES: Final = 1 * _MiB
# A task that runs one process per frame travels to its agent as one argument (a JSON list of
# its argvs, see ``FRAME_SEQUENCE``), so the whole sequence obeys the per-argument limit.
MAX_SEQUENCE_BYTES: Final = MAX_ARG_BYTES
MAX_PATH_BYTES: Final = 4_096  # cwd and output, expanded (PATH_MAX)
# The attempt number a bound assumes: attempts beyond max_attempts exist (preemptions and lost
# nodes requeue without counting a failure), but never a million of them.
WORST_ATTEMPT: Final = 999_999


def format_duration(seconds: float) -> str:
    """Render a whole number of days, hours, minutes or seconds compactly (``30d``, ``90s``)."""
    for unit, size in (("d", _DAY), ("h", 3600.0), ("m", 60.0)):
        if seconds >= size and seconds % size == 0:
            return f"{int(seconds // size)}{unit}"
    return f"{seconds:g}s"


def _size(value: int) -> str:
    for unit, size in (("PiB", _PiB), ("TiB", _TiB), ("MiB", _MiB), ("KiB", _KiB)):
        if value >= size and value % size == 0:
            return f"{value // size} {unit}"
    return f"{value:,} bytes"


#: Every bound, as the README's table shows it: (field, maximum).
LIMITS: Final[tuple[tuple[str, str], ...]] = (
    ("the spec file", f"{_size(MAX_SPEC_BYTES)}, nested at most {MAX_SPEC_DEPTH} levels deep"),
    ("`jobs`", f"{MAX_JOBS:,} per file, {MAX_TASKS_PER_FILE:,} tasks per file in all"),
    ("`tasks`", f"{MAX_TASKS:,} per job (explicit, or frames cut into chunks)"),
    ("`nodes`", f"{MAX_GANG_NODES:,} nodes for one multi-node task"),
    ("`frames`", f"{MAX_FRAMES:,} frames per range, frame numbers within ±{MAX_FRAME_NUMBER:,}"),
    ("`chunk`", f"{MAX_FRAMES:,}"),
    ("`depends_on`", f"{MAX_DEPENDENCIES:,} entries per job and per task"),
    ("`labels`", f"{MAX_LABELS} per job, {MAX_LABEL_LENGTH} characters each"),
    ("`metadata`", f"{_size(MAX_METADATA_BYTES)} as JSON"),
    ("`retries.max_attempts`", f"{MAX_ATTEMPTS:,}"),
    ("`retries.backoff`, `retries.max_backoff`", format_duration(MAX_BACKOFF)),
    ("`retries.backoff_factor`", f"{MAX_BACKOFF_FACTOR:g}"),
    ("`timeouts.max_runtime`", format_duration(MAX_RUNTIME)),
    ("`timeouts.stall`", format_duration(MAX_STALL)),
    ("`checkpoint_warning`", f"{format_duration(MAX_CHECKPOINT_WARNING)}, below `max_runtime`"),
    ("`checkpoint_retention`", f"{MAX_CHECKPOINT_RETENTION} checkpoints per task"),
    ("`resources.cores`", f"{MAX_CORES:,}"),
    ("`resources.memory`, `resources.scratch`", _size(MAX_MEMORY)),
    ("`resources.gpus`", f"{MAX_GPUS:,}"),
    ("`resources.gpu_memory`", f"{_size(MAX_GPU_MEMORY)} (per GPU)"),
    ("`resources.counters`", f"{MAX_COUNTERS} names, {MAX_COUNTER:,} each"),
    ("`command`", f"{MAX_ARGS:,} arguments"),
    ("`env`", f"{MAX_ENV_VARS:,} variables (names without `=`)"),
    (
        "expanded argument or env entry",
        f"{_size(MAX_ARG_BYTES)} (placeholders and format widths included)",
    ),
    ("expanded process (argv + env)", _size(MAX_PROCESS_BYTES)),
    ("a task's frame sequence (one process per frame)", f"{_size(MAX_SEQUENCE_BYTES)} in all"),
    ("`cwd`, `output` (expanded)", f"{MAX_PATH_BYTES:,} bytes"),
    ("a duration, size, core count or frame range as text", f"{MAX_VALUE_TEXT} characters"),
)


def shown(value: object, *, limit: int = 40) -> str:
    """Return a value for an error message: a string as written, a number compactly, anything
    long cut short (an error must stay one readable line)."""
    if isinstance(value, float):
        text = f"{value:g}"
    elif isinstance(value, int) and not isinstance(value, bool):
        text = str(value) if value.bit_length() < 128 else f"{float(value):g}"
    else:
        text = str(value)
    text = text.replace("\n", "\\n")
    return text if len(text) <= limit else text[: limit - 3] + "..."


def nesting_depth(value: object) -> int:
    """Return how deeply lists and dicts nest in ``value`` (a scalar is 0), without recursion
    (the value may be deeper than Python's stack)."""
    deepest = 0
    stack: list[tuple[object, int]] = [(value, 0)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict):
            children: Iterator[object] = iter(item.values())
        elif isinstance(item, list | tuple):
            children = iter(item)
        else:
            continue
        depth += 1
        deepest = max(deepest, depth)
        if deepest > MAX_SPEC_DEPTH:
            return deepest  # deep enough to refuse: do not walk the rest
        stack.extend((child, depth) for child in children)
    return deepest


# [[fill]align][sign][z][#][0][width][grouping][.precision][type]
_FORMAT_SPEC: Final = re.compile(
    r"(?:.?[<>=^])?[-+ ]?z?#?0?(?P<width>\d*)[,_]?(?:\.(?P<precision>\d+))?[a-zA-Z%]?", re.DOTALL
)


def largest_format_number(spec: str) -> int:
    """Return the larger of a format spec's width and precision (0 when it has neither): what
    formatting may pad or extend a value to, checked before anything is formatted."""
    match = _FORMAT_SPEC.fullmatch(spec)
    if match is None:
        return 0  # not a valid spec: ``format`` refuses it without building anything
    numbers = [match.group("width"), match.group("precision")]
    # Digits are counted, not converted: a width of a million digits costs nothing here.
    if any(n and len(n) > 12 for n in numbers):
        return 10**12
    return max((int(n) for n in numbers if n), default=0)


def expanded_size(template: str, values: Mapping[str, object], *, limit: int) -> int:
    """Return the size in bytes (UTF-8) of ``template`` rendered with ``values``, or a number
    above ``limit`` as soon as the rendering would exceed it.

    Nothing larger than ``limit`` (plus one placeholder's worth, itself at most ``limit``) is
    ever built: a width such as ``{frame:>20000000}`` is refused from its digits.
    """
    total = 0
    for literal, name, spec, _ in string.Formatter().parse(template):
        total += len(literal.encode("utf-8", "surrogatepass"))
        if name is not None:
            if largest_format_number(spec or "") > limit:
                return limit + 1
            total += len(format(values[name], spec or "").encode("utf-8", "surrogatepass"))
        if total > limit:
            return total
    return total
