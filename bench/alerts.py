#!/usr/bin/env python
"""Alert evaluation benchmark: events/s against 100,000 rules, event-to-fired latency, memory.

Input: the bundled real replay (`defiwatch.ingest.replay.iter_records`), turned into events by
the processor's own change detection (`ChangeDetector`, default thresholds: what users get),
in data order: about 225,000 events over 2,700 series.

Rules: `--rules` (default 100,000) of a mix modelled on what users write, each placed on a real
series with thresholds relative to a value that series really had (a rule is "created" at a
random moment of the data), so over the replay some rules fire, resolve and fire again and many
never do. Series are picked with a popularity skew (rank^-0.8: ETH and the big protocols carry
many rules). The mix (share of rules):

    38 %  value threshold on one series (gt above / lt below the value), a third with recovery
    15 %  change_pct on one series (24h or 7d; 1h for 5-minute data), rise or drop 5..30 %
    10 %  crossing of a level on a price or TVL series
     8 %  wildcard: any protocol on a chain (or any chain) whose TVL moves N % in 24h/7d
     2 %  wildcard: any coin whose price drops N % in 24h
    15 %  all(value threshold, change_pct) on one series
     7 %  threshold gated by another series (all(tvl of X below, ETH price below))
     5 %  any(threshold on X, threshold on Y): one alert fed by two series

Timing: the lifecycle clock is the event's observation time (`now = ts`): cooldowns (5 min
default) and `for` durations (some rules) elapse in data time, as in a replay. Ticks (a `for`
elapsed, a cooldown over, a repeat due) run in data time too, each when it falls due, exactly as
many as the product would make over the same 12 years of data (about 12 million daily repeats of
alerts that fire for years). They are timed apart (`tick_seconds`, `ticks_per_s`): in the replay
12 years pass in 225,000 events, about 50 repeats per event, where the product spreads them over
12 years of wall time (a few thousand a day) while the events arrive far faster. So
`events_per_s` is the engine's per-event cost and `events_per_s_with_ticks` only how fast this
replay runs; `ticks_per_s` is the tick's own throughput.

Modes, all in this one process (pin it: `taskset -c 1 python bench/alerts.py` or `--cpu 1`):

core
    The pure core the engine runs per event: `Evaluator.evaluate` through the `RuleIndex`, with
    the instance states in memory (`MemoryStates`) and the newest value of every series for
    rules reading another series. Reports events/s over the whole replay, the per-event
    evaluation time p50/p99/max, the same for the events that fired an alert (event-to-fired
    decision latency), instances evaluated per event, alerts fired, index build time and
    memory (RSS growth for compiled rules and for the index).
naive
    The baseline in the same run: the same evaluator over `NaiveIndex` (every rule checked for
    every event), on the first `--naive-events` events (it is about 1,000x slower); its
    decisions are checked equal to the indexed ones on those events.

Prints one JSON document on stdout and writes it to bench/results/alerts-<date>.json (or
`--out`). No services needed.

    .venv/bin/python bench/alerts.py --cpu 1
    .venv/bin/python bench/alerts.py --rules 10000 --events 50000
"""

from __future__ import annotations

import argparse
import datetime as dt
import gc
import heapq
import itertools
import json
import os
import platform
import random
import statistics
import sys
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from defiwatch.alerts.evaluate import Decision, Evaluator, MemoryStates
from defiwatch.alerts.index import NaiveIndex, RuleIndex
from defiwatch.alerts.lifecycle import Action, InstanceState, due_at
from defiwatch.alerts.rules import CompiledRule, compile_rule
from defiwatch.domain import ChangeDetector, Event, Point, SeriesKey, SeriesState
from defiwatch.domain.conditions import Sample
from defiwatch.ingest.replay import PointRecord, iter_records

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
CHANNELS = [{"type": "webhook", "url": "https://example.com/hook"}]


def rss_bytes() -> int:
    """Resident set size of this process (Linux /proc), in bytes."""
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


@dataclass
class Data:
    events: list[Event]
    values: dict[SeriesKey, list[float]]  # a sample of each series' values, for thresholds
    counts: Counter[SeriesKey]  # events per series
    points: int


def load_events(limit: int | None) -> Data:
    """Events exactly as the processor would emit them from the bundled real points."""
    detector = ChangeDetector()
    states: dict[SeriesKey, SeriesState] = {}
    events: list[Event] = []
    values: dict[SeriesKey, list[float]] = {}
    counts: Counter[SeriesKey] = Counter()
    points = 0
    for rec in iter_records():
        if not isinstance(rec, PointRecord):
            continue
        points += 1
        point = Point(rec.metric, rec.subject, rec.chain, rec.ts, rec.value, rec.source)
        state = states.setdefault(point.series, SeriesState())
        _, event, _ = detector.observe(state, point, now=float(rec.ts))
        seen = values.setdefault(point.series, [])
        if len(seen) < 64 or random.random() < 0.01:
            seen.append(point.value)
        if event is not None:
            event.offset = len(events) + 1
            events.append(event)
            counts[point.series] += 1
            if limit is not None and len(events) >= limit:
                break
    return Data(events, values, counts, points)


def make_rules(data: Data, count: int, rng: random.Random) -> tuple[list[CompiledRule], Counter[str]]:
    """`count` rules of the mix in the module docstring, on the replay's real series."""
    ranked = [k for k, _ in data.counts.most_common() if data.values.get(k)]
    weights = [1.0 / (rank + 1) ** 0.8 for rank in range(len(ranked))]
    prices = [k for k in ranked if k.metric == "price"]
    tvls = [k for k in ranked if k.metric == "tvl"]
    chains = [c for c, _ in Counter(k.chain for k in tvls if k.chain != "-").most_common(15)]
    eth = SeriesKey("price", "coingecko:ethereum", "-")
    five_minute = {k for k in ranked if data.counts[k] > 20_000}  # the CMC 5-minute series
    mix: Counter[str] = Counter()
    rules: list[CompiledRule] = []

    def pick(pool: Sequence[SeriesKey] | None = None) -> SeriesKey:
        if pool is None:
            return rng.choices(ranked, weights)[0]
        return rng.choice(pool)

    def value_leaf(key: SeriesKey, *, recovery: bool = False) -> dict[str, Any]:
        base = rng.choice(data.values[key])
        up = rng.random() < 0.5
        threshold = base * (rng.uniform(1.05, 1.5) if up else rng.uniform(0.5, 0.95))
        leaf: dict[str, Any] = {"metric": key.metric, "subject": key.subject, "chain": key.chain,
                                "op": "gt" if up else "lt", "threshold": threshold}
        if recovery:
            leaf["recovery"] = threshold * (0.98 if up else 1.02)
        return leaf

    def change_leaf(key: SeriesKey) -> dict[str, Any]:
        window = "1h" if key in five_minute else rng.choice(["24h", "7d"])
        up = rng.random() < 0.3
        return {"metric": "change_pct", "of": key.metric, "subject": key.subject,
                "chain": key.chain, "window": window, "op": "gte" if up else "lte",
                "threshold": rng.uniform(5, 30) * (1 if up else -1)}

    for rule_id in range(1, count + 1):
        roll = rng.random()
        if roll < 0.38:
            kind, condition = "value", value_leaf(pick(), recovery=rng.random() < 0.33)
        elif roll < 0.53:
            kind, condition = "change", change_leaf(pick())
        elif roll < 0.63:
            key = pick(prices if rng.random() < 0.6 else tvls)
            base = rng.choice(data.values[key])
            up = rng.random() < 0.5
            kind, condition = "crossing", {
                "metric": key.metric, "subject": key.subject, "chain": key.chain,
                "op": "crosses_above" if up else "crosses_below",
                "threshold": base * (rng.uniform(1.02, 1.3) if up else rng.uniform(0.7, 0.98))}
        elif roll < 0.71:
            kind, condition = "wildcard_tvl", {
                "metric": "change_pct", "of": "tvl", "subject": "*",
                "chain": rng.choice([*chains, "*"]), "window": rng.choice(["24h", "7d"]),
                "op": "lte", "threshold": -rng.uniform(5, 50)}
        elif roll < 0.73:
            kind, condition = "wildcard_price", {
                "metric": "change_pct", "of": "price", "subject": "*", "window": "24h",
                "op": "lte", "threshold": -rng.uniform(10, 60)}
        elif roll < 0.88:
            key = pick()
            kind, condition = "all_same_series", {"all": [value_leaf(key), change_leaf(key)]}
        elif roll < 0.95:
            gate = value_leaf(eth)
            gate["op"] = "lt"
            kind, condition = "gated_by_other_series", {"all": [value_leaf(pick()), gate]}
        else:
            kind, condition = "any_two_series", {"any": [value_leaf(pick()), value_leaf(pick())]}
        mix[kind] += 1
        rules.append(compile_rule(
            id=rule_id, user_id=rule_id % 5_000 + 1, name=f"rule {rule_id}",
            condition=condition, channels=CHANNELS,
            for_seconds=rng.choice([0, 0, 0, 300, 3_600]),
            throttle_minutes=5.0, repeat_minutes=rng.choice([None, None, None, 1440.0]),
            notify_on_resolve=rng.random() < 0.3))
    return rules, mix


def sample_of(event: Event) -> Sample:
    assert event.value is not None
    return Sample(event.metric, event.subject, event.chain, event.ts, event.value,
                  event.previous, {3_600: event.change_1h, 86_400: event.change_24h,
                                   604_800: event.change_7d})


def percentiles(values_ns: list[int]) -> dict[str, float]:
    if not values_ns:
        return {}
    ordered = sorted(values_ns)

    def at(q: float) -> float:
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))] / 1_000_000  # ms

    return {"p50_ms": round(at(0.50), 4), "p90_ms": round(at(0.90), 4),
            "p99_ms": round(at(0.99), 4), "p999_ms": round(at(0.999), 4),
            "max_ms": round(ordered[-1] / 1_000_000, 4),
            "mean_ms": round(statistics.fmean(ordered) / 1_000_000, 4)}


def run(evaluator: Evaluator, events: Sequence[Event], *, log: bool = False,
        cpu_clock: bool = False) -> dict[str, Any]:
    """Evaluate events in order, as the engine does per event; time each. Due instances
    (pending past `for`, cooldown ends, repeats) are ticked in data time before each event,
    from a heap of due times (the engine reads them from an index on alert_states.due_at).

    The timed evaluation of an event covers building its `Sample`, attaching the measures the
    rules last saw (`before`, `previous`) and recording it as the series' newest value, as well
    as `Evaluator.evaluate`: the engine does all of that per event too (engine.sample_of, its
    cursor), so it is the product's per-event cost, not the benchmark's bookkeeping. The
    per-event latency list and the tick scheduling stay outside the timed region.

    With `log`, every decision is listed under `_decisions` (to compare two runs): kept only
    for the short comparison runs, since millions of log entries would weigh on the GC and
    the memory of the long one, which is not work the engine does. With `cpu_clock`, times
    are this thread's CPU time rather than wall time (on a shared machine, time the core spent
    on other processes is then not counted as evaluation)."""
    states = MemoryStates()
    latest: dict[str, Sample] = {}
    per_event: list[int] = []
    per_fired_event: list[int] = []
    evaluated = 0
    actions: Counter[Action] = Counter()
    decisions_log: list[tuple[int, int, str, str]] = []
    # (due time, sequence, rule id, instance, the state it was due for): an entry whose state
    # has been replaced since is stale and skipped (the sequence breaks ties before the state).
    due: list[tuple[float, int, int, str, InstanceState]] = []
    sequence = itertools.count()
    tick_ns = 0
    ticked_total = 0
    clock = time.thread_time_ns if cpu_clock else time.perf_counter_ns
    started = clock()

    def schedule(decisions: Sequence[Decision]) -> None:
        for d in decisions:
            state = d.step.state
            when = due_at(d.rule.policy, state)
            if when is not None:
                heapq.heappush(due, (when, next(sequence), d.rule.id, d.instance, state))

    get_state = states.get
    for event in events:
        now = float(event.ts)
        if due and due[0][0] <= now:
            t1 = clock()
            ready: list[tuple[int, str, InstanceState]] = []
            while due and due[0][0] <= now:
                _, _, rule_id, instance, scheduled = heapq.heappop(due)
                if get_state(rule_id, instance) is scheduled:
                    ready.append((rule_id, instance, scheduled))
            ticked = evaluator.tick(ready, now)
            ticked_total += len(ticked)
            for d in ticked:
                states.set(d.rule, d.instance, d.step.state)
                actions[d.step.action] += 1
            if log:
                decisions_log.extend((event.offset, d.rule.id, d.instance, d.step.action.value)
                                     for d in ticked)
            schedule(ticked)
            tick_ns += clock() - t1
        t0 = clock()
        sample = sample_of(event)
        last = latest.get(sample.key)
        if last is not None:  # what the engine keeps per series in its cursor
            sample.previous = last.value
            sample.before = {0: last.value, **last.changes}
        decisions, n = evaluator.evaluate(sample, states, now, foreign=latest.get)
        latest[sample.key] = sample
        elapsed = clock() - t0
        per_event.append(elapsed)
        schedule(decisions)
        evaluated += n
        if decisions:
            fired = False
            for d in decisions:
                actions[d.step.action] += 1
                fired |= d.step.action is Action.FIRED
            if log:
                decisions_log.extend((event.offset, d.rule.id, d.instance, d.step.action.value)
                                     for d in decisions)
            if fired:
                per_fired_event.append(elapsed)
    wall = (clock() - started) / 1e9
    evaluating = sum(per_event) / 1e9
    return {
        "events": len(events),
        "seconds": round(wall, 3),
        "evaluation_seconds": round(evaluating, 3),
        # Events through the evaluator per second of evaluation: the engine's per-event cost.
        "events_per_s": round(len(events) / evaluating, 1) if evaluating else None,
        # Including the ticks run in between. Ticks run in data time here: 8 years of data in
        # minutes make every timer (cooldown, for, daily repeats) fire ~10^5x more often per
        # event than in production, where the engine ticks once a second of wall time.
        "events_per_s_with_ticks": round(len(events) / wall, 1) if wall else None,
        "instances_evaluated_per_event": round(evaluated / max(1, len(events)), 2),
        "event_latency": percentiles(per_event),
        "event_to_fired_latency": percentiles(per_fired_event),
        "events_that_fired": len(per_fired_event),
        "tick_seconds": round(tick_ns / 1e9, 3),
        "tick_decisions": ticked_total,
        # Due instances ticked (and rescheduled) per second of tick time.
        "ticks_per_s": round(ticked_total / (tick_ns / 1e9), 1) if tick_ns else None,
        "actions": {action.value: count for action, count in actions.items()},
        "instances_with_state": len(states),
        "_decisions": decisions_log,
    }


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rules", type=int, default=100_000)
    parser.add_argument("--events", type=int, default=None, help="default: every event")
    parser.add_argument("--naive-events", type=int, default=300)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--cpu", type=int, default=None, help="pin this process to one core")
    parser.add_argument("--no-gc-freeze", action="store_true",
                        help="leave the loaded rules to the cyclic GC (the engine freezes them)")
    parser.add_argument("--cpu-clock", action="store_true",
                        help="time with this thread's CPU time instead of wall time (a shared "
                             "machine: other processes' time on the core is not counted; the "
                             "timer itself adds about 1 us per event)")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    if args.cpu is not None:
        os.sched_setaffinity(0, {args.cpu})
    load_start = os.getloadavg()
    rng = random.Random(args.seed)
    random.seed(args.seed)

    t0 = time.perf_counter()
    data = load_events(args.events)
    load_s = time.perf_counter() - t0
    gc.collect()
    rss_start = rss_bytes()
    t0 = time.perf_counter()
    rules, mix = make_rules(data, args.rules, rng)
    compile_s = time.perf_counter() - t0
    gc.collect()
    rss_rules = rss_bytes()
    t0 = time.perf_counter()
    index = RuleIndex(rules)
    index.prepare()  # sort every threshold list now, as the engine does after a full load
    build_s = time.perf_counter() - t0
    gc.collect()
    rss_index = rss_bytes()
    if not args.no_gc_freeze:
        gc.freeze()  # what the engine does after loading rules: no GC scans of 100k rules

    core = run(Evaluator(index), data.events, cpu_clock=args.cpu_clock)
    rss_after = rss_bytes()
    naive_events = data.events[: args.naive_events]
    naive = run(Evaluator(NaiveIndex(rules)), naive_events, log=True, cpu_clock=args.cpu_clock)
    check = run(Evaluator(RuleIndex(rules)), naive_events, log=True, cpu_clock=args.cpu_clock)
    same = sorted(naive.pop("_decisions")) == sorted(check.pop("_decisions"))
    core.pop("_decisions")
    kinds = Counter(r.kind.value for r in rules)
    result = {
        "benchmark": "alerts",
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "conditions": {
            "python": sys.version.split()[0],
            "machine": platform.machine(),
            "cpu_count": os.cpu_count(),
            "pinned_cpu": args.cpu,
            "gc_frozen": not args.no_gc_freeze,
            "seed": args.seed,
            "clock": "lifecycle now = event observation ts (replay time)",
            "timer": "thread CPU time" if args.cpu_clock else "wall (perf_counter)",
            "load_average_start": load_start,
            "load_average_end": os.getloadavg(),
        },
        "data": {"points": data.points, "events": len(data.events),
                 "series_with_events": len(data.counts), "load_seconds": round(load_s, 2)},
        "rules": {"count": len(rules), "mix": dict(mix), "kinds": dict(kinds),
                  "compile_seconds": round(compile_s, 2),
                  "index_build_seconds": round(build_s, 3),
                  "rss_rules_mb": round((rss_rules - rss_start) / 2**20, 1),
                  "rss_index_mb": round((rss_index - rss_rules) / 2**20, 1),
                  "rss_total_mb": round(rss_after / 2**20, 1)},
        "core": core,
        "naive": naive,
        "naive_same_decisions": same,
        "speedup_events_per_s": round(core["events_per_s"] / naive["events_per_s"], 1)
        if naive["events_per_s"] else None,
        "speedup_on_the_same_events": round(
            check["events_per_s"] / naive["events_per_s"], 1) if naive["events_per_s"] else None,
        "targets": {"events_per_s": 20_000, "event_to_fired_p99_ms": 20},
    }
    text = json.dumps(result, indent=2)
    print(text)
    out = args.out or RESULTS / f"alerts-{dt.date.today().isoformat()}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text + "\n")
    return result


if __name__ == "__main__":
    main()
