"""DefiLlama parameter notation for the compat routes (pure)."""

from __future__ import annotations

import pytest

from defiwatch.errors import ValidationError
from defiwatch.query.llama import chart_timestamps, parse_duration


@pytest.mark.parametrize(("text", "seconds"), [("600", 600), ("15m", 900), ("4h", 14_400),
                                               ("1D", 86_400), ("2w", 1_209_600)])
def test_durations(text: str, seconds: int) -> None:
    assert parse_duration(text, field="searchWidth") == seconds


def test_chart_timestamps() -> None:
    assert chart_timestamps(100, None, 3, 10, 0) == [100, 110, 120]
    assert chart_timestamps(None, 100, 3, 10, 0) == [80, 90, 100]
    assert chart_timestamps(100, 125, None, 10, 0) == [100, 110, 120]
    assert chart_timestamps(None, None, None, 10, 555) == [555]


@pytest.mark.parametrize("text", ["", "soon", "-1h", "0", "4y", "1e9w"])
def test_bad_durations_name_the_parameter(text: str) -> None:
    with pytest.raises(ValidationError) as info:
        parse_duration(text, field="period")
    assert info.value.field == "period"


def test_too_many_chart_points() -> None:
    with pytest.raises(ValidationError) as info:
        chart_timestamps(0, None, 5_000, 60, 0)
    assert info.value.field == "span"
