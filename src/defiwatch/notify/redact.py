"""What of a target may appear in logs and errors: no credentials, no tokens.

Webhook URLs keep their path (it helps to tell endpoints apart) but lose userinfo, query and
fragment. Chat and push URLs keep only their origin: Slack (`/services/T/B/secret`), Discord
(`/api/webhooks/id/token`) and push services (`/fcm/send/token`) carry the credential in the path.
Email addresses keep their first letter and domain.
"""

from __future__ import annotations

from urllib.parse import urlsplit, urlunsplit

from defiwatch.notify.message import ChatTarget, EmailTarget, PushTarget, Target

__all__ = ["redact_address", "redact_target", "redact_url"]


def redact_url(url: str, *, keep_path: bool = True) -> str:
    """`url` without userinfo, query and fragment (each replaced by a marker), and without the
    path unless `keep_path`. Never raises: an unparseable URL becomes `<invalid url>`."""
    try:
        parts = urlsplit(url)
        host = parts.hostname or ""
        port = parts.port
    except ValueError:
        return "<invalid url>"
    if ":" in host:
        host = f"[{host}]"
    netloc = ("***@" if "@" in parts.netloc else "") + host + (f":{port}" if port else "")
    path = parts.path if keep_path else ("/…" if parts.path not in ("", "/") else parts.path)
    query = "…" if parts.query else ""
    return urlunsplit((parts.scheme, netloc, path, query, ""))


def redact_address(address: str) -> str:
    local, at, domain = address.rpartition("@")
    if not at:
        return "***"
    return f"{local[:1]}***@{domain}"


def redact_target(target: Target) -> str:
    """A target as logs may show it."""
    if isinstance(target, EmailTarget):
        return redact_address(target.address)
    if isinstance(target, PushTarget):
        return redact_url(target.endpoint, keep_path=False)
    if isinstance(target, ChatTarget):
        return redact_url(target.url, keep_path=False)
    return redact_url(target.url)
