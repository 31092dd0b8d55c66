"""Protocol metadata: upsert and the change rows that become protocol_update events."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import msgspec
from sqlalchemy import select
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.ext.asyncio import AsyncConnection

from defiwatch.domain import NO_CHAIN, ProtocolChange, ProtocolMeta, diff_protocol
from defiwatch.store.changelog import insert_changes
from defiwatch.store.schema import protocols

__all__ = ["load_protocols", "upsert_protocols"]

_CHUNK = 500  # slugs per IN (...) lookup; far below every driver's parameter limit


def _meta(row: Any) -> ProtocolMeta:
    return ProtocolMeta(
        slug=row.slug, name=row.name, category=row.category, chains=tuple(row.chains or ()),
        gecko_id=row.gecko_id, symbol=row.symbol, url=row.url, listed_at=row.listed_at,
    )


async def load_protocols(conn: AsyncConnection, slugs: Sequence[str]) -> dict[str, ProtocolMeta]:
    return {slug: meta for slug, (meta, _ts) in (await _load_stamped(conn, slugs)).items()}


async def _load_stamped(
    conn: AsyncConnection, slugs: Sequence[str]
) -> dict[str, tuple[ProtocolMeta, int]]:
    """Stored metadata with the observation time it describes (`updated_at`)."""
    found: dict[str, tuple[ProtocolMeta, int]] = {}
    for i in range(0, len(slugs), _CHUNK):
        stmt = select(protocols).where(protocols.c.slug.in_(slugs[i : i + _CHUNK]))
        found.update({r.slug: (_meta(r), int(r.updated_at)) for r in await conn.execute(stmt)})
    return found


async def upsert_protocols(
    conn: AsyncConnection, metas: Sequence[ProtocolMeta], *, ts: int, source: str
) -> list[ProtocolChange]:
    """Store the newest metadata; for each user-visible change write a change_log row in the
    same transaction (so a protocol_update is never lost nor emitted for an uncommitted change).

    Metadata observed before what is stored (`ts` older than its `updated_at`) is history, not
    news: it is ignored, so replaying old snapshots never rolls a protocol back.
    """
    latest = {m.slug: m for m in metas}  # the last word per slug within one batch
    known = await _load_stamped(conn, list(latest))
    changes: list[ProtocolChange] = []
    rows: list[dict[str, Any]] = []
    for slug, meta in latest.items():
        old, seen_at = known.get(slug, (None, ts))
        if old == meta or ts < seen_at:
            continue
        rows.append({
            "slug": slug, "name": meta.name, "category": meta.category,
            "chains": list(meta.chains), "gecko_id": meta.gecko_id, "symbol": meta.symbol,
            "url": meta.url, "listed_at": meta.listed_at, "first_seen": ts, "updated_at": ts,
        })
        change = diff_protocol(old, meta)
        if change is not None:
            changes.append(change)
    if rows:
        dialect = postgresql if conn.dialect.name == "postgresql" else sqlite
        stmt = dialect.insert(protocols)
        stmt = stmt.on_conflict_do_update(
            index_elements=["slug"],
            set_={c: stmt.excluded[c] for c in
                  ("name", "category", "chains", "gecko_id", "symbol", "url", "listed_at",
                   "updated_at")},
        )
        await conn.execute(stmt, rows)
    await insert_changes(conn, [
        {"kind": "protocol", "metric": "protocol", "subject": c.slug, "chain": NO_CHAIN,
         "ts": ts, "value": None, "source": source, "detail": msgspec.to_builtins(c)}
        for c in changes
    ])
    return changes
