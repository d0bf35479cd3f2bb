"""What this host is: its name, cores, memory and scratch space, and valid node labels."""

from __future__ import annotations

import os
import re
import shutil
import socket

from actors._errors import ResourceError
from actors.engine import Resources, parse_cores, parse_size
from runtime import (
    ConfigurationError,
)

__all__ = ["check_label", "default_name", "detect_resources"]

_LABEL_PATTERN = r"^[A-Za-z0-9_.@:=/-]+$"


def check_label(label: str, *, where: str) -> str:
    """Return ``label`` if it is a valid node label.

    Raises:
        ConfigurationError: it is empty or has characters other than letters, digits and
            ``_.@:=/-``.
    """
    if not re.fullmatch(_LABEL_PATTERN, label) or len(label) > 200:
        raise ConfigurationError(
            f"{label!r} is not a valid label (letters, digits and _.@:=/- only)", where=where
        )
    return label


def default_name() -> str:
    """Return this host's name, made valid as a node name."""
    name = re.sub(r"[^A-Za-z0-9_.@:-]", "-", socket.gethostname())[:200]
    return name or "agent"


def _detected_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def _detected_memory() -> int:
    try:
        with open("/proc/meminfo", encoding="ascii") as meminfo:
            for line in meminfo:
                if line.startswith("MemTotal:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 0


def detect_resources(
    work_dir: str | os.PathLike[str],
    *,
    cores: str | float | None = None,
    memory: str | int | None = None,
    gpus: int | None = None,
    gpu_memory: str | int | None = None,
    scratch: str | int | None = None,
) -> Resources:
    """Return this host's capacity: detected, or as given for each quantity that is not None.

    Cores come from the CPU affinity mask (``os.cpu_count()`` without one), memory from
    ``/proc/meminfo``, scratch from the free space of ``work_dir``'s file system; GPUs are
    never guessed (0 unless given).  The errors name the command-line flag of the quantity.

    Raises:
        ConfigurationError: a given quantity cannot be parsed or is negative, or the free space
            of ``work_dir`` cannot be read.
    """
    try:
        millicores = parse_cores(cores) if cores is not None else _detected_cores() * 1000
    except ResourceError as error:
        raise ConfigurationError(str(error), where="--cores") from None
    if millicores <= 0:
        raise ConfigurationError("must be more than 0", where="--cores")
    values: dict[str, int] = {}
    for flag, given in (("memory", memory), ("gpu_memory", gpu_memory), ("scratch", scratch)):
        if given is None:
            continue
        try:
            values[flag] = parse_size(given, what=flag)
        except ResourceError as error:
            where = "--" + flag.replace("_", "-")
            raise ConfigurationError(str(error), where=where) from None
    if gpus is not None and (isinstance(gpus, bool) or not isinstance(gpus, int) or gpus < 0):
        raise ConfigurationError(f"must be a whole number >= 0, got {gpus!r}", where="--gpus")
    if "scratch" not in values:
        try:
            values["scratch"] = shutil.disk_usage(work_dir).free
        except OSError as error:
            raise ConfigurationError(
                f"cannot read the free space: {error.strerror}", where="--work-dir"
            ) from None
    return Resources(
        millicores=millicores,
        memory=values.get("memory", _detected_memory()),
        gpus=gpus or 0,
        gpu_memory=values.get("gpu_memory", 0),
        scratch=values["scratch"],
    )
