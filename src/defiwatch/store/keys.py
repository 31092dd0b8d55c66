"""Users and API keys. Keys are shown once and stored as SHA-256 hashes.

A key is `dw_<prefix>_<secret>`: the prefix (public, unique) finds the row, the secret is checked
against the hash in constant time. SHA-256 rather than a slow password hash is deliberate: keys
carry 190 bits of randomness, so there is nothing to brute-force, and every request verifies one.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import time
from collections.abc import Collection, Sequence

import msgspec
from sqlalchemy import select, update
from sqlalchemy.ext.asyncio import AsyncConnection

from defiwatch.errors import NotFoundError, ValidationError
from defiwatch.store.schema import api_keys, users

__all__ = ["SCOPES", "ApiKeyInfo", "Principal", "active_key_ids", "authenticate", "check_scopes",
           "create_key", "list_keys", "revoke_key", "touch_key"]

SCOPES = ("read", "ingest", "alerts", "admin")
_PREFIX_BYTES = 6
# Ids per query of `active_key_ids`: below SQLite's (32,766) and asyncpg's (32,767) bind limits.
_IDS_PER_QUERY = 5_000
_SECRET_BYTES = 24


class Principal(msgspec.Struct, frozen=True):
    """Who is calling: the key's owner, tier and scopes."""

    user_id: int
    user: str
    tier: str
    scopes: frozenset[str]
    key_id: int
    key_prefix: str


class ApiKeyInfo(msgspec.Struct, frozen=True):
    id: int
    prefix: str
    name: str
    user: str
    tier: str
    scopes: list[str]
    created_at: float
    revoked_at: float | None
    last_used_at: float | None


def _hash(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def _parse(key: str) -> tuple[str, str] | None:
    if not key.isascii() or "\x00" in key:  # keys are ASCII; PostgreSQL refuses NUL in text
        return None
    parts = key.strip().split("_", 2)  # the secret itself may contain "_"
    if len(parts) != 3 or parts[0] != "dw" or not parts[1] or not parts[2]:
        return None
    return parts[1], parts[2]


def check_scopes(scopes: Sequence[str]) -> list[str]:
    unknown = sorted(set(scopes) - set(SCOPES))
    if unknown:
        raise ValidationError(
            f"unknown scope(s) {', '.join(unknown)}; known: {', '.join(SCOPES)}", field="scopes"
        )
    if not scopes:
        raise ValidationError("at least one scope is needed", field="scopes")
    return sorted(set(scopes))


async def create_key(
    conn: AsyncConnection,
    *,
    user: str,
    tier: str,
    scopes: Sequence[str],
    name: str = "default",
    tiers: Sequence[str],
) -> tuple[str, ApiKeyInfo]:
    """Create the user if new (or move them to `tier`) and a key; return the plaintext once."""
    if tier not in tiers:
        raise ValidationError(f"unknown tier {tier!r}; known: {', '.join(tiers)}", field="tier")
    if not user.strip():
        raise ValidationError("user name must not be empty", field="user")
    scope_list = check_scopes(scopes)
    now = time.time()
    row = (await conn.execute(select(users.c.id).where(users.c.name == user))).first()
    if row is None:
        user_id = (
            await conn.execute(
                users.insert().values(name=user, tier=tier, created_at=now).returning(users.c.id)
            )
        ).scalar_one()
    else:
        user_id = row[0]
        await conn.execute(update(users).where(users.c.id == user_id).values(tier=tier))
    prefix = secrets.token_hex(_PREFIX_BYTES)
    secret = secrets.token_urlsafe(_SECRET_BYTES)
    key_id = (
        await conn.execute(
            api_keys.insert()
            .values(user_id=user_id, prefix=prefix, key_hash=_hash(secret), name=name,
                    scopes=" ".join(scope_list), created_at=now)
            .returning(api_keys.c.id)
        )
    ).scalar_one()
    info = ApiKeyInfo(id=key_id, prefix=prefix, name=name, user=user, tier=tier,
                      scopes=scope_list, created_at=now, revoked_at=None, last_used_at=None)
    return f"dw_{prefix}_{secret}", info


async def list_keys(conn: AsyncConnection, *, user: str | None = None) -> list[ApiKeyInfo]:
    stmt = (
        select(api_keys, users.c.name.label("user"), users.c.tier)
        .join(users, users.c.id == api_keys.c.user_id)
        .order_by(api_keys.c.id)
    )
    if user is not None:
        stmt = stmt.where(users.c.name == user)
    return [
        ApiKeyInfo(id=r.id, prefix=r.prefix, name=r.name, user=r.user, tier=r.tier,
                   scopes=r.scopes.split(), created_at=r.created_at, revoked_at=r.revoked_at,
                   last_used_at=r.last_used_at)
        for r in await conn.execute(stmt)
    ]


async def revoke_key(conn: AsyncConnection, prefix: str) -> None:
    """Revoke by the key's public prefix (or the whole key); effective on the next request."""
    parsed = _parse(prefix)
    prefix = parsed[0] if parsed else prefix
    result = await conn.execute(
        update(api_keys)
        .where(api_keys.c.prefix == prefix, api_keys.c.revoked_at.is_(None))
        .values(revoked_at=time.time())
    )
    if result.rowcount == 0:
        raise NotFoundError(f"no active key with prefix {prefix!r}", field="prefix")


async def authenticate(conn: AsyncConnection, key: str) -> Principal | None:
    """The principal for a plaintext key, or None for a malformed, unknown or revoked key."""
    parsed = _parse(key)
    if parsed is None:
        return None
    prefix, secret = parsed
    row = (
        await conn.execute(
            select(api_keys, users.c.name.label("user"), users.c.tier)
            .join(users, users.c.id == api_keys.c.user_id)
            .where(api_keys.c.prefix == prefix)
        )
    ).first()
    if row is None or row.revoked_at is not None:
        return None
    if not hmac.compare_digest(row.key_hash, _hash(secret)):
        return None
    return Principal(user_id=row.user_id, user=row.user, tier=row.tier,
                     scopes=frozenset(row.scopes.split()), key_id=row.id, key_prefix=prefix)


async def active_key_ids(conn: AsyncConnection, key_ids: Collection[int]) -> set[int]:
    """Of `key_ids`, the keys still active (neither revoked nor deleted), for a holder of many
    authenticated keys (the gateway) to re-check them all at once: one query per 5,000 ids."""
    ids = sorted(set(key_ids))
    active: set[int] = set()
    for start in range(0, len(ids), _IDS_PER_QUERY):
        chunk = ids[start:start + _IDS_PER_QUERY]
        active.update((await conn.execute(
            select(api_keys.c.id).where(api_keys.c.id.in_(chunk), api_keys.c.revoked_at.is_(None))
        )).scalars())
    return active


async def touch_key(conn: AsyncConnection, key_id: int, now: float) -> None:
    await conn.execute(update(api_keys).where(api_keys.c.id == key_id).values(last_used_at=now))
