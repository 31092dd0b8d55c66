"""Change detection, values in and values out."""

from defiwatch.domain import ChangeDetector, Decision, Point, SeriesState, Thresholds, diff_protocol
from defiwatch.domain.protocols import ProtocolMeta

DAY = 86_400
T0 = 1_700_000_000
DETECT = ChangeDetector(Thresholds(tvl_pct=1.0, tvl_abs=10_000.0, price_pct=0.1, price_abs=None))


def tvl(ts: int, value: float) -> Point:
    return Point("tvl", "aave", "ethereum", ts, value, "test")


def price(ts: int, value: float) -> Point:
    return Point("price", "coingecko:ethereum", "-", ts, value, "test")


def run(points: list[Point], state: SeriesState | None = None) -> list[Decision]:
    state = state or SeriesState()
    return [DETECT.observe(state, p, now=0.0)[0] for p in points]


def test_first_point_emits_nothing() -> None:
    assert run([tvl(T0, 1e6)]) == [Decision.FIRST_POINT]


def test_significant_tvl_change_carries_previous_and_changes() -> None:
    state = SeriesState()
    DETECT.observe(state, tvl(T0, 1_000_000.0), now=0)
    decision, event, _ = DETECT.observe(state, tvl(T0 + DAY, 1_020_000.0), now=5.0)
    assert decision is Decision.SIGNIFICANT and event is not None
    assert event.type == "tvl_change"
    assert event.previous == 1_000_000.0
    assert event.change_abs == 20_000.0
    assert abs(event.change_pct - 2.0) < 1e-9  # type: ignore[operator]
    assert abs(event.change_24h - 2.0) < 1e-9  # type: ignore[operator]
    assert event.change_1h is None  # daily data has no 1h reference
    assert event.emitted_at == 5.0


def test_tvl_threshold_is_pct_or_absolute() -> None:
    # 0.5 % of 1e9 is 5e6 >= $10,000: significant by the absolute bound.
    assert run([tvl(T0, 1e9), tvl(T0 + 60, 1.005e9)])[1] is Decision.SIGNIFICANT
    # $5,000 on $1M is 0.5 % and below $10,000: not significant.
    assert run([tvl(T0, 1e6), tvl(T0 + 60, 1.005e6)])[1] is Decision.BELOW_THRESHOLD


def test_price_threshold() -> None:
    assert run([price(T0, 2000.0), price(T0 + 300, 2001.0)])[1] is Decision.BELOW_THRESHOLD
    assert run([price(T0, 2000.0), price(T0 + 300, 2002.5)])[1] is Decision.SIGNIFICANT


def test_slow_drift_adds_up_against_what_was_published() -> None:
    state = SeriesState()
    values = [1e6, 1.011e6, 1.015e6, 1.019e6, 1.023e6]  # +1.1 %, then +0.4 % steps
    decisions = [DETECT.observe(state, tvl(T0 + i * 60, v), now=0)[0] for i, v in enumerate(values)]
    assert decisions == [Decision.FIRST_POINT, Decision.SIGNIFICANT, Decision.BELOW_THRESHOLD,
                         Decision.BELOW_THRESHOLD, Decision.SIGNIFICANT]
    assert state.published == (T0 + 4 * 60, 1.023e6)


def test_restart_skips_what_the_stream_already_has() -> None:
    state = SeriesState(published=(T0 + DAY, 1.1e6))
    state.add(T0, 1e6)
    assert run([tvl(T0 + DAY, 1.1e6), tvl(T0 + 2 * DAY, 1.2e6)], state) == [
        Decision.ALREADY_PUBLISHED, Decision.SIGNIFICANT]


def test_out_of_order_point_is_history_not_a_change() -> None:
    assert run([tvl(T0, 1e6), tvl(T0 + DAY, 2e6), tvl(T0 + 60, 5e6)]) == [
        Decision.FIRST_POINT, Decision.SIGNIFICANT, Decision.OUT_OF_ORDER]


def test_zero_reference_gives_no_percentage() -> None:
    state = SeriesState()
    DETECT.observe(state, tvl(T0, 0.0), now=0)
    decision, event, _ = DETECT.observe(state, tvl(T0 + 60, 50_000.0), now=0)
    assert decision is Decision.SIGNIFICANT and event is not None
    assert event.change_pct is None and event.change_abs == 50_000.0


def test_windowed_changes_use_references_within_tolerance() -> None:
    state = SeriesState()
    for i in range(0, 8 * 24):  # hourly points for 8 days, value = hour index + 100
        state.add(T0 + i * 3600, 100.0 + i)
    now_ts = T0 + (8 * 24 - 1) * 3600
    windowed = state.windowed(now_ts, 300.0)
    assert windowed["change_1h"] == (300.0 - (100.0 + 8 * 24 - 2)) / (100.0 + 8 * 24 - 2) * 100
    assert windowed["change_7d"] is not None
    # A point 3 days after the last one has no 24h or 1h reference, but has a 7d one.
    later = state.windowed(now_ts + 3 * DAY, 1.0)
    assert later["change_1h"] is None and later["change_24h"] is None
    assert later["change_7d"] is not None


def test_history_is_bounded() -> None:
    state = SeriesState()
    for i in range(5000):
        state.add(T0 + i * 3600, float(i))
    assert state.ts[-1] - state.ts[0] <= int(7 * DAY * 1.5) + 1


def test_protocol_diff() -> None:
    old = ProtocolMeta(slug="aave", name="Aave", category="Lending", chains=("ethereum",))
    assert diff_protocol(old, old) is None
    new = ProtocolMeta(slug="aave", name="Aave", category="Lending", chains=("ethereum", "base"))
    change = diff_protocol(old, new)
    assert change is not None and change.chains_added == ["base"] and change.category is None
    moved = ProtocolMeta(slug="aave", name="Aave", category="CDP", chains=("ethereum",))
    change = diff_protocol(old, moved)
    assert change is not None and change.category == ("Lending", "CDP")
    first = diff_protocol(None, old)
    assert first is not None and first.new


def test_sign_change_is_measured_against_the_magnitude() -> None:
    state = SeriesState()
    DETECT.observe(state, tvl(T0, -100_000.0), now=0)
    decision, event, _ = DETECT.observe(state, tvl(T0 + 60, 50_000.0), now=0)
    assert decision is Decision.SIGNIFICANT and event is not None
    assert (event.previous, event.change_abs) == (-100_000.0, 150_000.0)
    assert event.change_pct == 150.0  # up, although the value crossed zero
    _, down, _ = DETECT.observe(state, tvl(T0 + 120, -25_000.0), now=0)
    assert down is not None and down.change_pct == -150.0


def test_a_price_leaving_zero_is_significant_without_a_percentage() -> None:
    # Prices have no absolute bound: a move from 0 has no percentage but is still a change.
    state = SeriesState()
    DETECT.observe(state, price(T0, 0.0), now=0)
    decision, event, _ = DETECT.observe(state, price(T0 + 300, 0.5), now=0)
    assert decision is Decision.SIGNIFICANT and event is not None and event.change_pct is None
    assert run([price(T0, 0.0), price(T0 + 300, 0.0)])[1] is Decision.BELOW_THRESHOLD
