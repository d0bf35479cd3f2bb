"""``taskfarm bench SUITE...``: run benchmark suites and print their tables."""

from __future__ import annotations

import argparse
import sys
import tempfile
from importlib.metadata import entry_points
from pathlib import Path

from ._bench import BenchContext, Figure, Suite, format_table
from ._errors import ConfigurationError

__all__ = ["configure"]

# `taskfarm bench runtime` is the foundation's benchmark: the kernel and the journal together.
_GROUPS = {"runtime": ("kernel", "journal")}


def configure(parser: argparse.ArgumentParser) -> None:
    """Add the bench command's arguments."""
    parser.add_argument(
        "suites", nargs="+", metavar="SUITE", help="what to measure: " + ", ".join(_names())
    )
    parser.add_argument(
        "--quick", action="store_true", help="smaller sizes (a smoke run, not a measurement)"
    )
    parser.set_defaults(handler=run)


def _names() -> list[str]:
    return sorted({ep.name for ep in entry_points(group="taskfarm.benchmarks")} | set(_GROUPS))


async def run(args: argparse.Namespace) -> int:
    """Run the named suites and print one table."""
    available = {ep.name: ep for ep in entry_points(group="taskfarm.benchmarks")}
    wanted: list[str] = []
    for name in args.suites:
        for member in _GROUPS.get(name, (name,)):
            if member not in available:
                raise ConfigurationError(
                    f"unknown suite {name!r}; choose from {', '.join(_names())}", where="bench"
                )
            if member not in wanted:
                wanted.append(member)
    figures: list[Figure] = []
    with tempfile.TemporaryDirectory(prefix="taskfarm-bench-") as workdir:
        context = BenchContext(workdir=Path(workdir), quick=args.quick, progress=_progress)
        for name in wanted:
            suite: Suite = available[name].load()
            _progress(f"suite {name}")
            figures.extend(await suite(context))
    print(format_table(figures))
    return 0


def _progress(message: str) -> None:
    print(f"  .. {message}", file=sys.stderr, flush=True)
