"""Conditions (domain/conditions.py): values in, values out, no event loop."""

from __future__ import annotations

from typing import Any

import hypothesis.strategies as st
import pytest
from hypothesis import given, settings

from defiwatch.alerts.rules import compile_rule
from defiwatch.domain.conditions import (
    All,
    AnyOf,
    ConditionError,
    Leaf,
    Problem,
    Sample,
    Truth,
    compile_truth,
    explain,
    iter_leaves,
    leaf_truth,
    parse_condition,
    stay_comparison,
)

T, F, U = Truth.TRUE, Truth.FALSE, Truth.UNKNOWN


def leaf(**over: Any) -> dict[str, Any]:
    return {"metric": "tvl", "subject": "aave", "op": "gt", "threshold": 10.0, **over}


def sample(value: float, previous: float | None = None, *, subject: str = "aave",
           chain: str = "-", metric: str = "tvl", change_1h: float | None = None) -> Sample:
    return Sample(metric, subject, chain, 100, value, previous, {3600: change_1h})


@pytest.mark.parametrize(
    ("op", "value", "previous", "expected"),
    [
        ("gt", 11, None, T), ("gt", 10, None, F), ("gte", 10, None, T), ("gte", 9, None, F),
        ("lt", 9, None, T), ("lt", 10, None, F), ("lte", 10, None, T), ("lte", 11, None, F),
        ("eq", 10.000000000001, None, T), ("eq", 10.1, None, F),
        ("ne", 10.1, None, T), ("ne", 10, None, F),
        # Crossings: TRUE on the transition only, UNKNOWN on later ticks past the line.
        ("crosses_above", 11, 9, T), ("crosses_above", 11, 10, T), ("crosses_above", 12, 11, U),
        ("crosses_above", 11, None, U), ("crosses_above", 9, 11, F), ("crosses_above", 10, 9, F),
        ("crosses_below", 9, 11, T), ("crosses_below", 8, 9, U), ("crosses_below", 11, 9, F),
        ("gt", None, None, U),
    ],
)
def test_leaf_truth(op: str, value: float | None, previous: float | None, expected: Truth) -> None:
    assert leaf_truth(op, 10.0, value, previous) == expected


def test_parse_normalises_and_pushes_not_down() -> None:
    tree, canonical = parse_condition({"not": {"any": [
        leaf(subject="Aave", chain="Binance"),
        {"metric": "price", "subject": "Ethereum", "op": "crosses_above", "threshold": 5},
    ]}})
    assert canonical["not"]["any"][0]["subject"] == "aave"
    assert canonical["not"]["any"][0]["chain"] == "bsc"
    assert canonical["not"]["any"][1]["subject"] == "coingecko:ethereum"
    # not(any(a, b)) = all(not a, not b); not gt = lte; a crossing keeps a negated flag.
    assert isinstance(tree, All)
    first, second = tree.children
    assert isinstance(first, Leaf) and first.op == "lte" and not first.negated
    assert isinstance(second, Leaf) and second.op == "crosses_above" and second.negated
    assert first.path == "condition.not.any[0]"


def test_change_pct_defaults_and_windows() -> None:
    tree, canonical = parse_condition({"metric": "change_pct", "subject": "coingecko:bitcoin",
                                       "window": 5400, "op": "lte", "threshold": -5})
    assert canonical["of"] == "price" and canonical["window"] == 5400
    assert isinstance(tree, Leaf) and tree.metric == "price" and tree.window_s == 5400
    tree, _ = parse_condition({"metric": "change_pct", "subject": "*", "chain": "*",
                               "window": "7d", "op": "lte", "threshold": -5})
    assert isinstance(tree, Leaf) and tree.metric == "tvl" and tree.window_s == 604_800


@pytest.mark.parametrize(
    ("raw", "path", "reason"),
    [
        ([], "condition", Problem.NOT_AN_OBJECT),
        ({"all": []}, "condition.all", Problem.EMPTY_GROUP),
        ({"all": [leaf()], "any": [leaf()]}, "condition.any", Problem.UNKNOWN_FIELD),
        ({"any": leaf()}, "condition.any", Problem.WRONG_TYPE),
        ({"any": [leaf()] * 33}, "condition.any", Problem.TOO_MANY_CHILDREN),
        ({"any": [{"all": [leaf()] * 20}, {"all": [leaf()] * 20}]}, "condition.any[1].all[12]",
         Problem.TOO_MANY_LEAVES),
        (leaf(metric=None), "condition.metric", Problem.UNKNOWN_METRIC),
        ({"metric": "tvl", "op": "gt", "threshold": 1}, "condition.subject",
         Problem.MISSING_FIELD),
        (leaf(subject="  "), "condition.subject", Problem.BAD_SUBJECT),
        (leaf(threshold=float("inf")), "condition.threshold", Problem.NOT_FINITE),
        (leaf(threshold=True), "condition.threshold", Problem.WRONG_TYPE),
        (leaf(window="1h"), "condition.window", Problem.WINDOW_NOT_ALLOWED),
        (leaf(metric="change_pct"), "condition.window", Problem.MISSING_FIELD),
        (leaf(metric="change_pct", window=30), "condition.window", Problem.WINDOW_TOO_SHORT),
        (leaf(metric="change_pct", window=90.5), "condition.window", Problem.BAD_WINDOW),
        (leaf(metric="change_pct", window="1h", of="volume"), "condition.of",
         Problem.UNKNOWN_METRIC),
        (leaf(op="eq", recovery=9), "condition.recovery", Problem.RECOVERY_NOT_ALLOWED),
        (leaf(op="lt", recovery=9), "condition.recovery", Problem.RECOVERY_WRONG_SIDE),
        (leaf(chain=5), "condition.chain", Problem.WRONG_TYPE),
        (leaf(metric="chain_tvl", subject="ethereum", chain="base"), "condition.chain",
         Problem.CHAIN_NOT_ALLOWED),
    ],
)
def test_parse_errors_name_path_and_reason(raw: Any, path: str, reason: Problem) -> None:
    with pytest.raises(ConditionError) as info:
        parse_condition(raw)
    assert (info.value.field, info.value.reason) == (path, reason)
    assert info.value.code == "invalid_request" and info.value.http_status == 400


def test_kleene_groups_and_foreign_series() -> None:
    tree, _ = parse_condition({"all": [
        leaf(op="lt", threshold=100.0),
        {"metric": "price", "subject": "ethereum", "op": "lt", "threshold": 2000}]})
    fn = compile_truth(tree)
    latest = {"price|coingecko:ethereum|-": Sample("price", "coingecko:ethereum", "-", 1, 1500)}
    assert fn(sample(50), latest.get) == T
    assert fn(sample(150), latest.get) == F  # FALSE wins in `all`
    assert fn(sample(50), {}.get) == U  # the other series is unknown
    assert isinstance(tree, All)
    any_fn = compile_truth(AnyOf(tree.children))
    assert any_fn(sample(150), {}.get) == U  # FALSE or UNKNOWN = UNKNOWN
    assert any_fn(sample(50), {}.get) == T


def test_wildcards_bind_to_the_event_series() -> None:
    tree, _ = parse_condition({"metric": "change_pct", "window": "1h", "subject": "*",
                               "chain": "*", "op": "lte", "threshold": -10})
    fn = compile_truth(tree)
    assert fn(sample(1, chain="arbitrum", change_1h=-12), {}.get) == T
    assert fn(sample(1, chain="-", change_1h=-12), {}.get) == U  # `*` chain is never the total
    assert fn(sample(1, chain="arbitrum", metric="price", change_1h=-12), {}.get) == U
    assert fn(sample(1, chain="arbitrum"), {}.get) == U  # no 1h reference


def test_stay_uses_recovery_and_crossings_become_levels() -> None:
    tree, _ = parse_condition({"any": [leaf(op="lt", threshold=10, recovery=12),
                                       leaf(op="crosses_above", threshold=50, recovery=45)]})
    stay = compile_truth(tree, stay=True)
    assert stay(sample(11), {}.get) == T  # between threshold and recovery: keeps firing
    assert stay(sample(13), {}.get) == F
    assert stay(sample(46, 44), {}.get) == T  # above the crossing's recovery level
    not_crossing, _ = parse_condition({"not": leaf(op="crosses_above", threshold=50)})
    assert compile_truth(not_crossing)(sample(40), {}.get) == T
    assert compile_truth(not_crossing)(sample(60, 40), {}.get) == F
    assert compile_truth(not_crossing, stay=True)(sample(60, 70), {}.get) == F


def test_explain_lists_each_comparison() -> None:
    tree, _ = parse_condition({"all": [leaf(), {"metric": "price", "subject": "bitcoin",
                                                "op": "gt", "threshold": 1}]})
    results = explain(tree, sample(11.0))
    assert [(r.path, r.truth, r.source, r.value) for r in results] == [
        ("condition.all[0]", T, "event", 11.0), ("condition.all[1]", U, "none", None)]


# --- property: the compiled functions agree with leaf_truth -------------------------------

OPS = ["gt", "gte", "lt", "lte", "eq", "ne", "crosses_above", "crosses_below"]
SUBJECTS = ["aave", "comp", "*"]
GRID = [float(v) for v in range(8, 13)]
MEASURES = st.sampled_from([None, *GRID, 10.000000000001])


@st.composite
def leaf_specs(draw: st.DrawFn) -> dict[str, Any]:
    op = draw(st.sampled_from(OPS))
    spec = leaf(op=op, subject=draw(st.sampled_from(SUBJECTS)),
                chain=draw(st.sampled_from(["-", "arb", "*"])),
                threshold=draw(st.sampled_from(GRID)))
    if spec["subject"] != "*" and spec["chain"] == "*":
        spec["chain"] = "-"
    if draw(st.booleans()):
        spec.update(metric="change_pct", of="tvl", window="1h")
    shift = draw(st.sampled_from([None, 0.0, 1.0, 2.5]))
    if shift is not None and op in ("gt", "gte", "crosses_above"):
        spec["recovery"] = spec["threshold"] - shift
    elif shift is not None and op in ("lt", "lte", "crosses_below"):
        spec["recovery"] = spec["threshold"] + shift
    if op.startswith("crosses_") and draw(st.booleans()):
        spec.pop("recovery", None)
        return {"not": spec}
    return spec


def _reference(node: Leaf, event: Sample, foreign: Any, *, stay: bool) -> int:
    """One leaf's truth spelled out with leaf_truth (what the compiled functions inline)."""
    if node.wildcard:
        if not node.matches(event.metric, event.subject, event.chain):
            return U
        src = event
    elif event.key == node.series_key:
        src = event
    else:
        src = foreign(node.series_key)
        if src is None:
            return U
    value = src.measure(node.window_s)
    if stay:
        op, threshold = stay_comparison(node)
        return leaf_truth(op, threshold, value, src.previous)
    truth = leaf_truth(node.op, node.threshold, value, src.previous)
    return 2 - truth if node.negated else truth


@settings(max_examples=400, deadline=None)
@given(specs=st.lists(leaf_specs(), min_size=1, max_size=3), group=st.sampled_from(["all", "any"]),
       subject=st.sampled_from(["aave", "comp"]), chain=st.sampled_from(["-", "arb"]),
       value=MEASURES, previous=MEASURES, change=MEASURES, other=MEASURES)
def test_compiled_truth_agrees_with_leaf_truth(
    specs: list[dict[str, Any]], group: str, subject: str, chain: str, value: float | None,
    previous: float | None, change: float | None, other: float | None,
) -> None:
    try:
        tree, _ = parse_condition(specs[0] if len(specs) == 1 else {group: specs})
    except ConditionError:
        return  # e.g. two different wildcards in one condition
    event = Sample("tvl", subject, chain, 100, 11.0 if value is None else value, previous,
                   {3600: change})
    # The series the event is not about hold `other` (or are unknown).
    latest = {} if other is None else {
        f"tvl|{s}|{c}": Sample("tvl", s, c, 90, other, None, {3600: other})
        for s in ("aave", "comp") for c in ("-", "arb")}
    leaves = list(iter_leaves(tree))
    for stay in (False, True):
        truths = [_reference(node, event, latest.get, stay=stay) for node in leaves]
        if isinstance(tree, Leaf):
            expected = truths[0]
        elif isinstance(tree, All):
            expected = 0 if 0 in truths else min(truths)
        else:
            expected = 2 if 2 in truths else max(truths)
        assert compile_truth(tree, stay=stay)(event, latest.get) == expected


def test_one_function_serves_entry_and_stay_when_they_are_the_same() -> None:
    plain = compile_rule(id=1, user_id=1, name="plain", condition={"all": [
        leaf(op="lt", threshold=10), leaf(op="gt", threshold=5, subject="comp")]})
    hysteresis = compile_rule(id=2, user_id=1, name="hysteresis",
                              condition=leaf(op="lt", threshold=10, recovery=12))
    crossing = compile_rule(id=3, user_id=1, name="crossing",
                            condition=leaf(op="crosses_above", threshold=10))
    assert plain.stay is plain.enter
    assert hysteresis.stay is not hysteresis.enter and crossing.stay is not crossing.enter
    assert hysteresis.stay(sample(11), _unknown) == T and hysteresis.enter(sample(11), _unknown) == F


def _unknown(_key: str) -> Sample | None:
    return None
