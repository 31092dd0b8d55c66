import math

import pytest

from defiwatch.domain import Point, PointRejection, validate_point

NOW = 1_710_115_200.0
GOOD = {"metric": "tvl", "subject": "Aave", "chain": "Ethereum", "ts": 1_710_000_000, "value": 1e9}


def check(**changes: object) -> Point | PointRejection:
    return validate_point({**GOOD, **changes}, index=3, now=NOW, source="test")


def test_valid_point_is_normalised() -> None:
    point = check()
    assert point == Point("tvl", "aave", "ethereum", 1_710_000_000, 1e9, "test")


def test_missing_chain_means_no_chain() -> None:
    raw = {k: v for k, v in GOOD.items() if k != "chain"}
    point = validate_point(raw, index=0, now=NOW, source="t")
    assert isinstance(point, Point) and point.chain == "-"


@pytest.mark.parametrize(
    ("changes", "field", "reason_part"),
    [
        ({"metric": "volume"}, "metric", "unknown metric"),
        ({"metric": None}, "metric", "unknown metric"),
        ({"subject": ""}, "subject", "non-empty"),
        ({"subject": 5}, "subject", "non-empty"),
        ({"subject": "!!!"}, "subject", "no usable"),
        ({"chain": 1}, "chain", "string"),
        ({"ts": "2024-01-01"}, "ts", "epoch seconds"),
        ({"ts": True}, "ts", "epoch seconds"),
        ({"ts": 1.5e9 + 0.5}, "ts", "whole"),
        ({"ts": 1_000}, "ts", "before 2009"),
        ({"ts": int(NOW * 1000)}, "ts", "milliseconds"),
        ({"ts": int(NOW) + 7200}, "ts", "future"),
        ({"value": "1e9"}, "value", "number"),
        ({"value": math.nan}, "value", "finite"),
        ({"value": math.inf}, "value", "finite"),
        ({"value": 1e20}, "value", "units"),
        ({"value": -1e20}, "value", "units"),
    ],
)
def test_rejections_name_the_field(changes: dict[str, object], field: str, reason_part: str) -> None:
    result = check(**changes)
    assert isinstance(result, PointRejection)
    assert (result.index, result.field) == (3, field)
    assert reason_part in result.reason


@pytest.mark.parametrize("value", [-21_442.5, -1e16, 0.0, -0.0])
def test_negative_values_are_kept_as_reported(value: float) -> None:
    # DefiLlama's own 2024-03 /protocols reports a Polygon TVL of -21,442.50.
    point = check(value=value)
    assert isinstance(point, Point) and point.value == value
