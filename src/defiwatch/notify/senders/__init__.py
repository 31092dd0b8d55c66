"""One sender per channel, same file name per role: webhook, email, webpush, chat; base holds
the interface, http the HTTP side they share."""

from defiwatch.notify.senders.base import Closer, Outcome, Reason, Sender, SendResult

__all__ = ["Closer", "Outcome", "Reason", "SendResult", "Sender"]
