"""The real-time protocol v1 (docs/protocol.md), sans I/O: frames in, commands and frames out.

Nothing here awaits, reads a clock or touches a socket (sans-I/O): `parse_client_frame` turns
the text of a client frame into a typed command or a typed `Rejection` (it never raises on bad
input), the `*_frame` functions build the bytes the server sends, `parse_channel` normalises a
channel name, `route` says which public channels an event belongs to and `alert_recipient` whose
private `alerts` channel a fired alert goes to. The server (server.py) and the hub (hub.py) only
move what these functions produce.

Frames are UTF-8 JSON text. Event frames are built by splicing the event's JSON, encoded once,
into a small envelope per channel (`event_frame`), so one event costs one encode however many
channels and clients receive it.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any, TypeGuard
from urllib.parse import parse_qs, urlsplit

import msgspec

from defiwatch.domain import NO_CHAIN, Event, EventType, Latest, normalize_chain, normalize_subject
from defiwatch.domain.series import PRICE_METRICS, name_problem
from defiwatch.jsondepth import MAX_JSON_DEPTH, too_deep, top_level_scalar

__all__ = [
    "ALERTS_CHANNEL",
    "MAX_RATE_MS",
    "PATH",
    "PROTOCOL_VERSION",
    "Auth",
    "Channel",
    "ChannelKind",
    "CloseCode",
    "Command",
    "ErrorCode",
    "Filter",
    "Ping",
    "Rejection",
    "RequestId",
    "Subscribe",
    "Unsubscribe",
    "ack_frame",
    "alert_recipient",
    "api_key_from_request",
    "channel_matches",
    "encode_event",
    "error_frame",
    "event_frame",
    "latest_belongs",
    "latest_frame",
    "latest_query",
    "parse_channel",
    "parse_client_frame",
    "pong_frame",
    "route",
    "welcome_frame",
]

PROTOCOL_VERSION = 1
PATH = "/v1/realtime"
ALERTS_CHANNEL = "alerts"
MAX_RATE_MS = 60_000  # the longest conflation interval a client may ask for, in milliseconds

_MAX_ID_CHARS = 128
_MAX_CHANNEL_CHARS = 256
_MAX_FILTER_CHAINS = 100
_MAX_EPOCH_CHARS = 128
_MAX_OFFSET = 2**63 - 1  # offsets are signed 64-bit in Redis stream ids and in the database

RequestId = str | int | None


class ErrorCode(enum.StrEnum):
    """Codes of `error` frames (docs/protocol.md); stable, clients branch on them."""

    INVALID_REQUEST = "invalid_request"  # malformed or unknown message; `field` names the part
    UNKNOWN_CHANNEL = "unknown_channel"
    TOO_MANY_SUBSCRIPTIONS = "too_many_subscriptions"
    RATE_LIMITED = "rate_limited"
    NOT_SUBSCRIBED = "not_subscribed"
    UNAUTHORIZED = "unauthorized"
    FORBIDDEN = "forbidden"
    TOO_MANY_CONNECTIONS = "too_many_connections"
    BACKEND_UNAVAILABLE = "backend_unavailable"


class CloseCode(enum.IntEnum):
    """WebSocket close codes the gateway uses; 4xxx are ours (RFC 6455 7.4.2: 4000-4999 private)."""

    NORMAL = 1000
    GOING_AWAY = 1001
    INTERNAL_ERROR = 1011
    SERVICE_RESTART = 1012  # graceful shutdown: reconnect elsewhere with `since`
    TRY_AGAIN_LATER = 1013  # a backend (database, Redis) is unavailable
    UNAUTHORIZED = 4001
    FORBIDDEN = 4003
    TOO_SLOW = 4008
    RATE_LIMITED = 4029
    TOO_MANY_CONNECTIONS = 4030


class ChannelKind(enum.Enum):
    PROTOCOL = "protocol"  # protocol:{slug}
    PROTOCOL_CHAIN = "protocol_chain"  # protocol:{slug}:{chain}
    CHAIN = "chain"  # chain:{chain}
    TOKEN = "token"  # token:{coin}
    TVL_CHANGES = "tvl_changes"
    PRICE_CHANGES = "price_changes"
    ALERTS = "alerts"


class Channel(msgspec.Struct, frozen=True):
    """A parsed channel: `name` is canonical (what acks and event frames carry)."""

    kind: ChannelKind
    name: str
    subject: str | None = None  # protocol slug or coin id
    chain: str | None = None


class Filter(msgspec.Struct, frozen=True):
    """Narrows a subscription. `min_change_pct`: |change_pct| at least this (events without a
    change_pct, such as protocol updates, never pass); `chains`: the event's chain is one of these
    (`-` is a protocol's total over all chains)."""

    min_change_pct: float | None = None
    chains: frozenset[str] | None = None

    def matches(self, event: Event) -> bool:
        if self.min_change_pct is not None and (
            event.change_pct is None or abs(event.change_pct) < self.min_change_pct
        ):
            return False
        return self.chains is None or event.chain in self.chains


class Rejection(msgspec.Struct, frozen=True):
    """A client message the server will not act on, as a value: becomes an `error` frame.

    `field` is the JSON path at fault (`channel`, `filter.min_change_pct`), when there is one;
    `temporary` says whether the same message may succeed later.
    """

    code: ErrorCode
    message: str
    field: str | None = None
    id: RequestId = None
    temporary: bool = False


class Subscribe(msgspec.Struct, frozen=True):
    id: RequestId
    channel: Channel
    filter: Filter | None = None
    since: int | None = None  # the last offset the client processed; replay what follows
    epoch: str | None = None  # the stream epoch `since` belongs to (from an earlier welcome)
    max_rate_ms: int | None = None  # conflation interval; None = every event at once


class Unsubscribe(msgspec.Struct, frozen=True):
    id: RequestId
    channel: Channel


class Ping(msgspec.Struct, frozen=True):
    id: RequestId


class Auth(msgspec.Struct, frozen=True):
    id: RequestId
    api_key: str


Command = Subscribe | Unsubscribe | Ping | Auth

_decoder = msgspec.json.Decoder()
_encoder = msgspec.json.Encoder()


# --- channels -----------------------------------------------------------------------------


def parse_channel(name: object) -> Channel | Rejection:
    """Parse and normalise a channel name (`protocol:Aave` -> `protocol:aave`, `token:ethereum`
    -> `token:coingecko:ethereum`, `chain:BSC` -> `chain:bsc`)."""
    if not isinstance(name, str) or not name.strip():
        return _invalid("channel must be a non-empty string", "channel")
    if len(name) > _MAX_CHANNEL_CHARS:
        return _invalid(f"channel is longer than {_MAX_CHANNEL_CHARS} characters", "channel")
    text = name.strip().lower()
    if text == "tvl_changes":
        return Channel(ChannelKind.TVL_CHANGES, text)
    if text == "price_changes":
        return Channel(ChannelKind.PRICE_CHANGES, text)
    if text == ALERTS_CHANNEL:
        return Channel(ChannelKind.ALERTS, text)
    prefix, _, rest = text.partition(":")
    # The subject and chain named, capped as ingest caps them (never cut to another name).
    for part in rest.split(":", 1) if prefix == "protocol" else [rest]:
        if problem := name_problem(part):
            return _invalid(f"a channel's subject or chain {problem}", "channel")
    if prefix == "protocol":
        slug_part, _, chain_part = rest.partition(":")
        slug = normalize_subject("tvl", slug_part)
        if not slug or ":" in chain_part:
            return _unknown(name)
        if not chain_part:
            return Channel(ChannelKind.PROTOCOL, f"protocol:{slug}", subject=slug)
        chain = normalize_chain(chain_part)
        if chain == NO_CHAIN:
            return _unknown(name)
        return Channel(ChannelKind.PROTOCOL_CHAIN, f"protocol:{slug}:{chain}", subject=slug,
                       chain=chain)
    if prefix == "chain":
        chain = normalize_chain(rest)
        if chain == NO_CHAIN or ":" in rest:
            return _unknown(name)
        return Channel(ChannelKind.CHAIN, f"chain:{chain}", chain=chain)
    if prefix == "token":
        coin = normalize_subject("price", rest)
        source, _, ident = coin.partition(":")
        if not source or not ident or ":" in ident:
            return _unknown(name)
        return Channel(ChannelKind.TOKEN, f"token:{coin}", subject=coin)
    return _unknown(name)


def route(event: Event) -> list[str]:
    """The public channels an event of the event stream belongs to (docs/protocol.md, Channels).

    tvl_change of a protocol -> `protocol:{slug}`, and when on one chain `protocol:{slug}:{chain}`
    and `chain:{chain}`; of a chain's own TVL (`chain_tvl`) -> `chain:{chain}`; both also
    `tvl_changes`. price_change -> `token:{coin}` and `price_changes`. protocol_update ->
    `protocol:{slug}`. Anything else (an unknown type) -> no channel.
    """
    kind = event.type
    if kind == EventType.TVL_CHANGE:
        if event.metric == "chain_tvl":
            return [f"chain:{event.chain}", "tvl_changes"]
        if event.chain == NO_CHAIN:
            return [f"protocol:{event.subject}", "tvl_changes"]
        return [f"protocol:{event.subject}", f"protocol:{event.subject}:{event.chain}",
                f"chain:{event.chain}", "tvl_changes"]
    if kind == EventType.PRICE_CHANGE:
        return [f"token:{event.subject}", "price_changes"]
    if kind == EventType.PROTOCOL_UPDATE:
        return [f"protocol:{event.subject}"]
    return []


def alert_recipient(event: Event) -> int | None:
    """The user whose `alerts` channel a fired-alert event goes to (`detail.user_id`), or None
    when the event names no user (it then goes to nobody: never guessed)."""
    user_id = (event.detail or {}).get("user_id")
    if isinstance(user_id, bool) or not isinstance(user_id, int):
        return None
    return user_id


def channel_matches(channel: Channel, event: Event, user_id: int | None = None) -> bool:
    """Whether `event` belongs to `channel` (for replays read back from a stream).

    For `alerts`, `event` comes from the alerts stream and must name `user_id`.
    """
    if channel.kind is ChannelKind.ALERTS:
        return user_id is not None and alert_recipient(event) == user_id
    return channel.name in route(event)


# --- client frames ------------------------------------------------------------------------


def parse_client_frame(raw: str | bytes) -> Command | Rejection:
    """Parse one client frame into a command, or the reason it is refused. Never raises."""
    # Measured before decoding: the decoder recurses, and a deep frame would raise
    # RecursionError instead of being answered.
    deep = too_deep(raw)
    if deep is not None:
        request_id = top_level_scalar(raw, "id")
        return _invalid(f"the frame nests deeper than {MAX_JSON_DEPTH} levels", deep,
                        request_id if _valid_id(request_id) else None)
    try:
        obj = _decoder.decode(raw)
    except msgspec.DecodeError as exc:
        return _invalid(f"a frame must be one JSON object ({exc})", None)
    if not isinstance(obj, dict):
        return _invalid("a frame must be a JSON object", None)
    request_id = obj.get("id")
    if not _valid_id(request_id):
        return _invalid(f"id must be a string (at most {_MAX_ID_CHARS} characters) or an integer",
                        "id")
    kind = obj.get("type")
    parser = _PARSERS.get(kind) if isinstance(kind, str) else None
    if parser is None:
        return _invalid(f"unknown message type {kind!r}; known: {', '.join(_PARSERS)}", "type",
                        request_id)
    return parser(obj, request_id)


def _valid_id(value: object) -> TypeGuard[RequestId]:
    """A request id is null, an integer, or a string of at most _MAX_ID_CHARS."""
    if value is None or (isinstance(value, int) and not isinstance(value, bool)):
        return True
    return isinstance(value, str) and len(value) <= _MAX_ID_CHARS


def _parse_subscribe(obj: dict[str, Any], request_id: RequestId) -> Command | Rejection:
    if request_id is None:
        return _invalid("subscribe needs an id, echoed in the reply", "id")
    channel = parse_channel(obj.get("channel"))
    if isinstance(channel, Rejection):
        return _with_id(channel, request_id)
    flt = _parse_filter(obj.get("filter"), channel)
    if isinstance(flt, Rejection):
        return _with_id(flt, request_id)
    since = obj.get("since")
    if since is not None and (isinstance(since, bool) or not isinstance(since, int)
                              or not 0 <= since <= _MAX_OFFSET):
        return _invalid("since must be a stream offset (an integer from 0 to 2^63-1)", "since",
                        request_id)
    epoch = obj.get("epoch")
    if epoch is not None and (not isinstance(epoch, str) or len(epoch) > _MAX_EPOCH_CHARS):
        return _invalid("epoch must be the string from a welcome frame", "epoch", request_id)
    max_rate = obj.get("max_rate_ms")
    if max_rate is not None:
        if isinstance(max_rate, bool) or not isinstance(max_rate, int) or not (
            0 <= max_rate <= MAX_RATE_MS
        ):
            return _invalid(f"max_rate_ms must be an integer from 0 to {MAX_RATE_MS} "
                            "(0 or null: no conflation)", "max_rate_ms", request_id)
        if max_rate and channel.kind is ChannelKind.ALERTS:
            return _invalid("alerts are never conflated: drop max_rate_ms", "max_rate_ms",
                            request_id)
    return Subscribe(request_id, channel, flt, since, epoch, max_rate or None)


def _parse_filter(raw: object, channel: Channel) -> Filter | Rejection | None:
    if raw is None:
        return None
    if not isinstance(raw, dict):
        return _invalid("filter must be an object {min_change_pct, chains}", "filter")
    if raw and channel.kind is ChannelKind.ALERTS:
        return _invalid("the alerts channel takes no filter", "filter")
    for key in raw:
        if key not in ("min_change_pct", "chains"):
            return _invalid(f"unknown filter {key!r}; known: min_change_pct, chains",
                            f"filter.{key}")
    min_pct = raw.get("min_change_pct")
    if min_pct is not None and (
        isinstance(min_pct, bool)
        or not isinstance(min_pct, int | float)
        or not math.isfinite(min_pct)
        or min_pct < 0
    ):
        return _invalid("min_change_pct must be a number >= 0 (percent)", "filter.min_change_pct")
    chains_raw = raw.get("chains")
    chains: frozenset[str] | None = None
    if chains_raw is not None:
        if channel.kind in (ChannelKind.TOKEN, ChannelKind.PRICE_CHANGES):
            return _invalid("price events have no chain: drop filter.chains", "filter.chains")
        if not isinstance(chains_raw, list) or not 1 <= len(chains_raw) <= _MAX_FILTER_CHAINS:
            return _invalid(f"chains must be a list of 1 to {_MAX_FILTER_CHAINS} chain names",
                            "filter.chains")
        for i, chain in enumerate(chains_raw):
            if not isinstance(chain, str) or not chain.strip():
                return _invalid("each chain must be a non-empty string", f"filter.chains[{i}]")
            if problem := name_problem(chain):
                return _invalid(f"chain {problem}", f"filter.chains[{i}]")
        chains = frozenset(normalize_chain(c) for c in chains_raw)
    if min_pct is None and chains is None:
        return None
    return Filter(None if min_pct is None else float(min_pct), chains)


def _parse_unsubscribe(obj: dict[str, Any], request_id: RequestId) -> Command | Rejection:
    if request_id is None:
        return _invalid("unsubscribe needs an id, echoed in the reply", "id")
    channel = parse_channel(obj.get("channel"))
    if isinstance(channel, Rejection):
        return _with_id(channel, request_id)
    return Unsubscribe(request_id, channel)


def _parse_ping(obj: dict[str, Any], request_id: RequestId) -> Command | Rejection:
    if request_id is None:
        return _invalid("ping needs an id, echoed in the pong", "id")
    return Ping(request_id)


def _parse_auth(obj: dict[str, Any], request_id: RequestId) -> Command | Rejection:
    key = obj.get("api_key")
    if not isinstance(key, str) or not key.strip():
        return Rejection(ErrorCode.UNAUTHORIZED, "auth needs api_key, a non-empty string",
                         "api_key", request_id)
    return Auth(request_id, key.strip())


_PARSERS: dict[str, Callable[[dict[str, Any], RequestId], Command | Rejection]] = {
    "subscribe": _parse_subscribe,
    "unsubscribe": _parse_unsubscribe,
    "ping": _parse_ping,
    "auth": _parse_auth,
}


def _invalid(message: str, field: str | None, request_id: RequestId = None) -> Rejection:
    return Rejection(ErrorCode.INVALID_REQUEST, message, field, request_id)


def _unknown(name: str) -> Rejection:
    return Rejection(
        ErrorCode.UNKNOWN_CHANNEL,
        f"unknown channel {name[:_MAX_CHANNEL_CHARS]!r}; channels: protocol:{{slug}}, "
        "protocol:{slug}:{chain}, chain:{chain}, token:{coin}, tvl_changes, price_changes, alerts",
        "channel",
    )


def _with_id(rejection: Rejection, request_id: RequestId) -> Rejection:
    return msgspec.structs.replace(rejection, id=request_id)


def api_key_from_request(headers: Mapping[str, str], path: str) -> str | None:
    """The API key of a handshake: `Authorization: Bearer`, then `X-API-Key`, then `?apiKey=`
    (the same order as the HTTP API); None when none is present (then a first `auth` message
    may carry it)."""
    auth = headers.get("authorization", "")
    if auth[:7].lower() == "bearer " and auth[7:].strip():
        return auth[7:].strip()
    key = headers.get("x-api-key", "").strip()
    if key:
        return key
    values = parse_qs(urlsplit(path).query).get("apiKey")
    return values[0].strip() if values and values[0].strip() else None


# --- server frames ------------------------------------------------------------------------


def encode_event(event: Event) -> bytes:
    """The event's JSON (docs/protocol.md, Frames), encoded once and shared by every frame."""
    return _encoder.encode(event)


def event_frame(channel: str, offset: int, event_json: bytes) -> bytes:
    """`{"type":"event","channel":...,"offset":...,"data":<event_json>}` without re-encoding
    the event: a splice of bytes, cheap enough to do once per (event, channel)."""
    return b'{"type":"event","channel":%b,"offset":%d,"data":%b}' % (
        _encoder.encode(channel), offset, event_json)


def latest_frame(channel: str, items: Sequence[Latest], *, truncated: bool) -> bytes:
    """The current values of a channel, sent after `recovered: false` instead of a replay."""
    return _encoder.encode(
        {"type": "latest", "channel": channel, "data": items, "truncated": truncated})


def welcome_frame(
    *,
    connection_id: str,
    user: str,
    tier: str,
    limits: Mapping[str, int],
    stream: Mapping[str, Any],
    alerts_stream: Mapping[str, Any] | None,
    node: str,
) -> bytes:
    return _encoder.encode({
        "type": "welcome", "protocol": PROTOCOL_VERSION, "connection_id": connection_id,
        "user": user, "tier": tier, "limits": limits, "stream": stream,
        "alerts_stream": alerts_stream, "node": node,
    })


def ack_frame(
    request_id: RequestId,
    *,
    channel: str | None = None,
    recovered: bool | None = None,
    replayed: int | None = None,
) -> bytes:
    """An `ack`. For subscribe: `channel` (canonical), `recovered` (None when no `since` was
    given) and `replayed` (event frames of the recovery sent before this ack)."""
    frame: dict[str, Any] = {"type": "ack", "id": request_id}
    if channel is not None:
        frame["channel"] = channel
    if replayed is not None:
        frame["recovered"] = recovered
        frame["replayed"] = replayed
    return _encoder.encode(frame)


def pong_frame(request_id: RequestId, now: float) -> bytes:
    return _encoder.encode({"type": "pong", "id": request_id, "ts": now})


def error_frame(rejection: Rejection) -> bytes:
    """One shape with REST and logs: `{"error": {"code", "message", "field", "temporary"}}`."""
    return _encoder.encode({
        "type": "error", "id": rejection.id,
        "error": {"code": rejection.code.value, "message": rejection.message,
                  "field": rejection.field, "temporary": rejection.temporary},
    })


def latest_query(channel: Channel) -> list[tuple[str | None, str | None, str | None]]:
    """The `(metric, subject, chain)` hot-cache lookups behind a channel's `latest` frame."""
    kind = channel.kind
    if kind is ChannelKind.PROTOCOL:
        return [(None, channel.subject, None)]
    if kind is ChannelKind.PROTOCOL_CHAIN:
        return [(None, channel.subject, channel.chain)]
    if kind is ChannelKind.CHAIN:
        return [(None, None, channel.chain)]
    if kind is ChannelKind.TOKEN:
        return [(None, channel.subject, None)]
    if kind is ChannelKind.TVL_CHANGES:
        return [("tvl", None, None), ("chain_tvl", None, None)]
    if kind is ChannelKind.PRICE_CHANGES:
        return [("price", None, None)]
    return []  # alerts: no "current value"; the ack's recovered:false says what was lost


def latest_belongs(channel: Channel, item: Latest, flt: Filter | None) -> bool:
    """Whether a hot-cache entry is one of the channel's series (the lookups of `latest_query`
    are wider: a protocol slug may equal a chain slug) and passes the filter's `chains`."""
    kind = channel.kind
    if kind in (ChannelKind.PROTOCOL, ChannelKind.PROTOCOL_CHAIN):
        ok = item.metric not in PRICE_METRICS and item.metric != "chain_tvl"
    elif kind in (ChannelKind.TOKEN, ChannelKind.PRICE_CHANGES):
        ok = item.metric in PRICE_METRICS
    else:
        ok = item.metric not in PRICE_METRICS
    return ok and (flt is None or flt.chains is None or item.chain in flt.chains)
