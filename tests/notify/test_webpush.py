"""Web Push: a real push endpoint on loopback checks the VAPID JWT (signature with the public
key, aud = its origin, exp, sub), decrypts the payload with the subscriber's private key
(`http_ece.decrypt`), and answers 201; 404/410 mean the subscription is gone."""

from __future__ import annotations

import base64
import json
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import http_ece
import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature

from defiwatch.notify.message import PushTarget, RuleRef
from defiwatch.notify.senders.base import Outcome, Reason
from defiwatch.notify.senders.http import HttpClient
from defiwatch.notify.senders.webpush import (
    MAX_PLAINTEXT,
    VapidKey,
    WebPushSender,
    encrypt_payload,
    push_payload,
)
from notify.factories import notification
from notify.receiver import Receiver, Reply, Seen

SUBJECT = "mailto:ops@defiwatch.example"


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def unb64url(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


@dataclass
class Subscriber:
    """A browser's side of a subscription: its key pair and auth secret."""

    key: ec.EllipticCurvePrivateKey = field(default_factory=lambda: ec.generate_private_key(ec.SECP256R1()))
    auth: bytes = field(default_factory=lambda: os.urandom(16))

    def target(self, endpoint: str) -> PushTarget:
        public = self.key.public_key().public_bytes(serialization.Encoding.X962,
                                                    serialization.PublicFormat.UncompressedPoint)
        return PushTarget.from_subscription(
            {"endpoint": endpoint, "keys": {"p256dh": b64url(public), "auth": b64url(self.auth)}},
            device_id="pixel-7")


class PushService:
    """The push endpoint's checks (RFC 8292 for VAPID, RFC 8291 for the payload)."""

    def __init__(self, subscriber: Subscriber, vapid_public: str) -> None:
        self.subscriber = subscriber
        self.vapid_public = vapid_public
        self.origin = ""
        self.delivered: list[dict[str, Any]] = []
        self.problems: list[str] = []

    def answer(self, seen: Seen) -> Reply:
        try:
            self.check(seen)
        except Exception as exc:  # the reply tells the test what failed
            self.problems.append(f"{type(exc).__name__}: {exc}")
            return Reply(400, str(exc).encode())
        return Reply(201, b"", {"Location": f"{self.origin}/message/1"})

    def check(self, seen: Seen) -> None:
        scheme, _, params = seen.headers["authorization"].partition(" ")
        assert scheme == "vapid", scheme
        parts = dict(p.strip().split("=", 1) for p in params.split(","))
        assert parts["k"] == self.vapid_public, "k is not the application server key"
        head, claims, signature = parts["t"].split(".")
        sig = unb64url(signature)
        public = ec.EllipticCurvePublicKey.from_encoded_point(ec.SECP256R1(), unb64url(parts["k"]))
        public.verify(encode_dss_signature(int.from_bytes(sig[:32], "big"), int.from_bytes(sig[32:], "big")),
                      f"{head}.{claims}".encode(), ec.ECDSA(hashes.SHA256()))
        assert json.loads(unb64url(head)) == {"typ": "JWT", "alg": "ES256"}
        jwt = json.loads(unb64url(claims))
        assert jwt["aud"] == self.origin, jwt["aud"]
        assert time.time() < jwt["exp"] <= time.time() + 86_400, "exp not within 24 h"
        assert jwt["sub"] == SUBJECT
        assert seen.headers["content-encoding"] == "aes128gcm"
        assert int(seen.headers["ttl"]) >= 0
        assert len(seen.body) <= 4096
        plaintext = http_ece.decrypt(seen.body, private_key=self.subscriber.key,
                                     auth_secret=self.subscriber.auth, version="aes128gcm")
        self.delivered.append(json.loads(plaintext))


@pytest.fixture
def vapid() -> VapidKey:
    return VapidKey.generate()


@pytest.fixture
def subscriber() -> Subscriber:
    return Subscriber()


@pytest.fixture
def push_service(subscriber: Subscriber, vapid: VapidKey) -> Iterator[tuple[PushService, Receiver]]:
    service = PushService(subscriber, vapid.application_server_key)
    with Receiver(service.answer) as server:
        service.origin = server.origin
        yield service, server


async def test_delivery_with_vapid_and_aes128gcm(
        push_service: tuple[PushService, Receiver], subscriber: Subscriber, vapid: VapidKey,
        client: HttpClient) -> None:
    service, server = push_service
    sender = WebPushSender(client, vapid, SUBJECT, ttl_s=3600)
    result = await sender.send(notification(subscriber.target(server.url("/push/abc"))))
    assert service.problems == []
    assert (result.outcome, result.status_code) == (Outcome.DELIVERED, 201)
    [payload] = service.delivered
    assert payload["title"] == "Alert fired: Uniswap TVL drop"
    assert payload["body"].startswith('Rule "Uniswap TVL drop" fired: uniswap TVL on ethereum fell')
    assert payload["tag"] == "defiwatch-rule-7"
    assert payload["data"]["id"] == "ntf_42" and payload["data"]["kind"] == "alert_fired"
    assert payload["data"]["event"]["value"] == 3_680_000_000.0
    headers = server.requests[0].headers
    assert headers["ttl"] == "3600" and headers["urgency"] == "high"
    assert 0 < len(headers["topic"]) <= 32


@pytest.mark.parametrize(
    ("reply", "outcome"),
    [(Reply(410, b"expired"), Outcome.GONE), (Reply(404), Outcome.GONE),
     (Reply(429, headers={"Retry-After": "5"}), Outcome.RETRY), (Reply(413), Outcome.FAILED_FINAL),
     (Reply(502), Outcome.RETRY)],
)
async def test_push_service_answers(push_service: tuple[PushService, Receiver], subscriber: Subscriber,
                                    vapid: VapidKey, client: HttpClient, reply: Reply,
                                    outcome: Outcome) -> None:
    _, server = push_service
    server.script(reply)
    result = await WebPushSender(client, vapid, SUBJECT).send(
        notification(subscriber.target(server.url("/push/abc"))))
    assert (result.outcome, result.status_code) == (outcome, reply.status)


async def test_bad_subscription_keys_fail_for_good(push_service: tuple[PushService, Receiver],
                                                   vapid: VapidKey, client: HttpClient) -> None:
    _, server = push_service
    target = PushTarget(server.url("/push/abc"), p256dh="bm90IGEga2V5", auth="c2hvcnQ")
    result = await WebPushSender(client, vapid, SUBJECT).send(notification(target))
    assert (result.outcome, result.reason) == (Outcome.FAILED_FINAL, Reason.INVALID_TARGET)
    assert server.requests == []


async def test_push_endpoints_go_through_the_ssrf_guard(subscriber: Subscriber, vapid: VapidKey,
                                                        client: HttpClient) -> None:
    target = subscriber.target("http://169.254.169.254/latest/meta-data/")
    result = await WebPushSender(client, vapid, SUBJECT).send(notification(target))
    assert (result.outcome, result.reason) == (Outcome.FAILED_FINAL, Reason.BLOCKED)


def test_oversized_payloads_are_shortened_to_fit(subscriber: Subscriber) -> None:
    n = notification(subscriber.target("https://push.example/x"), rule=RuleRef(1, "r" * 9_000))
    plaintext = push_payload(n)
    assert len(plaintext) <= MAX_PLAINTEXT
    body = encrypt_payload(plaintext, n.target)  # type: ignore[arg-type]
    assert len(body) <= 4096
    decrypted = http_ece.decrypt(body, private_key=subscriber.key, auth_secret=subscriber.auth,
                                 version="aes128gcm")
    assert json.loads(decrypted)["data"]["id"] == "ntf_42"


def test_vapid_keys_load_from_pem_and_raw() -> None:
    key = VapidKey.generate()
    assert VapidKey.from_string(key.private_pem().decode()).application_server_key == (
        key.application_server_key)
    raw = ec.generate_private_key(ec.SECP256R1())
    scalar = b64url(raw.private_numbers().private_value.to_bytes(32, "big"))
    public = raw.public_key().public_bytes(serialization.Encoding.X962,
                                           serialization.PublicFormat.UncompressedPoint)
    assert VapidKey.from_string(scalar).application_server_key == b64url(public)
    assert len(unb64url(key.application_server_key)) == 65
    assert "PRIVATE" not in repr(key)


@pytest.mark.parametrize(
    "text",
    ["", "not a key", b64url(b"x" * 31),
     ec.generate_private_key(ec.SECP384R1()).private_bytes(
         serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
         serialization.NoEncryption()).decode()],
)
def test_bad_vapid_keys_are_refused(text: str) -> None:
    with pytest.raises(ValueError):
        VapidKey.from_string(text)
