"""The key cache (pure, `now` passed in) and the scope check."""

from __future__ import annotations

import pytest

from defiwatch.gateway.auth import KeyCache, admit, digest
from defiwatch.gateway.protocol import ErrorCode, Rejection
from defiwatch.store.keys import Principal


def principal(key_id: int, scopes: frozenset[str] = frozenset({"read"})) -> Principal:
    return Principal(user_id=key_id, user=f"u{key_id}", tier="pro", scopes=scopes,
                     key_id=key_id, key_prefix=f"p{key_id}")


def test_an_entry_is_served_for_ttl_seconds_then_not() -> None:
    cache = KeyCache(ttl_s=60)
    cache.put(digest("dw_a_b"), principal(1), now=100.0)
    assert cache.get(digest("dw_a_b"), now=159.9) == principal(1)
    assert cache.get(digest("dw_a_c"), now=100.0) is None  # another key
    assert cache.get(digest("dw_a_b"), now=160.0) is None
    assert len(cache) == 0  # the expired entry is gone


def test_a_ttl_of_zero_caches_nothing() -> None:
    cache = KeyCache(ttl_s=0)
    cache.put(digest("k"), principal(1), now=0.0)
    assert cache.get(digest("k"), now=0.0) is None and len(cache) == 0


def test_the_oldest_verified_entry_goes_first_when_full() -> None:
    cache = KeyCache(ttl_s=60, max_entries=2)
    cache.put(b"a", principal(1), now=0.0)
    cache.put(b"b", principal(2), now=1.0)
    cache.put(b"a", principal(1), now=2.0)  # verified again: now the newest
    cache.put(b"c", principal(3), now=3.0)
    assert cache.get(b"b", now=3.0) is None
    assert cache.get(b"a", now=3.0) == principal(1) and cache.get(b"c", now=3.0) == principal(3)


def test_forget_drops_every_entry_of_the_given_keys() -> None:
    cache = KeyCache(ttl_s=60)
    cache.put(b"one", principal(1), now=0.0)
    cache.put(b"one-again", principal(1), now=0.0)  # the same key presented two ways
    cache.put(b"two", principal(2), now=0.0)
    assert cache.key_ids() == {1, 2}
    assert cache.forget({1, 9}) == 2
    assert cache.key_ids() == {2}


def test_max_entries_must_be_positive() -> None:
    with pytest.raises(ValueError, match="max_entries"):
        KeyCache(ttl_s=1, max_entries=0)


def test_admit_needs_read_or_admin() -> None:
    assert admit(principal(1)) == principal(1)
    assert admit(principal(1, frozenset({"admin"}))) == principal(1, frozenset({"admin"}))
    refused = admit(principal(1, frozenset({"ingest"})))
    assert isinstance(refused, Rejection) and refused.code is ErrorCode.FORBIDDEN
    unknown = admit(None)
    assert isinstance(unknown, Rejection) and unknown.code is ErrorCode.UNAUTHORIZED


def test_the_cache_names_keys_by_digest_not_plaintext() -> None:
    assert digest("dw_prefix_secret") != b"dw_prefix_secret"
    assert len(digest("dw_prefix_secret")) == 32
