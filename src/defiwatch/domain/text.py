"""Text a client sends that we store or compare in SQL: what makes it unusable.

PostgreSQL refuses NUL (U+0000) in text values and both drivers refuse lone surrogates (not
UTF-8), so either would surface as a 500 from deep inside a query. Every entry point checks
client text with `text_problem` first and answers a 400 naming the field instead.
"""

from __future__ import annotations

__all__ = ["text_problem"]


def text_problem(value: str) -> str | None:
    """Why `value` cannot be stored as text, or None when it can."""
    if "\x00" in value:
        return "must not contain NUL characters"
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return "must be valid Unicode (no lone surrogates)"
    return None
