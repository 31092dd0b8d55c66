"""Alert conditions: the boolean tree users write, its validation, and its evaluation.

Pure: JSON in, typed tree out; a `Sample` (one series at one instant) in, a `Truth` out. No I/O,
no clock. The alert engine (alerts/) indexes the tree and drives the lifecycle; this module only
says what the condition means.

The JSON users write (docs/alerts.md has the full grammar and worked examples)::

    {"all": [c, ...]}    every child holds          (1..MAX_CHILDREN children)
    {"any": [c, ...]}    at least one child holds
    {"not": c}           the child does not hold
    {"metric": "tvl", "subject": "aave", "chain": "ethereum", "op": "lt", "threshold": 1e9,
     "recovery": 1.05e9}
    {"metric": "change_pct", "of": "tvl", "window": "1h", "subject": "*", "chain": "arbitrum",
     "op": "lte", "threshold": -10}

Truth is three-valued (Kleene): a leaf whose value is unknown (no 1h reference for daily data, a
series never seen, a crossing without a previous value) is UNKNOWN, and UNKNOWN never fires nor
resolves an alert: it keeps the last state. With FALSE < UNKNOWN < TRUE, `all` is `min`, `any`
is `max` and `not` is `2 - x`, which is why the values are 0, 1, 2.

`not` is pushed down to the leaves when parsing (negation normal form): `not gt 5` becomes
`lte 5`, so the rule index only ever sees `all`, `any` and leaves. Crossings cannot be inverted
into another operator; their leaf keeps a `negated` flag instead.
"""

from __future__ import annotations

import enum
import math
import operator
import sys
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from defiwatch.domain.series import (
    METRICS,
    NO_CHAIN,
    PRICE_METRICS,
    name_problem,
    normalize_chain,
    normalize_subject,
)
from defiwatch.errors import ValidationError

__all__ = [
    "ANY",
    "CONDITION_JSON_SCHEMA",
    "MAX_CHILDREN",
    "MAX_DEPTH",
    "MAX_LEAVES",
    "MAX_WINDOW_S",
    "MIN_WINDOW_S",
    "NAMED_WINDOWS",
    "OPERATORS",
    "All",
    "AnyOf",
    "ConditionError",
    "Foreign",
    "Leaf",
    "LeafResult",
    "Node",
    "Problem",
    "Sample",
    "Truth",
    "compile_truth",
    "explain",
    "iter_leaves",
    "leaf_truth",
    "parse_condition",
    "stay_comparison",
    "stays_as_entered",
    "window_seconds",
]

ANY = "*"
# Measure key of a leaf: 0 = the series value; otherwise a change window in seconds.
VALUE = 0
NAMED_WINDOWS = {"1h": 3_600, "24h": 86_400, "7d": 7 * 86_400}
MIN_WINDOW_S = 60
MAX_WINDOW_S = 7 * 86_400  # the processor keeps 10.5 days of history; 7d is the longest window
MAX_DEPTH = 6  # nesting of all/any/not: deeper trees are unreadable, not more expressive
MAX_CHILDREN = 32
MAX_LEAVES = 32  # per rule: evaluation cost and index entries grow with leaves
OPERATORS = ("gt", "gte", "lt", "lte", "eq", "ne", "crosses_above", "crosses_below")
CHANGE_METRIC = "change_pct"
_EQ_REL_TOL = 1e-9  # `eq` compares floats with this relative tolerance, not bit for bit
_EQ_ABS_TOL = 1e-12

_INVERSE = {"gt": "lte", "gte": "lt", "lt": "gte", "lte": "gt", "eq": "ne", "ne": "eq"}
_LEAF_KEYS = frozenset({"metric", "of", "window", "subject", "chain", "op", "threshold", "recovery"})


class Truth(enum.IntEnum):
    """Kleene truth; ordered so that `all` is min, `any` is max and `not` is 2 - x."""

    FALSE = 0
    UNKNOWN = 1
    TRUE = 2


class Problem(enum.StrEnum):
    """Why a condition was refused; carried by ConditionError.reason."""

    NOT_AN_OBJECT = "not_an_object"
    UNKNOWN_FIELD = "unknown_field"
    MISSING_FIELD = "missing_field"
    WRONG_TYPE = "wrong_type"
    EMPTY_GROUP = "empty_group"
    TOO_MANY_CHILDREN = "too_many_children"
    TOO_DEEP = "too_deep"
    TOO_MANY_LEAVES = "too_many_leaves"
    UNKNOWN_METRIC = "unknown_metric"
    UNKNOWN_OPERATOR = "unknown_operator"
    NOT_FINITE = "not_finite"
    BAD_WINDOW = "bad_window"
    WINDOW_TOO_SHORT = "window_too_short"
    WINDOW_TOO_LONG = "window_too_long"
    WINDOW_NOT_ALLOWED = "window_not_allowed"
    BAD_SUBJECT = "bad_subject"
    BAD_CHAIN = "bad_chain"
    CHAIN_NOT_ALLOWED = "chain_not_allowed"
    RECOVERY_NOT_ALLOWED = "recovery_not_allowed"
    RECOVERY_WRONG_SIDE = "recovery_wrong_side"
    CROSSING_ON_CHANGE = "crossing_on_change"
    MIXED_WILDCARDS = "mixed_wildcards"


class ConditionError(ValidationError):
    """A condition is invalid. `field` is the JSON path at fault (e.g. `condition.all[1].window`),
    `reason` the named problem; the message says what is wrong and what is allowed."""

    def __init__(self, reason: Problem, message: str, *, field: str) -> None:
        super().__init__(f"{message} ({reason.value})", field=field)
        self.reason = reason


@dataclass(frozen=True, slots=True)
class Leaf:
    """One comparison on one series (after negation normal form).

    `metric` is the series metric watched (`tvl`, `price`, ...); `window_s` is 0 for the value
    itself, else the change window in seconds (the leaf was `change_pct`). `subject` and `chain`
    may be ANY. `recovery` is the threshold an alert must get back over to resolve (hysteresis);
    None means the threshold itself. `negated` is only ever True for crossings (see module doc).
    """

    path: str
    metric: str
    window_s: int
    subject: str
    chain: str
    op: str
    threshold: float
    recovery: float | None = None
    negated: bool = False

    @property
    def wildcard(self) -> bool:
        return self.subject == ANY or self.chain == ANY

    @property
    def series_key(self) -> str:
        """`metric|subject|chain`, the same text as `str(SeriesKey)` (wildcards kept)."""
        return f"{self.metric}|{self.subject}|{self.chain}"

    @property
    def selector(self) -> tuple[str, str, str]:
        return (self.metric, self.subject, self.chain)

    def matches(self, metric: str, subject: str, chain: str) -> bool:
        """Whether a series is one this leaf watches. ANY as chain means every real chain, not
        the protocol total (chain `-`): "on any chain" is per chain."""
        if metric != self.metric:
            return False
        if self.subject != ANY and subject != self.subject:
            return False
        if self.chain == ANY:
            return chain != NO_CHAIN
        return chain == self.chain


@dataclass(frozen=True, slots=True)
class All:
    children: tuple[Node, ...]
    path: str = ""


@dataclass(frozen=True, slots=True)
class AnyOf:
    children: tuple[Node, ...]
    path: str = ""


Node = Leaf | All | AnyOf


@dataclass(slots=True)
class Sample:
    """One series at one instant, as a condition sees it.

    `changes` maps a window in seconds to the percent change over it (None: no reference).
    `previous` is the value before this one, for crossings; None when unknown (a value read
    from the hot cache has none). `before` holds the measures (0 = value, else a window) of the
    previous observation the rules were evaluated on, when known: the rule index looks up only
    the comparisons that flip between `before` and now (alerts/index.py).
    """

    metric: str
    subject: str
    chain: str
    ts: int
    value: float
    previous: float | None = None
    changes: dict[int, float | None] = field(default_factory=dict)
    key: str = ""
    before: dict[int, float | None] | None = None

    def __post_init__(self) -> None:
        if not self.key:
            self.key = f"{self.metric}|{self.subject}|{self.chain}"

    def measure(self, window_s: int) -> float | None:
        return self.value if window_s == VALUE else self.changes.get(window_s)


# Looks up the newest known sample of another series by its key (`metric|subject|chain`).
Foreign = Callable[[str], Sample | None]


def _no_foreign(_key: str) -> Sample | None:
    return None


# --- parsing -------------------------------------------------------------------------------


@dataclass(slots=True)
class _Budget:
    leaves: int = 0


def parse_condition(raw: Any, path: str = "condition") -> tuple[Node, dict[str, Any]]:
    """Validate a condition; return its tree in negation normal form and its canonical JSON.

    The canonical JSON is what is stored and shown back: the user's tree with subjects and
    chains normalised (`Aave` -> `aave`, `ethereum` -> `coingecko:ethereum` for prices) and
    thresholds as floats.

    Raises:
        ConditionError: the first problem found, with its JSON path and named reason.
    """
    budget = _Budget()
    canonical = _canonical(raw, path, depth=0, budget=budget, under_not=False)
    tree = _to_nnf(canonical, path, negate=False)
    _check_wildcards(tree)
    return tree, canonical


def _fail(reason: Problem, message: str, path: str) -> ConditionError:
    return ConditionError(reason, message, field=path)


def _canonical(raw: Any, path: str, *, depth: int, budget: _Budget, under_not: bool) -> dict[str, Any]:
    if not isinstance(raw, Mapping):
        raise _fail(Problem.NOT_AN_OBJECT, "a condition must be an object: a leaf, or a group "
                    "{\"all\": [...]}, {\"any\": [...]} or {\"not\": {...}}", path)
    groups = [k for k in ("all", "any", "not") if k in raw]
    if groups:
        if len(raw) != 1:
            extra = sorted(set(raw) - {groups[0]})
            raise _fail(Problem.UNKNOWN_FIELD, f"a group has exactly one key; unexpected "
                        f"{', '.join(map(repr, extra))}", f"{path}.{extra[0]}")
        if depth >= MAX_DEPTH:
            raise _fail(Problem.TOO_DEEP, f"groups nest at most {MAX_DEPTH} levels deep", path)
        kind = groups[0]
        if kind == "not":
            child = _canonical(raw["not"], f"{path}.not", depth=depth + 1, budget=budget,
                               under_not=True)
            return {"not": child}
        items = raw[kind]
        if not isinstance(items, list):
            raise _fail(Problem.WRONG_TYPE, f"'{kind}' takes a list of conditions", f"{path}.{kind}")
        if not items:
            raise _fail(Problem.EMPTY_GROUP, f"an '{kind}' group needs at least one condition",
                        f"{path}.{kind}")
        if len(items) > MAX_CHILDREN:
            raise _fail(Problem.TOO_MANY_CHILDREN, f"an '{kind}' group takes at most "
                        f"{MAX_CHILDREN} conditions", f"{path}.{kind}")
        return {kind: [
            _canonical(item, f"{path}.{kind}[{i}]", depth=depth + 1, budget=budget,
                       under_not=under_not)
            for i, item in enumerate(items)
        ]}
    budget.leaves += 1
    if budget.leaves > MAX_LEAVES:
        raise _fail(Problem.TOO_MANY_LEAVES, f"a rule has at most {MAX_LEAVES} comparisons", path)
    return _canonical_leaf(raw, path, under_not=under_not)


def _canonical_leaf(raw: Mapping[str, Any], path: str, *, under_not: bool) -> dict[str, Any]:
    unknown = sorted(str(k) for k in set(raw) - _LEAF_KEYS)
    if unknown:
        raise _fail(Problem.UNKNOWN_FIELD, f"unknown field {unknown[0]!r}; a comparison has "
                    f"{', '.join(sorted(_LEAF_KEYS))}, a group is all/any/not", f"{path}.{unknown[0]}")
    for key in ("metric", "subject", "op", "threshold"):
        if key not in raw:
            raise _fail(Problem.MISSING_FIELD, f"'{key}' is required", f"{path}.{key}")
    metric = raw["metric"]
    known = sorted({*METRICS, CHANGE_METRIC})
    if not isinstance(metric, str) or metric not in known:
        raise _fail(Problem.UNKNOWN_METRIC, f"unknown metric {metric!r}; known: {', '.join(known)}",
                    f"{path}.metric")
    out: dict[str, Any] = {"metric": metric}
    subject_raw = raw["subject"]
    if not isinstance(subject_raw, str) or not subject_raw.strip():
        raise _fail(Problem.BAD_SUBJECT, "subject must be a protocol slug, a coin id "
                    "(coingecko:bitcoin) or '*' for any", f"{path}.subject")
    if problem := name_problem(subject_raw):
        raise _fail(Problem.BAD_SUBJECT, f"subject {problem}", f"{path}.subject")
    if metric == CHANGE_METRIC:
        of = raw.get("of")
        if of is None:
            # A coin id names a price series; anything else is a protocol's TVL.
            of = "price" if ":" in subject_raw else "tvl"
        if not isinstance(of, str) or of not in METRICS:
            raise _fail(Problem.UNKNOWN_METRIC, f"'of' must be a series metric; known: "
                        f"{', '.join(sorted(METRICS))}", f"{path}.of")
        out["of"] = of
        out["window"] = _window(raw.get("window"), f"{path}.window")
        series_metric = of
    else:
        for key in ("of", "window"):
            if key in raw:
                raise _fail(Problem.WINDOW_NOT_ALLOWED, f"'{key}' only applies to "
                            f"metric 'change_pct'", f"{path}.{key}")
        series_metric = metric
    subject = ANY if subject_raw.strip() == ANY else normalize_subject(series_metric, subject_raw)
    if not subject:
        raise _fail(Problem.BAD_SUBJECT, "subject has no usable characters", f"{path}.subject")
    chain_raw = raw.get("chain")
    if chain_raw is not None and not isinstance(chain_raw, str):
        raise _fail(Problem.WRONG_TYPE, "chain must be a chain slug, '*' for any chain, or "
                    "omitted for the protocol total", f"{path}.chain")
    if chain_raw is not None and (problem := name_problem(chain_raw)):
        raise _fail(Problem.BAD_CHAIN, f"chain {problem}", f"{path}.chain")
    chain = ANY if chain_raw is not None and chain_raw.strip() == ANY else normalize_chain(chain_raw)
    if series_metric in PRICE_METRICS and chain != NO_CHAIN:
        raise _fail(Problem.CHAIN_NOT_ALLOWED, f"{series_metric} series have no chain; omit "
                    "'chain'", f"{path}.chain")
    if series_metric == "chain_tvl" and subject != ANY and chain not in (NO_CHAIN, subject):
        raise _fail(Problem.CHAIN_NOT_ALLOWED, "a chain_tvl series is named by its chain as "
                    "subject; omit 'chain'", f"{path}.chain")
    if series_metric == "chain_tvl":
        # The chain_tvl series of chain X is (chain_tvl, X, X); '*' means every chain.
        chain = ANY if subject == ANY else subject
    out["subject"] = subject
    out["chain"] = chain
    op = raw["op"]
    if not isinstance(op, str) or op not in OPERATORS:
        raise _fail(Problem.UNKNOWN_OPERATOR, f"unknown operator {op!r}; known: "
                    f"{', '.join(OPERATORS)}", f"{path}.op")
    if op.startswith("crosses_") and metric == CHANGE_METRIC:
        raise _fail(Problem.CROSSING_ON_CHANGE, "crossings apply to values (tvl, price, ...); "
                    "for a percent change use gte/lte, which fire once on entry and resolve on "
                    "exit", f"{path}.op")
    out["op"] = op
    out["threshold"] = _number(raw["threshold"], f"{path}.threshold")
    if "recovery" in raw and raw["recovery"] is not None:
        recovery = _number(raw["recovery"], f"{path}.recovery")
        if op in ("eq", "ne"):
            raise _fail(Problem.RECOVERY_NOT_ALLOWED, f"'{op}' has no side to recover to; "
                        "recovery applies to gt, gte, lt, lte and crossings", f"{path}.recovery")
        if under_not:
            raise _fail(Problem.RECOVERY_NOT_ALLOWED, "recovery inside 'not' is ambiguous; "
                        "write the inverse operator instead", f"{path}.recovery")
        upward = op in ("gt", "gte", "crosses_above")
        threshold = out["threshold"]
        if (upward and recovery > threshold) or (not upward and recovery < threshold):
            side = "at or below" if upward else "at or above"
            raise _fail(Problem.RECOVERY_WRONG_SIDE, f"recovery must be {side} the threshold "
                        f"({threshold:g}) for '{op}': the alert resolves once the value is back "
                        "past it", f"{path}.recovery")
        out["recovery"] = recovery
    return out


def _window(raw: Any, path: str) -> str | int:
    if raw is None:
        raise _fail(Problem.MISSING_FIELD, "'window' is required for change_pct: '1h', '24h', "
                    "'7d' or seconds", path)
    if isinstance(raw, str):
        if raw in NAMED_WINDOWS:
            return raw
        raise _fail(Problem.BAD_WINDOW, f"unknown window {raw!r}; use '1h', '24h', '7d' or a "
                    "number of seconds", path)
    if isinstance(raw, bool) or not isinstance(raw, int | float) or raw != int(raw):
        raise _fail(Problem.BAD_WINDOW, "window must be '1h', '24h', '7d' or whole seconds", path)
    seconds = int(raw)
    if seconds < MIN_WINDOW_S:
        raise _fail(Problem.WINDOW_TOO_SHORT, f"window must be at least {MIN_WINDOW_S} s", path)
    if seconds > MAX_WINDOW_S:
        raise _fail(Problem.WINDOW_TOO_LONG, f"window {seconds} s is longer than the "
                    f"{MAX_WINDOW_S} s (7d) of history kept", path)
    return seconds


def window_seconds(window: str | int) -> int:
    return NAMED_WINDOWS[window] if isinstance(window, str) else int(window)


def _number(raw: Any, path: str) -> float:
    if isinstance(raw, bool) or not isinstance(raw, int | float):
        raise _fail(Problem.WRONG_TYPE, "must be a number", path)
    value = float(raw)
    if not math.isfinite(value):
        raise _fail(Problem.NOT_FINITE, "must be a finite number", path)
    return value


def _to_nnf(node: dict[str, Any], path: str, *, negate: bool) -> Node:
    if "not" in node:
        return _to_nnf(node["not"], f"{path}.not", negate=not negate)
    for kind in ("all", "any"):
        if kind in node:
            children = tuple(
                _to_nnf(child, f"{path}.{kind}[{i}]", negate=negate)
                for i, child in enumerate(node[kind])
            )
            # De Morgan: not(all) = any(not ...), not(any) = all(not ...).
            conjunction = (kind == "all") != negate
            return All(children, path) if conjunction else AnyOf(children, path)
    metric = node["metric"]
    window_s = window_seconds(node["window"]) if metric == CHANGE_METRIC else VALUE
    op = node["op"]
    crossing = op.startswith("crosses_")
    return Leaf(
        path=path,
        metric=node["of"] if metric == CHANGE_METRIC else metric,
        window_s=window_s,
        subject=node["subject"],
        chain=node["chain"],
        op=op if not negate or crossing else _INVERSE[op],
        threshold=node["threshold"],
        recovery=node.get("recovery"),
        negated=negate and crossing,
    )


def iter_leaves(node: Node) -> Iterator[Leaf]:
    if isinstance(node, Leaf):
        yield node
        return
    for child in node.children:
        yield from iter_leaves(child)


def _check_wildcards(tree: Node) -> None:
    """All wildcard leaves of one rule must watch the same selector.

    A wildcard rule has one alert per matching series (its instances): "any protocol on
    arbitrum" fires separately for each protocol. That needs one binding for `*`; two different
    wildcards (`tvl * arbitrum` and `price *`) would leave it undefined which series an alert is
    about.
    """
    first: Leaf | None = None
    for leaf in iter_leaves(tree):
        if not leaf.wildcard:
            continue
        if first is None:
            first = leaf
        elif leaf.selector != first.selector:
            raise _fail(Problem.MIXED_WILDCARDS, f"every wildcard comparison of a rule must watch "
                        f"the same series as {first.path} ({'|'.join(first.selector)}), so that "
                        "each matching series gets its own alert", leaf.path)


# --- evaluation ----------------------------------------------------------------------------


def _close(a: float, b: float) -> bool:
    return math.isclose(a, b, rel_tol=_EQ_REL_TOL, abs_tol=_EQ_ABS_TOL)


def leaf_truth(op: str, threshold: float, value: float | None, previous: float | None) -> Truth:
    """One comparison. Crossings are TRUE only on the transition (previous on or below the line,
    value above it, for crosses_above) and UNKNOWN on later ticks past the line: they neither
    fire again nor resolve; going back past the line is FALSE."""
    if value is None:
        return Truth.UNKNOWN
    if op == "gt":
        return Truth.TRUE if value > threshold else Truth.FALSE
    if op == "gte":
        return Truth.TRUE if value >= threshold else Truth.FALSE
    if op == "lt":
        return Truth.TRUE if value < threshold else Truth.FALSE
    if op == "lte":
        return Truth.TRUE if value <= threshold else Truth.FALSE
    if op == "eq":
        return Truth.TRUE if _close(value, threshold) else Truth.FALSE
    if op == "ne":
        return Truth.FALSE if _close(value, threshold) else Truth.TRUE
    if op == "crosses_above":
        if value <= threshold:
            return Truth.FALSE
        return Truth.TRUE if previous is not None and previous <= threshold else Truth.UNKNOWN
    if op == "crosses_below":
        if value >= threshold:
            return Truth.FALSE
        return Truth.TRUE if previous is not None and previous >= threshold else Truth.UNKNOWN
    raise ValueError(f"unknown operator {op!r}")


def stay_comparison(leaf: Leaf) -> tuple[str, float]:
    """The comparison that keeps a firing alert firing: the threshold moved to `recovery`,
    and crossings become the level they crossed (firing while above the line)."""
    level = {"crosses_above": "gt", "crosses_below": "lt"}.get(leaf.op, leaf.op)
    threshold = leaf.threshold if leaf.recovery is None else leaf.recovery
    if leaf.negated:  # not(crosses_above x) stays while not above: lte x
        return _INVERSE[level], threshold
    return level, threshold


def _comparator(op: str, t: float) -> Callable[[float, float | None], int]:
    """`leaf_truth` specialised to one operator and threshold, returning plain ints (2 TRUE,
    1 UNKNOWN, 0 FALSE): it runs for every candidate of every event, and skipping the operator
    dispatch and the enum lookups halves its cost."""
    if op == "gt":
        return lambda v, p: 2 if v > t else 0
    if op == "gte":
        return lambda v, p: 2 if v >= t else 0
    if op == "lt":
        return lambda v, p: 2 if v < t else 0
    if op == "lte":
        return lambda v, p: 2 if v <= t else 0
    if op == "crosses_above":
        return lambda v, p: 0 if v <= t else (2 if p is not None and p <= t else 1)
    if op == "crosses_below":
        return lambda v, p: 0 if v >= t else (2 if p is not None and p >= t else 1)
    if op in ("eq", "ne"):
        return lambda v, p: int(leaf_truth(op, t, v, p))
    raise ValueError(f"unknown operator {op!r}")


# The level comparisons as C functions: calling one costs less than a Python lambda.
_LEVELS: dict[str, Callable[[float, float], bool]] = {
    "gt": operator.gt, "gte": operator.ge, "lt": operator.lt, "lte": operator.le}


def _leaf_fn(leaf: Leaf, *, stay: bool) -> Callable[[Sample, Foreign], int]:
    if stay:
        (op, threshold), negated = stay_comparison(leaf), False
    else:
        op, threshold, negated = leaf.op, leaf.threshold, leaf.negated
    window_s = leaf.window_s
    # Interned: every rule on a series shares one key string, and `sample.key == key` is
    # mostly decided by identity.
    key = sys.intern(leaf.series_key)
    level = _LEVELS.get(op)
    if level is not None and not negated and not leaf.wildcard:
        # Most leaves (a level on a named series): a closure with four cells rather than ten,
        # and no call to a comparator; it runs for every candidate of every event, and there
        # are two per leaf of each of 100,000 rules.
        t = threshold

        def level_fn(sample: Sample, foreign: Foreign) -> int:
            src = sample if sample.key == key else foreign(key)
            if src is None:
                return 1
            value = src.value if window_s == 0 else src.changes.get(window_s)
            if value is None:
                return 1
            return 2 if level(value, t) else 0

        return level_fn
    compare = _comparator(op, threshold)
    wildcard = leaf.wildcard
    metric, subject, chain = leaf.selector
    any_subject, any_chain = subject == ANY, chain == ANY

    def fn(sample: Sample, foreign: Foreign) -> int:
        # Inlined Leaf.matches and Sample.measure: this runs for every candidate of every event.
        if wildcard:
            if (
                sample.metric != metric
                or (not any_subject and sample.subject != subject)
                or (sample.chain == NO_CHAIN if any_chain else sample.chain != chain)
            ):
                return 1  # UNKNOWN: a wildcard binds to the event's series only
            src = sample
        elif sample.key == key:
            src = sample
        else:
            other = foreign(key)
            if other is None:
                return 1
            src = other
        value = src.value if window_s == 0 else src.changes.get(window_s)
        if value is None:
            return 1
        truth = compare(value, src.previous)
        return 2 - truth if negated else truth

    return fn


def stays_as_entered(node: Node) -> bool:
    """Whether the stay condition is the entry condition itself (no leaf has a recovery
    threshold of its own, and no leaf is a crossing): then one compiled function serves both."""
    return all(not leaf.op.startswith("crosses_")
               and (leaf.recovery is None or leaf.recovery == leaf.threshold)
               for leaf in iter_leaves(node))


def compile_truth(node: Node, *, stay: bool = False) -> Callable[[Sample, Foreign], int]:
    """A function computing the node's Truth for an event's sample.

    Leaves on the sample's series read the sample; explicit leaves on other series read
    `foreign` (the newest known values); wildcard leaves not matching the sample are UNKNOWN.
    With `stay`, thresholds are the recovery thresholds and crossings are levels: the condition
    that keeps a firing alert firing.
    """
    if isinstance(node, Leaf):
        return _leaf_fn(node, stay=stay)
    fns = tuple(compile_truth(child, stay=stay) for child in node.children)
    if len(fns) == 2:  # the usual shape (all/any of two comparisons): no loop
        first, second = fns
        if isinstance(node, All):

            def all2_fn(sample: Sample, foreign: Foreign) -> int:
                a = first(sample, foreign)
                if a == 0:  # FALSE
                    return 0
                b = second(sample, foreign)
                return 0 if b == 0 else a if a < b else b

            return all2_fn

        def any2_fn(sample: Sample, foreign: Foreign) -> int:
            a = first(sample, foreign)
            if a == 2:  # TRUE
                return 2
            b = second(sample, foreign)
            return 2 if b == 2 else a if a > b else b

        return any2_fn
    if isinstance(node, All):

        def all_fn(sample: Sample, foreign: Foreign) -> int:
            result = 2  # TRUE
            for fn in fns:
                t = fn(sample, foreign)
                if t == 0:  # FALSE
                    return 0
                if t < result:
                    result = t
            return result

        return all_fn

    def any_fn(sample: Sample, foreign: Foreign) -> int:
        result = 0  # FALSE
        for fn in fns:
            t = fn(sample, foreign)
            if t == 2:  # TRUE
                return 2
            if t > result:
                result = t
        return result

    return any_fn


@dataclass(frozen=True, slots=True)
class LeafResult:
    """How one comparison evaluated: for the dry run and docs (`why would it fire`)."""

    path: str
    series: str
    op: str
    threshold: float
    value: float | None
    previous: float | None
    truth: Truth
    source: str  # "event", "latest" (another series' newest value) or "none"


def explain(node: Node, sample: Sample, foreign: Foreign = _no_foreign) -> list[LeafResult]:
    """Each leaf's value and truth for `sample` (entry thresholds), in tree order."""
    out: list[LeafResult] = []
    for leaf in iter_leaves(node):
        src: Sample | None
        if leaf.matches(sample.metric, sample.subject, sample.chain):
            src, source = sample, "event"
        elif leaf.wildcard:
            src, source = None, "none"
        else:
            src = foreign(leaf.series_key)
            source = "latest" if src is not None else "none"
        value = src.measure(leaf.window_s) if src is not None else None
        previous = src.previous if src is not None else None
        truth = leaf_truth(leaf.op, leaf.threshold, value, previous)
        if leaf.negated:
            truth = Truth(2 - truth)
        series = src.key if src is not None and source == "event" else leaf.series_key
        out.append(LeafResult(leaf.path, series, ("not " if leaf.negated else "") + leaf.op,
                              leaf.threshold, value, previous, truth, source))
    return out


# The condition grammar as JSON Schema, for the OpenAPI document (validation itself is
# parse_condition, whose errors name the JSON path and the reason).
_LEAF_SCHEMA: dict[str, Any] = {
    "type": "object",
    "title": "Comparison",
    "required": ["metric", "subject", "op", "threshold"],
    "additionalProperties": False,
    "properties": {
        "metric": {"type": "string", "description": "tvl, price, chain_tvl, mcap, tvl_borrowed, "
                   "... or change_pct (a percent change over `window`)"},
        "of": {"type": "string", "description": "change_pct only: the series metric whose "
               "change is watched (default price for coin ids, else tvl)"},
        "window": {"description": "change_pct only: '1h', '24h', '7d' or seconds (60..604800)",
                   "oneOf": [{"type": "string", "enum": list(NAMED_WINDOWS)},
                             {"type": "integer", "minimum": MIN_WINDOW_S,
                              "maximum": MAX_WINDOW_S}]},
        "subject": {"type": "string", "description": "protocol slug, coin id "
                    "(coingecko:bitcoin) or '*' for any"},
        "chain": {"type": "string", "description": "chain slug, '*' for any chain, omitted for "
                  "the protocol total (and for prices)"},
        "op": {"type": "string", "enum": list(OPERATORS)},
        "threshold": {"type": "number"},
        "recovery": {"type": "number", "description": "resolve only once the value is back "
                     "past this (hysteresis); default: the threshold"},
    },
}
CONDITION_JSON_SCHEMA: dict[str, Any] = {
    "title": "Condition",
    "description": "A comparison, or a group {all: [...]}, {any: [...]}, {not: {...}} nested up "
    f"to {MAX_DEPTH} levels, at most {MAX_LEAVES} comparisons. See docs/alerts.md.",
    "oneOf": [
        _LEAF_SCHEMA,
        {"type": "object", "title": "All", "required": ["all"],
         "properties": {"all": {"type": "array", "minItems": 1, "items": {"type": "object"}}}},
        {"type": "object", "title": "Any", "required": ["any"],
         "properties": {"any": {"type": "array", "minItems": 1, "items": {"type": "object"}}}},
        {"type": "object", "title": "Not", "required": ["not"],
         "properties": {"not": {"type": "object"}}},
    ],
    "examples": [
        {"metric": "tvl", "subject": "aave", "op": "lt", "threshold": 1e10, "recovery": 1.05e10},
        {"metric": "change_pct", "of": "tvl", "window": "1h", "subject": "*",
         "chain": "arbitrum", "op": "lte", "threshold": -10},
    ],
}
