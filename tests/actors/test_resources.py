"""Resources: parsing, fitting, allocation, shape buckets, fit scores and pools."""

from __future__ import annotations

import itertools

import msgspec
import pytest

from actors import (
    ResourceError,
    ResourcePool,
    Resources,
    fit_score,
    fits,
    format_size,
    overprovisioning,
    parse_cores,
    parse_size,
    shape_key,
    shortfall,
)
from actors.engine import add, subtract

GiB = 2**30
MiB = 2**20


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("16GiB", 16 * GiB),
        ("512MiB", 512 * MiB),
        ("512 mib", 512 * MiB),
        ("1.5GiB", 3 * GiB // 2),
        ("2Gi", 2 * GiB),
        ("1TB", 10**12),
        ("4096", 4096),
        ("10B", 10),
        (0, 0),
        (123, 123),
    ],
)
def test_parse_size_accepts(text: int | str, expected: int) -> None:
    """Human sizes parse to exact bytes, binary and decimal units alike."""
    assert parse_size(text) == expected


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("16G", "ambiguous"),
        ("-1GiB", "must not be negative"),
        (-5, "must not be negative"),
        ("1.5B", "whole number"),
        ("lots", "is not a size"),
        ("3 parsecs", "unknown unit"),
        ("99999EiB", "too large"),
        (True, "expected a size"),
    ],
)
def test_parse_size_rejects(value: int | str, message: str) -> None:
    """Bad sizes raise ResourceError saying what is wrong."""
    with pytest.raises(ResourceError, match=message):
        parse_size(value, what="memory")


@pytest.mark.parametrize(
    ("value", "expected"),
    [(4, 4000), ("4", 4000), (0.5, 500), ("0.5", 500), ("1500m", 1500), ("2.25", 2250)],
)
def test_parse_cores_accepts(value: int | float | str, expected: int) -> None:
    """Cores and millicores parse to integer millicores."""
    assert parse_cores(value) == expected


@pytest.mark.parametrize(
    ("value", "message"),
    [
        (-1, "negative"),
        ("-2", "negative"),
        ("1.5m", "finer than a millicore"),
        (0.0001, "finer than a millicore"),
        ("two", "not a CPU quantity"),
        (float("nan"), "not a number"),
    ],
)
def test_parse_cores_rejects(value: int | float | str, message: str) -> None:
    """Bad CPU quantities raise ResourceError saying what is wrong."""
    with pytest.raises(ResourceError, match=message):
        parse_cores(value)


@pytest.mark.parametrize(
    "kwargs",
    [{"memory": -1}, {"gpus": -2}, {"millicores": 1.5}, {"counters": (("a", -1),)}],
)
def test_resources_reject_invalid_quantities(kwargs: dict[str, object]) -> None:
    """The constructor refuses negative or non-integer quantities."""
    with pytest.raises(ResourceError):
        Resources(**kwargs)  # type: ignore[arg-type]


def test_resources_counters_are_canonical() -> None:
    """Counters are sorted with zeros dropped, so equal resources compare and hash equal."""
    a = Resources(counters=(("nuke", 1), ("houdini", 2), ("maya", 0)))
    b = Resources.of(counters={"houdini": 2, "nuke": 1})
    assert a == b
    assert hash(a) == hash(b)
    assert a.counters == (("houdini", 2), ("nuke", 1))
    with pytest.raises(ResourceError, match="twice"):
        Resources(counters=(("a", 1), ("a", 2)))


def test_resources_round_trip_and_decode_validation() -> None:
    """Resources survive msgpack, and decoding rejects negative quantities."""
    r = Resources.of(cores="1500m", memory="8GiB", gpus=1, gpu_memory="16GiB", counters={"x": 1})
    assert msgspec.msgpack.decode(msgspec.msgpack.encode(r), type=Resources) == r
    with pytest.raises(msgspec.ValidationError, match="memory"):
        msgspec.json.decode(b'{"memory": -1}', type=Resources)


NODE = Resources.of(
    cores=8, memory="32GiB", gpus=2, gpu_memory="24GiB", scratch="100GiB", counters={"lic": 2}
)


@pytest.mark.parametrize(
    ("request_", "expected"),
    [
        (NODE, True),
        (Resources(), True),
        (msgspec.structs.replace(NODE, millicores=8001), False),
        (msgspec.structs.replace(NODE, memory=32 * GiB + 1), False),
        (msgspec.structs.replace(NODE, gpus=3), False),
        (msgspec.structs.replace(NODE, scratch=100 * GiB + 1), False),
        (Resources(gpus=1, gpu_memory=24 * GiB + 1), False),
        (Resources(gpus=0, gpu_memory=80 * GiB), True),  # per-device memory only with GPUs
        (Resources(counters=(("lic", 3),)), False),
        (Resources(counters=(("other", 1),)), False),
    ],
)
def test_fits(request_: Resources, expected: bool) -> None:
    """A request fits only when every dimension fits, gpu_memory per device."""
    assert fits(request_, NODE) is expected
    assert (not shortfall(request_, NODE)) is expected


def test_shortfall_names_dimensions_in_order() -> None:
    """shortfall lists every short dimension in a stable order with amounts."""
    short = shortfall(Resources(gpus=4, millicores=9000, counters=(("lic", 5),)), NODE)
    assert [s.dimension for s in short] == ["millicores", "gpus", "lic"]
    assert str(short[0]) == "cores: needs 9, has 8"


def test_subtract_and_add_round_trip() -> None:
    """Allocating then releasing returns the free resources; gpu_memory is carried through."""
    req = Resources.of(cores=2, memory="8GiB", gpus=1, gpu_memory="12GiB", counters={"lic": 1})
    free = subtract(NODE, req)
    assert free.millicores == 6000
    assert free.gpus == 1
    assert free.gpu_memory == NODE.gpu_memory
    assert free.counter("lic") == 1
    assert add(free, req, capacity=NODE) == NODE
    assert subtract(NODE, NODE).is_zero() is False  # the device size stays
    assert subtract(NODE, NODE) == Resources(gpu_memory=NODE.gpu_memory)


def test_subtract_refuses_to_go_negative() -> None:
    """Subtracting more than is free raises, naming the dimension."""
    with pytest.raises(ResourceError, match="memory") as info:
        subtract(Resources(memory=GiB), Resources(memory=2 * GiB))
    assert info.value.dimension == "memory"


def test_add_refuses_a_double_release() -> None:
    """Releasing beyond capacity (a double release) raises."""
    req = Resources(millicores=1000)
    with pytest.raises(ResourceError, match="exceed capacity"):
        add(NODE, req, capacity=NODE)


@pytest.mark.parametrize(
    ("value", "bucket"),
    [(0, 0), (1, 1), (8, 8), (9, 10), (10, 10), (11, 12), (15, 16), (17, 20), (1000, 1024)],
)
def test_shape_bucket_values(value: int, bucket: int) -> None:
    """Memory rounds up to four steps per power of two (exact up to 8)."""
    assert shape_key(Resources(memory=value)).memory == bucket


def test_shape_key_properties() -> None:
    """A key is an idempotent ceiling at most 25 % above the (whole-core) request; GPUs exact."""
    for cores, mem, gpus in itertools.product(
        [100, 1500, 4000, 7300], [1, 3 * GiB, 9 * GiB], [0, 3]
    ):
        req = Resources(millicores=cores, memory=mem, gpus=gpus, gpu_memory=gpus * GiB)
        key = shape_key(req)
        assert fits(req, key)
        assert shape_key(key) == key
        assert key.gpus == gpus
        assert key.memory <= mem * 1.25
        whole_cores = -(-cores // 1000) * 1000
        assert key.millicores <= max(whole_cores * 1.25, cores + 100)


@pytest.mark.parametrize(
    ("millicores", "bucket"),
    [(0, 0), (250, 300), (1000, 1000), (1500, 2000), (4000, 4000), (9000, 10000), (12000, 12000)],
)
def test_shape_bucket_cores(millicores: int, bucket: int) -> None:
    """CPU buckets are 100m steps below a core and whole-core buckets above it."""
    assert shape_key(Resources(millicores=millicores)).millicores == bucket


def test_shape_key_groups_similar_requests() -> None:
    """Requests of similar size share a key; placement on the key is safe for each."""
    a = Resources.of(cores=4, memory="15GiB")
    b = Resources.of(cores=4, memory="16GiB")
    assert shape_key(a) == shape_key(b)
    free = Resources.of(cores=4, memory="16GiB")
    assert fits(shape_key(a), free)
    assert fits(a, free)
    assert fits(b, free)


def test_overprovisioning_per_dimension() -> None:
    """Overprovisioning gives the unused share of each dimension the node has."""
    req = Resources.of(cores=2, memory="8GiB")
    over = overprovisioning(req, NODE)
    assert over.millicores == pytest.approx(0.75)
    assert over.memory == pytest.approx(0.75)
    assert over.gpus == 1.0
    assert over.gpu_memory == 1.0
    assert over.scratch == 1.0
    assert overprovisioning(req, Resources.of(cores=2, memory="8GiB")).gpus == 0.0


@pytest.mark.parametrize(
    ("request_", "node", "expected"),
    [
        (Resources.of(cores=8, memory="32GiB"), Resources.of(cores=8, memory="32GiB"), 1.0),
        (Resources.of(cores=4, memory="16GiB"), Resources.of(cores=8, memory="32GiB"), 0.5),
        (Resources(), Resources(), 1.0),
    ],
)
def test_fit_score_table(request_: Resources, node: Resources, expected: float) -> None:
    """fit_score is 1 for an exact fit and falls with the unused share."""
    assert fit_score(request_, node) == pytest.approx(expected)


def test_fit_score_prefers_cpu_node_for_cpu_job() -> None:
    """A CPU job scores lower on a GPU node than on an equal CPU-only node."""
    job = Resources.of(cores=4, memory="16GiB")
    cpu_node = Resources.of(cores=8, memory="32GiB")
    gpu_node = Resources.of(cores=8, memory="32GiB", gpus=4, gpu_memory="80GiB")
    assert fit_score(job, cpu_node) > fit_score(job, gpu_node)


def test_fit_score_rejects_bad_input() -> None:
    """fit_score raises when the request does not fit or a weight is unknown."""
    with pytest.raises(ResourceError):
        fit_score(Resources(gpus=1), Resources())
    with pytest.raises(ResourceError, match="unknown fit weight"):
        fit_score(Resources(), NODE, weights={"bogus": 1.0})


def test_pool_acquire_is_all_or_nothing_and_bounded() -> None:
    """A pool never hands out more than its limit, and a partial request takes nothing."""
    pool = ResourcePool({"houdini": 2, "nuke": 1})
    assert pool.try_acquire("a1", {"houdini": 1, "nuke": 1})
    assert not pool.try_acquire("a2", {"houdini": 1, "nuke": 1})
    assert pool.in_use("houdini") == 1
    assert pool.try_acquire("a3", {"houdini": 1})
    assert not pool.try_acquire("a4", {"houdini": 1})
    assert pool.available("houdini") == 0


def test_pool_release_is_idempotent() -> None:
    """Releasing twice (a duplicate report) frees once and never goes below zero."""
    pool = ResourcePool({"lic": 1})
    assert pool.try_acquire("a1", {"lic": 1})
    assert pool.release("a1") is True
    assert pool.release("a1") is False
    assert pool.in_use("lic") == 0
    assert pool.available("lic") == 1


@pytest.mark.parametrize(
    ("holder", "counters", "message"),
    [
        ("a1", {"lic": 1}, "already holds"),
        ("b", {"nope": 1}, "no counter"),
        ("c", {"lic": -1}, "negative"),
    ],
)
def test_pool_rejects_misuse(holder: str, counters: dict[str, int], message: str) -> None:
    """Acquiring twice per holder, unknown counters and negative counts raise."""
    pool = ResourcePool({"lic": 3})
    pool.try_acquire("a1", {"lic": 1})
    with pytest.raises(ResourceError, match=message):
        pool.try_acquire(holder, counters)


def test_pool_lowered_limit_blocks_until_released() -> None:
    """Lowering a limit below use revokes nothing but blocks new acquisitions."""
    pool = ResourcePool({"lic": 2})
    pool.try_acquire("a", {"lic": 2})
    pool.set_limit("lic", 1)
    assert pool.available("lic") == 0
    pool.release("a")
    assert pool.try_acquire("b", {"lic": 1})


def test_pool_split_separates_pool_counters() -> None:
    """split() keeps node counters in the request and returns the pool's part."""
    pool = ResourcePool({"lic": 5})
    node_part, pool_part = pool.split(Resources.of(cores=1, counters={"lic": 1, "local": 2}))
    assert node_part == Resources.of(cores=1, counters={"local": 2})
    assert pool_part == {"lic": 1}


@pytest.mark.parametrize(
    ("size", "text"), [(0, "0B"), (1023, "1023B"), (GiB, "1GiB"), (3 * GiB // 2, "1.5GiB")]
)
def test_format_size(size: int, text: str) -> None:
    """Sizes format with the largest binary unit."""
    assert format_size(size) == text
