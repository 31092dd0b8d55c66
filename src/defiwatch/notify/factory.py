"""Senders, retry policy and breaker from settings: what the notifier role gets from app.py.

    senders = build_senders(settings)         # one guarded HTTP client (aiohttp) shared by three senders
    result = await senders.send(notification) # picks the channel's sender (metrics and logs on)
    ...
    await senders.aclose()
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

from defiwatch.errors import ConfigError
from defiwatch.notify.breaker import BreakerPolicy, CircuitBreaker
from defiwatch.notify.message import ChannelKind, Notification
from defiwatch.notify.observed import ObservedSender, observed
from defiwatch.notify.render import Templates
from defiwatch.notify.retry import RetryPolicy
from defiwatch.notify.senders.base import Outcome, Reason, Sender, SendResult
from defiwatch.notify.senders.chat import ChatSender
from defiwatch.notify.senders.email import EmailSender, SmtpConfig
from defiwatch.notify.senders.http import HttpClient, create_http_client
from defiwatch.notify.senders.webhook import WebhookSender
from defiwatch.notify.senders.webpush import VapidKey, WebPushSender
from defiwatch.notify.ssrf import AddressGuard, AllowList

if TYPE_CHECKING:
    from defiwatch.config import Settings

__all__ = [
    "Senders",
    "UnconfiguredSender",
    "address_guard",
    "breaker",
    "build_senders",
    "retry_policy",
]


class UnconfiguredSender:
    """Stands in for a channel whose settings are missing: every send fails for good with
    reason `not_configured` and says which setting to provide."""

    def __init__(self, channel: ChannelKind, hint: str) -> None:
        self._channel = channel
        self.hint = hint

    @property
    def channel(self) -> ChannelKind:
        return self._channel

    async def send(self, notification: Notification) -> SendResult:
        return SendResult(Outcome.FAILED_FINAL, Reason.NOT_CONFIGURED, error=self.hint)


@dataclass
class Senders:
    """One (observed) sender per channel kind and the HTTP client they share."""

    by_channel: Mapping[ChannelKind, ObservedSender]
    client: HttpClient

    def __getitem__(self, channel: ChannelKind) -> Sender:
        return self.by_channel[channel]

    async def send(self, notification: Notification) -> SendResult:
        """One attempt through the sender of the notification's channel."""
        return await self.by_channel[notification.channel].send(notification)

    async def aclose(self) -> None:
        """Close the shared HTTP client (its aiohttp session and connections)."""
        await self.client.aclose()


def address_guard(settings: Settings) -> AddressGuard:
    return AddressGuard(AllowList.parse(settings.notify_ssrf_allow))


def retry_policy(settings: Settings) -> RetryPolicy:
    return RetryPolicy(max_attempts=settings.notify_retry_max_attempts,
                       base_delay_s=settings.notify_retry_base_delay_s,
                       max_delay_s=settings.notify_retry_max_delay_s)


def breaker(settings: Settings) -> CircuitBreaker:
    return CircuitBreaker(BreakerPolicy(failure_threshold=settings.notify_breaker_failures,
                                        open_s=settings.notify_breaker_open_s,
                                        max_open_s=settings.notify_breaker_max_open_s))


def build_senders(
    settings: Settings,
    *,
    guard: AddressGuard | None = None,
    templates: Templates | None = None,
    clock: Callable[[], float] = time.time,
) -> Senders:
    """Every channel's sender, wrapped by `observed()`.

    Raises:
        ConfigError: the VAPID key is set but unreadable or malformed.
    """
    timeout = settings.notify_webhook_timeout_s
    client = create_http_client(guard or address_guard(settings), timeout_s=timeout,
                                per_host=settings.notifier_per_host)
    try:
        vapid = VapidKey.from_settings(settings)
    except (OSError, ValueError) as exc:
        raise ConfigError(f"invalid setting DEFIWATCH_NOTIFY_VAPID_PRIVATE_KEY(_FILE): {exc}",
                          field="notify_vapid_private_key") from exc
    push: Sender = (
        WebPushSender(client, vapid, settings.notify_vapid_subject,
                      ttl_s=settings.notify_push_ttl_s, timeout_s=timeout, clock=clock)
        if vapid is not None else
        UnconfiguredSender(ChannelKind.PUSH, "push is not configured: set "
                           "DEFIWATCH_NOTIFY_VAPID_PRIVATE_KEY or ..._FILE")
    )
    senders: list[Sender] = [
        WebhookSender(client, timeout_s=timeout, clock=clock),
        EmailSender(SmtpConfig.from_settings(settings), templates, clock=clock),
        push,
        ChatSender(client, timeout_s=timeout, clock=clock),
    ]
    return Senders({s.channel: observed(s) for s in senders}, client)
