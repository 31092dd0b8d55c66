"""The rule index (alerts/index.py): unit checks, and hypothesis checking that the indexed
evaluator decides exactly what the naive evaluate-every-rule loop decides."""

from __future__ import annotations

import os
from typing import Any

import hypothesis.strategies as st
from hypothesis import HealthCheck, given, settings

from defiwatch.alerts.evaluate import Evaluator, MemoryStates
from defiwatch.alerts.index import NaiveIndex, RuleIndex
from defiwatch.alerts.lifecycle import OK_STATE, Action, due_at, step
from defiwatch.alerts.rules import CompiledRule, RuleKind, compile_rule
from defiwatch.domain.conditions import ConditionError, Foreign, Sample

TVL_SUBJECTS = ["a", "b", "c"]
COINS = ["coingecko:x", "coingecko:y"]
CHAINS = ["-", "arb", "eth"]
GRID = [float(v) for v in range(0, 11)]
OPS = ["gt", "gte", "lt", "lte", "eq", "ne", "crosses_above", "crosses_below"]


def rule(rule_id: int, condition: dict[str, Any], **kw: Any) -> CompiledRule:
    return compile_rule(id=rule_id, user_id=1, name=f"r{rule_id}", condition=condition,
                        channels=[{"type": "push"}], **kw)


def tvl(value: float, subject: str = "a", chain: str = "-", previous: float | None = None,
        change_1h: float | None = None) -> Sample:
    before = None if previous is None else {0: previous}
    return Sample("tvl", subject, chain, 1, value, previous, {3600: change_1h}, before=before)


def test_lookups_touch_only_rules_whose_comparison_flips() -> None:
    rules = [rule(i, {"metric": "tvl", "subject": "a", "op": "gt", "threshold": float(i)})
             for i in range(100)]
    rules.append(rule(100, {"metric": "tvl", "subject": "b", "op": "gt", "threshold": 0}))
    rules.append(rule(101, {"metric": "tvl", "subject": "a", "op": "crosses_above",
                            "threshold": 50.5}))
    rules.append(rule(102, {"metric": "change_pct", "window": "1h", "subject": "*",
                            "chain": "*", "op": "lte", "threshold": -10}))
    index = RuleIndex(rules)
    # New rules are fresh: the first event of their series evaluates them all (and primes).
    assert len(index.candidates(tvl(10.5))) == 101
    # Then only the comparisons that change truth between the previous value and this one.
    assert sorted(index.candidates(tvl(12.5, previous=10.5))) == [11, 12]
    assert sorted(index.candidates(tvl(9.5, previous=12.5))) == [10, 11, 12]
    assert index.candidates(tvl(9.7, previous=9.5)) == {}
    assert 101 in index.candidates(tvl(51, previous=50))  # the line was crossed upwards
    assert 101 not in index.candidates(tvl(52, previous=51))  # no crossing, no resolve
    assert 101 in index.candidates(tvl(50, previous=51))  # back below: a firing one resolves
    # Without a previous value (the comparison was UNKNOWN) all of them: any may change state.
    assert len(index.candidates(tvl(3.5))) == 101
    # Wildcard rules are looked up by truth, never by flips.
    assert list(index.candidates(tvl(0, "c", "arb", change_1h=-12))) == [102]
    assert list(index.candidates(tvl(0, "c", "-", change_1h=-12))) == []  # `*` is not total
    index.remove(5)
    assert 5 not in index.candidates(tvl(6, previous=4)) and len(index) == 102
    index.add(rules[5])
    assert 5 in index.candidates(tvl(80, previous=81))  # re-added: fresh again


def test_rule_kinds_and_scope() -> None:
    single = rule(1, {"all": [{"metric": "tvl", "subject": "a", "op": "gt", "threshold": 1},
                              {"metric": "change_pct", "subject": "a", "window": 5400,
                               "op": "lt", "threshold": 1}]})
    multi = rule(2, {"any": [{"metric": "tvl", "subject": "a", "op": "gt", "threshold": 1},
                             {"metric": "price", "subject": "x", "op": "lt", "threshold": 1}]})
    wild = rule(3, {"all": [{"metric": "tvl", "subject": "*", "chain": "arb", "op": "gt",
                             "threshold": 1},
                            {"metric": "price", "subject": "x", "op": "lt", "threshold": 1}]})
    assert (single.kind, multi.kind, wild.kind) == (RuleKind.SINGLE, RuleKind.MULTI,
                                                     RuleKind.WILDCARD)
    index = RuleIndex([single, multi, wild])
    assert index.custom_windows("tvl", "a", "-") == frozenset({5400})
    assert index.multi_rules("price", "coingecko:x", "-") == [2]
    assert index.foreign_keys("tvl", "z", "arb") == frozenset({"price|coingecko:x|-"})
    assert wild.instance("tvl|z|arb") == "tvl|z|arb" and multi.instance("tvl|a|-") == ""


# --- property: indexed == naive ------------------------------------------------------------


@st.composite
def leaves(draw: st.DrawFn) -> dict[str, Any]:
    family = draw(st.sampled_from(["tvl", "price"]))
    change = draw(st.booleans())
    op = draw(st.sampled_from(OPS[:6] if change else OPS))
    if family == "tvl":
        subject = draw(st.sampled_from([*TVL_SUBJECTS, "*"]))
        chain = draw(st.sampled_from([*CHAINS, "*"]))
    else:
        subject, chain = draw(st.sampled_from([*COINS, "*"])), "-"
    out: dict[str, Any] = {"subject": subject, "chain": chain, "op": op,
                           "threshold": draw(st.sampled_from(GRID))}
    if change:
        out.update(metric="change_pct", of=family,
                   window=draw(st.sampled_from(["1h", "24h"])))
        out["threshold"] -= 5
    else:
        out["metric"] = family
    if op in ("gt", "gte", "crosses_above") and draw(st.booleans()):
        out["recovery"] = out["threshold"] - draw(st.sampled_from([0.0, 1.0, 2.5]))
    elif op in ("lt", "lte", "crosses_below") and draw(st.booleans()):
        out["recovery"] = out["threshold"] + draw(st.sampled_from([0.0, 1.0, 2.5]))
    return out


def _strip_recovery(node: dict[str, Any]) -> dict[str, Any]:
    if "not" in node:
        return {"not": _strip_recovery(node["not"])}
    for kind in ("all", "any"):
        if kind in node:
            return {kind: [_strip_recovery(c) for c in node[kind]]}
    return {k: v for k, v in node.items() if k != "recovery"}


conditions = st.recursive(
    leaves(),
    lambda children: st.one_of(
        st.builds(lambda c: {"all": c}, st.lists(children, min_size=1, max_size=3)),
        st.builds(lambda c: {"any": c}, st.lists(children, min_size=1, max_size=3)),
        st.builds(lambda c: {"not": _strip_recovery(c)}, children),
    ),
    max_leaves=5,
)


@st.composite
def rule_sets(draw: st.DrawFn) -> list[CompiledRule]:
    out: list[CompiledRule] = []
    for condition in draw(st.lists(conditions, min_size=1, max_size=12)):
        try:
            out.append(rule(
                len(out) + 1, condition,
                for_seconds=draw(st.sampled_from([0, 5])),
                throttle_minutes=draw(st.sampled_from([0, 0.2])),
                repeat_minutes=draw(st.sampled_from([None, 1.0])),
                notify_on_resolve=draw(st.booleans())))
        except ConditionError:
            continue  # e.g. two different wildcards in one rule
    return out


SERIES = ([("tvl", s, c) for s in TVL_SUBJECTS for c in CHAINS]
          + [("price", coin, "-") for coin in COINS])


@st.composite
def timelines(draw: st.DrawFn) -> list[tuple[str, Any]]:
    steps: list[tuple[str, Any]] = []
    for _ in range(draw(st.integers(1, 40))):
        kind = draw(st.sampled_from(["event", "event", "event", "tick", "remove", "readd"]))
        if kind == "event":
            series = draw(st.sampled_from(SERIES))
            value = draw(st.sampled_from([*GRID, 4.5, 7.25]))
            changes = {3600: draw(st.sampled_from([None, *[g - 5 for g in GRID]])),
                       86400: draw(st.sampled_from([None, -9.0, 0.0, 3.0]))}
            steps.append((kind, (series, value, changes, draw(st.floats(0, 40)))))
        elif kind == "tick":
            steps.append((kind, draw(st.floats(0, 90))))
        else:
            steps.append((kind, draw(st.integers(1, 12))))
    return steps


def _measures(sample: Sample) -> dict[int, float | None]:
    return {0: sample.value, **sample.changes}


# DEFIWATCH_TEST_EXAMPLES raises the example count for a deeper run (e.g. 20000).
@settings(max_examples=int(os.environ.get("DEFIWATCH_TEST_EXAMPLES", "300")), deadline=None,
          suppress_health_check=[HealthCheck.too_slow])
@given(rules=rule_sets(), steps=timelines())
def test_indexed_engine_decides_like_the_naive_one(
    rules: list[CompiledRule], steps: list[tuple[str, Any]]
) -> None:
    fast, slow = Evaluator(RuleIndex(rules)), Evaluator(NaiveIndex(rules))
    by_id = {r.id: r for r in rules}
    fast_states, slow_states, ref_states = MemoryStates(), MemoryStates(), MemoryStates()
    latest: dict[str, Sample] = {}
    now, ts = 1_000.0, 1_700_000_000
    for kind, arg in steps:
        if kind == "remove":  # a rule deleted or paused mid-run
            fast.index.remove(arg)
            slow.index.remove(arg)
            continue
        if kind == "readd":  # resumed (or changed back): fresh in the index
            if arg in by_id and fast.index.get(arg) is None:
                fast.index.add(by_id[arg])
                slow.index.add(by_id[arg])
            continue
        if kind == "tick":
            now += arg
            due_fast = _due(fast, fast_states, now)
            due_slow = _due(slow, slow_states, now)
            assert due_fast == due_slow
            assert _due(slow, ref_states, now) == due_slow
            ticked_fast, ticked_slow = fast.tick(due_fast, now), slow.tick(due_slow, now)
            ticked_ref = slow.tick(due_slow, now)
            assert [_key(d) for d in ticked_fast] == [_key(d) for d in ticked_slow]
            for states, ticked in ((fast_states, ticked_fast), (slow_states, ticked_slow),
                                   (ref_states, ticked_ref)):
                for d in ticked:
                    states.set(d.rule, d.instance, d.step.state)
            continue
        (metric, subject, chain), value, changes, dt = arg
        now += dt
        ts += 60
        sample_key = f"{metric}|{subject}|{chain}"
        last = latest.get(sample_key)
        sample = Sample(metric, subject, chain, ts, value, last.value if last else None, changes,
                        before=_measures(last) if last else None)
        decided_fast, _ = fast.evaluate(sample, fast_states, now, foreign=latest.get)
        decided_slow, _ = slow.evaluate(_copy(sample), slow_states, now, foreign=latest.get)
        assert sorted(map(_key, decided_fast)) == sorted(map(_key, decided_slow))
        decided_ref = _reference(slow.index, sample, ref_states, now, latest.get)
        assert sorted(map(_key, decided_slow)) == decided_ref
        latest[sample_key] = sample
    assert dict(fast_states.items()) == dict(slow_states.items())
    assert dict(slow_states.items()) == dict(ref_states.items())


def _reference(index: NaiveIndex, sample: Sample, states: MemoryStates, now: float,
               foreign: Foreign) -> list[tuple[Any, ...]]:
    """The lifecycle by its definition: `lifecycle.step` on every instance in scope with both
    truths evaluated, no skipping: the evaluator (which skips the cases step leaves alone and
    calls the acting transitions directly) must decide exactly this."""
    out = []
    for rule_ in index.candidates(sample):
        r = index.get(rule_)
        assert r is not None
        instance = r.instance(sample.key)
        state = states.get(r.id, instance) or OK_STATE
        result = step(r.policy, state, r.enter(sample, foreign), r.stay(sample, foreign),
                      ts=sample.ts, series=sample.key, now=now)
        if result.action is not Action.NONE:
            states.set(r, instance, result.state)
            out.append((r.id, instance, result.action.value, result.reason.value, result.notify))
    return sorted(out)


def _copy(sample: Sample) -> Sample:
    return Sample(sample.metric, sample.subject, sample.chain, sample.ts, sample.value,
                  sample.previous, dict(sample.changes), before=sample.before)


def _due(evaluator: Evaluator, states: MemoryStates, now: float) -> list[Any]:
    out = []
    for (rule_id, instance), state in sorted(states.items()):
        rule_ = evaluator.index.get(rule_id)
        if rule_ is None:
            continue
        due = due_at(rule_.policy, state)
        if due is not None and due <= now:
            out.append((rule_id, instance, state))
    return out


def _key(d: Any) -> tuple[Any, ...]:
    return (d.rule.id, d.instance, d.step.action.value, d.step.reason.value, d.step.notify)
