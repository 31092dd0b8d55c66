"""The real-time gateway: streams events to WebSocket clients (protocol v1, docs/protocol.md).

protocol.py parses and builds frames (sans I/O); hub.py routes events to subscriptions with the
encoded bytes shared; session.py is one connection's protocol state (transport-agnostic, for a
Socket.IO adapter too); server.py is the `websockets` server that moves the bytes, with
auth.py's cached, periodically re-checked API keys; socketio.py serves the original Socket.IO API
(python-socketio) on the same hub. gcpolicy.py is an opt-in, process-wide collector policy for a
process holding many connections (its entry point installs it).
"""

from defiwatch.gateway.hub import Hub, Subscriber, Subscription
from defiwatch.gateway.protocol import PATH, PROTOCOL_VERSION, Channel, CloseCode, ErrorCode
from defiwatch.gateway.server import Gateway
from defiwatch.gateway.session import Output, Session, authenticate_key
from defiwatch.gateway.socketio import SocketIOServer

__all__ = [
    "PATH",
    "PROTOCOL_VERSION",
    "Channel",
    "CloseCode",
    "ErrorCode",
    "Gateway",
    "Hub",
    "Output",
    "Session",
    "SocketIOServer",
    "Subscriber",
    "Subscription",
    "authenticate_key",
]
