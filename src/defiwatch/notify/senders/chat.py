"""Chat incoming webhooks: Slack's format (text + Block Kit blocks; also spoken by Mattermost,
Rocket.Chat and Teams' simple `text`) and Discord's (content + embeds).

Messages are for people: protocol, chain, old → new value with units and %, the rule, the time
in UTC. User-written text (rule names) is escaped for each markup, so a rule named
`<!channel>` or `@everyone` pings nobody: Slack control characters are entity-escaped, and
Discord gets `allowed_mentions: {parse: []}`. HTTP classification and the SSRF guard are those
of webhooks (`senders.http.post`).
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from typing import Any
from urllib.parse import urlsplit

import msgspec

from defiwatch.notify.message import ChannelKind, ChatFlavour, ChatTarget, Notification
from defiwatch.notify.render import Summary, iso_utc, summarize
from defiwatch.notify.senders.base import SendResult
from defiwatch.notify.senders.http import HttpClient, post

__all__ = [
    "ChatSender",
    "discord_message",
    "escape_discord",
    "escape_slack",
    "flavour_for",
    "slack_message",
]

_DISCORD_HOSTS = ("discord.com", "discordapp.com", "ptb.discord.com", "canary.discord.com")
_DISCORD_MD = re.compile(r"([\\*_~`|>#\[\]])")  # markdown that changes how text renders
_SLACK_FIELDS = 10  # Block Kit: at most 10 fields per section
_SLACK_TEXT = 3000  # Block Kit: characters per text object
_DISCORD_FIELDS = 25


def flavour_for(url: str, platform: str | None = None) -> ChatFlavour:
    """The message format for a chat URL: an explicit `platform` wins (discord, or any
    Slack-compatible one), else Discord's hosts get Discord's, everyone else Slack's."""
    if platform == "discord":
        return ChatFlavour.DISCORD
    if platform is not None and platform != "generic":
        return ChatFlavour.SLACK
    host = (urlsplit(url).hostname or "").lower()
    if host in _DISCORD_HOSTS and "/api/webhooks/" in urlsplit(url).path:
        return ChatFlavour.DISCORD
    return ChatFlavour.SLACK


def escape_slack(text: str) -> str:
    """Slack's three control characters (api.slack.com, "Escaping text")."""
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def escape_discord(text: str) -> str:
    """Markdown metacharacters backslash-escaped (mentions are disabled separately)."""
    return _DISCORD_MD.sub(r"\\\1", text)


def _clip(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


def slack_message(notification: Notification, summary: Summary | None = None) -> dict[str, Any]:
    """Slack incoming-webhook JSON: `text` (notification fallback) and `blocks`."""
    s = summary or summarize(notification)
    body = escape_slack(s.text)
    if s.lines:
        body += "\n" + "\n".join(f"• {escape_slack(line)}" for line in s.lines)
    blocks: list[dict[str, Any]] = [
        # Slack asks for &, <, > escaped in every text field, plain_text included.
        {"type": "header", "text": {"type": "plain_text", "text": _clip(escape_slack(s.title), 150),
                                    "emoji": False}},
        {"type": "section", "text": {"type": "mrkdwn", "text": _clip(body, _SLACK_TEXT)}},
    ]
    fields = [{"type": "mrkdwn", "text": _clip(f"*{escape_slack(k)}*\n{escape_slack(v)}", 2000)}
              for k, v in s.facts if k != "Time"][:_SLACK_FIELDS]
    if fields:
        blocks.append({"type": "section", "fields": fields})
    blocks.append({"type": "context", "elements": [
        {"type": "mrkdwn", "text": f"defiwatch · {s.when} · {escape_slack(notification.id)}"}]})
    return {"text": _clip(escape_slack(f"{s.title}: {s.text}"), _SLACK_TEXT), "blocks": blocks}


def discord_message(notification: Notification, summary: Summary | None = None) -> dict[str, Any]:
    """Discord webhook JSON: `content`, one embed, and no mentions."""
    s = summary or summarize(notification)
    description = escape_discord(s.text)
    if s.lines:
        description += "\n" + "\n".join(f"• {escape_discord(line)}" for line in s.lines)
    embed: dict[str, Any] = {
        "title": _clip(s.title, 256),
        "description": _clip(description, 4096),
        "color": int(s.color.lstrip("#"), 16),
        "fields": [{"name": _clip(k, 256), "value": _clip(escape_discord(v), 1024), "inline": True}
                   for k, v in s.facts if k != "Time"][:_DISCORD_FIELDS],
        "timestamp": iso_utc(s.timestamp),
        "footer": {"text": f"defiwatch · {notification.id}"},
    }
    return {"content": _clip(escape_discord(s.title), 2000), "embeds": [embed],
            "allowed_mentions": {"parse": []}}


class ChatSender:
    """Posts to Slack-compatible and Discord incoming webhooks.

    Args:
        client: the shared guarded client.
        timeout_s: deadline of one attempt, seconds.
        clock: epoch seconds (Retry-After dates).
    """

    def __init__(self, client: HttpClient, *, timeout_s: float = 10.0,
                 clock: Callable[[], float] = time.time) -> None:
        self._client = client
        self._timeout_s = timeout_s
        self._clock = clock

    @property
    def channel(self) -> ChannelKind:
        return ChannelKind.CHAT

    async def send(self, notification: Notification) -> SendResult:
        target = notification.target
        if not isinstance(target, ChatTarget):
            raise TypeError(f"ChatSender cannot send to a {target.channel} target")
        flavour = target.flavour or flavour_for(target.url)
        doc = (discord_message(notification) if flavour is ChatFlavour.DISCORD
               else slack_message(notification))
        return await post(self._client, target.url, content=msgspec.json.encode(doc),
                          headers={"content-type": "application/json"},
                          timeout_s=self._timeout_s, clock=self._clock)
