#!/usr/bin/env python
"""Peer for bench/ws_fanout.py: a plain python-socketio server (ASGI on uvicorn) doing the same
fan-out as the gateway: clients `emit("subscribe", [channels])` (acked) and join one room per
channel; an in-process publisher emits each event to the rooms of its channels as
`emit("event", {"channel", "offset", "data"}, room=channel)`. No auth, no recovery, no filters.

Control on stdin, one JSON line per answer on stdout (same as `ws_fanout.py _serve-ours`):
`rate R` (events/s), `stats`, `stop`. Prints `{"ready": true, "url": ...}` first.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import resource
import socket
import sys
import time

import socketio
import uvicorn


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--events", required=True)
    args = p.parse_args()
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    with open(args.events) as f:
        events = [json.loads(line) for line in f]
    asyncio.run(serve(events))


async def serve(events: list[dict]) -> None:
    sio = socketio.AsyncServer(async_mode="asgi", cors_allowed_origins="*", logger=False,
                               engineio_logger=False, ping_interval=20, ping_timeout=20)

    @sio.on("subscribe")
    async def subscribe(sid: str, channels: list[str]) -> list[str]:
        for ch in channels:
            await sio.enter_room(sid, ch)
        return channels

    app = socketio.ASGIApp(sio)
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    sock.listen(4096)
    port = sock.getsockname()[1]
    config = uvicorn.Config(app, log_level="error", access_log=False, lifespan="off",
                            backlog=4096, ws_ping_interval=None, timeout_keep_alive=30)
    server = uvicorn.Server(config)
    server_task = asyncio.create_task(server.serve(sockets=[sock]))
    state = {"rate": 0.0, "published": 0}

    async def publisher() -> None:
        i, offset, t0, sent = 0, 0, time.monotonic(), 0.0
        while True:
            await asyncio.sleep(0.01)
            now = time.monotonic()
            if state["rate"] <= 0:
                t0, sent = now, 0.0
                continue
            due = int(state["rate"] * (now - t0) - sent)
            stamp = time.time()
            for _ in range(max(0, due)):
                e = events[i]
                i = (i + 1) % len(events)
                offset += 1
                data = dict(e["event"], emitted_at=stamp, offset=offset)
                for ch in e["channels"]:
                    await sio.emit("event", {"channel": ch, "offset": offset, "data": data},
                                   room=ch)
            if due > 0:
                sent += due
                state["published"] += due

    pub = asyncio.create_task(publisher())
    while not server.started:  # noqa: ASYNC110 (uvicorn offers no event for it)
        await asyncio.sleep(0.05)
    print(json.dumps({"ready": True, "url": f"ws://127.0.0.1:{port}/socket.io/?EIO=4&transport=websocket"}),
          flush=True)
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    try:
        while True:
            line = (await reader.readline()).decode().strip()
            if not line or line == "stop":
                break
            cmd, *rest = line.split()
            if cmd == "rate":
                state["rate"] = float(rest[0])
            print(json.dumps({"ok": cmd, "published": state["published"]}), flush=True)
    finally:
        pub.cancel()
        server.should_exit = True
        server.force_exit = True
        await asyncio.wait([server_task], timeout=10)


if __name__ == "__main__":
    main()
