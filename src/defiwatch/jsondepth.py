"""A JSON nesting limit checked on the raw bytes, before any decoder recurses into them.

Python's `json` and msgspec both decode recursively: 5,000 nested `{"not": ...}` raise
RecursionError (a 500 in the API, a 1011 close in the gateway) before any depth rule of ours
runs. `too_deep` measures the nesting without recursion and in C-speed passes over the bytes;
only a body found too deep is walked token by token, to name the JSON path at fault.
The API applies it to every request body (api/jsondepth.py), the gateway to each client
frame (gateway/protocol.py).
"""

from __future__ import annotations

import json
import re
from itertools import accumulate

__all__ = ["MAX_JSON_DEPTH", "too_deep", "top_level_scalar"]

MAX_JSON_DEPTH = 64  # arrays and objects inside one another; our deepest grammar needs ~10

# Everything but quotes and brackets, deleted to get the bracket skeleton of a document.
_NOT_STRUCTURE = bytes(sorted(set(range(256)) - set(b'"[]{}')))
_STEPS = bytes.maketrans(b"[{]}", b"\x01\x01\xff\xff")  # +1 / -1 as signed bytes
_STRING = re.compile(rb'"[^"]*"')  # a string in the skeleton (escapes already dropped)
# A JSON string, or an unterminated one running to the end: each quote is scanned past once,
# so a body of many escaped quotes in an unclosed string stays linear, never quadratic.
_JSON_STRING = rb'"(?:[^"\\]|\\.)*+(?:"|\\?\Z)'
_TOKEN = re.compile(_JSON_STRING + rb"|[\[\]{},:]", re.DOTALL)  # strings and structure
_SCALAR_TOKEN = re.compile(_JSON_STRING + rb'|[\[\]{},:]|[^\s\[\]{},:"]+', re.DOTALL)  # + scalars
_MAX_FIELD_CHARS = 500


def too_deep(raw: bytes | str, limit: int = MAX_JSON_DEPTH) -> str | None:
    """The JSON path of the first array or object nested deeper than `limit`, or None.

    Malformed JSON is measured as far as it goes (a decoder rejects it afterwards); the root is
    `$` when the path would be empty.
    """
    data = raw.encode("utf-8", "surrogatepass") if isinstance(raw, str) else raw
    if sum(data.count(c) for c in (b"[", b"{")) <= limit:
        return None  # the common case: too few brackets to nest that deep
    if _max_depth(data) <= limit:
        return None
    return _path_beyond(data, limit)


def _max_depth(data: bytes) -> int:
    # Escapes first (`\\` before `\"`, so `\\"` still ends its string), then all but quotes
    # and brackets; `""` pairs go by plain replace (quotes alternate open/close, so dropping
    # an adjacent pair never moves a bracket across a string boundary), the few strings that
    # hold brackets by regex. What is left is brackets only: a running sum gives the depth.
    if b"\\" in data:
        data = data.replace(b"\\\\", b"").replace(b'\\"', b"")
    skeleton = data.translate(None, _NOT_STRUCTURE)
    skeleton = skeleton.replace(b'""', b"")
    if b'"' in skeleton:
        skeleton = _STRING.sub(b"", skeleton)
        # A quote left over opens a string never closed: what follows it is text.
        skeleton = skeleton.partition(b'"')[0]
    steps = skeleton.translate(_STEPS)
    return max(accumulate(memoryview(steps).cast("b")), default=0)


def _path_beyond(data: bytes, limit: int) -> str:
    """Walk tokens until the nesting passes `limit`; the path of the container opened there."""
    stack: list[list[str | int | None]] = []  # per open container: [kind, key or index]
    for match in _TOKEN.finditer(data):
        token = match.group()
        top = stack[-1] if stack else None
        if token in (b"[", b"{"):
            if len(stack) == limit:
                return _render(stack)
            stack.append(["[", 0] if token == b"[" else ["{", None])
        elif token in (b"]", b"}"):
            if stack:
                stack.pop()
        elif token == b",":
            if top is not None and top[0] == "[":
                top[1] = int(top[1] or 0) + 1
            elif top is not None:
                top[1] = None  # the next string is a key
        elif token.startswith(b'"') and top is not None and top[0] == "{" and top[1] is None:
            top[1] = _key(token)
    return _render(stack)


def top_level_scalar(raw: bytes | str, key: str) -> object:
    """The scalar value of `key` in a root object, found without decoding (so also in a
    document too deep to decode), or None when absent, not a scalar or not readable."""
    data = raw.encode("utf-8", "surrogatepass") if isinstance(raw, str) else raw
    depth, in_value, current = 0, False, None
    for match in _SCALAR_TOKEN.finditer(data):
        token = match.group()
        if token in (b"{", b"["):
            if depth == 1 and in_value and current == key:
                return None
            depth += 1
            in_value = False
        elif token in (b"}", b"]"):
            depth -= 1
        elif depth != 1:
            continue
        elif token == b",":
            in_value, current = False, None
        elif token == b":":
            in_value = True
        elif not in_value:
            current = _key(token)
        elif current == key:
            return _scalar(token)
    return None


def _scalar(token: bytes) -> object:
    try:
        return json.loads(token)
    except ValueError:
        return None


def _key(token: bytes) -> str:
    try:
        return str(json.loads(token))
    except ValueError:
        return token[1:-1].decode("utf-8", "replace")


def _render(stack: list[list[str | int | None]]) -> str:
    path = ""
    for _, at in stack:
        if isinstance(at, int):
            path += f"[{at}]"
        elif at is not None:
            path += f".{at}" if path else at
    if len(path) > _MAX_FIELD_CHARS:
        path = path[:_MAX_FIELD_CHARS] + "..."
    return path or "$"
