"""Page tokens: the sort-key values of a page's last row, the pin, and the query they belong to.

A token is base64url(msgpack([version, query digest, pin, values])). It holds no secret and
needs no signature: every value it carries is type-checked against the query's sort keys and
then only ever bound as a SQL parameter, so a forged token can at worst select another page of
the same query.
"""

from __future__ import annotations

import base64
import binascii
import math
from collections.abc import Sequence
from typing import Any

import msgspec

from defiwatch.errors import ValidationError
from defiwatch.query.compile import SortColumn
from defiwatch.query.dsl import Scalar
from defiwatch.query.fields import FieldType

__all__ = ["decode_cursor", "encode_cursor"]

_VERSION = 1
_DIGEST_CHARS = 16
_MAX_INT = 2**63 - 1


def encode_cursor(digest: str, pin: int | None, values: Sequence[Scalar]) -> str:
    raw = msgspec.msgpack.encode([_VERSION, digest[:_DIGEST_CHARS], pin, list(values)])
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode("ascii")


def _bad(reason: str) -> ValidationError:
    return ValidationError(f"cursor {reason}; pass meta.next_cursor of the previous page of "
                           "this same query", field="cursor")


def decode_cursor(
    token: str, digest: str, sort: Sequence[SortColumn]
) -> tuple[list[Scalar], int | None]:
    """The sort-key values and pin in `token`.

    Raises:
        ValidationError: (field `cursor`) malformed, from another query, or ill-typed.
    """
    try:
        raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))
        decoded: Any = msgspec.msgpack.decode(raw)
    except (binascii.Error, ValueError, msgspec.DecodeError):
        raise _bad("is malformed") from None
    if not (isinstance(decoded, list) and len(decoded) == 4 and decoded[0] == _VERSION):
        raise _bad("is malformed")
    _, query_digest, pin, values = decoded
    if query_digest != digest[:_DIGEST_CHARS]:
        raise _bad("belongs to a different query")
    if pin is not None and (isinstance(pin, bool) or not isinstance(pin, int)
                            or not 0 <= pin <= _MAX_INT):
        raise _bad("has an invalid pin")
    if not isinstance(values, list) or len(values) != len(sort):
        raise _bad("does not match this query's sort keys")
    for value, col in zip(values, sort, strict=True):
        if not _fits(value, col):
            raise _bad(f"has an invalid value for sort key {col.name!r}")
    return values, pin


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
