"""Web Push (RFC 8030) with VAPID (RFC 8292) and aes128gcm payload encryption (RFC 8291).

The crypto comes from the reference libraries of the Web Push working group: `http_ece`
encrypts the payload for the subscription (ECDH with its `p256dh` key and `auth` secret, RFC 8291
key derivation), `py_vapid` signs the VAPID JWT. We call `http_ece` the way `pywebpush`'s
`WebPusher.encode` does rather than through pywebpush: its send is blocking `requests` (it
would stall the event loop) and goes around our SSRF guard. The HTTP request is ours, on the
client the senders share (`senders.http`: aiohttp behind the guard).

Request (RFC 8030 5, RFC 8292 3, RFC 8291 4):

    POST {endpoint}
    TTL: seconds the push service keeps an undelivered message
    Urgency: high for critical alerts, normal otherwise
    Topic: one per rule (a newer message replaces an undelivered older one)
    Content-Encoding: aes128gcm
    Authorization: vapid t=<JWT ES256 {aud: endpoint origin, exp: now + 12 h, sub}>, k=<public key>

The push service answers 201; 404 or 410 mean the subscription is gone (outcome `gone`: disable
the device). The decrypted payload is JSON for the service worker's `showNotification`:
`{title, body, tag, timestamp (ms), data: {id, kind, rule, event}}`.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

import http_ece
import msgspec
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from py_vapid import Vapid02, VapidException

from defiwatch.notify.message import ChannelKind, Notification, PushTarget
from defiwatch.notify.render import summarize
from defiwatch.notify.senders.base import Outcome, Reason, SendResult
from defiwatch.notify.senders.http import HttpClient, post

if TYPE_CHECKING:
    from defiwatch.config import Settings

__all__ = [
    "GONE_STATUSES",
    "MAX_PLAINTEXT",
    "VapidKey",
    "WebPushSender",
    "encrypt_payload",
    "push_payload",
]

GONE_STATUSES = frozenset({404, 410})  # RFC 8030 7.3: the subscription expired or was removed
# A push message body is at most 4096 bytes (RFC 8030 7.2); aes128gcm adds a 86-byte header
# (salt, record size, key id = 65-byte public key) plus a padding delimiter and a 16-byte tag.
MAX_PLAINTEXT = 4096 - 86 - 17
_JWT_LIFETIME_S = 12 * 3600  # RFC 8292 2: at most 24 h


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _b64url_decode(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


class VapidKey:
    """The application server's VAPID key pair (ECDSA P-256).

    Args:
        private_key: the private key; its public half is the `applicationServerKey` browsers
            subscribe with.
    """

    def __init__(self, private_key: ec.EllipticCurvePrivateKey) -> None:
        if not isinstance(private_key.curve, ec.SECP256R1):
            raise ValueError("a VAPID key is an EC key on the P-256 curve")
        self._key = private_key
        self._vapid = Vapid02(private_key=private_key)

    @classmethod
    def generate(cls) -> VapidKey:
        return cls(ec.generate_private_key(ec.SECP256R1()))

    @classmethod
    def from_string(cls, text: str) -> VapidKey:
        """From a PEM (`-----BEGIN PRIVATE KEY-----` or `EC PRIVATE KEY`) or the raw 32-byte
        private scalar in base64url (what `web-push generate-vapid-keys` prints).

        Raises:
            ValueError: neither, or not a P-256 key.
        """
        text = text.strip()
        if text.startswith("-----BEGIN"):
            key = serialization.load_pem_private_key(text.encode(), password=None)
            if not isinstance(key, ec.EllipticCurvePrivateKey):
                raise ValueError("a VAPID key is an EC key on the P-256 curve")
            return cls(key)
        try:
            raw = _b64url_decode(text)
        except (binascii.Error, ValueError) as exc:
            raise ValueError("a VAPID key is a PEM or a base64url 32-byte private key") from exc
        if len(raw) != 32:
            raise ValueError("a VAPID key is a PEM or a base64url 32-byte private key")
        return cls(ec.derive_private_key(int.from_bytes(raw, "big"), ec.SECP256R1()))

    @classmethod
    def from_file(cls, path: Path) -> VapidKey:
        return cls.from_string(path.read_text())

    @classmethod
    def from_settings(cls, settings: Settings) -> VapidKey | None:
        """The key from `notify_vapid_private_key` or `notify_vapid_private_key_file`, or None
        when neither is set (push is then not configured).

        Raises:
            ValueError, OSError: the key is malformed or its file unreadable.
        """
        if settings.notify_vapid_private_key is not None:
            return cls.from_string(settings.notify_vapid_private_key.get_secret_value())
        if settings.notify_vapid_private_key_file is not None:
            return cls.from_file(settings.notify_vapid_private_key_file)
        return None

    @property
    def application_server_key(self) -> str:
        """The public key, base64url uncompressed point: `applicationServerKey` for
        `PushManager.subscribe()` and the `k` of the Authorization header."""
        return _b64url(self._key.public_key().public_bytes(
            serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint))

    def private_pem(self) -> bytes:
        return self._key.private_bytes(serialization.Encoding.PEM,
                                       serialization.PrivateFormat.PKCS8,
                                       serialization.NoEncryption())

    def authorization(self, endpoint: str, subject: str, now: float) -> str:
        """The `Authorization` header for a push to `endpoint` (RFC 8292 3).

        Raises:
            ValueError: the endpoint has no http(s) origin, or the subject is not a `mailto:`
                or `https:` URI.
        """
        parts = urlsplit(endpoint)
        if parts.scheme not in ("http", "https") or not parts.netloc:
            raise ValueError("a push endpoint is an absolute https URL")
        claims = {"aud": f"{parts.scheme}://{parts.netloc.rpartition('@')[2]}",
                  "exp": int(now) + _JWT_LIFETIME_S, "sub": subject}
        try:
            headers: dict[str, str] = self._vapid.sign(claims)
        except VapidException as exc:
            raise ValueError(str(exc)) from exc
        return headers["Authorization"]

    def __repr__(self) -> str:
        return f"VapidKey(public={self.application_server_key[:12]}…)"


def encrypt_payload(plaintext: bytes, target: PushTarget) -> bytes:
    """The aes128gcm body for `target` (RFC 8291 4), with a fresh ephemeral key and salt.

    Raises:
        ValueError: the subscription keys are malformed.
    """
    try:
        receiver = _b64url_decode(target.p256dh)
        auth = _b64url_decode(target.auth)
    except (binascii.Error, ValueError) as exc:
        raise ValueError("invalid push subscription keys (not base64url)") from exc
    if len(receiver) != 65 or receiver[0] != 0x04:
        raise ValueError("invalid push subscription keys (p256dh is not a P-256 public key)")
    if len(auth) != 16:
        raise ValueError("invalid push subscription keys (auth is not 16 bytes)")
    # RFC 8291 3.1: a new application server key pair for every message.
    ephemeral = ec.generate_private_key(ec.SECP256R1())
    try:
        body: bytes = http_ece.encrypt(plaintext, private_key=ephemeral, dh=receiver,
                                       auth_secret=auth, version="aes128gcm")
    except (http_ece.ECEException, ValueError) as exc:  # e.g. a point not on the curve
        raise ValueError(f"invalid push subscription keys ({type(exc).__name__})") from exc
    return body


def push_payload(notification: Notification) -> bytes:
    """The JSON the service worker receives, at most MAX_PLAINTEXT bytes (if it would not fit,
    the event is dropped and the title and rule name clipped, then the body shortened)."""
    n = notification
    summary = summarize(n)
    event = n.event
    compact: dict[str, Any] | None = None
    if event is not None:
        compact = {k: getattr(event, k) for k in (
            "type", "metric", "subject", "chain", "value", "previous", "change_pct", "ts")}
    doc: dict[str, Any] = {
        "title": summary.title,
        "body": summary.text,
        "tag": f"defiwatch-rule-{n.rule.id}" if n.rule and n.rule.id is not None else n.id,
        "timestamp": int(summary.timestamp * 1000),
        "data": {"id": n.id, "kind": n.kind.value,
                 "rule": n.rule.as_json() if n.rule else None, "event": compact},
    }
    out = msgspec.json.encode(doc)
    if len(out) > MAX_PLAINTEXT:  # drop what the notification can live without, in order
        doc["data"]["event"] = None
        doc["title"] = _clip(doc["title"], 120)
        if doc["data"]["rule"] is not None:
            doc["data"]["rule"]["name"] = _clip(doc["data"]["rule"]["name"], 120)
        out = msgspec.json.encode(doc)
    while len(out) > MAX_PLAINTEXT and doc["body"]:
        # cut at least the overflow (bytes >= characters); the body shrinks every turn
        keep = max(0, len(doc["body"]) - (len(out) - MAX_PLAINTEXT) - 1)
        doc["body"] = doc["body"][:keep] + "…" if keep else ""
        out = msgspec.json.encode(doc)
    return out


def _clip(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


class WebPushSender:
    """Delivers to browser push subscriptions.

    Args:
        client: the shared guarded client (push endpoints come from users' browsers, so the
            SSRF guard applies to them too).
        vapid: the application server key.
        subject: the VAPID `sub`, a `mailto:` or `https:` contact for the push service.
        ttl_s: how long the push service keeps a message for an offline device, seconds.
        timeout_s: deadline of one attempt, seconds.
        clock: epoch seconds (JWT expiry, Retry-After dates).
    """

    def __init__(self, client: HttpClient, vapid: VapidKey, subject: str, *,
                 ttl_s: int = 86_400, timeout_s: float = 10.0,
                 clock: Callable[[], float] = time.time) -> None:
        self._client = client
        self.vapid = vapid
        self._subject = subject
        self._ttl_s = ttl_s
        self._timeout_s = timeout_s
        self._clock = clock

    @property
    def channel(self) -> ChannelKind:
        return ChannelKind.PUSH

    async def send(self, notification: Notification) -> SendResult:
        target = notification.target
        if not isinstance(target, PushTarget):
            raise TypeError(f"WebPushSender cannot send to a {target.channel} target")
        try:
            body = encrypt_payload(push_payload(notification), target)
            authorization = self.vapid.authorization(target.endpoint, self._subject, self._clock())
        except ValueError as exc:
            return SendResult(Outcome.FAILED_FINAL, Reason.INVALID_TARGET, error=str(exc))
        headers = {
            "TTL": str(self._ttl_s),
            "Urgency": "high" if notification.rule and notification.rule.severity == "critical"
            else "normal",
            "Content-Encoding": "aes128gcm",
            "Content-Type": "application/octet-stream",
            "Authorization": authorization,
        }
        if notification.rule is not None and notification.rule.id is not None:
            # RFC 8030 5.4: at most 32 base64url characters.
            headers["Topic"] = _b64url(hashlib.sha256(
                f"rule:{notification.rule.id}".encode()).digest())[:32]
        return await post(self._client, target.endpoint, content=body, headers=headers,
                          timeout_s=self._timeout_s, gone=GONE_STATUSES, clock=self._clock)
