"""The usage store: per-minute rows merge, hours roll up once, retention deletes, size stays."""

from __future__ import annotations

from pathlib import Path

import pytest

from persistence import JournalFileError, UsageRow, open_usage_store

DAY = 86_400


def _minute(bucket: int, node: str = "n1", job: str = "", **values: float) -> UsageRow:
    return UsageRow(bucket=bucket, node=node, job=job, samples=1, **values)  # type: ignore[arg-type]


async def test_rows_of_one_minute_merge_sums_and_extremes(tmp_path: Path) -> None:
    """Writing the same (minute, node, job) twice adds sums and keeps the extremes."""
    async with open_usage_store(tmp_path / "u.db") as store:
        await store.add_minutes(
            [_minute(60, job="j", cpu_s=1.5, rss_max=10, read_bytes=4, attempts_max=1)]
        )
        await store.add_minutes(
            [_minute(60, job="j", cpu_s=2.0, rss_max=7, read_bytes=6, attempts_max=3)]
        )
        await store.add_minutes([_minute(60, load_max=0.5, memory_available_min=100)])
        await store.add_minutes([_minute(60, load_max=0.2, memory_available_min=80)])
        rows = await store.query("minute", since=0)
    assert rows == [
        UsageRow(bucket=60, node="n1", job="", samples=2, load_max=0.5, memory_available_min=80),
        UsageRow(
            bucket=60,
            node="n1",
            job="j",
            samples=2,
            cpu_s=3.5,
            rss_max=10,
            read_bytes=10,
            attempts_max=3,
        ),
    ]


async def test_complete_hours_roll_up_once_and_queries_filter(tmp_path: Path) -> None:
    """Minutes of complete hours become hour rows once (a second roll-up adds nothing); the
    current hour waits; queries filter by node, job and time."""
    async with open_usage_store(tmp_path / "u.db") as store:
        rows = [_minute(m * 60, job="j", cpu_s=1.0) for m in range(150)]  # 2.5 hours
        rows += [_minute(m * 60, node="n2", job="k", cpu_s=2.0) for m in range(60)]
        await store.add_minutes(rows)
        assert await store.roll_up(150 * 60) == 2
        assert await store.roll_up(150 * 60) == 0
        hours = await store.query("hour", since=0, node="n1")
        assert [(h.bucket, h.cpu_s, h.samples) for h in hours] == [(0, 60.0, 60), (3600, 60.0, 60)]
        assert [h.job for h in await store.query("hour", since=0, job="k")] == ["k"]
        assert len(await store.query("minute", since=120 * 60, node="n1")) == 30
        assert await store.roll_up(3 * 3600) == 1  # the third hour, once complete
        assert len(await store.query("hour", since=0, node="n1")) == 3


async def test_retention_deletes_and_the_file_stops_growing(tmp_path: Path) -> None:
    """Pruning drops old minutes and hours; with retention the file's size levels off."""
    async with open_usage_store(tmp_path / "u.db") as store:
        sizes = []
        for day in range(4):
            start = day * DAY
            await store.add_minutes(
                _minute(start + m * 60, node=f"n{n}", job="j", cpu_s=1.0)
                for m in range(1440)
                for n in range(5)
            )
            end = start + DAY
            await store.roll_up(end)
            await store.prune(minutes_before=end - DAY, hours_before=end - 2 * DAY)
            sizes.append(await store.size())
        assert await store.rows("minute") == 1440 * 5
        assert await store.rows("hour") == 48 * 5
        assert await store.query("minute", since=0, node="n0") != []
        assert (await store.query("minute", since=0, node="n0"))[0].bucket == 3 * DAY
    assert sizes[3] <= sizes[1] * 1.1  # pages freed by the deletes are reused


async def test_a_file_that_is_not_a_database_is_named(tmp_path: Path) -> None:
    """Opening garbage fails with the file named."""
    path = tmp_path / "u.db"
    path.write_bytes(b"not a database" * 100)
    with pytest.raises(JournalFileError, match=r"u\.db"):
        async with open_usage_store(path):
            pass
