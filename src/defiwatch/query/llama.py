"""DefiLlama's public read API, answered from our store: same paths' JSON shapes, our data.

Each function reads through a connection and returns the JSON-ready value of one endpoint;
api/routes/llama.py adds HTTP, keys, caching. Shapes follow the real responses captured in
../shared/defi-data (tests/query/test_llama.py compares them key by key and type by type):

| endpoint                               | from                                             |
|----------------------------------------|--------------------------------------------------|
| /protocols                             | protocols + query_latest (tvl family) + snapshot |
| /protocol/{slug}                       | points of the protocol's tvl-family series       |
| /tvl/{slug}                            | query_snapshot                                   |
| /v2/chains                             | query_latest chain_tvl + llama_chains.V2_CHAINS  |
| /v2/historicalChainTvl[/{chain}]       | chain_tvl points, the last point of each UTC day |
| /prices/current/{coins}                | query_latest price                               |
| /prices/historical/{timestamp}/{coins} | the price point nearest the timestamp            |
| /chart/{coins}                         | the nearest price point to each requested time   |

What we do not have is sent the way DefiLlama sends "nothing": text fields we never stored are
"" where DefiLlama never sends null (logo, module) and null where it does (address, cmcId);
list fields are empty. `id` is the slug (DefiLlama's numeric ids are not in our data).
Prices carry `confidence: 0.99`, the value coins.llama.fi gives CoinGecko-sourced prices.
"""

from __future__ import annotations

import bisect
import re
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import and_, or_, select, text
from sqlalchemy.ext.asyncio import AsyncConnection

from defiwatch.domain import NO_CHAIN, normalize_chain, normalize_subject
from defiwatch.domain.changes import WINDOWS, pct_change
from defiwatch.errors import ValidationError
from defiwatch.query.fields import TVL_DATASET_METRICS
from defiwatch.query.index import chain_observations, window_references
from defiwatch.query.llama_chains import V2_CHAINS, chain_name
from defiwatch.store.schema import points, protocols, query_latest, query_snapshot

__all__ = [
    "MAX_CHART_POINTS",
    "chain_tvl_history",
    "chains",
    "chart",
    "chart_timestamps",
    "parse_duration",
    "prices_at",
    "prices_current",
    "protocol",
    "protocols_list",
    "tvl",
]

CONFIDENCE = 0.99
MAX_CHART_POINTS = 1_000  # timestamps per coin in one /chart request
_MAX_CHART_ROWS = 500_000  # stored points one /chart request may scan
_DURATION_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([wdhms]?)\s*$", re.IGNORECASE)
_UNIT = {"w": 604_800, "d": 86_400, "h": 3_600, "m": 60, "s": 1, "": 1}
_TVL_SUBMETRICS = sorted(m for m in TVL_DATASET_METRICS if m.startswith("tvl_"))
_GECKO_SYMBOLS = {g: s for _n, g, s, _c, _i in V2_CHAINS.values() if g and s}


def parse_duration(value: str, *, field: str) -> int:
    """DefiLlama's period/searchWidth notation in seconds: `4h`, `1d`, `2w`, `15m` (case does
    not matter) or a bare number of seconds.

    Raises:
        ValidationError: not such a duration (field = the query parameter).
    """
    match = _DURATION_RE.match(value)
    if not match:
        raise ValidationError(f"{value[:40]!r} is not a duration such as 600, 15m, 4h, 1d, 1w",
                              field=field)
    seconds = int(float(match.group(1)) * _UNIT[match.group(2).lower()])
    if not 0 < seconds <= 100 * 365 * 86_400:
        raise ValidationError("must be more than 0 s and at most 100 years", field=field)
    return seconds


def chart_timestamps(start: int | None, end: int | None, span: int | None, period: int,
                     now: int) -> list[int]:
    """The times /chart asks prices for: from `start` (or back from `end`, default now) every
    `period` seconds, `span` points (default: up to `end` when both ends are given, else 1)."""
    if start is not None and end is not None and span is None:
        if end < start:
            raise ValidationError("end is before start", field="end")
        count = (end - start) // period + 1
    else:
        count = span if span is not None else 1
    if count > MAX_CHART_POINTS:
        raise ValidationError(f"at most {MAX_CHART_POINTS} points per coin; raise period or "
                              "lower span", field="span")
    if start is not None:
        return [start + i * period for i in range(count)]
    last = end if end is not None else now
    return [last - (count - 1 - i) * period for i in range(count)]


def _name(value: str | None) -> str:
    return value if value else ""


def _chain_key(metric: str, chain: str) -> str:
    """A (metric, chain) series as DefiLlama's chainTvls key: `Ethereum`, `Ethereum-borrowed`,
    or a bare `borrowed` for a sub-metric's total over chains."""
    sub = metric.removeprefix("tvl_") if metric != "tvl" else ""
    if chain == NO_CHAIN:
        return sub
    return f"{chain_name(chain)}-{sub}" if sub else chain_name(chain)


@dataclass(frozen=True, slots=True)
class _Observed:
    """A protocol's total TVL at its observation time, with the windowed changes there."""

    tvl: float | None
    change_1h: float | None = None
    change_24h: float | None = None
    change_7d: float | None = None


def _observation_time(series: Iterable[tuple[str, str, int]], total_ts: int | None
                      ) -> int | None:
    """The one time a protocol's /protocols numbers describe: the newest time its per-chain
    TVL was observed (all its current chains carry it; DefiLlama's total is their sum), else
    its newest total's. `series`: (metric, chain, newest ts) of its tvl-family series."""
    chain_times = [ts for metric, chain, ts in series if metric == "tvl" and chain != NO_CHAIN]
    return max(chain_times) if chain_times else total_ts


async def _stale_observations(conn: AsyncConnection
                              ) -> dict[str, tuple[float | None, list[float | None]]]:
    """Protocol -> (total, window references) at its observation time, for every protocol
    whose newest total (the read model's snapshot) was observed at another time than its
    chains. The total is None when none was observed then (the caller sums the chains).

    Empty in steady live operation, where the poller stores the total and the chains together.
    """
    seen = chain_observations().subquery("o")
    snap = query_snapshot
    total = (select(points.c.value).where(
        points.c.metric == "tvl", points.c.subject == seen.c.subject,
        points.c.chain == NO_CHAIN, points.c.ts == seen.c.ts).scalar_subquery().label("total"))
    stmt = (select(seen.c.subject, total, *window_references(seen.c.subject, seen.c.ts))
            .select_from(seen.outerjoin(snap, snap.c.slug == seen.c.subject))
            .where(or_(snap.c.tvl_ts.is_(None), snap.c.tvl_ts != seen.c.ts)))
    return {r["subject"]: (_float(r["total"]), [_float(r[f"ref_{n}"]) for n in WINDOWS])
            for r in (await conn.execute(stmt)).mappings()}


def _float(value: Any) -> float | None:
    return None if value is None else float(value)


def _protocol_object(slug: str, meta: Any, snap: Any, chain_tvls: dict[str, float],
                     observed: _Observed | None) -> dict[str, Any]:
    """A protocol as DefiLlama lists it; `meta` and `snap` may be missing (points ingested
    before the protocol's metadata or snapshot exist)."""
    chains = [chain_name(c) for c in (meta.chains if meta is not None else None) or []]
    obj: dict[str, Any] = {
        "id": slug, "name": meta.name if meta is not None else slug, "address": None,
        "symbol": (meta.symbol if meta is not None else None) or "-",
        "url": _name(meta.url if meta is not None else None), "description": None,
        "chain": chains[0] if len(chains) == 1 else "Multi-Chain", "logo": "",
        "audits": None, "audit_note": None,
        "gecko_id": meta.gecko_id if meta is not None else None, "cmcId": None,
        "category": _name(meta.category if meta is not None else None), "chains": chains,
        "module": "", "twitter": None, "forkedFrom": [], "oracles": [],
        "listedAt": meta.listed_at if meta is not None else None, "slug": slug,
        "tvl": observed.tvl if observed else None, "chainTvls": chain_tvls,
        "change_1h": observed.change_1h if observed else None,
        "change_1d": observed.change_24h if observed else None,
        "change_7d": observed.change_7d if observed else None,
        "tokenBreakdowns": {}, "mcap": snap.mcap if snap is not None else None,
    }
    if obj["listedAt"] is None:
        del obj["listedAt"]  # DefiLlama leaves the key out rather than sending null
    for sub in ("staking", "pool2"):
        if sub in chain_tvls:
            obj[sub] = chain_tvls[sub]
    return obj


def _snapshot_observed(snap: Any) -> _Observed | None:
    if snap is None:
        return None
    return _Observed(snap.tvl, snap.change_1h, snap.change_24h, snap.change_7d)


async def protocols_list(conn: AsyncConnection) -> list[dict[str, Any]]:
    """GET /protocols: every protocol, largest TVL first (as DefiLlama orders it).

    `tvl`, `chainTvls` and the changes of a protocol all describe one observation time (see
    `_observation_time`), so tvl = sum of the plain chains as in DefiLlama's own answers: a
    total observed without chains, or a chain the source stopped reporting, does not mix in.
    """
    metas = {r.slug: r for r in await conn.execute(select(protocols))}
    snaps = {r.slug: r for r in await conn.execute(select(query_snapshot))}
    newest: dict[str, list[Any]] = defaultdict(list)
    stmt = select(query_latest).where(query_latest.c.metric.in_(["tvl", *_TVL_SUBMETRICS]))
    for r in await conn.execute(stmt):
        newest[r.subject].append(r)
    stale = await _stale_observations(conn)
    objects = []
    for slug in set(metas) | set(snaps):
        snap = snaps.get(slug)
        rows = newest.get(slug, [])
        at = _observation_time(((r.metric, r.chain, r.ts) for r in rows),
                               snap.tvl_ts if snap is not None else None)
        chain_tvls = {_chain_key(r.metric, r.chain): float(r.value) for r in rows
                      if r.ts == at and _chain_key(r.metric, r.chain)}
        observed = _snapshot_observed(snap)
        if slug in stale:
            total, refs = stale[slug]
            if total is None:  # DefiLlama's definition: the sum of the plain chains
                total = sum(float(r.value) for r in rows
                            if r.metric == "tvl" and r.chain != NO_CHAIN and r.ts == at)
            observed = _Observed(total, *(None if ref is None else pct_change(total, ref)
                                          for ref in refs))
        objects.append(_protocol_object(slug, metas.get(slug), snap, chain_tvls, observed))
    objects.sort(key=lambda o: (o["tvl"] is None, -(o["tvl"] or 0.0), o["slug"]))
    return objects


async def protocol(conn: AsyncConnection, slug: str) -> dict[str, Any] | None:
    """GET /protocol/{slug}: metadata, `tvl` history, per-chain histories, current values."""
    slug = normalize_subject("tvl", slug)
    meta = (await conn.execute(select(protocols).where(protocols.c.slug == slug))).first()
    snap = (await conn.execute(select(query_snapshot).where(query_snapshot.c.slug == slug))).first()
    rows = await conn.execute(
        select(points.c.metric, points.c.chain, points.c.ts, points.c.value)
        .where(points.c.subject == slug, points.c.metric.in_(["tvl", *_TVL_SUBMETRICS]))
        .order_by(points.c.metric, points.c.chain, points.c.ts))
    series: dict[str, list[dict[str, float | int]]] = defaultdict(list)
    total: list[dict[str, float | int]] = []
    newest: dict[tuple[str, str], int] = {}
    for metric, chain, ts, value in rows:
        item = {"date": int(ts), "totalLiquidityUSD": float(value)}
        newest[(metric, chain)] = int(ts)  # rows come in time order per series
        if metric == "tvl" and chain == NO_CHAIN:
            total.append(item)
        else:
            series[_chain_key(metric, chain)].append(item)
    if meta is None and snap is None and not total and not series:
        return None
    # Current values are those of one observation time, like /protocols (the histories stay
    # whole): a chain the source stopped reporting is not current.
    at = _observation_time(((m, c, ts) for (m, c), ts in newest.items()),
                           int(total[-1]["date"]) if total else None)
    current = {}
    for key, items in series.items():
        last = next((x for x in reversed(items) if x["date"] <= (at or 0)), None)
        if last is not None and last["date"] == at:
            current[key] = float(last["totalLiquidityUSD"])
    obj = _protocol_object(slug, meta, snap, current, None)
    for key in ("chainTvls", "tvl", "change_1h", "change_1d", "change_7d", "tokenBreakdowns"):
        obj.pop(key, None)
    obj.update({
        "currentChainTvls": current,
        "chainTvls": {k: {"tvl": v, "tokensInUsd": [], "tokens": []} for k, v in series.items()},
        "tvl": total, "tokensInUsd": [], "tokens": [],
    })
    return obj


async def tvl(conn: AsyncConnection, slug: str) -> float | None:
    """GET /tvl/{slug}: the newest total TVL, or None for an unknown protocol."""
    value = (await conn.execute(select(query_snapshot.c.tvl).where(
        query_snapshot.c.slug == normalize_subject("tvl", slug)))).scalar()
    return float(value) if value is not None else None


async def chains(conn: AsyncConnection) -> list[dict[str, Any]]:
    """GET /v2/chains: each chain with a chain_tvl series, its newest value and metadata."""
    out = []
    for r in await conn.execute(select(query_latest).where(
            query_latest.c.metric == "chain_tvl").order_by(query_latest.c.subject)):
        name, gecko, symbol, cmc, chain_id = V2_CHAINS.get(
            r.subject, (chain_name(r.subject), None, None, None, None))
        out.append({"gecko_id": gecko, "tvl": float(r.value), "tokenSymbol": symbol,
                    "cmcId": cmc, "name": name, "chainId": chain_id})
    return out


_DAILY_LAST = (
    "SELECT day, SUM(value) AS tvl FROM ("
    "  SELECT ts - ts % 86400 AS day, value, ROW_NUMBER() OVER ("
    "    PARTITION BY subject, ts - ts % 86400 ORDER BY ts DESC) AS rn"
    "  FROM points WHERE metric = 'chain_tvl' {chain}"
    ") AS d WHERE rn = 1 GROUP BY day ORDER BY day")


async def chain_tvl_history(conn: AsyncConnection, chain: str | None) -> list[dict[str, Any]]:
    """GET /v2/historicalChainTvl[/{chain}]: `[{date, tvl}]` per UTC day (the day's last point;
    summed over chains without `chain`)."""
    params: dict[str, Any] = {}
    clause = ""
    if chain is not None:
        clause, params["chain"] = "AND subject = :chain", normalize_chain(chain)
    rows = await conn.execute(text(_DAILY_LAST.format(chain=clause)), params)
    return [{"date": int(day), "tvl": float(value)} for day, value in rows]


def _coin_ids(coins: Sequence[str]) -> dict[str, str]:
    """Requested id -> stored subject (`coingecko:ETH` -> `coingecko:eth`); other chains'
    `{chain}:{address}` ids are looked up as given and simply not found."""
    return {c: normalize_subject("price", c) for c in coins}


async def _symbols(conn: AsyncConnection, subjects: Iterable[str]) -> dict[str, str | None]:
    gecko = {s.removeprefix("coingecko:") for s in subjects if s.startswith("coingecko:")}
    found: dict[str, str | None] = {g: _GECKO_SYMBOLS.get(g) for g in gecko}
    if gecko:
        for g, sym in await conn.execute(select(protocols.c.gecko_id, protocols.c.symbol).where(
                protocols.c.gecko_id.in_(sorted(gecko)), protocols.c.symbol.is_not(None))):
            if found.get(g) is None and sym and sym != "-":
                found[g] = sym
    return {s: found.get(s.removeprefix("coingecko:")) for s in subjects}


def _quote(price: float, symbol: str | None, ts: int) -> dict[str, Any]:
    return {"price": price, "symbol": symbol, "timestamp": ts, "confidence": CONFIDENCE}


async def prices_current(conn: AsyncConnection, coins: Sequence[str], *,
                         not_before: int | None = None) -> dict[str, Any]:
    """GET /prices/current/{coins}: `{"coins": {id: {price, symbol, timestamp, confidence}}}`;
    unknown ids are left out, as DefiLlama does."""
    ids = _coin_ids(coins)
    rows = {r.subject: r for r in await conn.execute(select(query_latest).where(
        query_latest.c.metric == "price", query_latest.c.chain == NO_CHAIN,
        query_latest.c.subject.in_(sorted(set(ids.values())))))}
    symbols = await _symbols(conn, rows)
    out = {}
    for asked, subject in ids.items():
        r = rows.get(subject)
        if r is not None and (not_before is None or r.ts >= not_before):
            out[asked] = _quote(float(r.value), symbols.get(subject), int(r.ts))
    return {"coins": out}


async def _nearest(conn: AsyncConnection, subject: str, ts: int, width: int
                   ) -> tuple[int, float] | None:
    before = (await conn.execute(
        select(points.c.ts, points.c.value).where(and_(
            points.c.metric == "price", points.c.subject == subject, points.c.chain == NO_CHAIN,
            points.c.ts <= ts, points.c.ts >= ts - width)).order_by(points.c.ts.desc()).limit(1)
    )).first()
    after = (await conn.execute(
        select(points.c.ts, points.c.value).where(and_(
            points.c.metric == "price", points.c.subject == subject, points.c.chain == NO_CHAIN,
            points.c.ts > ts, points.c.ts <= ts + width)).order_by(points.c.ts).limit(1)
    )).first()
    best = min((c for c in (before, after) if c is not None),
               key=lambda c: (abs(int(c[0]) - ts), int(c[0])), default=None)
    return (int(best[0]), float(best[1])) if best is not None else None


async def prices_at(conn: AsyncConnection, coins: Sequence[str], ts: int, width: int
                    ) -> dict[str, Any]:
    """GET /prices/historical/{timestamp}/{coins}: the stored price nearest `ts` within
    `width` seconds either side (ties: the earlier)."""
    ids = _coin_ids(coins)
    symbols = await _symbols(conn, set(ids.values()))
    out = {}
    for asked, subject in ids.items():
        hit = await _nearest(conn, subject, ts, width)
        if hit is not None:
            out[asked] = _quote(hit[1], symbols.get(subject), hit[0])
    return {"coins": out}


async def chart(conn: AsyncConnection, coins: Sequence[str], stamps: Sequence[int], width: int
                ) -> dict[str, Any]:
    """GET /chart/{coins}: per coin, the stored price nearest each of `stamps` within `width`
    (times without one are skipped), as `{symbol, confidence, prices: [{timestamp, price}]}`."""
    ids = _coin_ids(coins)
    symbols = await _symbols(conn, set(ids.values()))
    lo, hi = min(stamps) - width, max(stamps) + width
    out = {}
    for asked, subject in ids.items():
        rows = (await conn.execute(
            select(points.c.ts, points.c.value).where(
                points.c.metric == "price", points.c.subject == subject,
                points.c.chain == NO_CHAIN, points.c.ts.between(lo, hi))
            .order_by(points.c.ts).limit(_MAX_CHART_ROWS + 1))).all()
        if len(rows) > _MAX_CHART_ROWS:
            raise ValidationError("the requested range holds too many points; shorten it",
                                  field="start")
        times = [int(r[0]) for r in rows]
        prices = []
        for t in stamps:
            i = bisect.bisect_left(times, t)
            near = [j for j in (i - 1, i) if 0 <= j < len(times) and abs(times[j] - t) <= width]
            if near:
                j = min(near, key=lambda j: (abs(times[j] - t), times[j]))
                prices.append({"timestamp": times[j], "price": float(rows[j][1])})
        if prices:
            out[asked] = {"symbol": symbols.get(subject), "confidence": CONFIDENCE,
                          "prices": prices}
    return {"coins": out}

