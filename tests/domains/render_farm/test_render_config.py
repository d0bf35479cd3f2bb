"""farm.toml: parsed into the configuration the policy uses, every error naming the file and
the field; guarantees scaled down past 100 %; prices across tariff boundaries."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import pytest

from domains.render_farm import (
    FarmConfig,
    load_farm_config,
    parse_farm_config,
    render_farm_policy,
)
from runtime import ConfigurationError

FARM = """
margin = "2h"
reclaim_after = "90s"
max_errors = 4
frame_estimate = "5m"
timezone = "UTC"

[[clients]]
id = "acme"
name = "Acme Pictures"
tier = "premium"
guaranteed = 50
maximum = 80
borrowing_limit = 30

[[clients]]
id = "blue"
guaranteed = 30

[[node_classes]]
name = "gpu"
watts = { idle = 150, busy = 650, sleep = 8 }
performance = 1.3
job_types = ["vfx", "lighting"]
scarce = true

[energy]
mode = "efficiency"
reserve = 3
sleep_after = "10m"

[[tariffs]]
days = ["mon", "tue", "wed", "thu", "fri"]
peak_hours = ["07:00-23:00"]
peak_price = 0.32
off_peak_price = 0.11

[previews]
stride = 4
passes = [0.5, 0.25]
"""


def test_a_farm_toml_is_parsed_into_the_configuration() -> None:
    """Every section lands in the configuration, durations in seconds, passes sorted."""
    config = parse_farm_config(FARM, source="farm.toml")
    assert config.margin == 7200
    assert config.reclaim_after == 90
    assert config.max_errors == 4
    assert config.frame_estimate == 300
    acme = config.client("acme")
    assert acme is not None
    assert acme.tier == "premium"
    assert acme.label == "Acme Pictures"
    assert (acme.guaranteed, acme.maximum, acme.borrowing_limit) == (50, 80, 30)
    gpu = config.node_class("gpu")
    assert (gpu.idle_watts, gpu.busy_watts, gpu.sleep_watts) == (150, 650, 8)
    assert gpu.job_types == ("vfx", "lighting")
    assert gpu.scarce
    assert config.node_class("unknown") is config.default_class
    assert config.energy.mode == "efficiency"
    assert config.energy.sleep_after == 600
    assert config.previews.stride == 4
    assert config.previews.passes == (0.25, 0.5)
    assert config.source == "farm.toml"


@pytest.mark.parametrize(
    ("text", "where", "problem"),
    [
        ("[[clients]]\nid = 'a'\ntier = 'gold'", "clients[0].tier", "Invalid enum value 'gold'"),
        ("[[clients]]\nid = 'a'\nguaranteed = 120", "clients[0].guaranteed", "<= 100"),
        (
            "[[clients]]\nid = 'a'\nguaranteed = 50\nmaximum = 40",
            "clients[0].maximum",
            "below the guarantee",
        ),
        ("[[clients]]\nid = 'a'\n[[clients]]\nid = 'a'", "clients[1].id", "duplicate client"),
        ("[[clients]]\nid = 'a'\ncolour = 'red'", "clients[0].colour", "unknown field"),
        ("margin = 'soon'\n[[clients]]\nid = 'a'", "margin", "not a duration"),
        ("[energy]\nmode = 'turbo'\n[[clients]]\nid = 'a'", "energy.mode", "turbo"),
        (
            "[[clients]]\nid = 'a'\n[[tariffs]]\ndays = ['funday']\npeak_price = 1\n"
            "off_peak_price = 1",
            "tariffs[0].days[0]",
            "not a weekday",
        ),
        (
            "[[clients]]\nid = 'a'\n[[tariffs]]\ndays = ['mon']\npeak_hours = ['23:00-07:00']\n"
            "peak_price = 1\noff_peak_price = 1",
            "tariffs[0].peak_hours[0]",
            "ends before it starts",
        ),
        (
            "[[clients]]\nid = 'a'\n[[node_classes]]\nname = 'x'\n"
            "watts = { idle = 300, busy = 100 }",
            "node_classes[0].watts.busy",
            "below the idle draw",
        ),
        ("timezone = 'Mars/Olympus'\n[[clients]]\nid = 'a'", "timezone", "unknown time zone"),
        ("clients = []", "clients", "length >= 1"),
        ("[[clients]]\nid = 'a'\n[previews]\npasses = [1.5]", "previews.passes[0]", "< 1"),
    ],
)
def test_an_invalid_farm_toml_is_refused_naming_the_file_and_field(
    text: str, where: str, problem: str
) -> None:
    """Each mistake is one error naming farm.toml, the field and what is wrong."""
    with pytest.raises(ConfigurationError) as caught:
        parse_farm_config(text, source="farm.toml")
    message = str(caught.value)
    assert message.startswith(f"farm.toml: {where}:"), message
    assert problem in message


def test_a_file_that_cannot_be_read_is_named(tmp_path: Path) -> None:
    """A missing file, and invalid TOML in a file, are errors naming the file."""
    with pytest.raises(ConfigurationError, match=r"farm\.toml: cannot read the file"):
        load_farm_config(tmp_path / "farm.toml")
    (tmp_path / "farm.toml").write_text("clients = [", encoding="utf-8")
    with pytest.raises(ConfigurationError, match=r"farm\.toml: invalid TOML"):
        load_farm_config(tmp_path / "farm.toml")
    with pytest.raises(ConfigurationError, match="--policy-config: the render-farm policy needs"):
        render_farm_policy(None)


@pytest.mark.parametrize(
    ("guarantees", "scaled"),
    [
        ((50, 30, 20), (0.5, 0.3, 0.2)),
        ((60, 60, 30), (0.4, 0.4, 0.2)),
        ((20, 10, 0), (0.2, 0.1, 0.0)),
    ],
)
def test_guarantees_above_100_percent_are_scaled_down_in_proportion(
    guarantees: tuple[int, int, int], scaled: tuple[float, float, float]
) -> None:
    """150 % of guarantees become 100 % in the same proportions; less is left as it is."""
    text = "".join(
        f"[[clients]]\nid = 'c{i}'\nguaranteed = {g}\n" for i, g in enumerate(guarantees)
    )
    result = parse_farm_config(text).guarantees()
    assert [round(result[f"c{i}"], 9) for i in range(3)] == list(scaled)


def _at(day: int, hour: int, minute: int = 0) -> datetime:
    # 2026-03-02 is a Monday.
    return datetime(2026, 3, 2 + day, hour, minute, tzinfo=UTC)


@pytest.mark.parametrize(
    ("moment", "price", "peak", "next_change", "off_peak"),
    [
        (_at(0, 6, 30), 0.11, False, _at(0, 7), _at(0, 6, 30)),
        (_at(0, 7), 0.32, True, _at(0, 23), _at(0, 23)),
        (_at(0, 22, 59), 0.32, True, _at(0, 23), _at(0, 23)),
        (_at(4, 23, 30), 0.11, False, _at(5, 0), _at(4, 23, 30)),  # Friday night: Saturday flat
        (_at(5, 12), 0.20, False, _at(7, 0), _at(5, 12)),  # Saturday: the flat price
    ],
)
def test_prices_and_tariff_boundaries(
    moment: datetime, price: float, peak: bool, next_change: datetime, off_peak: datetime
) -> None:
    """The price in force, whether it is peak, the next boundary, and the next off-peak time."""
    config = parse_farm_config(FARM)
    assert config.price(moment) == price
    assert config.is_peak(moment) is peak
    assert config.next_price_change(moment) == next_change
    assert config.next_off_peak(moment) == off_peak


def test_tariff_hours_are_in_the_configured_time_zone() -> None:
    """Peak 07:00-23:00 in Paris starts at 06:00 UTC in winter."""
    config = parse_farm_config(FARM.replace('timezone = "UTC"', 'timezone = "Europe/Paris"'))
    assert not config.is_peak(datetime(2026, 1, 5, 5, 59, tzinfo=UTC))
    assert config.is_peak(datetime(2026, 1, 5, 6, 0, tzinfo=UTC))


def test_the_configuration_is_a_journal_value() -> None:
    """The configuration round-trips through msgspec (it is journaled on every change)."""
    import msgspec

    config = parse_farm_config(FARM, source="farm.toml")
    assert msgspec.json.decode(msgspec.json.encode(config), type=FarmConfig) == config
