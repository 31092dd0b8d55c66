"""Alert rules and fired alerts (scope `alerts`); their notifications: routes/notifications.py.

A user only ever sees and changes their own rules and alerts: every query filters by the
caller's user id, so another user's id answers 404 exactly like an id that does not exist.
Rule writes bump the rules revision in the same transaction; the alert engine polls it and
applies the change within `alerts_rule_refresh_s` (docs/alerts.md).
"""

from __future__ import annotations

import contextlib
import math
import time
from typing import Annotated, Any, Literal

import msgspec
from fastapi import APIRouter, Depends, Path, Query, Request, Response
from pydantic import BaseModel, ConfigDict, Field, WithJsonSchema
from sqlalchemy.ext.asyncio import AsyncConnection

from defiwatch.alerts.config import AlertsApiConfig
from defiwatch.alerts.evaluate import is_active
from defiwatch.alerts.events import AlertEventType, build_alert_event, event_dict
from defiwatch.alerts.index import STANDARD_WINDOWS
from defiwatch.alerts.lifecycle import OK_STATE, Action, InstanceState, Phase, due_at, step
from defiwatch.alerts.rules import (
    MAX_FOR_SECONDS,
    MAX_REPEAT_MINUTES,
    MAX_THROTTLE_MINUTES,
    CompiledRule,
    RuleKind,
    RuleLimitError,
    compile_rule,
    compile_stored,
)
from defiwatch.api.auth import require
from defiwatch.api.params import EpochFloat, Name, Offset, RowId, Text
from defiwatch.api.responses import json_response
from defiwatch.api.routes.endpoints import notify_settings
from defiwatch.api.routes.notifications import notification_out
from defiwatch.api.schemas import AlertDetail, AlertOut, AlertPage, RuleTestResult
from defiwatch.domain import Latest, SeriesKey, normalize_subject
from defiwatch.domain.changes import SeriesState, pct_change
from defiwatch.domain.channels import CHANNELS_JSON_SCHEMA, parse_channels
from defiwatch.domain.conditions import (
    CONDITION_JSON_SCHEMA,
    Sample,
    Truth,
    explain,
    iter_leaves,
    parse_condition,
)
from defiwatch.errors import NotFoundError, RateLimited, ValidationError
from defiwatch.notify.factory import address_guard
from defiwatch.store import alerts as store
from defiwatch.store import endpoints as endpoint_store
from defiwatch.store import notifications as notification_store
from defiwatch.store.keys import Principal
from defiwatch.store.points import load_history

__all__ = ["router"]

router = APIRouter(prefix="/v1/alerts", tags=["alerts"])

_MAX_SNOOZE_S = 30 * 86_400
_TEST_INSTANCES = 50  # a dry run of a wildcard rule reports at most this many series
_TEST_SCAN = 5_000  # and looks at most at this many matching series
_TEST_SEND_INTERVAL_S = 10.0  # one test send per rule this often (429 otherwise)

Auth = Annotated[Principal, Depends(require("alerts"))]
RuleId = Annotated[RowId, Path(description="the rule's id")]
AlertId = Annotated[RowId, Path(description="the alert's id (history row)")]
Condition = Annotated[dict[str, Any], WithJsonSchema(CONDITION_JSON_SCHEMA)]
Channels = Annotated[list[Any], WithJsonSchema(CHANNELS_JSON_SCHEMA)]
Severity = Literal["info", "warning", "critical"]


# --- models ----------------------------------------------------------------------------------


class RuleCreate(BaseModel):
    """A new rule. Durations: `for_seconds` in seconds; throttle and repeat in minutes."""

    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [{
        "name": "Arbitrum TVL crash",
        "condition": {"metric": "change_pct", "of": "tvl", "window": "1h", "subject": "*",
                      "chain": "arbitrum", "op": "lte", "threshold": -10},
        "channels": [{"type": "webhook", "url": "https://example.com/hooks/defiwatch"}],
        "throttle_minutes": 30,
    }]})

    name: Text = Field(min_length=1, max_length=120)
    description: Text | None = Field(default=None, max_length=1000)
    condition: Condition
    channels: Channels
    for_seconds: float = Field(default=0, ge=0, le=MAX_FOR_SECONDS,
                               description="the condition must hold this long before firing")
    throttle_minutes: float | None = Field(
        default=None, ge=0, le=MAX_THROTTLE_MINUTES,
        description="cooldown: no second fire of one series within it (default: server "
                    "setting, 5)")
    repeat_minutes: float | None = Field(
        default=None, ge=1, le=MAX_REPEAT_MINUTES,
        description="notify again this often while firing and not acknowledged; null: never")
    notify_on_resolve: bool = False
    severity: Severity = "warning"
    paused: bool = False


class RulePatch(BaseModel):
    """Fields to change; absent fields stay. Changing the condition closes the rule's open
    alerts (reason `rule_changed`) and starts its instances afresh."""

    model_config = ConfigDict(extra="forbid")

    name: Text | None = Field(default=None, min_length=1, max_length=120)
    description: Text | None = Field(default=None, max_length=1000)
    condition: Condition | None = None
    channels: Channels | None = None
    for_seconds: float | None = Field(default=None, ge=0, le=MAX_FOR_SECONDS)
    throttle_minutes: float | None = Field(default=None, ge=0, le=MAX_THROTTLE_MINUTES)
    repeat_minutes: float | None = Field(default=None, ge=1, le=MAX_REPEAT_MINUTES)
    notify_on_resolve: bool | None = None
    severity: Severity | None = None
    paused: bool | None = None


class RuleOut(BaseModel):
    id: int
    name: str
    description: str | None
    condition: dict[str, Any]
    channels: list[dict[str, Any]]
    for_seconds: float
    throttle_minutes: float
    repeat_minutes: float | None
    notify_on_resolve: bool
    severity: str
    paused: bool
    kind: str = Field(description="wildcard (one alert per matching series), single or multi")
    created_at: float
    updated_at: float


class RuleWritten(RuleOut):
    webhook_secrets: dict[str, str] | None = Field(
        default=None,
        description="Only when this request created webhook endpoints: their URL -> signing "
        "secret (`whsec_...`, Standard Webhooks). Shown only in this response: store it to "
        "verify `webhook-signature`. A URL that already had an endpoint keeps its secret "
        "(rotate it with POST /v1/endpoints/{id}/rotate-secret to see a new one).")


class PageMeta(BaseModel):
    count: int
    total: int
    next_after: int | None = Field(default=None, description="pass as `after` for the next page")


class RulePage(BaseModel):
    data: list[RuleOut]
    meta: PageMeta


class SnoozeRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    until: float | None = Field(default=None, description="epoch seconds")
    minutes: float | None = Field(default=None, gt=0, le=_MAX_SNOOZE_S / 60)


def _rule_out(rule: store.StoredRule) -> RuleOut:
    return RuleOut(
        id=rule.id, name=rule.name, description=rule.description, condition=rule.condition,
        channels=rule.channels, for_seconds=rule.for_seconds,
        throttle_minutes=rule.throttle_minutes, repeat_minutes=rule.repeat_minutes,
        notify_on_resolve=rule.notify_on_resolve, severity=rule.severity, paused=rule.paused,
        kind=rule.kind, created_at=rule.created_at, updated_at=rule.updated_at,
    )


def _written(rule: store.StoredRule, secrets: dict[str, str]) -> dict[str, Any]:
    out = _rule_out(rule).model_dump()
    if secrets:
        out["webhook_secrets"] = secrets
    return out


async def _ensure_endpoints(conn: AsyncConnection, principal: Principal,
                            channels: list[dict[str, Any]], now: float) -> dict[str, str]:
    """The endpoint rows of the rule's webhook, chat and email targets (same transaction);
    returns the secrets of the webhook endpoints created now."""
    targets = [(c.type, c.target) for c in parse_channels(channels)]
    return await endpoint_store.ensure_rule_endpoints(conn, principal.user_id, targets, now)


def _config(request: Request) -> AlertsApiConfig:
    config = getattr(request.app.state.ctx, "alerts", None)
    return config if isinstance(config, AlertsApiConfig) else AlertsApiConfig()



def _watch(condition: dict[str, Any]) -> str:
    tree, _ = parse_condition(condition)
    keys = dict.fromkeys(leaf.series_key for leaf in iter_leaves(tree))
    return " " + " ".join(keys)[:3990] + " "


async def _check_destinations(request: Request, channels: list[dict[str, Any]]) -> None:
    """Refuse webhook and chat URLs that resolve to loopback, private, link-local or metadata
    addresses now, rather than at the first delivery. A host that does not resolve yet is
    accepted: every connection is checked again when it is made.

    Raises:
        BlockedDestination: (400 `destination_blocked`, field `channels[i].url`).
    """
    guard = address_guard(notify_settings(request))
    for i, channel in enumerate(channels):
        if (isinstance(channel, dict) and channel.get("type") in ("webhook", "chat")
                and isinstance(channel.get("url"), str)):
            with contextlib.suppress(OSError):
                await guard.check_url(channel["url"], field=f"channels[{i}].url")


def _validated(fields: dict[str, Any]) -> tuple[dict[str, Any], CompiledRule]:
    """Check a rule's condition and channels; return the canonical fields and the compiled
    rule (which also proves the whole rule compiles)."""
    _, condition = parse_condition(fields["condition"])
    channels = [c.as_json() for c in parse_channels(fields["channels"])]
    out = {**fields, "condition": condition, "channels": channels}
    compiled = compile_rule(
        id=0, user_id=0, name=out["name"], condition=condition, channels=channels,
        for_seconds=out["for_seconds"], throttle_minutes=out["throttle_minutes"],
        repeat_minutes=out["repeat_minutes"], notify_on_resolve=out["notify_on_resolve"],
        severity=out["severity"])
    return out, compiled


async def _owned_rule(conn: AsyncConnection, principal: Principal, rule_id: int) -> store.StoredRule:
    rule = await store.get_rule(conn, principal.user_id, rule_id)
    if rule is None:
        raise NotFoundError(f"no alert rule {rule_id}", field="id")
    return rule


# --- rules -----------------------------------------------------------------------------------


@router.post("/rules", status_code=201, summary="Create an alert rule",
             response_model=RuleWritten,
             responses={400: {"description": "invalid rule; `field` is the JSON path at fault"},
                        403: {"description": "the tier's rule limit is reached "
                                             "(code rule_limit_reached)"}})
async def create_rule(body: RuleCreate, request: Request, principal: Auth) -> Response:
    config = _config(request)
    fields = body.model_dump()
    if fields["throttle_minutes"] is None:
        fields["throttle_minutes"] = config.default_throttle_minutes
    fields, compiled = _validated(fields)
    await _check_destinations(request, fields["channels"])
    now = time.time()
    async with request.app.state.ctx.engine.begin() as conn:
        revision = await store.bump_revision(conn)  # serialises rule writers: the count holds
        limit = config.limit_for(principal.tier)
        if await store.count_rules(conn, principal.user_id) >= limit:
            raise RuleLimitError(
                f"the {principal.tier} tier allows {limit} alert rules; delete one or upgrade")
        rule_id = await store.insert_rule(conn, {
            **fields, "user_id": principal.user_id, "kind": compiled.kind.value,
            "watch": _watch(fields["condition"]), "revision": revision, "created_at": now,
            "updated_at": now,
        })
        await store.reset_states(conn, rule_id, multi=compiled.kind is RuleKind.MULTI, now=now)
        secrets = await _ensure_endpoints(conn, principal, fields["channels"], now)
        rule = await _owned_rule(conn, principal, rule_id)
    return json_response(_written(rule, secrets), 201)


@router.get("/rules", summary="List your alert rules", response_model=RulePage)
async def list_rules(
    request: Request,
    principal: Auth,
    paused: Annotated[bool | None, Query(description="only paused (true) or active (false)")] = None,
    severity: Severity | None = None,
    metric: Annotated[Text | None, Query(description="rules watching this series metric")] = None,
    subject: Annotated[Name | None, Query(description="rules naming this subject (or *)")] = None,
    name: Annotated[Text | None, Query(max_length=120, description="name contains")] = None,
    limit: Annotated[int, Query(ge=1, le=200)] = 50,
    after: Annotated[Offset, Query(description="id of the last rule already seen")] = 0,
) -> Response:
    if subject is not None and subject != "*":
        subject = normalize_subject(metric or ("price" if ":" in subject else "tvl"), subject)
    async with request.app.state.ctx.engine.connect() as conn:
        rules, total = await store.list_rules(
            conn, principal.user_id, paused=paused, severity=severity, metric=metric,
            subject=subject, name=name, limit=limit, after=after)
    page = RulePage(data=[_rule_out(r) for r in rules], meta=PageMeta(
        count=len(rules), total=total,
        next_after=rules[-1].id if len(rules) == limit else None))
    return json_response(page.model_dump())


@router.get("/rules/{rule_id}", summary="One of your alert rules", response_model=RuleOut)
async def get_rule(rule_id: RuleId, request: Request, principal: Auth) -> Response:
    async with request.app.state.ctx.engine.connect() as conn:
        rule = await _owned_rule(conn, principal, rule_id)
    return json_response(_rule_out(rule).model_dump())


async def _update(
    request: Request, principal: Auth, rule_id: int, changes: dict[str, Any], *,
    endpoints: bool = False,
) -> tuple[store.StoredRule, dict[str, str]]:
    """Apply `changes`; with `endpoints`, also ensure the endpoint rows of its channels and
    return the secrets of webhook endpoints created now."""
    if isinstance(changes.get("channels"), list):  # before the transaction: DNS may take time
        await _check_destinations(request, changes["channels"])
    now = time.time()
    async with request.app.state.ctx.engine.begin() as conn:
        revision = await store.bump_revision(conn)
        rule = await _owned_rule(conn, principal, rule_id)
        current = {k: getattr(rule, k) for k in (
            "name", "description", "condition", "channels", "for_seconds", "throttle_minutes",
            "repeat_minutes", "notify_on_resolve", "severity", "paused")}
        merged, compiled = _validated({**current, **changes})
        values = {k: v for k, v in merged.items() if k in changes}
        values.update(kind=compiled.kind.value, watch=_watch(merged["condition"]),
                      revision=revision, updated_at=now)
        await store.update_rule(conn, rule_id, values)
        if merged["condition"] != rule.condition:
            # The old instances answered another question: close them, start afresh.
            await store.close_rule_alerts(conn, rule_id, reason="rule_changed", now=now)
            await store.reset_states(conn, rule_id, multi=compiled.kind is RuleKind.MULTI,
                                     now=now)
        secrets = (await _ensure_endpoints(conn, principal, merged["channels"], now)
                   if endpoints else {})
        return await _owned_rule(conn, principal, rule_id), secrets


@router.patch("/rules/{rule_id}", summary="Change an alert rule", response_model=RuleWritten)
async def patch_rule(rule_id: RuleId, body: RulePatch, request: Request, principal: Auth) -> Response:
    changes = body.model_dump(include=body.model_fields_set)
    for key in ("name", "condition", "channels", "for_seconds", "throttle_minutes",
                "notify_on_resolve", "severity", "paused"):
        if key in changes and changes[key] is None:
            raise ValidationError(f"{key} cannot be null", field=key)
    rule, secrets = await _update(request, principal, rule_id, changes, endpoints=True)
    return json_response(_written(rule, secrets))


@router.post("/rules/{rule_id}/pause", summary="Pause a rule: no evaluation until resumed",
             response_model=RuleOut)
async def pause_rule(rule_id: RuleId, request: Request, principal: Auth) -> Response:
    rule, _ = await _update(request, principal, rule_id, {"paused": True})
    return json_response(_rule_out(rule).model_dump())


@router.post("/rules/{rule_id}/resume", summary="Resume a paused rule", response_model=RuleOut)
async def resume_rule(rule_id: RuleId, request: Request, principal: Auth) -> Response:
    rule, _ = await _update(request, principal, rule_id, {"paused": False})
    return json_response(_rule_out(rule).model_dump())


@router.delete("/rules/{rule_id}", status_code=204, summary="Delete an alert rule",
               description="Its open alerts are closed (reason `rule_deleted`); its history "
               "stays readable.")
async def delete_rule(rule_id: RuleId, request: Request, principal: Auth) -> Response:
    now = time.time()
    async with request.app.state.ctx.engine.begin() as conn:
        revision = await store.bump_revision(conn)
        await _owned_rule(conn, principal, rule_id)
        await store.close_rule_alerts(conn, rule_id, reason="rule_deleted", now=now)
        await store.soft_delete_rule(conn, rule_id, revision=revision, now=now)
    return Response(status_code=204)


# --- dry run -----------------------------------------------------------------------------------


def _sample(latest: Latest) -> Sample:
    return Sample(latest.metric, latest.subject, latest.chain, latest.ts, latest.value, None,
                  {3_600: latest.change_1h, 86_400: latest.change_24h,
                   604_800: latest.change_7d})


async def _custom_windows(conn: AsyncConnection, rule: CompiledRule, sample: Sample) -> None:
    windows = [w for w in rule.windows if w not in STANDARD_WINDOWS]
    if not windows:
        return
    history = SeriesState()
    key = SeriesKey(sample.metric, sample.subject, sample.chain)
    for ts, value in await load_history(conn, key, before=sample.ts + 1,
                                        seconds=int(max(windows) * 1.5) + 1):
        history.add(ts, value)
    for window in windows:
        ref = history.reference(sample.ts, window)
        sample.changes[window] = None if ref is None else pct_change(sample.value, ref)


@router.post(
    "/rules/{rule_id}/test",
    summary="Dry run: would the rule fire on the current values, and why",
    description="Evaluates the rule against the newest values (hot cache) without recording "
    "anything. Per series (instance): the truth of the condition, each comparison with its "
    "value, and what the lifecycle would do now given the instance's state (fire, go pending, "
    "held by the cooldown, already firing). Crossings need two consecutive values, which "
    "current values cannot show: they test as unknown unless the value is on the safe side.\n\n"
    "With `send=true` it also queues one notification of kind `test` per channel of the rule "
    "(an alert-shaped event with `type` \"test\"), whatever the evaluation says, and returns "
    "their ids in `queued`: follow them in GET /v1/notifications?kind=test. One test send per "
    f"rule every {_TEST_SEND_INTERVAL_S:g} s (429 with Retry-After otherwise).",
    response_model=RuleTestResult,
    responses={429: {"description": "a test send of this rule was queued less than "
                                    f"{_TEST_SEND_INTERVAL_S:g} s ago (code rate_limited)"}},
)
async def test_rule(
    rule_id: RuleId,
    request: Request,
    principal: Auth,
    send: Annotated[bool, Query(description="also queue a test notification on every "
                                            "channel")] = False,
) -> Response:
    ctx = request.app.state.ctx
    now = time.time()
    async with ctx.engine.connect() as conn:
        stored = await _owned_rule(conn, principal, rule_id)
        rule = compile_stored(stored)
        cache = ctx.cache
        samples: list[Sample] = []
        if rule.kind is RuleKind.WILDCARD:
            assert rule.binding is not None
            metric, subject, chain = rule.binding
            found = await cache.get_latest(metric, None if subject == "*" else subject,
                                           None if chain == "*" else chain, limit=_TEST_SCAN)
            samples = [s for s in map(_sample, found) if rule.in_scope(s)]
        else:
            for key in rule.scope:
                m, s, c = key.split("|", 2)
                samples += [_sample(x) for x in await cache.get_latest(m, s, c, limit=1)]
                break  # the instance is evaluated once, from its first series
        foreign: dict[str, Sample] = {}
        for key in rule.foreign:
            m, s, c = key.split("|", 2)
            for latest in await cache.get_latest(m, s, c, limit=1):
                foreign[key] = _sample(latest)
        instances: list[dict[str, Any]] = []
        for sample in samples:
            await _custom_windows(conn, rule, sample)
            instance = rule.instance(sample.key)
            row = await store.get_state(conn, rule.id, instance)
            state = msgspec.convert(row.state, InstanceState) if row else OK_STATE
            instances.append(_verdict(rule, sample, instance, state, foreign, now))
        if not samples:
            instances.append({
                "instance": "" if rule.kind is not RuleKind.WILDCARD else None,
                "series": rule.scope[0] if rule.scope else "|".join(rule.binding or ()),
                "truth": Truth.UNKNOWN.name.lower(), "would_fire": False, "action": "none",
                "reason": "no_data", "phase": "ok",
                "explanation": "no current value for the watched series yet",
                "leaves": [],
            })
    instances.sort(key=lambda i: (not i["would_fire"], i["series"] or ""))
    body = {
        "rule_id": rule.id, "evaluated_at": now, "paused": stored.paused,
        "would_fire": any(i["would_fire"] for i in instances),
        "matched_series": len(samples), "instances": instances[:_TEST_INSTANCES],
    }
    if send:
        body["queued"] = await _queue_test(request, principal, stored, rule, time.time())
    return json_response(body)


async def _queue_test(request: Request, principal: Principal, stored: store.StoredRule,
                      rule: CompiledRule, now: float) -> list[int]:
    """Queue one `test` notification per channel of the rule; return their ids.

    Raises:
        RateLimited: 429, a test send of the rule is younger than _TEST_SEND_INTERVAL_S.
    """
    series = rule.scope[0] if rule.scope else "|".join(rule.binding or ())
    detail = {"user_id": principal.user_id, "rule_id": stored.id, "rule_name": stored.name,
              "alert_id": None, "instance": "", "state": "test", "reason": "test",
              "severity": stored.severity, "fired_at": now, "resolved_at": None,
              "suppressed": None}
    # The engine's builder, so a test payload has the shape real ones have; `test` is not an
    # alert event type of the stream, hence the replace.
    event = msgspec.structs.replace(
        build_alert_event(AlertEventType.FIRED, source=None, series=series, ts=int(now),
                          now=now, detail=detail), type="test")
    payload = event_dict(event)
    rows = [{"alert_id": None, "user_id": principal.user_id, "rule_id": stored.id,
             "kind": "test", "seq": 0, "channel": c.type, "target": c.target, "host": c.host,
             "config": c.as_json(), "payload": payload, "status": "pending", "attempt": 0,
             "next_attempt_at": now, "created_at": now, "updated_at": now}
            for c in parse_channels(stored.channels)]
    async with request.app.state.ctx.engine.begin() as conn:
        last = await notification_store.last_test_at(conn, principal.user_id, stored.id,
                                                     lock=True)
        if last is not None and now - last < _TEST_SEND_INTERVAL_S:
            wait = max(1, math.ceil(_TEST_SEND_INTERVAL_S - (now - last)))
            raise RateLimited(f"a test of rule {stored.id} was sent less than "
                              f"{_TEST_SEND_INTERVAL_S:g} s ago; retry after {wait} s",
                              retry_after=wait, field="send")
        return await notification_store.queue_notifications(conn, rows)


def _verdict(rule: CompiledRule, sample: Sample, instance: str, state: InstanceState,
             foreign: dict[str, Sample], now: float) -> dict[str, Any]:
    truth = rule.enter(sample, foreign.get)
    stay = rule.stay(sample, foreign.get) if state.phase is Phase.FIRING else truth
    result = step(rule.policy, state, truth, stay, ts=sample.ts, series=sample.key, now=now)
    leaves = explain(rule.tree, sample, foreign.get)
    would_fire = result.action is Action.FIRED
    if would_fire:
        why = "the condition holds: " + "; ".join(
            f"{x.series} {x.op} {x.threshold:g} (value {_fmt(x.value)})"
            for x in leaves if x.truth is Truth.TRUE)
    elif result.action is Action.PENDING:
        why = f"the condition holds; it fires after holding for {rule.policy.for_s:g} s"
    elif result.action is Action.HELD:
        why = "the condition holds, but the cooldown since the last fire has not passed"
    elif state.phase is Phase.FIRING:
        why = "already firing" if stay != Truth.FALSE else "firing; it would resolve now"
    elif truth == Truth.UNKNOWN:
        missing = [x.path for x in leaves if x.truth is Truth.UNKNOWN]
        why = "not enough data to decide: " + ", ".join(missing)
    else:
        failing = [f"{x.series} {x.op} {x.threshold:g} is false (value {_fmt(x.value)})"
                   for x in leaves if x.truth is Truth.FALSE]
        why = "the condition does not hold: " + "; ".join(failing)
    return {
        "instance": instance, "series": sample.key, "observed_ts": sample.ts,
        "truth": Truth(truth).name.lower(), "phase": state.phase.value,
        "active": is_active(state), "would_fire": would_fire, "action": result.action.value,
        "reason": result.reason.value, "explanation": why,
        "leaves": [{"path": x.path, "series": x.series, "op": x.op, "threshold": x.threshold,
                    "value": x.value, "previous": x.previous, "truth": x.truth.name.lower(),
                    "source": x.source} for x in leaves],
    }


def _fmt(value: float | None) -> str:
    return "unknown" if value is None else f"{value:g}"


# --- history -------------------------------------------------------------------------------------


def _alert_out(alert: store.AlertRow) -> dict[str, Any]:
    out = msgspec.to_builtins(alert)
    out["series"] = {"metric": out.pop("metric"), "subject": out.pop("subject"),
                     "chain": out.pop("chain")}
    out["acknowledged_at"] = out.pop("acked_at")
    out["acknowledged_by"] = out.pop("acked_by")
    return dict(out)


@router.get(
    "/history",
    summary="Your fired alerts, newest first, with the event that fired each",
    description="Page with `before=meta.next_before`. `state` is firing or resolved; "
    "`suppressed` says why a fire was not notified (e.g. snoozed).",
    response_model=AlertPage,
)
async def list_history(
    request: Request,
    principal: Auth,
    rule_id: RowId | None = None,
    state: Literal["firing", "resolved"] | None = None,
    subject: Annotated[Name | None, Query(description="series subject, e.g. aave")] = None,
    since: Annotated[EpochFloat | None, Query(description="fired at or after (epoch s)")] = None,
    until: Annotated[EpochFloat | None, Query(description="fired before (epoch s)")] = None,
    acknowledged: bool | None = None,
    limit: Annotated[int, Query(ge=1, le=200)] = 50,
    before: Annotated[RowId | None, Query(description="id of the oldest alert seen")] = None,
) -> Response:
    async with request.app.state.ctx.engine.connect() as conn:
        alerts, total = await store.list_alerts(
            conn, principal.user_id, rule_id=rule_id, state=state, subject=subject,
            since=since, until=until, acknowledged=acknowledged, limit=limit, before=before)
    return json_response({"data": [_alert_out(a) for a in alerts], "meta": {
        "count": len(alerts), "total": total,
        "next_before": alerts[-1].id if len(alerts) == limit else None}})


async def _owned_alert(conn: AsyncConnection, principal: Principal, alert_id: int, *,
                       lock: bool = False) -> store.AlertRow:
    alert = await store.get_alert(conn, principal.user_id, alert_id, lock=lock)
    if alert is None:
        raise NotFoundError(f"no alert {alert_id}", field="id")
    return alert


@router.get("/history/{alert_id}", summary="One alert with its queued notifications",
            response_model=AlertDetail)
async def get_alert(alert_id: AlertId, request: Request, principal: Auth) -> Response:
    async with request.app.state.ctx.engine.connect() as conn:
        alert = await _owned_alert(conn, principal, alert_id)
        notes = await notification_store.list_notifications(
            conn, principal.user_id, alert_id=alert_id, limit=200)
    out = _alert_out(alert)
    out["notifications"] = [notification_out(n) for n in notes]
    return json_response(out)


async def _update_instance(conn: AsyncConnection, alert: store.AlertRow, now: float,
                           **changes: Any) -> None:
    """Apply ack/snooze to the alert's instance state, recomputing when the tick is due."""
    if alert.rule_id is None:
        return
    row = await store.get_state(conn, alert.rule_id, alert.instance, lock=True)
    if row is None:
        return
    state = msgspec.convert(row.state, InstanceState)
    if "acked" in changes and state.alert_id != alert.id:
        return  # a later episode: the acknowledgement was for an older alert
    state = msgspec.structs.replace(state, **changes)
    rule = await store.get_rule_any(conn, alert.rule_id)
    due = None
    if rule is not None and rule.deleted_at is None:
        due = due_at(compile_stored(rule).policy, state)
    await store.save_states(conn, [(row.rule_id, row.instance, row.series, state.phase.value,
                                    msgspec.to_builtins(state), due)], now)


@router.post("/history/{alert_id}/ack", summary="Acknowledge an alert: no more repeats",
             response_model=AlertOut)
async def ack_alert(alert_id: AlertId, request: Request, principal: Auth) -> Response:
    now = time.time()
    async with request.app.state.ctx.engine.begin() as conn:
        alert = await _owned_alert(conn, principal, alert_id, lock=True)
        if alert.acked_at is None:
            await store.update_alert(conn, alert_id, {"acked_at": now, "acked_by": principal.user,
                                                      "updated_at": now})
            await _update_instance(conn, alert, now, acked=True)
        alert = await _owned_alert(conn, principal, alert_id)
    return json_response(_alert_out(alert))


@router.post(
    "/history/{alert_id}/snooze",
    summary="Snooze an alert's series until a time: no notifications meanwhile",
    description="Give `until` (epoch s) or `minutes`. While snoozed, transitions of this rule "
    "on this series are still recorded, but nothing is notified; a repeat due meanwhile waits "
    f"for the end. At most {_MAX_SNOOZE_S // 86_400} days.",
    response_model=AlertOut,
)
async def snooze_alert(alert_id: AlertId, body: SnoozeRequest, request: Request,
                       principal: Auth) -> Response:
    now = time.time()
    if (body.until is None) == (body.minutes is None):
        raise ValidationError("give either 'until' (epoch s) or 'minutes'", field="until")
    until = body.until if body.until is not None else now + (body.minutes or 0) * 60
    if not math.isfinite(until) or until <= now:
        raise ValidationError("until must be in the future (epoch seconds)", field="until")
    if until > now + _MAX_SNOOZE_S:
        raise ValidationError(f"a snooze lasts at most {_MAX_SNOOZE_S // 86_400} days",
                              field="until")
    return await _set_snooze(request, principal, alert_id, until, now)


@router.delete("/history/{alert_id}/snooze", summary="End an alert's snooze now",
               response_model=AlertOut)
async def unsnooze_alert(alert_id: AlertId, request: Request, principal: Auth) -> Response:
    return await _set_snooze(request, principal, alert_id, None, time.time())


async def _set_snooze(request: Request, principal: Principal, alert_id: int,
                      until: float | None, now: float) -> Response:
    async with request.app.state.ctx.engine.begin() as conn:
        alert = await _owned_alert(conn, principal, alert_id, lock=True)
        await store.update_alert(conn, alert_id, {"snoozed_until": until, "updated_at": now})
        await _update_instance(conn, alert, now, snoozed_until=until)
        alert = await _owned_alert(conn, principal, alert_id)
    return json_response(_alert_out(alert))
