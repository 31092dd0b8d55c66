"""Email: delivered to a real SMTP server (aiosmtpd) on loopback, plain, STARTTLS with a
self-signed certificate and AUTH, and implicit TLS; headers and both bodies checked."""

from __future__ import annotations

import asyncio
import email
import email.policy
import socket
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from email.message import EmailMessage
from email.utils import parsedate_to_datetime
from pathlib import Path
from typing import Any

import pytest
from aiosmtpd.smtp import SMTP, AuthResult, Envelope, LoginPassword, Session
from pydantic import SecretStr

from defiwatch.notify.message import EmailTarget, NotificationKind, RuleRef
from defiwatch.notify.senders.base import Outcome, Reason
from defiwatch.notify.senders.email import EmailSender, SmtpConfig, SmtpMode
from notify.factories import NOW, notification, tvl_event
from notify.tls import SelfSigned, self_signed

HOSTILE = RuleRef(7, '<script>alert("x")</script> & drop', "critical")


@dataclass
class Received:
    mail_from: str
    rcpt_tos: list[str]
    message: EmailMessage
    tls: bool
    login: bytes | None


@dataclass
class Inbox:
    """The aiosmtpd handler: keeps what it receives, refuses scripted recipients."""

    messages: list[Received] = field(default_factory=list)
    refuse: dict[str, str] = field(default_factory=dict)  # address -> SMTP reply

    async def handle_RCPT(self, server: SMTP, session: Session, envelope: Envelope, address: str,
                          rcpt_options: list[str]) -> str:
        if address in self.refuse:
            return self.refuse[address]
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        assert isinstance(envelope.content, bytes)
        message = email.message_from_bytes(envelope.content, policy=email.policy.default)
        assert isinstance(message, EmailMessage)
        login = session.auth_data.login if isinstance(session.auth_data, LoginPassword) else None
        self.messages.append(Received(str(envelope.mail_from), list(envelope.rcpt_tos), message,
                                      session.ssl is not None, login))
        return "250 Message accepted for delivery"


def authenticator(server: SMTP, session: Session, envelope: Envelope, mechanism: str,
                  auth_data: Any) -> AuthResult:
    ok = isinstance(auth_data, LoginPassword) and auth_data == (b"mailer", b"s3cret")
    # handled=False: aiosmtpd answers a failure itself (535)
    return AuthResult(success=ok, handled=False, auth_data=auth_data)


@dataclass
class SmtpServer:
    inbox: Inbox
    port: int


async def start(make: Callable[[], SMTP], **server_kw: Any) -> tuple[asyncio.Server, int]:
    server = await asyncio.get_running_loop().create_server(make, "127.0.0.1", 0, **server_kw)
    return server, server.sockets[0].getsockname()[1]


@pytest.fixture
def cert(tmp_path: Path) -> SelfSigned:
    return self_signed(tmp_path)


@pytest.fixture
async def plain_smtp() -> AsyncIterator[SmtpServer]:
    inbox, loop = Inbox(), asyncio.get_running_loop()
    server, port = await start(lambda: SMTP(inbox, hostname="smtp.test", loop=loop))
    yield SmtpServer(inbox, port)
    server.close()
    await server.wait_closed()


@pytest.fixture
async def starttls_smtp(cert: SelfSigned) -> AsyncIterator[SmtpServer]:
    inbox, loop = Inbox(), asyncio.get_running_loop()
    server, port = await start(lambda: SMTP(
        inbox, hostname="smtp.test", loop=loop, tls_context=cert.server_context(),
        require_starttls=True, auth_required=True, authenticator=authenticator))
    yield SmtpServer(inbox, port)
    server.close()
    await server.wait_closed()


def sender(port: int, **config: Any) -> EmailSender:
    config.setdefault("mode", SmtpMode.PLAIN)
    return EmailSender(SmtpConfig(host="127.0.0.1", port=port,
                                  from_address="defiwatch <alerts@example.com>", timeout_s=10,
                                  **config), clock=lambda: NOW)


def bodies(message: EmailMessage) -> tuple[str, str]:
    text, html = message.get_body(("plain",)), message.get_body(("html",))
    assert text is not None and html is not None
    return str(text.get_content()), str(html.get_content())


async def test_plain_delivery_headers_and_bodies(plain_smtp: SmtpServer) -> None:
    result = await sender(plain_smtp.port).send(
        notification(EmailTarget("ops@example.org"), rule=HOSTILE))
    assert (result.outcome, result.reason, result.status_code) == (
        Outcome.DELIVERED, Reason.ACCEPTED, 250)
    [got] = plain_smtp.inbox.messages
    assert got.mail_from == "alerts@example.com" and got.rcpt_tos == ["ops@example.org"]
    assert not got.tls
    m = got.message
    assert m["From"] == "defiwatch <alerts@example.com>"
    assert m["To"] == "ops@example.org"
    # (compared without folding whitespace: a long header is folded on the wire)
    assert " ".join(m["Subject"].split()) == (
        '[defiwatch] Fired (critical): <script>alert("x")</script> & drop · '
        "uniswap TVL on ethereum -12.38 %")
    assert m["Message-ID"] == "<ntf_42@example.com>"
    assert parsedate_to_datetime(m["Date"]).timestamp() == NOW
    assert m["Auto-Submitted"] == "auto-generated"
    assert m.get_content_type() == "multipart/alternative"
    text, html = bodies(m)
    assert '<script>alert("x")</script> & drop' in text  # plain text is not markup
    assert "fell 12.38 % from $4.20B to $3.68B" in text
    assert "$4.20B → $3.68B" in text and "2025-01-02 02:59:59 UTC" in text
    assert "<script>" not in html  # autoescaped
    assert "&lt;script&gt;alert(&#34;x&#34;)&lt;/script&gt; &amp; drop" in html
    assert "$4.20B → $3.68B" in html and "ntf_42" in html
    assert "http" not in text and "href" not in html  # link-free


async def test_message_id_is_stable_across_attempts(plain_smtp: SmtpServer) -> None:
    s = sender(plain_smtp.port)
    await s.send(notification(EmailTarget("ops@example.org"), attempt=1))
    await s.send(notification(EmailTarget("ops@example.org"), attempt=2))
    first, second = (r.message["Message-ID"] for r in plain_smtp.inbox.messages)
    assert first == second


async def test_starttls_with_auth(starttls_smtp: SmtpServer, cert: SelfSigned) -> None:
    s = sender(starttls_smtp.port, mode=SmtpMode.STARTTLS, tls_context=cert.client_context(),
               username="mailer", password=SecretStr("s3cret"))
    result = await s.send(notification(EmailTarget("ops@example.org")))
    assert result.outcome is Outcome.DELIVERED, result.error
    [got] = starttls_smtp.inbox.messages
    assert got.tls and got.login == b"mailer"
    text, _ = bodies(got.message)
    assert "Uniswap TVL drop" in text


async def test_wrong_password_is_retried(starttls_smtp: SmtpServer, cert: SelfSigned) -> None:
    s = sender(starttls_smtp.port, mode=SmtpMode.STARTTLS, tls_context=cert.client_context(),
               username="mailer", password=SecretStr("wrong-password"))
    result = await s.send(notification(EmailTarget("ops@example.org")))
    assert (result.outcome, result.reason, result.status_code) == (
        Outcome.RETRY, Reason.SMTP_REJECTED, 535)
    assert result.error is not None and "wrong-password" not in result.error
    assert starttls_smtp.inbox.messages == []


async def test_untrusted_certificate_is_refused(starttls_smtp: SmtpServer) -> None:
    s = sender(starttls_smtp.port, mode=SmtpMode.STARTTLS)  # system trust store only
    result = await s.send(notification(EmailTarget("ops@example.org")))
    assert result.outcome is Outcome.RETRY
    assert starttls_smtp.inbox.messages == []


async def test_starttls_mode_refuses_a_server_without_tls(plain_smtp: SmtpServer) -> None:
    result = await sender(plain_smtp.port, mode=SmtpMode.STARTTLS).send(
        notification(EmailTarget("ops@example.org")))
    assert result.outcome is Outcome.RETRY
    assert plain_smtp.inbox.messages == []


async def test_implicit_tls(cert: SelfSigned) -> None:
    inbox, loop = Inbox(), asyncio.get_running_loop()
    server, port = await start(lambda: SMTP(inbox, hostname="smtp.test", loop=loop),
                               ssl=cert.server_context())
    try:
        result = await sender(port, mode=SmtpMode.TLS, tls_context=cert.client_context()).send(
            notification(EmailTarget("ops@example.org")))
    finally:
        server.close()
        await server.wait_closed()
    assert result.outcome is Outcome.DELIVERED, result.error
    assert len(inbox.messages) == 1


@pytest.mark.parametrize(
    ("reply", "outcome", "code"),
    [("550 5.1.1 No such user", Outcome.FAILED_FINAL, 550),
     ("452 4.2.2 Mailbox full", Outcome.RETRY, 452)],
)
async def test_refused_recipients(plain_smtp: SmtpServer, reply: str, outcome: Outcome, code: int
                                  ) -> None:
    plain_smtp.inbox.refuse["nobody@example.org"] = reply
    result = await sender(plain_smtp.port).send(notification(EmailTarget("nobody@example.org")))
    assert (result.outcome, result.reason, result.status_code) == (
        outcome, Reason.SMTP_REJECTED, code)


async def test_no_server_is_a_network_failure() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        result = await sender(sock.getsockname()[1]).send(notification(EmailTarget("a@b.example")))
    assert (result.outcome, result.reason) == (Outcome.RETRY, Reason.NETWORK)


async def test_an_address_that_cannot_be_a_header_fails_for_good(plain_smtp: SmtpServer) -> None:
    result = await sender(plain_smtp.port).send(
        notification(EmailTarget("ops@example.org\r\nBcc: victim@example.org")))
    assert (result.outcome, result.reason) == (Outcome.FAILED_FINAL, Reason.INVALID_TARGET)
    assert plain_smtp.inbox.messages == []


@pytest.mark.parametrize("kind", list(NotificationKind))
async def test_every_kind_is_delivered(plain_smtp: SmtpServer, kind: NotificationKind) -> None:
    n = notification(EmailTarget("ops@example.org"), kind=kind)
    if kind is NotificationKind.DIGEST:
        n = type(n)(id="ntf_d", kind=kind, target=n.target, rule=None,
                    events=(tvl_event(), tvl_event(subject="aave")), created_at=NOW,
                    detail={"since": NOW - 86_400, "until": NOW})
    if kind is NotificationKind.ENDPOINT_DISABLED:
        n = type(n)(id="ntf_x", kind=kind, target=n.target, created_at=NOW,
                    detail={"channel": "webhook", "target": "https://u:p@hooks.example/x?k=1",
                            "reason": "410 Gone for 3 days"})
    result = await sender(plain_smtp.port).send(n)
    assert result.delivered
    m = plain_smtp.inbox.messages[-1].message
    text, html = bodies(m)
    assert m["Subject"].startswith("[defiwatch]")
    assert "defiwatch" in text and "<html" in html
    assert "u:p@" not in text + html and "k=1" not in text + html
