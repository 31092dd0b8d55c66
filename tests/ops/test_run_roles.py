"""`run_roles` supervises: a role that cannot start is restarted with backoff while the other
roles go on, and the ops listener says which role is not ready until it is back."""

from __future__ import annotations

import asyncio
import socket
from pathlib import Path
from typing import Any

from structlog.testing import capture_logs

from defiwatch.app import open_platform, run_roles
from defiwatch.config import Settings
from loopback import free_port, readiness_until


async def test_a_role_that_fails_is_restarted_and_the_others_go_on(tmp_path: Path) -> None:
    with socket.socket() as blocker:
        blocker.bind(("127.0.0.1", 0))
        blocker.listen()
        down, up, roles, logs = await run_with_gateway_port_held(tmp_path, blocker)
    assert down["failing"] == ["gateway"]
    assert down["roles"]["processor"]["state"] == "ok"  # went on meanwhile
    assert "address already in use" in down["roles"]["gateway"]["error"].lower()
    assert up["roles"]["gateway"]["state"] == "ok"
    failed = [e for e in logs if e["event"] == "role.failed"]
    assert failed and all(e["role"] == "gateway" for e in failed)
    assert not roles.exception()


async def run_with_gateway_port_held(tmp_path: Path, blocker: socket.socket) -> tuple[
        dict[str, Any], dict[str, Any], asyncio.Task[None], list[dict[str, Any]]]:
    """Readiness while `blocker` holds the gateway's port, then after it lets go."""
    settings = Settings(database_url=f"sqlite+aiosqlite:///{tmp_path}/dw.db", state_dir=tmp_path,
                        replay_enabled=False, demo_key=False, processor_poll_s=0.2,
                        gateway_port=blocker.getsockname()[1], socketio_port=free_port(),
                        ops_port=free_port())
    url = f"http://127.0.0.1:{settings.ops_port}/readyz"
    stop = asyncio.Event()
    with capture_logs() as logs:
        async with open_platform(settings) as platform:
            roles = asyncio.create_task(run_roles(platform, ["processor", "gateway"], stop))
            try:
                down = await readiness_until(
                    url, lambda status, body: body["roles"]["gateway"]["state"] == "failed")
                blocker.close()  # the port is free again: the next restart binds it
                up = await readiness_until(url, lambda status, body: status == 200)
            finally:
                stop.set()
                await roles
    return down, up, roles, logs
