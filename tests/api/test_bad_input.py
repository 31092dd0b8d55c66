"""Hostile input answers 400 naming the field, never 500 or 422 (issue 10 point 7).

On both deployments: SQLite and PostgreSQL refuse integers beyond signed 64 bits, PostgreSQL
refuses NUL in text, and Python's decoders recurse into deep JSON; each used to surface as a
500. The JSON depth check is also tested on its own, against a recursive reference.
"""

from __future__ import annotations

import base64
import json
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from defiwatch.jsondepth import MAX_JSON_DEPTH, too_deep, top_level_scalar

from .conftest import Api, subscription

BIG = str(2**63)  # one past the largest signed 64-bit integer
RULE: dict[str, Any] = {
    "name": "r", "condition": {"metric": "tvl", "subject": "aave", "op": "gt", "threshold": 1},
    "channels": [{"type": "webhook", "url": "https://example.com/hook"}]}
LEAF = {"field": "tvl", "op": "gt", "value": 1}


def nested(key: str, depth: int, leaf: Any) -> str:
    """`{"key": {"key": ... leaf ...}}`, `depth` objects deep, as text (json.dumps recurses)."""
    return f'{{"{key}": ' * depth + json.dumps(leaf) + "}" * depth


def rule_with(**changes: Any) -> dict[str, Any]:
    return {**RULE, **changes}


def condition_with(**changes: Any) -> dict[str, Any]:
    return rule_with(condition={**RULE["condition"], **changes})


# (method, path, JSON body or raw text, the field the 400 names)
BAD: list[tuple[str, str, Any, str]] = [
    # integers beyond 64 bits, negative or non-integer ids and offsets
    ("GET", f"/v1/alerts/rules/{BIG}", None, "rule_id"),
    ("GET", "/v1/alerts/rules/-1", None, "rule_id"),
    ("PATCH", f"/v1/alerts/rules/{BIG}", {"name": "x"}, "rule_id"),
    ("POST", f"/v1/alerts/rules/{BIG}/test", None, "rule_id"),
    ("DELETE", f"/v1/alerts/rules/{BIG}", None, "rule_id"),
    ("GET", f"/v1/alerts/rules?after={BIG}", None, "after"),
    ("GET", "/v1/alerts/rules?after=-1", None, "after"),
    ("GET", f"/v1/alerts/history?rule_id={BIG}", None, "rule_id"),
    ("GET", f"/v1/alerts/history?before={BIG}", None, "before"),
    ("GET", "/v1/alerts/history?since=nan", None, "since"),
    ("GET", "/v1/alerts/history?until=1e400", None, "until"),
    ("GET", f"/v1/alerts/history/{BIG}", None, "alert_id"),
    ("POST", f"/v1/alerts/history/{BIG}/ack", None, "alert_id"),
    ("GET", f"/v1/notifications?rule_id={BIG}", None, "rule_id"),
    ("GET", f"/v1/notifications?alert_id={BIG}", None, "alert_id"),
    ("GET", "/v1/notifications?since=inf", None, "since"),
    ("GET", f"/v1/notifications/{BIG}", None, "notification_id"),
    ("POST", f"/v1/notifications/{BIG}/redeliver", None, "notification_id"),
    ("POST", f"/v1/endpoints/{BIG}/rotate-secret", None, "endpoint_id"),
    ("POST", f"/v1/endpoints/{BIG}/enable", None, "endpoint_id"),
    ("GET", "/v1/events?since=1e20", None, "since"),
    ("GET", f"/v1/events?since={BIG}", None, "since"),
    ("GET", "/v1/events?since=-1", None, "since"),
    ("GET", f"/prices/historical/{BIG}/coingecko:ethereum", None, "timestamp"),
    ("GET", f"/chart/coingecko:ethereum?start={BIG}", None, "start"),
    ("GET", "/chart/coingecko:ethereum?end=-5", None, "end"),
    ("PUT", "/v1/notifications/preferences", {"max_per_minute": {"email": 2**63}},
     "max_per_minute.email"),
    # NUL in text that reaches SQL: query strings, paths, bodies
    ("GET", "/v1/latest?subject=a%00b", None, "subject"),
    ("GET", "/v1/latest?chain=a%00b", None, "chain"),
    ("GET", "/v1/alerts/rules?name=a%00b", None, "name"),
    ("GET", "/v1/alerts/rules?metric=a%00b", None, "metric"),
    ("GET", "/v1/alerts/history?subject=a%00b", None, "subject"),
    ("GET", "/protocol/a%00b", None, "slug"),
    ("GET", "/tvl/a%00b", None, "slug"),
    ("GET", "/v2/historicalChainTvl/a%00b", None, "chain"),
    ("GET", "/prices/current/coingecko:a%00b", None, "coins"),
    ("POST", "/v1/alerts/rules", rule_with(name="a\x00b"), "name"),
    ("POST", "/v1/alerts/rules", rule_with(description="\x00"), "description"),
    ("POST", "/v1/alerts/rules", condition_with(subject="aa\x00ve"), "condition.subject"),
    ("POST", "/v1/alerts/rules", condition_with(chain="eth\x00"), "condition.chain"),
    ("POST", "/v1/alerts/rules",
     rule_with(channels=[{"type": "webhook", "url": "https://example.com/\x00"}]),
     "channels[0].url"),
    ("POST", "/v1/alerts/rules", rule_with(channels=[{"type": "email",
                                                      "address": "ops\x00@example.com"}]),
     "channels[0].address"),
    ("PUT", "/v1/notifications/preferences", {"timezone": "UTC\x00"}, "timezone"),
    # URLs the resolver or the URL parser would raise on (not OSError: used to be a 500)
    ("POST", "/v1/alerts/rules",
     rule_with(channels=[{"type": "webhook", "url": f"https://{'a' * 64}.com/hook"}]),
     "channels[0].url"),
    ("POST", "/v1/alerts/rules",
     rule_with(channels=[{"type": "chat", "url": "https://[::1/hook"}]), "channels[0].url"),
    ("POST", "/v1/devices", {"subscription": subscription(f"https://{'p' * 300}/push")},
     "subscription.endpoint"),
    ("POST", "/v1/devices", {"subscription": subscription("https://[::1/push")},
     "subscription.endpoint"),
    ("POST", "/v1/devices", {"device": "d1", "user_agent": "x\x00", "subscription": {
        "endpoint": "https://1.1.1.1/push", "keys": {"p256dh": "x", "auth": "y"}}},
     "user_agent"),
    ("POST", "/v1/query/advanced", {"dataset": "tvl", "where": {
        "field": "subject", "op": "eq", "value": "aa\x00ve"}}, "where.value"),
    # subjects longer than any stored one
    ("GET", f"/v1/latest?subject={'a' * 121}", None, "subject"),
    ("GET", f"/protocol/{'a' * 121}", None, "slug"),
    ("POST", "/v1/alerts/rules", condition_with(subject="a" * 121), "condition.subject"),
    ("POST", "/v1/query/advanced", {"dataset": "tvl", "where": {
        "field": "subject", "op": "eq", "value": "a" * 121}}, "where.value"),
    # JSON nested deeper than MAX_JSON_DEPTH, before any decoder recurses into it
    ("POST", "/v1/query/advanced",
     '{"dataset": "protocols", "where": ' + nested("not", 5000, LEAF) + "}",
     "where" + ".not" * (MAX_JSON_DEPTH - 1)),
    ("POST", "/v1/alerts/rules",
     json.dumps(RULE)[:-1] + ', "description": ' + "[" * 100_000 + "}",
     "description" + "[0]" * (MAX_JSON_DEPTH - 1)),
    ("PATCH", "/v1/alerts/rules/1",
     '{"condition": ' + nested("not", 5000, RULE["condition"]) + "}",
     "condition" + ".not" * (MAX_JSON_DEPTH - 1)),
    ("POST", "/v1/ingest", '{"points": [' + nested("value", 200, 1) + "]}",
     "points[0]" + ".value" * (MAX_JSON_DEPTH - 2)),
    # a forged page cursor: 3,000 nested msgpack arrays
    ("POST", "/v1/query/advanced", {"dataset": "protocols", "sort": ["-tvl"], "cursor":
        base64.urlsafe_b64encode(b"\x91" * 3000 + b"\x01").decode().rstrip("=")}, "cursor"),
]


async def test_hostile_input_is_a_400_naming_the_field(api: Api) -> None:
    auth = await api.key(scopes=("admin",))
    wrong: list[str] = []
    for method, path, body, field in BAD:
        content = body if isinstance(body, str) or body is None else json.dumps(body)
        response = await api.client.request(
            method, path, content=content,
            headers={**auth, "content-type": "application/json"} if content else auth)
        error = response.json().get("error") if response.status_code == 400 else None
        if error is None or (error["code"], error["field"]) != ("invalid_request", field):
            wrong.append(f"{method} {path[:60]}: {response.status_code} {response.text[:200]}")
    assert not wrong, "\n".join(wrong)


async def test_the_key_is_checked_before_the_depth_of_a_body(api: Api) -> None:
    deep = '{"dataset": "protocols", "where": ' + nested("not", 5000, LEAF) + "}"
    response = await api.client.post("/v1/query/advanced", content=deep)
    assert response.status_code == 401


async def test_a_deep_tree_within_the_json_limit_meets_the_query_depth_rule(api: Api) -> None:
    auth = await api.key(scopes=("read",))
    body = '{"dataset": "protocols", "where": ' + nested("not", MAX_JSON_DEPTH - 2, LEAF) + "}"
    response = await api.client.post("/v1/query/advanced", content=body, headers=auth)
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["field"].startswith("where.not.not") and "deeper than" in error["message"]


async def test_ingest_rejects_unstorable_subjects_and_chains_per_point(api: Api) -> None:
    auth = await api.key(scopes=("ingest",))
    point = {"metric": "tvl", "subject": "aave", "chain": "ethereum", "ts": 1_710_115_200,
             "value": 1.0}
    points = [{**point, "subject": "aa\x00ve"}, {**point, "subject": "a" * 121},
              {**point, "chain": "eth\x00"}, {**point, "chain": "c" * 121}, point]
    response = await api.client.post("/v1/ingest", json={"points": points}, headers=auth)
    assert response.status_code == 200
    body = response.json()
    assert body["accepted"] == 1
    assert [(r["field"], r["reason"]) for r in body["rejected"]] == [
        ("points[0].subject", "must not contain NUL characters"),
        ("points[1].subject", "is longer than 120 characters"),
        ("points[2].chain", "must not contain NUL characters"),
        ("points[3].chain", "is longer than 120 characters")]


async def test_a_key_with_nul_is_unauthorized_not_a_server_error(api: Api) -> None:
    response = await api.client.get("/v1/events?apiKey=dw_ab%00c_secret")
    assert response.status_code == 401
    assert response.json()["error"]["code"] == "unauthorized"


ODD = [BIG, "-1", "0", "1e20", "nan", "-inf", "1.5", "a%00b", "%ED%A0%80", "x" * 3000, "%20"]
ROUTES = ["/v1/alerts/rules/{}", "/v1/alerts/rules?after={}", "/v1/alerts/rules?subject={}",
          "/v1/alerts/history?since={}", "/v1/alerts/history/{}", "/v1/notifications/{}",
          "/v1/notifications?before={}", "/v1/events?since={}", "/v1/latest?chain={}",
          "/protocol/{}", "/v2/historicalChainTvl/{}", "/prices/current/{}",
          "/prices/historical/{}/coingecko:ethereum", "/chart/coingecko:ethereum?end={}"]


async def test_odd_values_in_every_id_and_text_parameter_never_fail_the_server(api: Api) -> None:
    auth = await api.key(scopes=("admin",))
    failed = []
    for route in ROUTES:
        for value in ODD:
            response = await api.client.get(route.format(value), headers=auth)
            if response.status_code >= 500 or response.status_code == 422:
                failed.append(f"{route.format(value)[:80]}: {response.status_code}")
    assert not failed, "\n".join(failed)


# --- the depth check on its own ------------------------------------------------------------


def depth(value: Any) -> int:
    """The reference: nesting of arrays and objects, recursively."""
    if isinstance(value, dict):
        return 1 + max(map(depth, value.values()), default=0)
    if isinstance(value, list):
        return 1 + max(map(depth, value), default=0)
    return 0


# Strings full of what a bracket counter could trip on: brackets, quotes and backslashes.
TRICKY = st.text(alphabet='[]{}"\\:,u0 a', max_size=6)
DOCUMENTS = st.recursive(
    st.none() | st.booleans() | st.integers() | TRICKY,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(TRICKY, inner, max_size=3),
    max_leaves=30)


@settings(max_examples=400, deadline=None)
@given(document=DOCUMENTS, limit=st.integers(min_value=1, max_value=6))
def test_too_deep_agrees_with_a_recursive_count(document: Any, limit: int) -> None:
    raw = json.dumps(document)
    assert (too_deep(raw, limit) is None) == (depth(document) <= limit)
    assert (too_deep(raw.encode(), limit) is None) == (depth(document) <= limit)


@pytest.mark.parametrize(("raw", "limit", "path"), [
    ('{"a": [1, {"b": [[]]}]}', 3, "a[1].b"),
    ('{"a": [1, {"b": [[]]}]}', 4, "a[1].b[0]"),
    ('{"a": [1, {"b": [[]]}]}', 5, None),
    ('[[], [[[]]]]', 2, "[1][0]"),
    ('{"k\\"[": {"x": "]]]", "y": {"z": {}}}}', 2, 'k"[.y'),
    ("[" * 10, 3, "[0][0][0]"),  # unclosed: measured as far as it goes
    ('"[[[[[["', 1, None),  # brackets in a string do not nest
    ('["abc\\"[[', 1, None),  # nor in an unclosed one (its lone quote counts for nothing)
    ("", 1, None),
])
def test_too_deep_names_the_path(raw: str, limit: int, path: str | None) -> None:
    assert too_deep(raw, limit) == path


@pytest.mark.parametrize(("raw", "value"), [
    ('{"id": 7, "deep": ' + "[" * 5000 + "]" * 5000 + "}", 7),
    ('{"deep": ' + "[" * 5000 + "]" * 5000 + ', "id": "a\\"b"}', 'a"b'),
    ('{"x": {"id": 1}}', None),
    ('{"id": [1]}', None),
    ("[1, 2]", None),
])
def test_top_level_scalar_reads_past_deep_parts(raw: str, value: object) -> None:
    assert top_level_scalar(raw, "id") == value
