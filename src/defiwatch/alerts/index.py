"""The rule index: from an event to the few rules whose state it can change.

Pure, in memory. The cost of an event grows with the rules it can touch, not with all rules:

1. **By series.** Rules live in buckets keyed by the selector they watch: `(metric, subject,
   chain)` with `*` allowed for subject and chain. An event on `(tvl, aave, arbitrum)` looks at
   four buckets only: itself, `(tvl, aave, *)`, `(tvl, *, arbitrum)` and `(tvl, *, *)`.
2. **By threshold.** Inside a bucket, comparisons are kept per measure (the value, or a change
   window) in threshold order (truth lookups also per operator), so the ones that matter are a
   slice found by bisection.
3. **By what can change.** An instance that is ok stays ok until its condition turns TRUE;
   instances that are pending, firing or holding a fire are *active* and re-evaluated on every
   event of their series anyway (the evaluator takes them from the states, not from here). So
   the index must return every rule whose condition may have *become* TRUE. Two ways:

   - **Edges** (rules on named series: single and multi). A condition can only become TRUE if
     one of its comparisons changed truth, and a comparison `value > t` changes truth between
     the previous measure p and the current one v exactly when t lies between them. One list
     per measure serves every operator: the thresholds in [min(p, v), max(p, v)], bounds
     included and widened by the `eq` tolerance (a rule exactly on a bound is evaluated and
     decides nothing), so an event costs one slice per measure, not one per operator. Every
     comparison of the rule is an entry of its own series' bucket; an event returns the rules
     with a comparison crossed, and nothing when the measure did not move.
     A rule that holds for months (ETH above 100) costs nothing until ETH comes back to 100.
     This needs the measures the rules last saw (`Sample.before`; the engine keeps them per
     series with its cursor) and a first evaluation of each new rule: a rule added (or changed,
     or resumed) is *fresh* and returned on the next event of each of its series, which primes
     it. A measure with no previous value (change_1h of daily data, a new series) is looked up
     by truth instead (the thresholds the current value satisfies).
   - **Truth** (wildcard rules: one instance per matching series, too many to prime one by
     one). The rules whose condition may be TRUE now: for `value > t` the t below v, a prefix.
     A rule enters once, through its *trigger*: for `all`, the child cheapest to look up (if the
     `all` holds, that child holds too); for `any`, every child. What cannot be looked up
     (`ne`, a gate read from another series) makes the rule a *scan* entry of its bucket.
     Wildcard rules are mostly percent changes, which hold rarely, so their slices are short.

`tests/alerts/test_index.py` checks the indexed evaluator against `NaiveIndex` (every rule in
scope, every event) with hypothesis.
"""

from __future__ import annotations

import bisect
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

from defiwatch.alerts.rules import CompiledRule, RuleKind
from defiwatch.domain.conditions import (
    VALUE,
    All,
    AnyOf,
    Leaf,
    Node,
    Sample,
    iter_leaves,
    stay_comparison,
)
from defiwatch.domain.series import NO_CHAIN

__all__ = ["STANDARD_WINDOWS", "NaiveIndex", "RuleIndex", "Trigger"]

# The change windows every event carries (change_1h, change_24h, change_7d); others are
# computed by the engine from stored history, only for series whose rules need them.
STANDARD_WINDOWS = frozenset({3_600, 86_400, 7 * 86_400})

# Lookup operators: the leaf operators, with crossings renamed and negated crossings turned
# into the level they test (not crosses_above t holds exactly when value <= t).
_PLACEMENT = {"gt": "gt", "gte": "gte", "lt": "lt", "lte": "lte", "eq": "eq", "ne": "ne",
              "crosses_above": "xa", "crosses_below": "xb"}
_NEGATED_CROSSING = {"crosses_above": "lte", "crosses_below": "gte"}
# Relative cost of a truth lookup, to pick the trigger of an `all`: a crossing or an equality
# touches a narrow band; a percent change holds briefly; a value level holds for as long as
# the value stays past the line, so it comes last.
_COST = {"xa": 1, "xb": 1, "eq": 1}
_CHANGE_LEVEL_COST = 4
_VALUE_LEVEL_COST = 8
_SCAN_COST = 1_000
_EQ_BAND = 2e-9  # wider than conditions._EQ_REL_TOL: the band is a superset, the leaf decides
_EQ_ABS = 1e-11
_FLIP = "flip"  # the one operator of edge lists: every comparison that flips in a range


@dataclass(frozen=True, slots=True)
class Trigger:
    """One index entry: a threshold on a measure (0 = value, else a window in seconds)."""

    window_s: int
    op: str
    threshold: float

    @property
    def cost(self) -> int:
        if self.op in _COST:
            return _COST[self.op]
        return _VALUE_LEVEL_COST if self.window_s == VALUE else _CHANGE_LEVEL_COST


def _trigger(leaf: Leaf) -> Trigger:
    op = _NEGATED_CROSSING[leaf.op] if leaf.negated else _PLACEMENT[leaf.op]
    return Trigger(leaf.window_s, op, leaf.threshold)


def _stay_trigger(leaf: Leaf) -> Trigger:
    """The comparison a firing alert resolves on (recovery threshold, crossings as levels)."""
    op, threshold = stay_comparison(leaf)
    return Trigger(leaf.window_s, op, threshold)


def _edge_triggers(leaf: Leaf) -> tuple[Trigger, ...]:
    """Every comparison whose flip may change the state of a rule with this leaf: its entry
    comparison, its stay comparison, and for a crossing also the level it crosses (TRUE only
    at the crossing, it turns FALSE when the value goes back over the line, not at a crossing)."""
    out: tuple[Trigger, ...] = (_trigger(leaf), _stay_trigger(leaf))
    if leaf.op.startswith("crosses_") and not leaf.negated:
        out += (Trigger(leaf.window_s, "gt" if leaf.op == "crosses_above" else "lt",
                        leaf.threshold),)
    return out


@dataclass(slots=True)
class _Plan:
    triggers: list[Trigger] = field(default_factory=list)
    scan: bool = False

    @property
    def cost(self) -> int:
        return _SCAN_COST if self.scan else sum(t.cost for t in self.triggers)


def _truth_plan(node: Node, binding: tuple[str, str, str]) -> _Plan:
    """Truth triggers of a wildcard rule: node TRUE for an event => some trigger holds, or
    scan. The wildcard leaves read the event; any other leaf reads another series' newest
    value, which no threshold on this event can predict: scan."""
    if isinstance(node, Leaf):
        if node.selector != binding or node.op == "ne":
            return _Plan(scan=True)
        return _Plan([_trigger(node)])
    plans = [_truth_plan(child, binding) for child in node.children]
    if isinstance(node, All):
        return min(plans, key=lambda p: p.cost)  # a scan child only wins if all are scans
    assert isinstance(node, AnyOf)
    if any(p.scan for p in plans):
        return _Plan(scan=True)
    return _Plan([t for p in plans for t in p.triggers])


class _Sorted:
    """Thresholds of one (bucket, measure, operator) in ascending order, with their rules.

    Kept as two parallel lists for `bisect`; changes mark it dirty and it is re-sorted on the
    next lookup, so loading 100,000 rules costs one sort per list, not 100,000 insertions. The
    rules are kept as (id, rule) pairs: a slice of them goes into the candidates with one
    `dict.update`, a loop in C (an event on ETH can return thousands).
    """

    __slots__ = ("dirty", "entries", "pairs", "thresholds")

    def __init__(self) -> None:
        self.entries: list[tuple[float, int, CompiledRule]] = []
        self.thresholds: list[float] = []
        self.pairs: list[tuple[int, CompiledRule]] = []
        self.dirty = False

    def add(self, threshold: float, rule: CompiledRule) -> None:
        self.entries.append((threshold, rule.id, rule))
        self.dirty = True

    def remove(self, rule_id: int) -> None:
        self.entries = [e for e in self.entries if e[1] != rule_id]
        self.dirty = True

    def ready(self) -> None:
        if self.dirty:
            self.entries.sort(key=lambda e: (e[0], e[1]))
            self.thresholds = [e[0] for e in self.entries]
            self.pairs = [(e[1], e[2]) for e in self.entries]
            self.dirty = False


class _Bucket:
    """Rules watching one selector."""

    __slots__ = ("edges", "foreign", "fresh", "members", "scan", "truth", "windows")

    def __init__(self) -> None:
        self.truth: dict[int, dict[str, _Sorted]] = {}  # wildcard rules, looked up by truth
        self.scan: dict[int, CompiledRule] = {}
        self.edges: dict[int, dict[str, _Sorted]] = {}  # named-series rules, by flips
        self.fresh: dict[int, CompiledRule] = {}  # not yet evaluated on this series
        self.members: dict[int, CompiledRule] = {}  # every rule with this bucket in scope
        self.windows: Counter[int] = Counter()  # change windows used here (for custom windows)
        self.foreign: Counter[str] = Counter()  # series read as newest values by members

    def empty(self) -> bool:
        return not self.members


# Where a rule was entered: (selector, None, None, None) for membership, or (selector, kind,
# window, operator) for a threshold entry ("truth" or "edges").
_Entry = tuple[tuple[str, str, str], str | None, int | None, str | None]


def _bucket_keys(metric: str, subject: str, chain: str) -> tuple[tuple[str, str, str], ...]:
    if chain == NO_CHAIN:  # `*` as chain means a real chain, never the total
        return ((metric, subject, chain), (metric, "*", chain))
    return ((metric, subject, chain), (metric, subject, "*"), (metric, "*", chain),
            (metric, "*", "*"))


def _truth_slice(op: str, sorted_: _Sorted, value: float) -> list[tuple[int, CompiledRule]]:
    """The rules whose comparison holds for `value` (crossings: none, they need an edge)."""
    th = sorted_.thresholds
    if op == "gt":  # t < v
        return sorted_.pairs[: bisect.bisect_left(th, value)]
    if op == "gte":  # t <= v
        return sorted_.pairs[: bisect.bisect_right(th, value)]
    if op == "lt":  # t > v
        return sorted_.pairs[bisect.bisect_right(th, value):]
    if op == "lte":  # t >= v
        return sorted_.pairs[bisect.bisect_left(th, value):]
    if op == "eq":
        band = abs(value) * _EQ_BAND + _EQ_ABS
        return sorted_.pairs[bisect.bisect_left(th, value - band):
                             bisect.bisect_right(th, value + band)]
    if op == "ne":  # holds unless equal: all of them (the leaf decides)
        return sorted_.pairs
    return []


def _crossing_slice(op: str, sorted_: _Sorted, previous: float, value: float
                    ) -> list[tuple[int, CompiledRule]]:
    th = sorted_.thresholds
    if op == "xa":  # previous <= t < v
        if previous >= value:
            return []
        return sorted_.pairs[bisect.bisect_left(th, previous): bisect.bisect_left(th, value)]
    if previous <= value:  # xb: v < t <= previous
        return []
    return sorted_.pairs[bisect.bisect_right(th, value): bisect.bisect_right(th, previous)]


class RuleIndex:
    """Active (not paused) rules, indexed for `candidates` (see module docstring)."""

    def __init__(self, rules: Iterable[CompiledRule] = ()) -> None:
        self._rules: dict[int, CompiledRule] = {}
        self._buckets: dict[tuple[str, str, str], _Bucket] = {}
        self._entries: dict[int, list[_Entry]] = {}
        self._lookup: dict[tuple[str, str, str], tuple[_Bucket, ...]] = {}
        for rule in rules:
            self.add(rule)

    # --- maintenance ----------------------------------------------------------------------

    def __len__(self) -> int:
        return len(self._rules)

    def __contains__(self, rule_id: object) -> bool:
        return rule_id in self._rules

    def get(self, rule_id: int) -> CompiledRule | None:
        return self._rules.get(rule_id)

    def rules(self) -> Iterator[CompiledRule]:
        return iter(self._rules.values())

    def add(self, rule: CompiledRule) -> None:
        """Add a rule (fresh: evaluated on the next event of each of its series), replacing the
        rule with the same id if present."""
        if rule.id in self._rules:
            self.remove(rule.id)
        self._rules[rule.id] = rule
        entries: list[_Entry] = []
        if rule.kind is RuleKind.WILDCARD:
            assert rule.binding is not None
            bucket = self._member(rule, rule.binding, entries)
            plan = _truth_plan(rule.tree, rule.binding)
            if plan.scan:
                bucket.scan[rule.id] = rule
            else:
                for trigger in dict.fromkeys(plan.triggers):
                    self._enter(bucket.truth, trigger, rule)
                    entries.append((rule.binding, "truth", trigger.window_s, trigger.op))
        else:
            leaves = list(iter_leaves(rule.tree))
            for key in rule.scope:
                local = [leaf for leaf in leaves if leaf.series_key == key]
                selector = local[0].selector
                bucket = self._member(rule, selector, entries)
                bucket.fresh[rule.id] = rule
                # Entry and stay comparisons: a flip of either may change the state, so no
                # instance of these rules needs evaluating unless one of them flipped. A level
                # comparison of any operator flips exactly when its threshold lies between the
                # previous and the current measure, so all of them share one list per window.
                lines = {(t.window_s, t.threshold) for leaf in local for t in _edge_triggers(leaf)}
                for window_s, threshold in sorted(lines):
                    self._enter(bucket.edges, Trigger(window_s, _FLIP, threshold), rule)
                entries.extend((selector, "edges", window_s, _FLIP)
                               for window_s in sorted({w for w, _ in lines}))
        self._entries[rule.id] = entries

    def _member(self, rule: CompiledRule, selector: tuple[str, str, str],
                entries: list[_Entry]) -> _Bucket:
        bucket = self._buckets.get(selector)
        if bucket is None:
            bucket = self._buckets[selector] = _Bucket()
            self._lookup.clear()  # cached bucket lists may now miss this one
        bucket.members[rule.id] = rule
        bucket.windows.update(rule.windows)
        bucket.foreign.update(rule.foreign)
        entries.append((selector, None, None, None))
        return bucket

    @staticmethod
    def _enter(table: dict[int, dict[str, _Sorted]], trigger: Trigger, rule: CompiledRule) -> None:
        by_op = table.setdefault(trigger.window_s, {})
        sorted_ = by_op.get(trigger.op)
        if sorted_ is None:
            sorted_ = by_op[trigger.op] = _Sorted()
        sorted_.add(trigger.threshold, rule)

    def remove(self, rule_id: int) -> CompiledRule | None:
        rule = self._rules.pop(rule_id, None)
        if rule is None:
            return None
        for selector, kind, window_s, op in self._entries.pop(rule_id, []):
            bucket = self._buckets.get(selector)
            if bucket is None:
                continue
            if kind is None:
                if rule_id in bucket.members:
                    del bucket.members[rule_id]
                    bucket.windows.subtract(rule.windows)
                    bucket.foreign.subtract(rule.foreign)
                    bucket.windows += Counter()  # drop zero counts
                    bucket.foreign += Counter()
                bucket.scan.pop(rule_id, None)
                bucket.fresh.pop(rule_id, None)
            else:
                assert window_s is not None and op is not None
                table = bucket.truth if kind == "truth" else bucket.edges
                table[window_s][op].remove(rule_id)
            if bucket.empty():
                del self._buckets[selector]
                self._lookup.clear()
        return rule

    def prepare(self) -> None:
        """Sort every threshold list now rather than on its first lookup (after a bulk load,
        so that the first events do not pay for the sorting)."""
        for bucket in self._buckets.values():
            for table in (bucket.truth, bucket.edges):
                for by_op in table.values():
                    for sorted_ in by_op.values():
                        sorted_.ready()

    def unprime(self) -> None:
        """Make every named-series rule fresh again. The engine calls this when a batch failed
        after `candidates` primed rules whose evaluation was then rolled back."""
        for bucket in self._buckets.values():
            for rule_id, rule in bucket.members.items():
                if rule.kind is not RuleKind.WILDCARD:
                    bucket.fresh[rule_id] = rule

    def _buckets_for(self, metric: str, subject: str, chain: str) -> tuple[_Bucket, ...]:
        key = (metric, subject, chain)
        found = self._lookup.get(key)
        if found is None:
            found = tuple(
                b for k in _bucket_keys(metric, subject, chain)
                if (b := self._buckets.get(k)) is not None
            )
            self._lookup[key] = found
        return found

    # --- queries --------------------------------------------------------------------------

    def candidates(self, sample: Sample) -> dict[int, CompiledRule]:
        """Rules whose condition may have become TRUE with this event (never misses one).

        Fresh rules of the sample's series are returned once and are primed by it: the caller
        must evaluate every candidate (see `unprime` for a caller that could not).
        """
        found: dict[int, CompiledRule] = {}
        before = sample.before
        for bucket in self._buckets_for(sample.metric, sample.subject, sample.chain):
            if bucket.scan:
                found.update(bucket.scan)
            if bucket.fresh:
                found.update(bucket.fresh)
                bucket.fresh.clear()
            for window_s, by_op in bucket.truth.items():
                value = sample.value if window_s == VALUE else sample.changes.get(window_s)
                if value is None:
                    continue
                for op, sorted_ in by_op.items():
                    if sorted_.dirty:
                        sorted_.ready()
                    if op in ("xa", "xb"):
                        previous = sample.previous if window_s == VALUE else None
                        hits = ([] if previous is None
                                else _crossing_slice(op, sorted_, previous, value))
                    else:
                        hits = _truth_slice(op, sorted_, value)
                    found.update(hits)
            for window_s, by_op in bucket.edges.items():
                value = sample.value if window_s == VALUE else sample.changes.get(window_s)
                if value is None:
                    continue  # the comparison is UNKNOWN now: that never changes a state
                prior = before.get(window_s) if before is not None else None
                if prior == value:
                    continue  # nothing can flip (the value did not move on this measure)
                sorted_ = by_op[_FLIP]
                if sorted_.dirty:
                    sorted_.ready()
                if prior is None:
                    # No previous measure: the comparisons were UNKNOWN and now have a truth,
                    # either of which may matter (an entry that holds, a stay that does not).
                    # Rare (a window's first reference): take them all.
                    found.update(sorted_.pairs)
                    continue
                # The thresholds between the two measures, bounds included and widened by the
                # `eq` tolerance: every level comparison (gt ... lte, eq, ne, and the level a
                # crossing crosses) whose truth differs between them, a few on a bound too.
                lo, hi = (prior, value) if prior < value else (value, prior)
                th = sorted_.thresholds
                start = bisect.bisect_left(th, lo - abs(lo) * _EQ_BAND - _EQ_ABS)
                end = bisect.bisect_right(th, hi + abs(hi) * _EQ_BAND + _EQ_ABS)
                found.update(sorted_.pairs[start:end])
        return found

    def in_scope(self, metric: str, subject: str, chain: str) -> Iterator[CompiledRule]:
        """Every rule an event on this series is in scope of (each once)."""
        seen: set[int] = set()
        for bucket in self._buckets_for(metric, subject, chain):
            for rule_id, rule in bucket.members.items():
                if rule_id not in seen:
                    seen.add(rule_id)
                    yield rule

    def watched(self, metric: str, subject: str, chain: str) -> bool:
        """Whether any rule has this series in scope."""
        return bool(self._buckets_for(metric, subject, chain))

    def multi_rules(self, metric: str, subject: str, chain: str) -> list[int]:
        """Ids of MULTI rules (one instance fed by several series) in scope of this series."""
        return [r.id for r in self.in_scope(metric, subject, chain) if r.kind is RuleKind.MULTI]

    def custom_windows(self, metric: str, subject: str, chain: str) -> frozenset[int]:
        """Change windows (s) the rules on this series need beyond the standard three."""
        out: set[int] = set()
        for bucket in self._buckets_for(metric, subject, chain):
            out.update(w for w in bucket.windows if w not in STANDARD_WINDOWS)
        return frozenset(out)

    def foreign_keys(self, metric: str, subject: str, chain: str) -> frozenset[str]:
        """Series whose newest values the rules in scope of this series may read."""
        out: set[str] = set()
        for bucket in self._buckets_for(metric, subject, chain):
            out.update(bucket.foreign)
        return frozenset(out)


class NaiveIndex:
    """Every rule in scope is a candidate: the baseline for benchmarks and the oracle for the
    property tests (same interface as RuleIndex for what the evaluator needs)."""

    def __init__(self, rules: Iterable[CompiledRule] = ()) -> None:
        self._rules: dict[int, CompiledRule] = {r.id: r for r in rules}

    def __len__(self) -> int:
        return len(self._rules)

    def get(self, rule_id: int) -> CompiledRule | None:
        return self._rules.get(rule_id)

    def add(self, rule: CompiledRule) -> None:
        self._rules[rule.id] = rule

    def remove(self, rule_id: int) -> CompiledRule | None:
        return self._rules.pop(rule_id, None)

    def candidates(self, sample: Sample) -> dict[int, CompiledRule]:
        return {r.id: r for r in self._rules.values() if r.in_scope(sample)}
