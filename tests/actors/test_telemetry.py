"""The coordinator's telemetry: samples folded per minute, rolled up, queried; bounded wire
messages; the agent's and the CLI's telemetry settings."""

from __future__ import annotations

import argparse
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import msgspec
import pytest

from actors.cli._agent import config_from_args, configure
from actors.cli._usage import format_usage, parse_since
from actors.cluster import (
    MAX_SAMPLED_ATTEMPTS,
    AgentConfig,
    Heartbeat,
    NodeUsage,
    Telemetry,
    TelemetrySettings,
    UsageRequest,
    usage_store_path,
)
from actors.cluster._coordinator import _INBOUND_CODEC
from actors.engine import Resources
from actors.executors import AttemptUsage, HostUsage
from persistence import open_usage_store
from runtime import ConfigurationError, ProtocolError, VirtualClock

START = datetime(2026, 1, 1, tzinfo=UTC)
MIB = 2**20


def _attempt(job: str, task: str, cpu: float, rss: int, read: int = 0) -> AttemptUsage:
    return AttemptUsage(
        job_id=job, task_id=task, attempt=1, fencing_token=1, cpu_s=cpu, rss=rss,
        peak_rss=rss, read_bytes=read,
    )  # fmt: skip


def _sample(*attempts: AttemptUsage, load: float = 1.0, available: int = 8 * 2**30) -> NodeUsage:
    return NodeUsage(
        host=HostUsage(load=load, memory_available=available, scratch_free=2**30),
        attempts=attempts,
    )


async def test_cpu_is_counted_as_the_difference_between_samples(tmp_path: Path) -> None:
    """Cumulative CPU and I/O become per-minute use: each minute gets what was used in it."""
    clock = VirtualClock(START)
    async with open_usage_store(tmp_path / "u.db") as store:
        telemetry = Telemetry(store=store, clock=clock, settings=TelemetrySettings())
        telemetry.record("n1", _sample(_attempt("j", "0", 10.0, 100 * MIB, read=1000)))
        await clock.advance(30)
        telemetry.record("n1", _sample(_attempt("j", "0", 25.0, 300 * MIB, read=1500)))
        await clock.advance(30)  # the next minute
        telemetry.record("n1", _sample(_attempt("j", "0", 40.0, 200 * MIB, read=1500), load=3.0))
        await telemetry.flush()
        rows = await store.query("minute", since=0, job="j")
        assert [(r.cpu_s, r.rss_max, r.read_bytes, r.samples) for r in rows] == [
            (25.0, 300 * MIB, 1500, 2)
        ]  # the second minute is still in memory
        reply = await telemetry.query(UsageRequest(job="j", since=START))
        assert [(p.cpu_s, p.rss_max) for p in reply.points] == [
            (25.0, 300 * MIB),
            (15.0, 200 * MIB),
        ]
        assert reply.points[0].cpu_cores == pytest.approx(25 / 60, abs=1e-3)
        (job,) = reply.jobs
        assert (job.job_id, job.attempts, job.cpu_s, job.rss) == ("j", 1, 40.0, 200 * MIB)
        assert job.cpu_cores == pytest.approx(0.5)  # 15 CPU s in the last 30 s
        host = await telemetry.query(UsageRequest(node="n1", since=START))
        assert [p.load_max for p in host.points] == [1.0, 3.0]
        (node,) = host.nodes
        assert (node.node, node.attempts, node.load) == ("n1", 1, 3.0)


async def test_queries_filter_by_node_and_job_and_sum_the_farm() -> None:
    """A job's series sums its nodes; a node's holds its host and its jobs; the farm sums all."""
    clock = VirtualClock(START)
    telemetry = Telemetry(store=None, clock=clock, settings=TelemetrySettings())
    telemetry.record("n1", _sample(_attempt("a", "0", 1.0, MIB), _attempt("b", "0", 2.0, MIB)))
    telemetry.record("n2", _sample(_attempt("a", "1", 4.0, 2 * MIB), load=2.0))
    farm = await telemetry.query(UsageRequest())
    (point,) = farm.points
    assert (point.cpu_s, point.rss_max, point.load_max, point.samples) == (7.0, 4 * MIB, 2.0, 2)
    (a,) = (await telemetry.query(UsageRequest(job="a"))).points
    assert (a.cpu_s, a.rss_max, a.attempts_max) == (5.0, 3 * MIB, 2)
    (n1,) = (await telemetry.query(UsageRequest(node="n1"))).points
    assert (n1.cpu_s, n1.load_max) == (3.0, 1.0)
    jobs = (await telemetry.query(UsageRequest(node="n2"))).jobs
    assert [j.job_id for j in jobs] == ["a"]
    telemetry.forget("n2")
    assert [n.node for n in telemetry.nodes_now()] == ["n1"]
    assert [(j.job_id, j.attempts) for j in telemetry.jobs_now(["a"])] == [("a", 1)]


async def test_hours_roll_up_and_auto_switches_to_them_past_the_minutes(tmp_path: Path) -> None:
    """After three hours of samples with 1 h of minutes kept, ``auto`` over three hours answers
    per hour, and every CPU second is there once."""
    clock = VirtualClock(START)
    settings = TelemetrySettings(minute_retention=3600, hour_retention=86_400)
    async with open_usage_store(tmp_path / "u.db") as store:
        telemetry = Telemetry(store=store, clock=clock, settings=settings)
        for tick in range(1, 3 * 60 + 1):
            telemetry.record("n1", _sample(_attempt("j", "0", tick * 6.0, MIB)))
            await clock.advance(60)
            await telemetry.flush()
        assert await store.rows("minute") <= 61 * 2
        reply = await telemetry.query(UsageRequest(job="j", since=START))
        assert reply.resolution == "hour"
        assert [p.at - START for p in reply.points] == [timedelta(hours=h) for h in range(3)]
        assert sum(p.cpu_s for p in reply.points) == pytest.approx(3 * 60 * 6.0)
        minutes = await telemetry.query(
            UsageRequest(job="j", since=START + timedelta(hours=2, minutes=30))
        )
        assert minutes.resolution == "minute"
        assert len(minutes.points) == 30
        forced = await telemetry.query(
            UsageRequest(job="j", since=START + timedelta(hours=2), resolution="hour")
        )
        assert (forced.resolution, len(forced.points)) == ("hour", 1)
        assert forced.points[0].cpu_s == pytest.approx(60 * 6.0)


async def test_closing_flushes_the_minute_still_in_memory(tmp_path: Path) -> None:
    """What was sampled in the current minute is written when the telemetry stops."""
    clock = VirtualClock(START)
    async with open_usage_store(tmp_path / "u.db") as store:
        telemetry = Telemetry(store=store, clock=clock, settings=TelemetrySettings())
        telemetry.record("n1", _sample(_attempt("j", "0", 3.0, MIB)))
        await telemetry.flush(everything=True)
        assert [r.cpu_s for r in await store.query("minute", since=0, job="j")] == [3.0]


@pytest.mark.parametrize(
    ("fields", "where"),
    [
        ({"minute_retention": 10}, "minute_retention"),
        ({"hour_retention": float("nan")}, "hour_retention"),
        ({"minute_retention": 7200, "hour_retention": 3600}, "hour_retention"),
    ],
)
def test_bad_retention_is_named(fields: dict[str, float], where: str) -> None:
    """A retention under a minute, not a number, or minutes kept longer than hours is refused."""
    with pytest.raises(ConfigurationError, match=where):
        TelemetrySettings(**fields)


def test_the_usage_store_sits_beside_the_journal() -> None:
    """``farm.db`` keeps its usage in ``farm.usage.db``."""
    assert usage_store_path(Path("/x/farm.db")) == Path("/x/farm.usage.db")
    assert usage_store_path(Path("journal")) == Path("journal.usage.db")


def test_a_heartbeat_without_a_sample_leaves_the_field_out() -> None:
    """A heartbeat with no sample encodes without a ``usage`` key (older coordinators forbid
    fields they do not know)."""
    encoded = msgspec.msgpack.encode(Heartbeat(sequence=3, running=1))
    assert msgspec.msgpack.decode(encoded) == {
        "type": "agent.heartbeat",
        "running": 1,
        "sequence": 3,
    }


def test_a_heartbeat_naming_too_many_attempts_is_refused() -> None:
    """The coordinator refuses a sample of more attempts than the bound while decoding."""
    attempt = _attempt("j", "0", 1.0, 1)
    heartbeat = Heartbeat(sequence=1, usage=_sample(attempt))
    assert _INBOUND_CODEC.decode(_INBOUND_CODEC.encode(heartbeat)[4:], peer="p") == heartbeat
    too_many = msgspec.structs.replace(
        heartbeat,
        usage=NodeUsage(host=HostUsage(), attempts=(attempt,) * (MAX_SAMPLED_ATTEMPTS + 1)),
    )
    with pytest.raises(ProtocolError):
        _INBOUND_CODEC.decode(_INBOUND_CODEC.encode(too_many)[4:], peer="p")
    negative = msgspec.msgpack.encode(
        {"type": "agent.heartbeat", "usage": {"host": {"load": -1.0}}}
    )
    with pytest.raises(ProtocolError):
        _INBOUND_CODEC.decode(negative, peer="p")


def _agent_args(tmp_path: Path, *extra: str) -> argparse.Namespace:
    token = tmp_path / "token"
    token.write_text("t" * 32)
    token.chmod(0o600)
    parser = argparse.ArgumentParser()
    configure(parser)
    return parser.parse_args(
        ["--connect", "127.0.0.1:7717", "--token-file", str(token), "--name", "n1",
         "--work-dir", str(tmp_path / "work"), "--cores", "1", "--memory", "1GiB", *extra]
    )  # fmt: skip


def test_the_agent_takes_its_sampling_and_memory_limit_flags(tmp_path: Path) -> None:
    """--sample-interval and --memory-limit-factor reach the agent's configuration."""
    config = config_from_args(
        _agent_args(tmp_path, "--sample-interval", "2.5", "--memory-limit-factor", "1.5")
    )
    assert (config.sample_interval, config.memory_limit_factor) == (2.5, 1.5)
    default = config_from_args(_agent_args(tmp_path))
    assert (default.sample_interval, default.memory_limit_factor) == (10.0, 0.0)


@pytest.mark.parametrize(
    ("flag", "value"),
    [
        ("--memory-limit-factor", "-1"),
        ("--memory-limit-factor", "lots"),
        ("--sample-interval", "-2"),
        ("--sample-interval", "inf"),
    ],
)
def test_bad_sampling_flags_are_named(tmp_path: Path, flag: str, value: str) -> None:
    """A negative, infinite or non-numeric setting is refused, naming its flag."""
    with pytest.raises(ConfigurationError) as caught:
        config_from_args(_agent_args(tmp_path, flag, value))
    assert caught.value.where == flag


def test_agent_config_checks_its_telemetry_fields() -> None:
    """AgentConfig refuses a negative sample interval or memory limit factor."""
    fields: dict[str, Any] = {
        "host": "h", "port": 1, "token_file": "t", "name": "n", "work_dir": "w",
        "capacity": Resources.of(cores=1),
    }  # fmt: skip
    with pytest.raises(ConfigurationError, match="memory_limit_factor"):
        AgentConfig(**fields, memory_limit_factor=-0.5)
    with pytest.raises(ConfigurationError, match="sample_interval"):
        AgentConfig(**fields, sample_interval=float("nan"))


@pytest.mark.parametrize(
    ("text", "ago"),
    [("30m", timedelta(minutes=30)), ("6h", timedelta(hours=6)), ("2d", timedelta(days=2))],
)
def test_since_takes_a_time_ago(text: str, ago: timedelta) -> None:
    """``--since 30m`` means thirty minutes before now."""
    now = datetime(2026, 6, 1, 12, tzinfo=UTC)
    assert parse_since(text, now=now) == now - ago


def test_since_takes_a_time_and_refuses_the_future_and_nonsense() -> None:
    """An ISO time is taken as is; a future time or garbage is refused, naming --since."""
    now = datetime(2026, 6, 1, 12, tzinfo=UTC)
    assert parse_since("2026-06-01T10:00:00Z", now=now) == datetime(2026, 6, 1, 10, tzinfo=UTC)
    for bad in ("2026-06-02T10:00:00Z", "yesterday", "+2h"):
        with pytest.raises(ConfigurationError) as caught:
            parse_since(bad, now=now)
        assert caught.value.where == "--since"
        assert "from now" not in str(caught.value)


async def test_the_usage_table_shows_nodes_jobs_and_points() -> None:
    """``taskfarm usage`` prints the latest samples and one line per bucket."""
    clock = VirtualClock(START)
    telemetry = Telemetry(store=None, clock=clock, settings=TelemetrySettings())
    telemetry.record("render-7", _sample(_attempt("shot-42", "0", 9.0, 512 * MIB)))
    text = format_usage(await telemetry.query(UsageRequest(since=START)))
    assert "render-7" in text
    assert "shot-42" in text
    assert "per minute since 2026-01-01 00:00 UTC:" in text
    assert "2026-01-01 00:00" in text.splitlines()[-1]
    empty = Telemetry(store=None, clock=clock, settings=TelemetrySettings())
    assert "no samples" in format_usage(await empty.query(UsageRequest()))


def test_serve_takes_the_usage_retention_as_durations() -> None:
    """--keep-usage-minutes and --keep-usage-hours become the telemetry's retention."""
    from actors.cli._commands import _telemetry_settings

    args = argparse.Namespace(keep_usage_minutes="36h", keep_usage_hours="90d")
    assert _telemetry_settings(args) == TelemetrySettings(
        minute_retention=36 * 3600, hour_retention=90 * 86_400
    )
    default = argparse.Namespace(keep_usage_minutes="1d", keep_usage_hours="365d")
    assert _telemetry_settings(default) == TelemetrySettings()


@pytest.mark.parametrize(
    ("minutes", "hours", "where"),
    [
        ("30s", "1d", "--keep-usage-minutes"),
        ("2d", "1d", "--keep-usage-hours"),
        ("forever", "1d", "--keep-usage-minutes"),
        ("1d", "400d", "--keep-usage-hours"),
    ],
)
def test_bad_usage_retention_flags_are_named(minutes: str, hours: str, where: str) -> None:
    """Under a minute, hours shorter than minutes, no duration or over 366 days: refused."""
    from actors.cli._commands import _telemetry_settings

    with pytest.raises(ConfigurationError) as caught:
        _telemetry_settings(argparse.Namespace(keep_usage_minutes=minutes, keep_usage_hours=hours))
    assert caught.value.where == where
