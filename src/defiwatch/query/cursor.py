"""Page tokens: where the next page starts, and the query they belong to.

A token is base64url(msgpack([version, query digest, pin, values, snapshot])):

- keyset pages: `values` are the sort-key values of the page's last row and `pin` (history
  datasets) the largest points.id the pages may see; `snapshot` is None;
- snapshot pages (the `protocols` dataset, service.py): `snapshot` is `[id, offset]`, the
  stored result of the first page and the number of its rows already served; `values` is
  empty and `pin` None.

Version 1 tokens (`[1, digest, pin, values]`, keyset only) are still read. A token holds no
secret and needs no signature: every value it carries is type-checked against the query's sort
keys and then only ever bound as a SQL parameter, and a snapshot is stored under the query's
digest, so a forged token can at worst select another page (or another stored snapshot) of the
same query.
"""

from __future__ import annotations

import base64
import binascii
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import msgspec

from defiwatch.errors import ValidationError
from defiwatch.query.compile import SortColumn
from defiwatch.query.dsl import Scalar
from defiwatch.query.fields import FieldType

__all__ = ["Cursor", "SnapshotRef", "decode_cursor", "encode_cursor"]

_VERSION = 2  # version v has 3 + v elements
_DIGEST_CHARS = 16
_MAX_INT = 2**63 - 1
_SNAPSHOT_ID = re.compile(r"^[A-Za-z0-9_-]{8,64}$")


@dataclass(frozen=True, slots=True)
class SnapshotRef:
    """A stored first-page result and how many of its rows the client has seen."""

    id: str
    offset: int  # rows of the snapshot before the next page (>= 0)


@dataclass(frozen=True, slots=True)
class Cursor:
    """A decoded token: keyset values and pin, or a snapshot position."""

    values: list[Scalar] = field(default_factory=list)
    pin: int | None = None
    snapshot: SnapshotRef | None = None


def encode_cursor(digest: str, pin: int | None, values: Sequence[Scalar],
                  snapshot: SnapshotRef | None = None) -> str:
    """The token for the page after `values` (keyset) or at `snapshot` (snapshot pages)."""
    snap = None if snapshot is None else [snapshot.id, snapshot.offset]
    raw = msgspec.msgpack.encode([_VERSION, digest[:_DIGEST_CHARS], pin, list(values), snap])
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode("ascii")


def _bad(reason: str) -> ValidationError:
    return ValidationError(f"cursor {reason}; pass meta.next_cursor of the previous page of "
                           "this same query", field="cursor")


def decode_cursor(token: str, digest: str, sort: Sequence[SortColumn]) -> Cursor:
    """The position `token` names in the query with digest `digest` and sort keys `sort`.

    Raises:
        ValidationError: (field `cursor`) malformed, from another query, or ill-typed.
    """
    try:
        raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))
        decoded: Any = msgspec.msgpack.decode(raw)
    except (binascii.Error, ValueError, msgspec.DecodeError, RecursionError):
        # RecursionError: a forged token of nested arrays (a real one nests two deep).
        raise _bad("is malformed") from None
    if not (isinstance(decoded, list) and len(decoded) in (4, 5)
            and type(decoded[0]) is int and decoded[0] == len(decoded) - 3):
        raise _bad("is malformed")
    _, query_digest, pin, values, *rest = decoded
    snap = rest[0] if rest else None
    if query_digest != digest[:_DIGEST_CHARS]:
        raise _bad("belongs to a different query")
    if pin is not None and (isinstance(pin, bool) or not isinstance(pin, int)
                            or not 0 <= pin <= _MAX_INT):
        raise _bad("has an invalid pin")
    if snap is not None:
        if not (isinstance(snap, list) and len(snap) == 2 and isinstance(snap[0], str)
                and _SNAPSHOT_ID.match(snap[0]) and isinstance(snap[1], int)
                and not isinstance(snap[1], bool) and 0 <= snap[1] <= _MAX_INT
                and pin is None and values == []):
            raise _bad("has an invalid snapshot position")
        return Cursor(snapshot=SnapshotRef(snap[0], snap[1]))
    if not isinstance(values, list) or len(values) != len(sort):
        raise _bad("does not match this query's sort keys")
    for value, col in zip(values, sort, strict=True):
        if not _fits(value, col):
            raise _bad(f"has an invalid value for sort key {col.name!r}")
    return Cursor(values, pin)


def _fits(value: Any, col: SortColumn) -> bool:
    if value is None:
        return col.nullable
    if isinstance(value, bool):
        return False
    if col.type == FieldType.INTEGER:
        return isinstance(value, int) and abs(value) <= _MAX_INT
    if col.type == FieldType.NUMBER:
        return isinstance(value, int | float) and math.isfinite(value)
    return isinstance(value, str) and len(value) <= 1024 and "\x00" not in value
