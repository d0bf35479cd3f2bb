"""Multi-dimensional resources: quantities, fitting, shape buckets, fit scores and pools.

Units are integers so that allocating and freeing never drifts:

- ``millicores``: CPU in thousandths of a core (``"1500m"`` and ``1.5`` are both 1500), so
  fractional HPC requests add up exactly;
- ``memory``, ``scratch``: bytes;
- ``gpus``: whole devices;
- ``gpu_memory``: bytes *per device*. It is a property of a node's GPUs that a request is matched
  against (each GPU it gets must have at least this much), not a quantity that is consumed:
  ``subtract`` and ``add`` carry the free side's value through unchanged;
- ``counters``: named integer counters (software licences, tickets), held canonically as pairs
  sorted by name with zero counts dropped, so equal resources compare and hash equal.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from decimal import Decimal, InvalidOperation
from typing import Annotated, Final

import msgspec

from actors._errors import ResourceError

__all__ = [
    "DEFAULT_FIT_WEIGHTS",
    "DIMENSIONS",
    "Overprovisioning",
    "ResourcePool",
    "Resources",
    "Shortfall",
    "add",
    "fit_score",
    "fits",
    "format_size",
    "overprovisioning",
    "parse_cores",
    "parse_size",
    "shape_key",
    "shortfall",
    "subtract",
]

NonNegative = Annotated[int, msgspec.Meta(ge=0)]

# Quantities are stored in SQLite and msgpack, both of which top out at a signed 64-bit integer.
_MAX: Final = 2**63 - 1

#: The scalar dimensions, in display order (counters come after them, by name).
DIMENSIONS: Final = ("millicores", "memory", "gpus", "gpu_memory", "scratch")


class Resources(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    """An immutable resource vector: a request, a node's capacity or its free part.

    Every quantity is a non-negative ``int`` (see the module docstring for units); the
    constructor checks this because msgspec validates types only when decoding.

    Raises:
        ResourceError: a quantity is negative, not an integer, or a counter name repeats.
    """

    millicores: NonNegative = 0
    memory: NonNegative = 0
    gpus: NonNegative = 0
    gpu_memory: NonNegative = 0
    scratch: NonNegative = 0
    counters: tuple[tuple[str, NonNegative], ...] = ()

    def __post_init__(self) -> None:
        for dim in DIMENSIONS:
            _check_quantity(getattr(self, dim), dim)
        if self.counters:
            canonical = _canonical_counters(self.counters)
            if canonical != self.counters:
                msgspec.structs.force_setattr(self, "counters", canonical)

    @classmethod
    def of(
        cls,
        *,
        cores: int | float | str = 0,
        memory: int | str = 0,
        gpus: int = 0,
        gpu_memory: int | str = 0,
        scratch: int | str = 0,
        counters: Mapping[str, int] | None = None,
    ) -> Resources:
        """Build resources from human quantities (``cores="1500m"``, ``memory="16GiB"``).

        Raises:
            ResourceError: a quantity cannot be parsed or is negative.
        """
        return cls(
            millicores=parse_cores(cores),
            memory=parse_size(memory, what="memory"),
            gpus=_check_quantity(gpus, "gpus"),
            gpu_memory=parse_size(gpu_memory, what="gpu_memory"),
            scratch=parse_size(scratch, what="scratch"),
            counters=tuple((counters or {}).items()),
        )

    @property
    def cores(self) -> float:
        """CPU in cores, for display (computations use ``millicores``)."""
        return self.millicores / 1000

    def counter(self, name: str) -> int:
        """Return the count of the named counter (0 when absent)."""
        for key, value in self.counters:
            if key == name:
                return value
        return 0

    def counters_dict(self) -> dict[str, int]:
        """Return the counters as a new dict (sorted by name)."""
        return dict(self.counters)

    def is_zero(self) -> bool:
        """Return True when every quantity is zero."""
        return (
            not (self.millicores or self.memory or self.gpus or self.gpu_memory or self.scratch)
            and not self.counters
        )

    def __str__(self) -> str:
        parts: list[str] = []
        if self.millicores:
            parts.append(f"{_format_cores(self.millicores)} cores")
        if self.memory:
            parts.append(f"{format_size(self.memory)} memory")
        if self.gpus:
            per = f" ({format_size(self.gpu_memory)} each)" if self.gpu_memory else ""
            parts.append(f"{self.gpus} gpu{'s' if self.gpus != 1 else ''}{per}")
        elif self.gpu_memory:
            parts.append(f"{format_size(self.gpu_memory)} gpu_memory")
        if self.scratch:
            parts.append(f"{format_size(self.scratch)} scratch")
        parts.extend(f"{name}={count}" for name, count in self.counters)
        return ", ".join(parts) or "nothing"


class Shortfall(msgspec.Struct, frozen=True, kw_only=True):
    """One dimension in which a request does not fit: what it asks for and what is there."""

    dimension: str
    requested: int
    available: int

    def __str__(self) -> str:
        if self.dimension in ("memory", "scratch", "gpu_memory"):
            req, avail = format_size(self.requested), format_size(self.available)
        elif self.dimension == "millicores":
            req, avail = _format_cores(self.requested), _format_cores(self.available)
            return f"cores: needs {req}, has {avail}"
        else:
            req, avail = str(self.requested), str(self.available)
        return f"{self.dimension}: needs {req}, has {avail}"


class Overprovisioning(msgspec.Struct, frozen=True, kw_only=True):
    """The share of each capacity dimension a request leaves unused, each in ``[0, 1]``.

    A dimension the node does not have is 0.0 (nothing is wasted). ``gpu_memory`` is 1.0 when a
    GPU node runs a request without GPUs, and 0.0 when the request names no GPU memory.
    """

    millicores: float
    memory: float
    gpus: float
    gpu_memory: float
    scratch: float


#: Default weights of ``fit_score``: GPUs are the scarce dimension, scratch the cheapest.
DEFAULT_FIT_WEIGHTS: Final[Mapping[str, float]] = {
    "millicores": 1.0,
    "memory": 1.0,
    "gpus": 4.0,
    "gpu_memory": 1.0,
    "scratch": 0.5,
}


def fits(request: Resources, free: Resources) -> bool:
    """Return True when ``request`` fits in ``free`` in every dimension.

    ``gpu_memory`` is checked per device and only when the request asks for GPUs.
    """
    if (
        request.millicores > free.millicores
        or request.memory > free.memory
        or request.gpus > free.gpus
        or request.scratch > free.scratch
        or (request.gpus and request.gpu_memory > free.gpu_memory)
    ):
        return False
    return all(free.counter(name) >= count for name, count in request.counters)


def shortfall(request: Resources, free: Resources) -> tuple[Shortfall, ...]:
    """Return every dimension in which ``request`` does not fit ``free`` (empty when it fits).

    The order is ``DIMENSIONS`` then counters by name, so explanations are stable.
    """
    short: list[Shortfall] = []
    for dim in DIMENSIONS:
        if dim == "gpu_memory" and not request.gpus:
            continue
        req, avail = getattr(request, dim), getattr(free, dim)
        if req > avail:
            short.append(Shortfall(dimension=dim, requested=req, available=avail))
    for name, count in request.counters:
        avail = free.counter(name)
        if count > avail:
            short.append(Shortfall(dimension=name, requested=count, available=avail))
    return tuple(short)


def subtract(free: Resources, request: Resources) -> Resources:
    """Return ``free`` minus ``request`` (an allocation); ``gpu_memory`` stays ``free``'s.

    Raises:
        ResourceError: the request does not fit; ``dimension`` names the first short one.
    """
    if not fits(request, free):
        short = shortfall(request, free)
        raise ResourceError(
            f"cannot allocate {request} from {free}: {short[0]}", dimension=short[0].dimension
        )
    counters = free.counters
    if request.counters:
        left = dict(counters)
        for name, count in request.counters:
            left[name] -= count
        counters = tuple(left.items())
    # The result is non-negative by construction (it fits): no need to re-validate it, which
    # would cost more than the subtraction on placement's hot path.
    return msgspec.structs.replace(
        free,
        millicores=free.millicores - request.millicores,
        memory=free.memory - request.memory,
        gpus=free.gpus - request.gpus,
        scratch=free.scratch - request.scratch,
        counters=counters,
    )


def add(free: Resources, request: Resources, *, capacity: Resources | None = None) -> Resources:
    """Return ``free`` plus ``request`` (a release); ``gpu_memory`` stays ``free``'s.

    With ``capacity``, a result above it (a double release) is refused.

    Raises:
        ResourceError: the result would exceed ``capacity``; ``dimension`` names where.
    """
    counters = free.counters
    if request.counters:
        total = dict(counters)
        for name, count in request.counters:
            total[name] = total.get(name, 0) + count
        counters = tuple(sorted(total.items()))
    result = msgspec.structs.replace(
        free,
        millicores=free.millicores + request.millicores,
        memory=free.memory + request.memory,
        gpus=free.gpus + request.gpus,
        scratch=free.scratch + request.scratch,
        counters=counters,
    )
    # gpu_memory is per device and never summed, so ``fits`` compares the rest.
    if capacity is not None and not fits(result, capacity):
        over = shortfall(
            msgspec.structs.replace(result, gpu_memory=0),
            msgspec.structs.replace(capacity, gpu_memory=0),
        )
        raise ResourceError(
            f"releasing {request} would exceed capacity: {over[0].dimension} would be "
            f"{over[0].requested}, capacity is {over[0].available}",
            dimension=over[0].dimension,
        )
    if result.millicores > _MAX or result.memory > _MAX or result.scratch > _MAX:
        for dim in DIMENSIONS:
            _check_quantity(getattr(result, dim), dim)
    return result


# Shape buckets: four steps per doubling, so a bucket's ceiling is at most 25 % above any request
# in it, and a farm's requests fall into a few dozen buckets per dimension.
_STEPS_BITS: Final = 2  # 2**2 = 4 steps per octave


def _bucket(value: int) -> int:
    """Round ``value`` up to the next ``m * 2**k`` with ``m`` in 4..7 (exact below 8)."""
    if value <= 8:
        return value
    shift = value.bit_length() - (_STEPS_BITS + 1)
    mantissa = -(-value >> shift)  # ceil(value / 2**shift), in 4..8
    return mantissa << shift


def _bucket_millicores(millicores: int) -> int:
    """Round up to 100m below one core, else to whole cores bucketed like the rest, so that
    common whole-core requests (1-8, 10, 12, 16, 24, 32, 48, 64 ...) stay exact."""
    if millicores <= 1000:
        return -(-millicores // 100) * 100
    return _bucket(-(-millicores // 1000)) * 1000


def shape_key(request: Resources) -> Resources:
    """Return the request's shape bucket: its ceiling, a hashable ``Resources``.

    ``memory``, ``gpu_memory`` and ``scratch`` are rounded *up* to one of four steps per power
    of two (values up to 8 stay exact, so 4, 12, 16, 24, 48 GiB are exact); ``millicores``
    likewise in whole cores (100m steps below one core); ``gpus`` and counters stay exact,
    because they are small and scarce. Hence the placement index's invariant: if the key fits
    a node's free resources, so does every request with that key; requests with equal keys are
    interchangeable for the index. The allocation itself always subtracts the exact request.
    ``shape_key(shape_key(r)) == shape_key(r)``.
    """
    return Resources(
        millicores=_bucket_millicores(request.millicores),
        memory=_bucket(request.memory),
        gpus=request.gpus,
        gpu_memory=_bucket(request.gpu_memory) if request.gpus else 0,
        scratch=_bucket(request.scratch),
        counters=request.counters,
    )


def overprovisioning(request: Resources, capacity: Resources) -> Overprovisioning:
    """Return, per dimension, the share of ``capacity`` that ``request`` leaves unused.

    Raises:
        ResourceError: ``request`` does not fit ``capacity``.
    """
    short = shortfall(request, capacity)
    if short:
        raise ResourceError(
            f"{request} does not fit {capacity}: {short[0]}", dimension=short[0].dimension
        )

    def unused(req: int, cap: int) -> float:
        return 1.0 - req / cap if cap else 0.0

    if not capacity.gpus:
        gpu_memory = 0.0
    elif not request.gpus:
        gpu_memory = 1.0 if capacity.gpu_memory else 0.0
    elif request.gpu_memory:
        gpu_memory = unused(request.gpu_memory, capacity.gpu_memory)
    else:
        gpu_memory = 0.0
    return Overprovisioning(
        millicores=unused(request.millicores, capacity.millicores),
        memory=unused(request.memory, capacity.memory),
        gpus=unused(request.gpus, capacity.gpus),
        gpu_memory=gpu_memory,
        scratch=unused(request.scratch, capacity.scratch),
    )


def fit_score(
    request: Resources, capacity: Resources, *, weights: Mapping[str, float] | None = None
) -> float:
    """Return how snugly ``request`` fits a node, from 0.0 (all wasted) to 1.0 (exact fit).

    The score is one minus the weighted mean of ``overprovisioning`` over the dimensions the
    node has (capacity above zero), so a small CPU job on a big GPU node scores low.

    Raises:
        ResourceError: ``request`` does not fit ``capacity``, or a weight names an unknown
            dimension or is negative.
    """
    weights = DEFAULT_FIT_WEIGHTS if weights is None else weights
    for dim, weight in weights.items():
        if dim not in DIMENSIONS:
            raise ResourceError(f"unknown fit weight dimension {dim!r}", dimension=dim)
        if weight < 0:
            raise ResourceError(f"fit weight {dim}={weight} is negative", dimension=dim)
    over = overprovisioning(request, capacity)
    total = wasted = 0.0
    for dim in DIMENSIONS:
        if dim == "gpu_memory":
            present = bool(capacity.gpus and capacity.gpu_memory)
        else:
            present = bool(getattr(capacity, dim))
        if not present:
            continue
        weight = weights.get(dim, 0.0)
        total += weight
        wasted += weight * getattr(over, dim)
    return 1.0 - wasted / total if total else 1.0


class ResourcePool:
    """Pool-wide named counters (licences shared across nodes), held per holder.

    Each holder (an attempt id) holds one acquisition at a time, so releasing is idempotent: a
    duplicate completion report cannot free a licence twice, and the count in use never goes
    below zero or above the limit. Rebuild it by replaying acquisitions and releases in journal
    order.
    """

    def __init__(self, limits: Mapping[str, int]) -> None:
        """Create a pool with a limit per counter name.

        Raises:
            ResourceError: a limit is negative or not an integer.
        """
        self._limits: dict[str, int] = {}
        self._used: dict[str, int] = {}
        self._holders: dict[str, dict[str, int]] = {}
        for name, limit in sorted(limits.items()):
            self.set_limit(name, limit)

    @property
    def limits(self) -> dict[str, int]:
        """The limit per counter name (a copy, sorted by name)."""
        return dict(self._limits)

    def manages(self, name: str) -> bool:
        """Return True when the pool has a limit for ``name``."""
        return name in self._limits

    def in_use(self, name: str) -> int:
        """Return how many of ``name`` are held."""
        return self._used.get(name, 0)

    def available(self, name: str) -> int:
        """Return how many of ``name`` can still be acquired (0 when the limit was lowered)."""
        return max(0, self._limits.get(name, 0) - self._used.get(name, 0))

    def held_by(self, holder: str) -> dict[str, int]:
        """Return what ``holder`` holds (empty when nothing)."""
        return dict(self._holders.get(holder, {}))

    def holders(self) -> tuple[str, ...]:
        """Return the holders, sorted."""
        return tuple(sorted(self._holders))

    def set_limit(self, name: str, limit: int) -> None:
        """Set the limit of ``name``; lowering it below what is held blocks new acquisitions
        until enough is released (nothing held is revoked).

        Raises:
            ResourceError: the limit is negative or not an integer.
        """
        self._limits[name] = _check_quantity(limit, name)
        self._limits = dict(sorted(self._limits.items()))

    def split(self, request: Resources) -> tuple[Resources, dict[str, int]]:
        """Split ``request`` into its node part and the counters this pool manages."""
        node: list[tuple[str, int]] = []
        pool: dict[str, int] = {}
        for name, count in request.counters:
            if name in self._limits:
                pool[name] = count
            else:
                node.append((name, count))
        return msgspec.structs.replace(request, counters=tuple(node)), pool

    def can_acquire(self, counters: Mapping[str, int]) -> bool:
        """Return True when every counter in ``counters`` is available now.

        Raises:
            ResourceError: a counter is unknown to the pool or a count is negative.
        """
        return all(self.available(n) >= c for n, c in self._checked(counters).items())

    def try_acquire(self, holder: str, counters: Mapping[str, int]) -> bool:
        """Acquire all of ``counters`` for ``holder``, or nothing; return whether it did.

        Raises:
            ResourceError: ``holder`` already holds an acquisition, a counter is unknown to the
                pool, or a count is negative.
        """
        wanted = self._checked(counters)
        if holder in self._holders:
            raise ResourceError(f"{holder!r} already holds {self._holders[holder]}")
        if any(self.available(name) < count for name, count in wanted.items()):
            return False
        for name, count in wanted.items():
            self._used[name] = self._used.get(name, 0) + count
        self._holders[holder] = wanted
        return True

    def release(self, holder: str) -> bool:
        """Release what ``holder`` holds; return False (and do nothing) when it holds nothing."""
        held = self._holders.pop(holder, None)
        if held is None:
            return False
        for name, count in held.items():
            self._used[name] -= count
        return True

    def _checked(self, counters: Mapping[str, int]) -> dict[str, int]:
        wanted: dict[str, int] = {}
        for name, count in sorted(counters.items()):
            if name not in self._limits:
                raise ResourceError(f"the pool has no counter {name!r}", dimension=name)
            if _check_quantity(count, name):
                wanted[name] = count
        return wanted


# --- human quantities --------------------------------------------------------------------------

_SIZE_RE: Final = re.compile(r"\s*(\d+(?:\.\d*)?|\.\d+)\s*([A-Za-z]*)\s*")
_SIZE_UNITS: Final[Mapping[str, int]] = {
    "": 1,
    "b": 1,
    **{f"{p}b": 1000 ** (i + 1) for i, p in enumerate("kmgtpe")},
    **{f"{p}ib": 1024 ** (i + 1) for i, p in enumerate("kmgtpe")},
    **{f"{p}i": 1024 ** (i + 1) for i, p in enumerate("kmgtpe")},
}


def parse_size(value: int | str, *, what: str = "size") -> int:
    """Parse a byte size: an int (bytes) or a string such as ``"16GiB"``, ``"512MiB"``,
    ``"1.5TB"`` or ``"4096"``.

    Binary units are ``KiB``/``Ki`` (1024) up to ``EiB``; decimal units are ``KB`` (1000) up to
    ``EB``; case does not matter. A bare ``"16G"`` is refused as ambiguous (Slurm reads it as
    GiB, Kubernetes as GB).

    Raises:
        ResourceError: the value is negative, not a whole number of bytes, too large, or not a
            size; ``dimension`` is ``what``.
    """
    if isinstance(value, bool) or not isinstance(value, int | str):
        raise ResourceError(
            f"{what}: expected a size like '16GiB' or a number of bytes, got {value!r}",
            dimension=what,
        )
    if isinstance(value, int):
        return _check_quantity(value, what)
    match = _SIZE_RE.fullmatch(value)
    if match is None:
        problem = "must not be negative" if value.strip().startswith("-") else "is not a size"
        raise ResourceError(
            f"{what}: {value!r} {problem} (expected e.g. '16GiB', '512MiB', '2TB')",
            dimension=what,
        )
    number, unit = match.groups()
    factor = _SIZE_UNITS.get(unit.lower())
    if factor is None:
        hint = (
            f" (ambiguous: write '{unit.upper()}iB' for 1024-based or '{unit.upper()}B' "
            "for 1000-based)"
            if unit.lower() in ("k", "m", "g", "t", "p", "e")
            else " (expected B, KiB, MiB, GiB, TiB, KB, MB, GB or TB)"
        )
        raise ResourceError(f"{what}: unknown unit {unit!r} in {value!r}{hint}", dimension=what)
    total = Decimal(number) * factor
    if total != total.to_integral_value():
        raise ResourceError(f"{what}: {value!r} is not a whole number of bytes", dimension=what)
    return _check_quantity(int(total), what)


_CORES_RE: Final = re.compile(r"\s*(\d+(?:\.\d*)?|\.\d+)\s*(m?)\s*")


def parse_cores(value: int | float | str) -> int:
    """Parse a CPU quantity into millicores: ``4`` and ``"4"`` are 4000, ``0.5`` and ``"500m"``
    are 500.

    Raises:
        ResourceError: the value is negative, finer than a millicore, too large or not a
            CPU quantity (``dimension="millicores"``).
    """
    what = "cores"
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        raise ResourceError(
            f"{what}: expected a number of cores or millicores like '1500m', got {value!r}",
            dimension="millicores",
        )
    if isinstance(value, int):
        return _check_quantity(value * 1000, "millicores") if value >= 0 else _negative(what)
    if isinstance(value, float):
        if value != value or value in (float("inf"), float("-inf")):
            raise ResourceError(f"{what}: {value!r} is not a number", dimension="millicores")
        if value < 0:
            return _negative(what)
        number, unit = repr(value), ""
    else:
        match = _CORES_RE.fullmatch(value)
        if match is None:
            if value.strip().startswith("-"):
                return _negative(what)
            raise ResourceError(
                f"{what}: {value!r} is not a CPU quantity (expected e.g. '4', '0.5' or '1500m')",
                dimension="millicores",
            )
        number, unit = match.groups()
    try:
        millis = Decimal(number) * (1 if unit else 1000)
    except InvalidOperation:  # repr() of a huge float such as '1e+300'
        raise ResourceError(f"{what}: {value!r} is too large", dimension="millicores") from None
    if millis != millis.to_integral_value():
        raise ResourceError(f"{what}: {value!r} is finer than a millicore", dimension="millicores")
    return _check_quantity(int(millis), "millicores")


_BINARY_UNITS: Final = tuple(
    (u, 2 ** (10 * (6 - i))) for i, u in enumerate(("EiB", "PiB", "TiB", "GiB", "MiB", "KiB"))
)


def format_size(size: int) -> str:
    """Format a byte count with the largest binary unit that keeps it exact to one decimal."""
    for unit, factor in _BINARY_UNITS:
        if size >= factor:
            scaled = size / factor
            text = f"{scaled:.1f}".removesuffix(".0")
            return f"{text}{unit}" if float(text) * factor == size else f"{scaled:.2f}{unit}"
    return f"{size}B"


def _format_cores(millicores: int) -> str:
    return f"{millicores // 1000}" if millicores % 1000 == 0 else f"{millicores}m"


def _negative(what: str) -> int:
    raise ResourceError(f"{what}: must not be negative", dimension="millicores")


def _check_quantity(value: object, dimension: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ResourceError(f"{dimension}: expected an integer, got {value!r}", dimension=dimension)
    if value < 0:
        raise ResourceError(f"{dimension}: must not be negative, got {value}", dimension=dimension)
    if value > _MAX:
        raise ResourceError(f"{dimension}: {value} is too large", dimension=dimension)
    return value


def _canonical_counters(pairs: Iterable[tuple[str, int]]) -> tuple[tuple[str, int], ...]:
    seen: dict[str, int] = {}
    for pair in pairs:
        if not (isinstance(pair, tuple | list) and len(pair) == 2):
            raise ResourceError(f"counters: expected (name, count) pairs, got {pair!r}")
        name, count = pair
        if not isinstance(name, str) or not name:
            raise ResourceError(f"counters: a counter name must be a non-empty string: {name!r}")
        if name in seen:
            raise ResourceError(f"counters: {name!r} appears twice", dimension=name)
        seen[name] = _check_quantity(count, name)
    return tuple(sorted((n, c) for n, c in seen.items() if c))
