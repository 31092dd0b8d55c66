"""Every Redis key defiwatch uses, in one place: no other module spells a key.

All keys start with a configurable prefix (`DEFIWATCH_REDIS_PREFIX`, default `dw:`), so tests,
staging and tenants can share one Redis and a prefix scan finds everything of one deployment.

Keys that one Lua script touches together carry the same Redis Cluster hash tag (the `{...}`
part), so they live in one slot and the script stays legal on a cluster. The tag is the literal
`{stream}`, so the streams of different prefixes share a slot too: acceptable, because one
deployment's stream is a single ordered log that could not be split across nodes anyway.

| key                  | type   | holds                                                   |
|----------------------|--------|---------------------------------------------------------|
| `{p}{stream}:events` | stream | the events; entry id `{offset}-0`, field `e` = JSON     |
|                      |        | (`{stream}` is the stream's name: `stream` for events,  |
|                      |        | another name such as `alerts` for a second stream)      |
| `{p}{stream}:offset` | string | last assigned offset (INCR counter; survives trimming)  |
| `{p}{stream}:last`   | hash   | `str(series)` -> `"{ts} {value}"` of its last event     |
| `{p}{stream}:epoch`  | string | random id of this life of the stream (SET NX)           |
| `{p}cache:latest`    | hash   | `str(series)` -> msgspec JSON of its `Latest`           |
| `{p}cache:filled`    | string | set once the cache was rebuilt from the database; gone  |
|                      |        | with the data (processor/fill.py refills when missing)  |
| `{p}query:result:{h}`| string | a cached query answer (msgpack), TTL query_cache_ttl_s  |
| `{p}ratelimit:{who}` | string | GCRA theoretical arrival time (µs) of a key or client IP|
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["DEFAULT_PREFIX", "STREAM_ENTRY_FIELD", "RedisKeys"]

DEFAULT_PREFIX = "dw:"

# The one field of a stream entry: the event JSON (without its offset; the entry id is the offset).
STREAM_ENTRY_FIELD = "e"


@dataclass(frozen=True, slots=True)
class RedisKeys:
    """Key names under one prefix. Cheap to build; properties return plain strings."""

    prefix: str = DEFAULT_PREFIX
    stream: str = "stream"  # the stream's name: "stream" (events) or e.g. "alerts"

    # Event stream (stream/redis.py). The three keys are touched by one script: same hash tag.
    @property
    def stream_events(self) -> str:
        return f"{self.prefix}{{{self.stream}}}:events"

    @property
    def stream_offset(self) -> str:
        return f"{self.prefix}{{{self.stream}}}:offset"

    @property
    def stream_last_published(self) -> str:
        return f"{self.prefix}{{{self.stream}}}:last"

    @property
    def stream_epoch(self) -> str:
        return f"{self.prefix}{{{self.stream}}}:epoch"

    # Hot cache (cache/redis.py).
    @property
    def cache_latest(self) -> str:
        return f"{self.prefix}cache:latest"

    @property
    def cache_filled(self) -> str:
        return f"{self.prefix}cache:filled"

    # Query result cache (query/cache.py): `digest` is the hash of the normalised query.
    def query_result(self, digest: str) -> str:
        return f"{self.prefix}query:result:{digest}"

    # API rate limits (api/ratelimit.py): `who` is `key:{id}` or `ip:{address}`.
    def rate_limit(self, who: str) -> str:
        return f"{self.prefix}ratelimit:{who}"
