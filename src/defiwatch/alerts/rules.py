"""Alert rules: what a user asked for, validated, and compiled for evaluation.

A rule is a condition (domain/conditions.py), channels (domain/channels.py) and timing. Its
*instances* are the alerts it can have at once:

- a **wildcard** rule (a leaf with subject or chain `*`) has one instance per matching series,
  keyed by that series (`tvl|aave|arbitrum`): "any protocol on arbitrum" fires per protocol;
- any other rule has one instance, keyed `""`, whichever of its series an event is about.

An event is *in scope* of a rule when it can change the rule's truth: for a wildcard rule, an
event on a series its wildcard matches; otherwise an event on one of the series its leaves name.
Leaves on other series (a gate such as "and ETH is below 2,000") read the newest known value.
"""

from __future__ import annotations

import enum
import math
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from defiwatch.alerts.lifecycle import Policy
from defiwatch.domain.channels import Channel, parse_channels
from defiwatch.domain.conditions import (
    VALUE,
    Foreign,
    Leaf,
    Node,
    Sample,
    compile_truth,
    iter_leaves,
    parse_condition,
    stays_as_entered,
)
from defiwatch.errors import DefiwatchError, ValidationError

__all__ = [
    "MAX_FOR_SECONDS",
    "MAX_REPEAT_MINUTES",
    "MAX_THROTTLE_MINUTES",
    "SEVERITIES",
    "CompiledRule",
    "RuleKind",
    "RuleLimitError",
    "StoredRuleFields",
    "compile_rule",
    "compile_stored",
    "validate_timing",
]

SEVERITIES = ("info", "warning", "critical")
MAX_FOR_SECONDS = 86_400
MAX_THROTTLE_MINUTES = 7 * 24 * 60
MAX_REPEAT_MINUTES = 7 * 24 * 60
MIN_REPEAT_MINUTES = 1.0


class RuleLimitError(DefiwatchError):
    """The user has as many rules as their tier allows (a DefiwatchError: rendered by the
    API's one handler; HTTP 403, code `rule_limit_reached`)."""

    code = "rule_limit_reached"
    http_status = 403


class StoredRuleFields(Protocol):
    """The stored form of a rule (store/alerts.py StoredRule)."""

    id: int
    user_id: int
    name: str
    condition: dict[str, Any]
    channels: list[dict[str, Any]]
    for_seconds: float
    throttle_minutes: float
    repeat_minutes: float | None
    notify_on_resolve: bool
    severity: str
    revision: int


class RuleKind(enum.StrEnum):
    WILDCARD = "wildcard"  # one instance per matching series
    SINGLE = "single"  # one instance; every leaf on one series
    MULTI = "multi"  # one instance; leaves on several series


@dataclass(eq=False, slots=True)
class CompiledRule:
    """A rule ready for the index and the lifecycle. Identity is the rule id.

    `scope` holds the series keys whose events are in scope (non-wildcard rules); `binding` the
    wildcard selector (wildcard rules). `foreign` holds the series keys of leaves that may be
    read from the newest known values rather than from the event. `windows` are the change
    windows (seconds) its leaves use, `simple` says the condition is a single comparison (so an
    index hit *is* the truth, which lets the evaluator skip work for instances already firing).
    """

    id: int
    user_id: int
    name: str
    tree: Node
    policy: Policy
    channels: tuple[Channel, ...] = ()
    severity: str = "warning"
    revision: int = 0
    kind: RuleKind = RuleKind.SINGLE
    binding: tuple[str, str, str] | None = None
    scope: tuple[str, ...] = ()
    foreign: frozenset[str] = frozenset()
    windows: frozenset[int] = frozenset()
    simple: bool = False
    enter: Callable[[Sample, Foreign], int] = field(default=lambda s, f: 0, repr=False)
    stay: Callable[[Sample, Foreign], int] = field(default=lambda s, f: 0, repr=False)

    def in_scope(self, sample: Sample) -> bool:
        if self.binding is not None:
            metric, subject, chain = self.binding
            return (
                sample.metric == metric
                and (subject == "*" or sample.subject == subject)
                and (sample.chain != "-" if chain == "*" else sample.chain == chain)
            )
        return sample.key in self.scope

    def instance(self, sample_key: str) -> str:
        """The instance an event on `sample_key` belongs to."""
        return sample_key if self.kind is RuleKind.WILDCARD else ""

    def scope_of(self, instance: str) -> tuple[str, ...]:
        """The series whose events concern `instance` (for finding active instances)."""
        return (instance,) if self.kind is RuleKind.WILDCARD else self.scope


# Sets many rules have in common (the windows they use, the series they read): one object
# each, not one per rule (100,000 rules are held in memory by every engine).
_SHARED: dict[frozenset[Any], frozenset[Any]] = {}


def _shared(items: frozenset[Any]) -> frozenset[Any]:
    if len(_SHARED) > 100_000:  # bounded: sets are not all alike (foreign series of multi rules)
        _SHARED.clear()
    return _SHARED.setdefault(items, items)


def compile_rule(
    *,
    id: int,
    user_id: int,
    name: str,
    condition: Mapping[str, Any] | Node,
    for_seconds: float = 0.0,
    throttle_minutes: float = 5.0,
    repeat_minutes: float | None = None,
    notify_on_resolve: bool = False,
    channels: Sequence[Mapping[str, Any]] | Sequence[Channel] = (),
    severity: str = "warning",
    revision: int = 0,
) -> CompiledRule:
    """Compile a rule (from its stored or submitted form) for the index and the lifecycle.

    Raises:
        ConditionError / ValidationError: the condition or channels are invalid.
    """
    tree = parse_condition(condition)[0] if isinstance(condition, Mapping) else condition
    leaves = list(iter_leaves(tree))
    wild = [leaf for leaf in leaves if leaf.wildcard]
    binding: tuple[str, str, str] | None
    scope: tuple[str, ...]
    if wild:
        kind, binding, scope = RuleKind.WILDCARD, wild[0].selector, ()
        foreign = frozenset(sys.intern(leaf.series_key) for leaf in leaves if not leaf.wildcard)
    else:
        keys = tuple(dict.fromkeys(sys.intern(leaf.series_key) for leaf in leaves))
        kind = RuleKind.SINGLE if len(keys) == 1 else RuleKind.MULTI
        binding, scope = None, keys
        foreign = frozenset(keys) if len(keys) > 1 else frozenset()
    enter = compile_truth(tree)
    parsed_channels = tuple(
        c if isinstance(c, Channel) else parse_channels([c])[0] for c in channels
    )
    policy = Policy(
        for_s=float(for_seconds),
        throttle_s=float(throttle_minutes) * 60.0,
        repeat_s=None if repeat_minutes is None else float(repeat_minutes) * 60.0,
        notify_on_resolve=notify_on_resolve,
    )
    return CompiledRule(
        id=id, user_id=user_id, name=name, tree=tree, policy=policy, channels=parsed_channels,
        severity=severity, revision=revision, kind=kind, binding=binding, scope=scope,
        foreign=_shared(foreign),
        windows=_shared(frozenset(leaf.window_s for leaf in leaves if leaf.window_s != VALUE)),
        # eq is looked up with a tolerance band and ne is scanned: an index hit on them is not
        # proof of truth, so only the exact operators count as simple.
        simple=isinstance(tree, Leaf) and tree.op not in ("eq", "ne"),
        # Without recoveries or crossings the stay condition is the entry one: one function
        # (half the memory of a compiled rule is its compiled condition).
        enter=enter, stay=enter if stays_as_entered(tree) else compile_truth(tree, stay=True),
    )


def validate_timing(
    *,
    for_seconds: Any = 0,
    throttle_minutes: Any = 5.0,
    repeat_minutes: Any = None,
    severity: Any = "warning",
) -> None:
    """Check a rule's timing fields (the API's models check types; this checks meaning).

    Raises:
        ValidationError: naming the field and the allowed range.
    """

    def number(value: Any, name: str, low: float, high: float) -> None:
        if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
            raise ValidationError("must be a finite number", field=name)
        if not low <= value <= high:
            raise ValidationError(f"must be between {low:g} and {high:g}", field=name)

    number(for_seconds, "for_seconds", 0, MAX_FOR_SECONDS)
    number(throttle_minutes, "throttle_minutes", 0, MAX_THROTTLE_MINUTES)
    if repeat_minutes is not None:
        number(repeat_minutes, "repeat_minutes", MIN_REPEAT_MINUTES, MAX_REPEAT_MINUTES)
    if severity not in SEVERITIES:
        raise ValidationError(f"unknown severity {severity!r}; known: {', '.join(SEVERITIES)}",
                              field="severity")


def compile_stored(rule: StoredRuleFields) -> CompiledRule:
    """Compile a rule as stored (store/alerts.py StoredRule)."""
    return compile_rule(
        id=rule.id, user_id=rule.user_id, name=rule.name, condition=rule.condition,
        for_seconds=rule.for_seconds, throttle_minutes=rule.throttle_minutes,
        repeat_minutes=rule.repeat_minutes, notify_on_resolve=rule.notify_on_resolve,
        channels=rule.channels, severity=rule.severity, revision=rule.revision,
    )
