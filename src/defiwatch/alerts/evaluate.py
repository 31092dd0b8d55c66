"""Evaluation of one event against the rules: index candidates + active instances -> lifecycle.

Pure: a sample, the instance states and `now` in; decisions out. The engine (engine.py) loads
the states an event can touch, calls `Evaluator.evaluate` per event and persists the decisions;
the benchmark and the property tests call it directly with `MemoryStates`.

Which instances an event touches:
- the candidates of the index (rules that may be TRUE now), at the event's instance, and
- the *active* instances in scope of the event's series (pending, firing, or holding a fire in
  the cooldown): they must see a FALSE to clear or resolve, and FALSE is what the index skips.
Everything else is ok and stays ok (its condition is not TRUE), so skipping it changes nothing:
the evaluator gives the same decisions as evaluating every rule (checked by the property tests).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import Any, Protocol

import msgspec

from defiwatch.alerts.index import NaiveIndex, RuleIndex
from defiwatch.alerts.lifecycle import (
    OK_STATE,
    Action,
    InstanceState,
    Phase,
    Step,
    clear_hold,
    clear_pending,
    resolve,
    start_episode,
    tick,
)
from defiwatch.alerts.rules import CompiledRule
from defiwatch.domain.conditions import Foreign, Sample

__all__ = ["Decision", "Evaluator", "MemoryStates", "StateView", "is_active"]

# Module constants for the members the hot loop compares with: a global is read in a tenth of
# the time of `Phase.OK` (an attribute lookup through the enum's metaclass).
_OK, _PENDING, _FIRING, _NONE = Phase.OK, Phase.PENDING, Phase.FIRING, Action.NONE


def is_active(state: InstanceState) -> bool:
    """Whether an instance must be evaluated even when its condition is not TRUE."""
    return state.phase is not _OK or state.held_at is not None


class StateView(Protocol):
    """The instance states an evaluation may read and change."""

    def get(self, rule_id: int, instance: str) -> InstanceState | None:
        ...

    def set(self, rule: CompiledRule, instance: str, state: InstanceState) -> None:
        ...

    def active(self, series_key: str) -> Iterable[tuple[int, str]]:
        """(rule id, instance) of the active instances of *wildcard* rules on this series:
        the instances the rule index cannot find (see Evaluator.evaluate)."""
        ...


class MemoryStates:
    """Instance states in a dict, with an index of active instances per series.

    The engine fills one per batch from the database rows it locked; benchmarks keep one for a
    whole run.
    """

    def __init__(self) -> None:
        self._states: dict[tuple[int, str], InstanceState] = {}
        self._active: dict[str, set[tuple[int, str]]] = {}

    def __len__(self) -> int:
        return len(self._states)

    def items(self) -> Iterator[tuple[tuple[int, str], InstanceState]]:
        return iter(self._states.items())

    def get(self, rule_id: int, instance: str) -> InstanceState | None:
        return self._states.get((rule_id, instance))

    def set(self, rule: CompiledRule, instance: str, state: InstanceState) -> None:
        key = (rule.id, instance)
        self._states[key] = state
        if rule.binding is None:
            # The index finds these by flips (see Evaluator.evaluate), which also stores them
            # straight into `_states`: keep the two in step.
            return
        if state.phase is not _OK or state.held_at is not None:  # is_active, inlined (hot)
            self._active.setdefault(instance, set()).add(key)
        else:
            keys = self._active.get(instance)
            if keys is not None:
                keys.discard(key)
                if not keys:
                    del self._active[instance]

    def active(self, series_key: str) -> Iterable[tuple[int, str]]:
        keys = self._active.get(series_key)
        return tuple(keys) if keys else ()


class Decision(msgspec.Struct, frozen=True):
    """One instance's step that did something (action is never NONE).

    `sample` is the event's sample (None for a decision of the tick); `origin` is whatever the
    caller passed along with the sample (the engine passes the Event). A frozen msgspec Struct
    (built in C) rather than a dataclass: one is made per transition (see lifecycle.Step).
    """

    rule: CompiledRule
    instance: str
    before: InstanceState
    step: Step
    sample: Sample | None = None
    origin: Any = None


class Evaluator:
    """Evaluates events against an index of rules (RuleIndex, or NaiveIndex as a baseline)."""

    def __init__(self, index: RuleIndex | NaiveIndex) -> None:
        self.index = index
        # RuleIndex looks wildcard rules up by truth: for a simple one a hit *is* its truth.
        # (Its other hits are flips, and NaiveIndex returns every rule in scope: no proof.)
        self._truth_hits = isinstance(index, RuleIndex)

    def evaluate(
        self,
        sample: Sample,
        states: StateView,
        now: float,
        *,
        foreign: Foreign | None = None,
        origin: Any = None,
        event: dict[str, Any] | None = None,
    ) -> tuple[list[Decision], int]:
        """Apply one event; return the decisions and how many instances were evaluated.

        Args:
            sample: the event as the conditions see it.
            states: instance states; changed in place for every decision.
            now: wall clock, epoch s.
            foreign: newest values of other series (None: unknown).
            origin: passed through to the decisions (the engine's Event).
            event: the event as a dict, kept by pending/held states to record it when they fire.
        """
        lookup = foreign if foreign is not None else _unknown
        index = self.index
        hits = index.candidates(sample)
        key = sample.key
        # The index hits, then the active instances of wildcard rules on this series (rules on
        # named series are indexed by flips of their entry and stay comparisons, so the index
        # returns them whenever their state may change; wildcard rules are looked up by truth,
        # which misses an active instance turning FALSE). An active wildcard instance is keyed
        # by this series, so it duplicates a hit exactly when its rule is a hit.
        extra: list[CompiledRule] = []
        for rule_id, _instance in states.active(key):
            if rule_id not in hits:
                rule_ = index.get(rule_id)
                if rule_ is not None:  # a paused or deleted rule keeps its state, unevaluated
                    extra.append(rule_)
        decisions: list[Decision] = []
        # The hot loop (every candidate of every event): MemoryStates, the only view the
        # engine uses, is read through its dict rather than a method call per instance, and
        # written so too for rules on named series (all MemoryStates.set does for them).
        get_state: Callable[[tuple[int, str]], InstanceState | None]
        put_named: Callable[[tuple[int, str], InstanceState], None] | None
        if type(states) is MemoryStates:
            get_state, put_named = states._states.get, states._states.__setitem__
        else:
            get_state, put_named = (lambda k: states.get(*k)), None
        truth_hits = self._truth_hits
        ts = sample.ts
        # Globals the loop reads per instance, as locals (a local is the cheapest read).
        decision, ok_state, ok, pending, firing = Decision, OK_STATE, _OK, _PENDING, _FIRING
        for group in (hits.values(), extra):
            for rule in group:
                rule_id = rule.id
                wildcard = rule.binding is not None
                instance = key if wildcard else ""
                state_key = (rule_id, instance)
                state = get_state(state_key)
                # Only evaluate what can act, and apply the one transition that can: the cases
                # of lifecycle.step that act, called directly (step decides by phase and truth
                # alone, and everything skipped here is one of its NONE cases). An ok instance
                # acts on TRUE only; a pending or held one on FALSE only (time is the tick's); a
                # firing one when its stay condition is FALSE.
                # A truth hit on a single exact comparison *is* its truth: TRUE (and the stay
                # comparison, looser, TRUE too), no need to evaluate it.
                known_true = truth_hits and wildcard and rule.simple and rule_id in hits
                if state is None or (state.phase is ok and state.held_at is None):
                    if not known_true and rule.enter(sample, lookup) != 2:  # only TRUE acts
                        continue
                    state = state or ok_state
                    result = start_episode(rule.policy, state, ts, key, event, now)
                elif known_true:
                    continue  # TRUE: a pending, held or firing instance stays as it is
                elif state.phase is firing:
                    if rule.stay(sample, lookup) != 0:  # only FALSE acts
                        continue
                    result = resolve(rule.policy, state, now)
                elif rule.enter(sample, lookup) != 0:  # pending or held: only FALSE acts
                    continue
                elif state.phase is pending:
                    result = clear_pending(state, now)
                else:
                    result = clear_hold(state)
                # Every transition above acts (never Action.NONE): record it.
                if put_named is not None and not wildcard:
                    put_named(state_key, result.state)
                else:
                    states.set(rule, instance, result.state)
                decisions.append(decision(rule, instance, state, result, sample, origin))
        return decisions, len(hits) + len(extra)

    def tick(
        self, states: Iterable[tuple[int, str, InstanceState]], now: float
    ) -> list[Decision]:
        """Advance time for due instances (pending past `for`, held past the cooldown, repeats).

        Instances of rules not in the index (paused, deleted) are left alone."""
        out: list[Decision] = []
        get_rule = self.index.get
        for rule_id, instance, state in states:
            rule = get_rule(rule_id)
            if rule is None:
                continue
            result = tick(rule.policy, state, now)
            if result.action is not _NONE:
                out.append(Decision(rule, instance, state, result))
        return out


def _unknown(_key: str) -> Sample | None:
    return None

