"""Email over SMTP (aiosmtplib): plain, STARTTLS or implicit TLS, with a text and an HTML body
from the Jinja2 templates of the notification's kind.

`Message-ID` is derived from the notification id, so every attempt of one notification is the
same message to the receiving side; `Date` is the attempt's time. `Auto-Submitted:
auto-generated` (RFC 3834) keeps vacation responders from answering.

One SMTP connection per message: alert mail is rare enough that a connection pool would be
complexity without benefit.
"""

from __future__ import annotations

import enum
import re
import ssl
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from email.headerregistry import Address
from email.message import EmailMessage
from email.utils import format_datetime, parseaddr
from typing import TYPE_CHECKING

import aiosmtplib
from pydantic import SecretStr

from defiwatch.notify.message import ChannelKind, EmailTarget, Notification
from defiwatch.notify.render import Templates
from defiwatch.notify.retry import classify_smtp
from defiwatch.notify.senders.base import Outcome, Reason, SendResult

if TYPE_CHECKING:
    from defiwatch.config import Settings

__all__ = ["EmailSender", "SmtpConfig", "SmtpMode", "classify_smtp_error"]

_ID_UNSAFE = re.compile(r"[^A-Za-z0-9._-]")


class SmtpMode(enum.StrEnum):
    PLAIN = "plain"  # no TLS (a relay on localhost or a trusted network)
    STARTTLS = "starttls"  # upgrade after connecting (port 587); refuses servers without it
    TLS = "tls"  # implicit TLS from the first byte (port 465)


_DEFAULT_PORTS = {SmtpMode.PLAIN: 25, SmtpMode.STARTTLS: 587, SmtpMode.TLS: 465}


@dataclass(frozen=True, slots=True)
class SmtpConfig:
    """How to reach the SMTP relay.

    Attributes:
        port: None for the mode's standard port (25, 587, 465).
        password: used with `username`; never logged.
        from_address: the From header, `Name <address>` or a bare address.
        timeout_s: per SMTP command, seconds.
        tls_context: for STARTTLS and TLS; None = system trust store, hostname verified.
    """

    host: str = "localhost"
    port: int | None = None
    mode: SmtpMode = SmtpMode.STARTTLS
    username: str | None = None
    password: SecretStr | None = field(default=None, repr=False)
    from_address: str = "defiwatch <alerts@localhost>"
    timeout_s: float = 30.0
    tls_context: ssl.SSLContext | None = None

    @property
    def effective_port(self) -> int:
        return self.port or _DEFAULT_PORTS[self.mode]

    @classmethod
    def from_settings(cls, settings: Settings) -> SmtpConfig:
        context = None
        if settings.notify_smtp_ca_file is not None:
            context = ssl.create_default_context(cafile=str(settings.notify_smtp_ca_file))
        return cls(
            host=settings.notify_smtp_host,
            port=settings.notify_smtp_port,
            mode=SmtpMode(settings.notify_smtp_mode),
            username=settings.notify_smtp_user,
            password=settings.notify_smtp_password,
            from_address=settings.notify_smtp_from,
            timeout_s=settings.notify_smtp_timeout_s,
            tls_context=context,
        )


def classify_smtp_error(exc: BaseException) -> tuple[Outcome, Reason, int | None]:
    """The outcome of an exception from aiosmtplib (or the socket under it).

    Reply codes follow `retry.classify_smtp` (4xx retry, 5xx final), with one exception: an
    authentication failure (535) is the operator's to fix and concerns every message, so it is
    retried (bounded) rather than dropping every notification until someone notices.
    """
    if isinstance(exc, aiosmtplib.SMTPRecipientsRefused):
        codes = [r.code for r in exc.recipients]
        code = max(codes) if codes else 550
        return classify_smtp(code), Reason.SMTP_REJECTED, code
    if isinstance(exc, aiosmtplib.SMTPAuthenticationError):
        return Outcome.RETRY, Reason.SMTP_REJECTED, exc.code
    if isinstance(exc, aiosmtplib.SMTPResponseException):
        return classify_smtp(exc.code), Reason.SMTP_REJECTED, exc.code
    if isinstance(exc, aiosmtplib.SMTPTimeoutError | TimeoutError):
        return Outcome.RETRY, Reason.TIMEOUT, None
    if isinstance(exc, aiosmtplib.SMTPConnectError | aiosmtplib.SMTPServerDisconnected | OSError):
        return Outcome.RETRY, Reason.NETWORK, None  # ssl.SSLError is an OSError
    if isinstance(exc, aiosmtplib.SMTPNotSupported):
        return Outcome.RETRY, Reason.NOT_CONFIGURED, None  # e.g. STARTTLS required, not offered
    if isinstance(exc, aiosmtplib.SMTPException):
        return Outcome.RETRY, Reason.PROTOCOL, None
    return Outcome.FAILED_FINAL, Reason.INTERNAL, None


class EmailSender:
    """Sends email notifications through one SMTP relay.

    Args:
        config: the relay.
        templates: the email templates (bundled ones by default).
        clock: epoch seconds (the Date header).
    """

    def __init__(self, config: SmtpConfig, templates: Templates | None = None, *,
                 clock: Callable[[], float] = time.time) -> None:
        self.config = config
        self._templates = templates or Templates()
        self._clock = clock
        _, from_addr = parseaddr(config.from_address)
        self._domain = from_addr.rpartition("@")[2] or "defiwatch.invalid"

    @property
    def channel(self) -> ChannelKind:
        return ChannelKind.EMAIL

    def message_id(self, notification: Notification) -> str:
        return f"<{_ID_UNSAFE.sub('-', notification.id)}@{self._domain}>"

    def build_message(self, notification: Notification) -> EmailMessage:
        """The message as it will be sent (multipart/alternative: text, then HTML).

        Raises:
            ValueError: the target address cannot be a header (the caller maps it).
        """
        target = notification.target
        if not isinstance(target, EmailTarget):
            raise TypeError(f"EmailSender cannot send to a {target.channel} target")
        rendered = self._templates.email(notification)
        msg = EmailMessage()
        msg["From"] = self.config.from_address
        msg["To"] = Address(addr_spec=target.address)
        msg["Subject"] = rendered.subject
        msg["Date"] = format_datetime(datetime.fromtimestamp(self._clock(), UTC))
        msg["Message-ID"] = self.message_id(notification)
        msg["Auto-Submitted"] = "auto-generated"
        msg["X-Defiwatch-Kind"] = notification.kind.value
        msg.set_content(rendered.text)
        msg.add_alternative(rendered.html, subtype="html")
        return msg

    async def send(self, notification: Notification) -> SendResult:
        try:
            message = self.build_message(notification)
        except (ValueError, IndexError) as exc:  # email.headerregistry parse errors
            return SendResult(Outcome.FAILED_FINAL, Reason.INVALID_TARGET,
                              error=f"not a deliverable address ({type(exc).__name__})")
        cfg = self.config
        started = time.perf_counter()
        try:
            await aiosmtplib.send(
                message,
                hostname=cfg.host,
                port=cfg.effective_port,
                username=cfg.username if cfg.username else None,
                password=cfg.password.get_secret_value() if cfg.password and cfg.username else None,
                use_tls=cfg.mode is SmtpMode.TLS,
                start_tls=cfg.mode is SmtpMode.STARTTLS,
                tls_context=cfg.tls_context if cfg.mode is not SmtpMode.PLAIN else None,
                timeout=cfg.timeout_s,
            )
        except Exception as exc:
            outcome, reason, code = classify_smtp_error(exc)
            if reason is Reason.INTERNAL:
                raise
            return SendResult(outcome, reason, status_code=code, error=_describe(exc),
                              latency_s=time.perf_counter() - started)
        return SendResult(Outcome.DELIVERED, Reason.ACCEPTED, status_code=250,
                          latency_s=time.perf_counter() - started)


def _describe(exc: BaseException) -> str:
    # SMTP replies name addresses at most; the password never reaches an exception message.
    text = " ".join(str(exc).split()) or type(exc).__name__
    return f"{type(exc).__name__}: {text}"[:300]
