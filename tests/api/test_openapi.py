"""The OpenAPI document is the contract: every status a route answers is documented for that
route, and every JSON body it answers validates against the documented schema.

One scenario per deployment walks every documented operation: with a valid key (success and
404s), without a key (401), with a key lacking the scope (403), with bad input (400), through
a rate limiter that refuses everything (429) and against a database nobody listens on (503).
Each answer goes through `Contract.check`; at the end every operation must have been called.
"""

from __future__ import annotations

import dataclasses
import re
import time
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import httpx
import pytest
from jsonschema import Draft202012Validator

from defiwatch.alerts import AlertsApiConfig
from defiwatch.api import ApiContext, create_app
from defiwatch.api.ratelimit import MemoryRateStore, RateLimiter
from defiwatch.app import Platform
from defiwatch.store.db import create_engine
from defiwatch.store.schema import alert_history

from .conftest import ALLOWED_HTTP, Api, delivery_settings, subscription

_PATH_VALUES = {"slug": "aave", "chain": "ethereum", "coins": "coingecko:ethereum",
                "timestamp": "1710115200", "device": "laptop"}
_ANY_IDS = {**_PATH_VALUES, **dict.fromkeys(
    ("rule_id", "alert_id", "endpoint_id", "notification_id"), "1")}  # for refusals


class Contract:
    """The operations of an OpenAPI document, and the check of one answer against them."""

    def __init__(self, spec: dict[str, Any]) -> None:
        self.spec = spec
        self.called: set[tuple[str, str]] = set()
        self.seen: set[tuple[str, str, int]] = set()
        # Static segments first: /v1/notifications/preferences before /{notification_id}.
        templates: list[str] = sorted(spec["paths"], key=lambda p: (p.count("{"), p))
        self._patterns = [(t, re.compile("^" + re.sub(r"\{[^}]+\}", "[^/]+", t) + "$"))
                          for t in templates]

    def operations(self) -> Iterator[tuple[str, str, dict[str, Any]]]:
        for template, item in self.spec["paths"].items():
            for method, op in item.items():
                yield method, template, op

    def template_of(self, path: str) -> str:
        return next(t for t, pattern in self._patterns if pattern.match(path))

    def check(self, response: httpx.Response) -> httpx.Response:
        method = response.request.method.lower()
        template = self.template_of(response.request.url.path)
        op = self.spec["paths"][template][method]
        status = response.status_code
        where = f"{method.upper()} {template} -> {status}: {response.text[:300]}"
        assert str(status) in op["responses"], f"undocumented status: {where}"
        self.called.add((method, template))
        self.seen.add((method, template, status))
        documented = op["responses"][str(status)]
        media = response.headers.get("content-type", "").split(";")[0]
        if status == 204:
            assert not response.content
            return response
        assert media in documented.get("content", {}), f"undocumented {media}: {where}"
        for header, spec in documented.get("headers", {}).items():
            assert not spec.get("required") or header.lower() in response.headers, where
        if media == "application/json":
            schema = documented["content"][media]["schema"]
            validator = Draft202012Validator({**schema, "components": self.spec["components"]})
            errors = [f"{'/'.join(map(str, e.absolute_path))}: {e.message}"
                      for e in validator.iter_errors(response.json())]
            assert not errors, f"{where}\n" + "\n".join(errors[:5])
        return response


def fill(template: str, values: dict[str, str]) -> str:
    return re.sub(r"\{([^}]+)\}", lambda m: values[m.group(1)], template)


def _client(ctx: ApiContext) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=create_app(ctx)),
                             base_url="http://defiwatch.test")


def _ctx(p: Platform, **over: Any) -> ApiContext:
    ctx = ApiContext(p.engine, p.stream, p.cache, p.ingest,
                     alerts=AlertsApiConfig.from_settings(p.settings),
                     settings=delivery_settings(p.settings))
    return dataclasses.replace(ctx, **over)


@pytest.fixture
async def contract(api: Api) -> AsyncIterator[Contract]:
    spec = (await api.client.get("/openapi.json")).json()
    Draft202012Validator.check_schema(spec["components"]["schemas"]["Query"])
    yield Contract(spec)


async def _seed(api: Api, auth: dict[str, str]) -> dict[str, str]:
    """Data for every route to find something; returns the path values of what it made."""
    now = int(time.time())
    points = [{"metric": "tvl", "subject": "aave", "chain": chain, "ts": now - 60 + i,
               "value": 1e9 + i * 1e7} for i, chain in enumerate(["-", "ethereum", "-"])]
    points += [{"metric": "price", "subject": "coingecko:ethereum", "ts": now - 30,
                "value": 3000.0},
               {"metric": "chain_tvl", "subject": "ethereum", "ts": now - 30, "value": 5e10}]
    c = api.client
    assert (await c.post("/v1/ingest", json={"points": points}, headers=auth)).status_code == 200
    await api.platform.processor().drain()
    rule = (await c.post("/v1/alerts/rules", headers=auth, json={
        "name": "aave drop", "channels": [{"type": "webhook", "url": f"http://{ALLOWED_HTTP}/h"}],
        "condition": {"metric": "tvl", "subject": "aave", "op": "lt", "threshold": 1}})).json()
    endpoint = (await c.get("/v1/endpoints", headers=auth)).json()["data"][0]
    user_id = await api.user_id(auth)
    async with api.platform.engine.begin() as conn:
        alert_id = (await conn.execute(alert_history.insert().values(
            rule_id=rule["id"], user_id=user_id, rule_name="aave drop", severity="warning",
            instance="", metric="tvl", subject="aave", chain="-", state="firing",
            reason="condition_met", fired_at=now, dedup_key=f"k{now}", updated_at=now,
        ).returning(alert_history.c.id))).scalar_one()
    notification = await api.notification(user_id, attempts=1, status="delivered")
    return {**_PATH_VALUES, "rule_id": str(rule["id"]), "alert_id": str(alert_id),
            "endpoint_id": str(endpoint["id"]), "notification_id": str(notification)}


def _bodies(values: dict[str, str]) -> dict[tuple[str, str], Any]:
    return {
        ("post", "/v1/ingest"): {"points": [{"metric": "tvl", "subject": "aave",
                                             "ts": int(time.time()), "value": 2e9}]},
        ("post", "/v1/alerts/rules"): {"name": "n", "channels": [{"type": "push"}],
                                       "condition": {"metric": "price", "op": "gt",
                                                     "subject": "coingecko:ethereum",
                                                     "threshold": 1e9}},
        ("patch", "/v1/alerts/rules/{rule_id}"): {"name": "renamed"},
        ("post", "/v1/alerts/history/{alert_id}/snooze"): {"minutes": 5},
        ("post", "/v1/devices"): {"device": values["device"], "subscription": subscription()},
        ("put", "/v1/notifications/preferences"): {"timezone": "Europe/Paris"},
        ("post", "/v1/query/advanced"): {"dataset": "tvl", "group_by": ["metric", "subject"],
                                         "aggregations": [{"op": "max", "field": "value"}]},
    }


# Deletions last, so the other operations still find what they need.
_LAST = {("delete", "/v1/alerts/rules/{rule_id}"): 2, ("delete", "/v1/devices/{device}"): 1}


async def _call(c: httpx.AsyncClient, method: str, path: str, body: Any = None,
                headers: dict[str, str] | None = None) -> httpx.Response:
    return await c.request(method, path, json=body, headers=headers)


async def test_every_answer_is_documented_and_valid(api: Api, contract: Contract) -> None:
    auth = await api.key(scopes=("read", "ingest", "alerts"))
    values = await _seed(api, auth)
    bodies = _bodies(values)
    ops = sorted(contract.operations(), key=lambda o: (_LAST.get((o[0], o[1]), 0), o[1], o[0]))
    c = api.client
    for method, template, _op in ops:  # with a valid key: success (or a documented refusal)
        body = bodies.get((method, template))
        contract.check(await _call(c, method, fill(template, values), body, auth))
    for method, template, op in ops:  # ids of nothing, and malformed input
        missing = {**values, **{k: "987654" for k in values if k.endswith("_id")},
                   "slug": "no-such-protocol", "chain": "no-such-chain", "device": "nope"}
        contract.check(await _call(c, method, fill(template, missing), bodies.get(
            (method, template)), auth))
        if op.get("requestBody"):
            contract.check(await _call(c, method, fill(template, values), {"bogus": [1]}, auth))
        if re.search(r"\{(\w+_id|timestamp)\}", template):  # not an integer: 400
            bad = {**values, **{k: "x" for k in values if k.endswith("_id")}, "timestamp": "x"}
            assert contract.check(await _call(c, method, fill(template, bad), None, auth)
                                  ).status_code == 400, template
    for params in ({"limit": 0}, {"since": -1}, {"limit": "x"}):
        assert contract.check(await c.get("/v1/events", params=params, headers=auth)
                              ).status_code == 400
    # A notification on its way cannot be redelivered (409).
    path = f"/v1/notifications/{values['notification_id']}/redeliver"
    assert contract.check(await c.post(path, headers=auth)).status_code == 409
    # The query answers CSV too.
    csv = await c.post("/v1/query/advanced", headers={**auth, "accept": "text/csv"},
                       json=bodies[("post", "/v1/query/advanced")])
    assert contract.check(csv).text.startswith("metric,subject,")
    assert contract.called == {(m, t) for m, t, _ in ops}
    assert {(m, t) for m, t, s in contract.seen if s < 300} == contract.called
    assert {s for *_, s in contract.seen} >= {200, 201, 202, 204, 400, 404, 409}


async def test_keys_and_scopes_are_documented(api: Api, contract: Contract) -> None:
    """401 without a key, 403 with a key lacking the scope; public routes need none."""
    keyed = [(m, t, op) for m, t, op in contract.operations() if op.get("security")]
    assert len(keyed) > 30
    read_only = await api.key(scopes=("read",))
    ingest_only = await api.key(scopes=("ingest",))
    for method, template, op in contract.operations():
        path = fill(template, _ANY_IDS)
        response = contract.check(await _call(api.client, method, path))
        if not op.get("security"):
            assert response.status_code == 200, template
            continue
        assert response.status_code == 401
        assert response.headers["www-authenticate"] == "Bearer"
        lacking = ingest_only if template != "/v1/ingest" else read_only
        assert contract.check(await _call(api.client, method, path, None, lacking)
                              ).status_code == 403
    schemes = contract.spec["components"]["securitySchemes"]
    assert {s["type"] for s in schemes.values()} == {"http", "apiKey"}


async def test_oversized_bodies_are_documented(
    contract: Contract, api: Api, make_client: Callable[..., httpx.AsyncClient],
) -> None:
    """413 from every route that may take a body, above its cap (Content-Length)."""
    auth = await api.key(scopes=("read", "ingest", "alerts"))
    cap = 1_024
    async with make_client(api_max_body_bytes=cap, api_max_ingest_body_bytes=cap) as c:
        for method, template, op in contract.operations():
            if "413" not in op["responses"]:
                continue
            path = fill(template, _ANY_IDS)
            response = await c.request(method, path, content=b"[" * (cap + 1),
                                       headers={**auth, "content-type": "application/json"})
            assert contract.check(response).status_code == 413, template


async def test_rate_limits_and_outages_are_documented(api: Api, contract: Contract) -> None:
    """429 with Retry-After through a limiter that refuses all; 503 without a database."""
    p = api.platform
    refuse_all = RateLimiter(p.engine, MemoryRateStore(), {"free": 0, "pro": 0})
    dead = create_engine("postgresql+asyncpg://nobody@127.0.0.1:9/none")
    auth = await api.key(scopes=("read", "ingest", "alerts"))
    try:
        async with _client(_ctx(p, rate_limiter=refuse_all)) as limited, \
                _client(_ctx(p, engine=dead, reads=dead)) as down:
            for method, template, op in contract.operations():
                path = fill(template, _ANY_IDS)
                response = contract.check(await _call(limited, method, path, None, auth))
                if "429" in op["responses"]:
                    assert response.status_code == 429, template
                    assert int(response.headers["retry-after"]) >= 1
                if op.get("security"):
                    response = contract.check(await _call(down, method, path, None, auth))
                    assert response.status_code == 503, template
                    assert response.json()["error"]["temporary"] is True
            assert contract.check(await down.get("/readyz")).status_code == 503
    finally:
        await dead.dispose()


async def test_docs_are_served_without_a_cdn(api: Api) -> None:
    """/docs and /redoc load only assets of ours, which no rate limit holds back."""
    refuse_all = RateLimiter(api.platform.engine, MemoryRateStore(), {"free": 0})
    async with _client(_ctx(api.platform, rate_limiter=refuse_all)) as c:
        await docs_are_local(c)


async def docs_are_local(client: httpx.AsyncClient) -> None:
    for page in ("/docs", "/redoc"):
        html = (await client.get(page)).text
        urls = re.findall(r"""(?:src|href)\s*=\s*["']([^"']+)""", html)
        urls += re.findall(r"""url:\s*['"]([^'"]+)""", html)
        assert urls, page
        assert all(u.startswith("/") and not u.startswith("//") for u in urls), urls
        for url in urls:
            if url.startswith("/docs/static/"):
                assert (await client.get(url)).status_code == 200, url
    assert "https://" not in (await client.get("/docs")).text
