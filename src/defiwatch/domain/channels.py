"""Notification channels of an alert rule: where a fired alert is delivered.

Pure validation. A rule stores its channels; the alert engine writes one outbox row per
(alert, channel target) and the notifier (notify/) sends them. Secrets (webhook signing keys,
SMTP credentials) are not part of a channel: they belong to the delivery side.

    {"type": "webhook", "url": "https://example.com/hooks/defiwatch"}
    {"type": "email", "address": "ops@example.com"}
    {"type": "push"}                         every registered device of the rule's owner
    {"type": "push", "device": "pixel-7"}    one device (user_devices)
    {"type": "chat", "platform": "slack", "url": "https://hooks.slack.com/services/..."}
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any
from urllib.parse import urlsplit

import msgspec

from defiwatch.domain.text import text_problem
from defiwatch.errors import ValidationError

__all__ = [
    "CHANNELS_JSON_SCHEMA",
    "CHANNEL_TYPES",
    "CHAT_PLATFORMS",
    "MAX_CHANNELS",
    "Channel",
    "parse_channels",
    "url_host",
    "validate_url",
]

CHANNEL_TYPES = ("webhook", "email", "push", "chat")
CHAT_PLATFORMS = ("slack", "discord", "teams", "mattermost", "generic")
MAX_CHANNELS = 10
_MAX_URL = 2_000
_MAX_HOST = 253  # RFC 1035 2.3.4: a DNS name is at most 253 characters as text
_MAX_ADDRESS = 254  # RFC 5321 path limit
# Deliberately loose (one @, a dot in the domain, no spaces): the SMTP server is the judge;
# we only catch typos such as a missing @ or a pasted name.
_EMAIL_RE = re.compile(r"^[^@\s<>\"]+@[^@\s<>\"]+\.[^@\s<>\".]+$")
_DEVICE_RE = re.compile(r"^[A-Za-z0-9._:-]{1,120}$")
_FIELDS = {
    "webhook": {"type", "url"},
    "email": {"type", "address"},
    "push": {"type", "device"},
    "chat": {"type", "platform", "url"},
}


class Channel(msgspec.Struct, frozen=True, omit_defaults=True):
    """One validated notification target. `target` is what the outbox row records: the URL,
    the address, or the device id (`*` = all devices of the owner)."""

    type: str
    url: str | None = None
    address: str | None = None
    device: str | None = None
    platform: str | None = None

    @property
    def target(self) -> str:
        if self.type == "email":
            return self.address or ""
        if self.type == "push":
            return self.device or "*"
        return self.url or ""

    @property
    def host(self) -> str:
        """The receiving host of the outbox row (the notifier's breaker and per-host limit):
        "smtp" for email (all goes through the relay), "" for push (known per device)."""
        if self.type == "email":
            return "smtp"
        return url_host(self.url) if self.url else ""

    def as_json(self) -> dict[str, Any]:
        return {k: v for k, v in msgspec.structs.asdict(self).items() if v is not None}


def url_host(url: str) -> str:
    """`host` or `host:port` of a URL, lower case: one receiving host per key."""
    parts = urlsplit(url)
    host = (parts.hostname or "").lower()
    try:
        port = parts.port
    except ValueError:
        port = None
    return f"{host}:{port}" if port else host


def validate_url(raw: Any, path: str) -> str:
    """An absolute http(s) URL whose host can be looked up, stripped.

    Raises:
        ValidationError: with `field` = `path`.
    """
    if not isinstance(raw, str) or not raw.strip():
        raise ValidationError("url is required (http:// or https://)", field=path)
    url = raw.strip()
    if len(url) > _MAX_URL:
        raise ValidationError(f"url is longer than {_MAX_URL} characters", field=path)
    if problem := text_problem(url):
        raise ValidationError(f"url {problem}", field=path)
    try:
        parts = urlsplit(url)
        port = parts.port  # raises for a port beyond 65535 or not a number
    except ValueError as exc:
        raise ValidationError(f"url cannot be parsed: {exc}", field=path) from exc
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValidationError("url must be an absolute http:// or https:// URL", field=path)
    if port == 0 or not _resolvable(parts.hostname):
        raise ValidationError("url must name a valid host and port (DNS labels of 1 to 63 "
                              f"characters, at most {_MAX_HOST} in all)", field=path)
    return url


def _resolvable(host: str) -> bool:
    """Whether `host` can be looked up at all: the resolver raises UnicodeError (not OSError)
    for an over-long label, and the outbox's host column holds _MAX_HOST characters."""
    if len(host) > _MAX_HOST or any(c.isspace() for c in host):
        return False
    try:
        host.encode("idna")
    except UnicodeError:
        return False
    return True


def parse_channels(raw: Any, path: str = "channels") -> list[Channel]:
    """Validate a rule's channel list (1..MAX_CHANNELS, no duplicates).

    Raises:
        ValidationError: with `field` the JSON path at fault, e.g. `channels[1].address`.
    """
    if not isinstance(raw, list):
        raise ValidationError("channels must be a list of notification targets", field=path)
    if not raw:
        raise ValidationError("a rule needs at least one channel (webhook, email, push or "
                              "chat) to notify", field=path)
    if len(raw) > MAX_CHANNELS:
        raise ValidationError(f"a rule has at most {MAX_CHANNELS} channels", field=path)
    out: list[Channel] = []
    seen: set[tuple[str, str]] = set()
    for i, item in enumerate(raw):
        at = f"{path}[{i}]"
        channel = _parse_one(item, at)
        if (channel.type, channel.target) in seen:
            raise ValidationError(f"duplicate {channel.type} channel {channel.target!r}", field=at)
        seen.add((channel.type, channel.target))
        out.append(channel)
    return out


def _parse_one(item: Any, at: str) -> Channel:
    if not isinstance(item, Mapping):
        raise ValidationError("a channel must be an object with a 'type'", field=at)
    kind = item.get("type")
    if kind not in CHANNEL_TYPES:
        raise ValidationError(f"unknown channel type {kind!r}; known: {', '.join(CHANNEL_TYPES)}",
                              field=f"{at}.type")
    unknown = sorted(str(k) for k in set(item) - _FIELDS[kind])
    if unknown:
        raise ValidationError(f"unknown field {unknown[0]!r} for a {kind} channel; it has "
                              f"{', '.join(sorted(_FIELDS[kind]))}", field=f"{at}.{unknown[0]}")
    if kind == "webhook":
        return Channel(type=kind, url=validate_url(item.get("url"), f"{at}.url"))
    if kind == "email":
        address = item.get("address")
        if (not isinstance(address, str) or len(address) > _MAX_ADDRESS
                or text_problem(address) or not _EMAIL_RE.match(address.strip())):
            raise ValidationError("address must be an email address such as ops@example.com",
                                  field=f"{at}.address")
        return Channel(type=kind, address=address.strip())
    if kind == "push":
        device = item.get("device")
        if device is not None and (not isinstance(device, str) or not _DEVICE_RE.fullmatch(device)):
            raise ValidationError("device must be a registered device id (letters, digits, "
                                  "._:-), or omitted for every device", field=f"{at}.device")
        return Channel(type=kind, device=device)
    platform = item.get("platform", "generic")
    if platform not in CHAT_PLATFORMS:
        raise ValidationError(f"unknown chat platform {platform!r}; known: "
                              f"{', '.join(CHAT_PLATFORMS)}", field=f"{at}.platform")
    return Channel(type=kind, platform=platform, url=validate_url(item.get("url"), f"{at}.url"))


CHANNELS_JSON_SCHEMA: dict[str, Any] = {
    "type": "array",
    "minItems": 1,
    "maxItems": MAX_CHANNELS,
    "items": {
        "oneOf": [
            {"type": "object", "title": "Webhook", "required": ["type", "url"],
             "properties": {"type": {"const": "webhook"}, "url": {"type": "string",
                                                                   "format": "uri"}}},
            {"type": "object", "title": "Email", "required": ["type", "address"],
             "properties": {"type": {"const": "email"}, "address": {"type": "string",
                                                                     "format": "email"}}},
            {"type": "object", "title": "Push", "required": ["type"],
             "properties": {"type": {"const": "push"},
                            "device": {"type": "string", "description": "omit for all devices"}}},
            {"type": "object", "title": "Chat", "required": ["type", "url"],
             "properties": {"type": {"const": "chat"},
                            "platform": {"type": "string", "enum": list(CHAT_PLATFORMS)},
                            "url": {"type": "string", "format": "uri"}}},
        ]
    },
    "examples": [[{"type": "webhook", "url": "https://example.com/hooks/defiwatch"},
                  {"type": "email", "address": "ops@example.com"}]],
}
