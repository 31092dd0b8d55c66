"""Chat: Slack-compatible and Discord messages, formatted for people, escaped for their markup,
and delivered to a real receiver on loopback."""

from __future__ import annotations

import json

import pytest

from defiwatch.notify.message import ChatFlavour, ChatTarget, NotificationKind, RuleRef
from defiwatch.notify.senders.base import Outcome
from defiwatch.notify.senders.chat import (
    ChatSender,
    discord_message,
    escape_discord,
    escape_slack,
    flavour_for,
    slack_message,
)
from defiwatch.notify.senders.http import HttpClient
from notify.factories import notification, tvl_event
from notify.receiver import Receiver, Reply

SLACK, DISCORD = ChatFlavour.SLACK, ChatFlavour.DISCORD
HOSTILE = RuleRef(7, "<!channel> @everyone *bold* <https://evil.example|click>", "warning")


@pytest.mark.parametrize(
    ("url", "platform", "flavour"),
    [
        ("https://hooks.slack.com/services/T0/B0/XXX", None, SLACK),
        ("https://discord.com/api/webhooks/123/token", None, DISCORD),
        ("https://discordapp.com/api/webhooks/123/token", None, DISCORD),
        ("https://discord.com/channels/1/2", None, SLACK),  # not a webhook URL
        ("https://mattermost.example/hooks/abc", None, SLACK),
        ("https://chat.example/hooks/abc", "discord", DISCORD),  # a proxy in front of Discord
        ("https://discord.com/api/webhooks/123/token", "slack", SLACK),  # explicit wins
        ("https://chat.example/hooks/abc", "mattermost", SLACK),
        ("https://chat.example/hooks/abc", "teams", SLACK),
        ("https://discord.com/api/webhooks/123/token", "generic", DISCORD),
    ],
)
def test_flavour(url: str, platform: str | None, flavour: ChatFlavour) -> None:
    assert flavour_for(url, platform) is flavour


@pytest.mark.parametrize(
    ("raw", "slack", "discord"),
    [
        ("a & b", "a &amp; b", "a & b"),
        ("<!channel>", "&lt;!channel&gt;", "<!channel\\>"),
        ("*x* _y_ ~z~ `c` |s|", "*x* _y_ ~z~ `c` |s|", "\\*x\\* \\_y\\_ \\~z\\~ \\`c\\` \\|s\\|"),
        ("[t](u)", "[t](u)", "\\[t\\](u)"),
        ("-12.30 %", "-12.30 %", "-12.30 %"),
    ],
)
def test_escaping(raw: str, slack: str, discord: str) -> None:
    assert escape_slack(raw) == slack
    assert escape_discord(raw) == discord


def test_slack_message_for_people() -> None:
    doc = slack_message(notification(ChatTarget("https://hooks.slack.com/services/T/B/C")))
    assert doc["text"].startswith("Alert fired: Uniswap TVL drop: Rule")
    header, section, fields, context = doc["blocks"]
    assert header == {"type": "header", "text": {
        "type": "plain_text", "text": "Alert fired: Uniswap TVL drop", "emoji": False}}
    assert "fell 12.38 % from $4.20B to $3.68B" in section["text"]["text"]
    facts = [f["text"] for f in fields["fields"]]
    assert facts == ["*Protocol*\nuniswap", "*Chain*\nethereum", "*Metric*\nTVL",
                     "*Value*\n$4.20B → $3.68B", "*Change*\n-12.38 %", "*Rule*\nUniswap TVL drop",
                     "*Severity*\ncritical"]
    assert context["elements"][0]["text"] == "defiwatch · 2025-01-02 02:59:59 UTC · ntf_42"


def test_slack_message_escapes_rule_names() -> None:
    text = json.dumps(slack_message(notification(ChatTarget("https://x.example"), rule=HOSTILE)))
    assert "<!channel>" not in text and "<https://evil" not in text
    assert "&lt;!channel&gt;" in text


def test_discord_message_for_people() -> None:
    doc = discord_message(notification(ChatTarget("https://discord.com/api/webhooks/1/t")))
    assert doc["allowed_mentions"] == {"parse": []}
    assert doc["content"] == "Alert fired: Uniswap TVL drop"
    [embed] = doc["embeds"]
    assert embed["title"] == "Alert fired: Uniswap TVL drop"
    assert embed["color"] == 0xCF222E  # critical
    assert embed["timestamp"] == "2025-01-02T02:59:59Z"
    assert {"name": "Value", "value": "$4.20B → $3.68B", "inline": True} in embed["fields"]
    assert {"name": "Change", "value": "-12.38 %", "inline": True} in embed["fields"]


def test_discord_message_neutralises_mentions_and_markdown() -> None:
    doc = discord_message(notification(ChatTarget("https://discord.com/api/webhooks/1/t"), rule=HOSTILE))
    assert doc["allowed_mentions"] == {"parse": []}  # @everyone pings nobody
    assert "\\*bold\\*" in doc["content"] and "\\[" not in doc["content"]


def test_price_and_resolved_messages() -> None:
    event = tvl_event(type="alert_resolved", metric="price", subject="coingecko:ethereum", chain="-",
                      value=2345.678, previous=2100.0, change_pct=11.7)
    n = notification(ChatTarget("https://x.example"), kind=NotificationKind.ALERT_RESOLVED, event=event)
    doc = slack_message(n)
    assert doc["blocks"][0]["text"]["text"] == "Alert resolved: Uniswap TVL drop"
    assert "ethereum price rose 11.70 % from $2,100.00 to $2,345.68" in doc["blocks"][1]["text"]["text"]
    assert discord_message(n)["embeds"][0]["color"] == 0x1A7F37  # resolved: green


@pytest.mark.parametrize(
    ("path", "flavour", "key"),
    [("/services/T/B/C", None, "blocks"), ("/api/webhooks/1/t", ChatFlavour.DISCORD, "embeds")],
)
async def test_delivery(receiver: Receiver, client: HttpClient, path: str,
                        flavour: ChatFlavour | None, key: str) -> None:
    receiver.script(Reply(204, b""))
    result = await ChatSender(client).send(notification(ChatTarget(receiver.url(path), flavour)))
    assert (result.outcome, result.status_code) == (Outcome.DELIVERED, 204)
    seen = receiver.requests[0]
    assert seen.headers["content-type"] == "application/json"
    assert key in json.loads(seen.body)


async def test_rate_limits_and_dead_hooks(receiver: Receiver, client: HttpClient) -> None:
    receiver.script(Reply(429, b'{"retry_after": 2.5}', {"Retry-After": "3"}),
                    Reply(404, b"no_service"))
    sender = ChatSender(client)
    limited = await sender.send(notification(ChatTarget(receiver.url())))
    assert (limited.outcome, limited.retry_after_s) == (Outcome.RETRY, 3.0)
    dead = await sender.send(notification(ChatTarget(receiver.url())))
    assert (dead.outcome, dead.error) == (Outcome.FAILED_FINAL, "HTTP 404: no_service")
