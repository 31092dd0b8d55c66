"""Watermarks over change_log: has anything a cached answer depends on changed since?

Every committed point (the capture trigger) and every announced protocol change writes a
change_log row in its own transaction, whoever wrote it: the ingest service, the replay, or
plain SQL. So "no relevant change_log row committed since the answer was computed" implies "the
answer is still what a fresh query would return". A watermark names a position in change_log:

- SQLite: `M`, the largest change_log id. One writer at a time hands out ids in commit order,
  so "a row with id > M" is exactly "committed after the watermark".
- PostgreSQL: `M|snapshot`, the largest visible id and `pg_current_snapshot()`, read in one
  statement. Ids are not committed in order there: a transaction in flight at the watermark
  may hold ids below M and commit later. Such a transaction is in the snapshot's in-flight
  list (xip), and every transaction that starts later draws ids above M from the sequence. So
  a row is newer than the watermark iff `id > M` or `txid` is in xip(snapshot): a primary-key
  range scan plus a few equality probes on the (txid, id) index, however far back other
  transactions hold the snapshot's xmin.

Taking the watermark before reading the data is conservative: a commit landing between the two
is seen by the read *and* reported as a change later, costing one extra miss, never a stale
hit. If change_log was pruned past a watermark, the rows proving a change may be gone, so the
answer counts as changed (`min(id)` beyond it, or ids restarted below it).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, NamedTuple

from sqlalchemy import bindparam, text
from sqlalchemy.ext.asyncio import AsyncConnection

__all__ = ["ChangeRow", "Deps", "Probe", "capture", "changes_since", "probe", "same_position"]


@dataclass(frozen=True, slots=True)
class Deps:
    """What an answer depends on: point metrics (optionally only points with ts in
    [ts_from, ts_to)) and, if `protocols`, protocol metadata changes."""

    metrics: frozenset[str]
    protocols: bool = False
    ts_from: int | None = None
    ts_to: int | None = None


class Probe(NamedTuple):
    watermark: str  # the current position (store it with an answer computed now)
    changed: bool  # a relevant change since `since` (True when there was no `since`)
    index_stale: bool  # change_log moved past the read model's watermark (query_refresh)


class ChangeRow(NamedTuple):
    kind: str
    metric: str
    subject: str
    chain: str
    ts: int
    value: float | None


def _deps_sql(deps: Deps, params: dict[str, Any]) -> str:
    """A WHERE fragment over change_log for `deps`: fixed text, every value a bound parameter."""
    point = ["kind = 'point'", "metric IN :dep_metrics"]
    params["dep_metrics"] = sorted(deps.metrics) or ["-"]
    if deps.ts_from is not None:
        point.append("ts >= :dep_from")
        params["dep_from"] = deps.ts_from
    if deps.ts_to is not None:
        point.append("ts < :dep_to")
        params["dep_to"] = deps.ts_to
    sql = "(" + " AND ".join(point) + ")"
    if deps.protocols:
        sql = f"({sql} OR kind = 'protocol')"
    return sql


def _split(watermark: str) -> tuple[int, str | None]:
    """`M` or `M|xmin:xmax:xip,...` -> (M, the comma-separated in-flight txids or None)."""
    head, _, snap = watermark.partition("|")
    xip = snap.split(":")[2] if snap.count(":") == 2 else ""
    return int(head), xip or None


def same_position(a: str, b: str) -> bool:
    """Whether watermarks `a` and `b` name the same change_log position: the same largest id
    and in-flight list. Probes read nothing else, so either answers every probe the same
    (`pg_current_snapshot()`'s xmin/xmax move with every transaction in the cluster, even
    ones that never touch change_log)."""
    return _split(a) == _split(b)


def _newer(id_param: str, xip_param: str | None, where: str) -> str:
    """SQL: some change_log row matching `where` is newer than the watermark in the params.

    The CASE first asks the primary key whether any newer row exists at all (the usual answer
    on a hit is no, and that is one index probe); only then does it look for a relevant one.
    Without the guard, PostgreSQL with statistics that lag a bulk load estimated the filtered
    search as one row and scanned all of change_log. The in-flight list is usually empty, and
    then it is left out of the SQL altogether.
    """
    sql = (f"CASE WHEN COALESCE((SELECT max(id) FROM change_log), 0) > :{id_param} THEN "
           f"EXISTS (SELECT 1 FROM change_log WHERE id > :{id_param} AND {where}) ELSE false END")
    if xip_param is not None:
        sql = (f"({sql} OR EXISTS (SELECT 1 FROM change_log WHERE txid = ANY (CAST("
               f"string_to_array(CAST(:{xip_param} AS text), ',') AS xid8[])) AND {where}))")
    return sql


def _pruned(id_param: str) -> str:
    """SQL: change_log no longer reaches back to the watermark (pruned, or ids restarted)."""
    return (f"COALESCE((SELECT min(id) FROM change_log) > :{id_param} + 1 "
            f"OR (SELECT max(id) FROM change_log) < :{id_param}, false)")


_PG_NOW = ("CAST((SELECT COALESCE(max(id), 0) FROM change_log) AS text) || '|' || "
           "CAST(pg_current_snapshot() AS text)")
_SQLITE_NOW = "CAST((SELECT COALESCE(max(id), 0) FROM change_log) AS text)"


_PG_INDEX_STALE = (
    "COALESCE((SELECT (SELECT max(id) FROM change_log) <> CAST(split_part(q.watermark, '|', 1) "
    "AS bigint) OR CASE WHEN split_part(split_part(q.watermark, '|', 2), ':', 3) = '' THEN false "
    "ELSE EXISTS (SELECT 1 FROM change_log WHERE txid = ANY (CAST(string_to_array(split_part("
    "split_part(q.watermark, '|', 2), ':', 3), ',') AS xid8[]))) END "
    "FROM query_refresh q WHERE q.name = 'index' AND q.watermark IS NOT NULL), true)")
_SQLITE_INDEX_STALE = (
    "COALESCE((SELECT CAST(q.watermark AS INTEGER) != (SELECT COALESCE(max(id), 0) "
    "FROM change_log) FROM query_refresh q WHERE q.name = 'index' AND q.watermark IS NOT NULL), 1)")


async def probe(conn: AsyncConnection, *, since: str | None, deps: Deps,
                index: bool = False) -> Probe:
    """Where change_log stands, whether `deps` changed after `since`, and (if `index`) whether
    the read model (query_refresh 'index') is behind. One statement, one round trip."""
    pg = conn.dialect.name == "postgresql"
    parts = [f"{_PG_NOW if pg else _SQLITE_NOW} AS wm"]
    params: dict[str, Any] = {}
    sql_params: list[Any] = []
    if since is not None:
        where = _deps_sql(deps, params)
        params["since_id"], since_xip = _split(since)
        xip = None
        if pg and since_xip is not None:
            params["since_xip"], xip = since_xip, "since_xip"
        parts.append(f"({_newer('since_id', xip, where)} OR {_pruned('since_id')}) AS changed")
        sql_params.append(bindparam("dep_metrics", expanding=True))
    if index:
        parts.append(f"{_PG_INDEX_STALE if pg else _SQLITE_INDEX_STALE} AS index_stale")
    sql = text("SELECT " + ", ".join(parts)).bindparams(*sql_params)
    row = (await conn.execute(sql, params)).one()
    return Probe(str(row.wm), True if since is None else bool(row.changed),
                 bool(row.index_stale) if index else False)


async def capture(conn: AsyncConnection) -> str:
    """The current watermark (take it before reading the data it will vouch for)."""
    pg = conn.dialect.name == "postgresql"
    return str((await conn.execute(text(f"SELECT {_PG_NOW if pg else _SQLITE_NOW}"))).scalar_one())


async def changes_since(
    conn: AsyncConnection, since: str, *, limit: int
) -> tuple[list[ChangeRow], bool]:
    """change_log rows newer than watermark `since` (at most `limit`, oldest id first), and
    whether the log no longer reaches back to it (the caller must rebuild from the tables)."""
    since_id, xip = _split(since)
    params: dict[str, Any] = {"since_id": since_id, "limit": limit}
    gap = bool((await conn.execute(text(f"SELECT {_pruned('since_id')}"), params)).scalar_one())
    cols = "id, kind, metric, subject, chain, ts, value"
    sql = f"SELECT {cols} FROM change_log WHERE id > :since_id"
    if conn.dialect.name == "postgresql" and xip is not None:
        params["xip"] = xip
        sql = (f"{sql} UNION ALL SELECT {cols} FROM change_log WHERE id <= :since_id AND "
               "txid = ANY (CAST(string_to_array(CAST(:xip AS text), ',') AS xid8[]))")
    result = await conn.execute(text(f"SELECT * FROM ({sql}) AS c ORDER BY id LIMIT :limit"),
                                params)
    return [ChangeRow(r.kind, r.metric, r.subject, r.chain, r.ts, r.value) for r in result], gap
