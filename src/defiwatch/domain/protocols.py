"""Protocol metadata and the diff that becomes a `protocol_update` event."""

from __future__ import annotations

import msgspec

from defiwatch.domain.events import ProtocolChange

__all__ = ["ProtocolMeta", "diff_protocol"]


class ProtocolMeta(msgspec.Struct, frozen=True):
    slug: str
    name: str
    category: str | None = None
    chains: tuple[str, ...] = ()
    gecko_id: str | None = None
    symbol: str | None = None
    url: str | None = None
    listed_at: int | None = None


def diff_protocol(old: ProtocolMeta | None, new: ProtocolMeta) -> ProtocolChange | None:
    """The user-visible change from `old` to `new`, or None when nothing users track changed.

    Tracked: chains added or removed, category, listing time, and a protocol seen for the first time.
    Name, url or symbol edits alone are stored but not announced.
    """
    if old is None:
        return ProtocolChange(
            slug=new.slug, name=new.name, chains_added=sorted(new.chains), chains_removed=[],
            category=(None, new.category), listed_at=(None, new.listed_at), new=True,
        )
    added = sorted(set(new.chains) - set(old.chains))
    removed = sorted(set(old.chains) - set(new.chains))
    category = (old.category, new.category) if old.category != new.category else None
    listed = (old.listed_at, new.listed_at) if old.listed_at != new.listed_at else None
    if not (added or removed or category or listed):
        return None
    return ProtocolChange(
        slug=new.slug, name=new.name, chains_added=added, chains_removed=removed,
        category=category, listed_at=listed,
    )
