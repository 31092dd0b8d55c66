"""Loopback helpers shared by tests that start servers or child processes."""

from __future__ import annotations

import asyncio
import socket

import httpx


def free_port() -> int:
    """A port nothing listens on now (the OS picks it; a race with other binders is unlikely)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def wait_until_ready(url: str) -> None:
    """Poll a readiness URL until it answers 200; the caller bounds the wait with a timeout."""
    async with httpx.AsyncClient(timeout=2) as client:
        while True:
            try:
                if (await client.get(url)).status_code == 200:
                    return
            except httpx.TransportError:
                pass  # not listening yet
            await asyncio.sleep(0.1)
