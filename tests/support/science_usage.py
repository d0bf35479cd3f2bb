"""A coordinator's usage store with known measured usage, for the science forecast tests."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

from persistence import UsageRow, open_usage_store

_DAY0 = int(datetime(2027, 3, 1, tzinfo=UTC).timestamp())


async def write_usage_store(path: Path) -> None:
    """A coordinator's usage store: climate-0 used 4 cores through 10:00-11:00 on day 0 (its
    minutes rolled up into an hour, and kept) and 2 cores through 11:00-11:30 (minutes not
    rolled up yet); a job the journal does not know used 1 CPU-hour; host rows carry no CPU."""
    ten = _DAY0 + 10 * 3600
    rows = [
        UsageRow(bucket=ten + 60 * k, node="n1", job="climate-0", cpu_s=240.0) for k in range(60)
    ]
    rows += [UsageRow(bucket=ten + 60 * k, node="n1", job="", load_max=4.0) for k in range(90)]
    async with open_usage_store(path) as store:
        await store.add_minutes(rows)
        assert await store.roll_up(ten + 3600) == 1
        later = [
            UsageRow(bucket=ten + 3600 + 60 * k, node="n1", job="climate-0", cpu_s=120.0)
            for k in range(30)
        ]
        later.append(UsageRow(bucket=ten + 3600, node="n2", job="elsewhere", cpu_s=3600.0))
        await store.add_minutes(later)
