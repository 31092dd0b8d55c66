"""The `defiwatch` command line: run roles, migrate, manage keys, replay and import data."""

from __future__ import annotations

import asyncio
import contextlib
import csv
import errno
import io
import json
import shlex
import shutil
import signal
import socket
import sys
from collections.abc import Callable, Coroutine, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

import click
import structlog
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table

from defiwatch import __version__
from defiwatch.config import ROLES, Settings, load_settings
from defiwatch.errors import ConfigError, DefiwatchError
from defiwatch.ops import configure_logging

__all__ = ["main"]

T = TypeVar("T")
log = structlog.get_logger(__name__)
console = Console(stderr=True)
out = Console()


def _fail(exc: DefiwatchError) -> None:
    """One plain line on stderr (no wrapping, no markup): scripts and people both read it."""
    click.echo(f"defiwatch: {exc.message}", err=True)


def _settings(**overrides: Any) -> Settings:
    settings = load_settings(**{k: v for k, v in overrides.items() if v is not None})
    configure_logging(settings.log_format, settings.log_level)
    return settings


def _run(coro: Coroutine[Any, Any, T]) -> T:
    try:
        return asyncio.run(coro)
    except DefiwatchError as exc:
        _fail(exc)
        sys.exit(2)


def _progress() -> Progress:
    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                    TimeRemainingColumn(), console=console, transient=False)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="defiwatch")
def cli() -> None:
    """defiwatch: real-time DeFi TVL and price events.

    Settings come from DEFIWATCH_* environment variables or ./defiwatch.toml. With none set,
    everything runs embedded: SQLite under ./var/, in-process stream and cache.

    \b
    Start here:  defiwatch run          (API on :8000, processor, replay of bundled real data)
    Then:        curl -H "Authorization: Bearer $KEY" localhost:8000/v1/events
    """


@cli.command()
@click.argument("roles", nargs=-1, type=click.Choice(["all", *ROLES]))
@click.option("--speed", type=float, help="Replay speed: data seconds per second (0 = max).")
@click.option("--port", type=int, help="API port (default 8000).")
def run(roles: tuple[str, ...], speed: float | None, port: int | None) -> None:
    """Run roles in this process (default: all enabled roles).

    \b
    api        HTTP API (docs at /docs, metrics at /metrics)
    processor  change_log -> events (stream) and latest values (hot cache)
    gateway    WebSocket streaming on /v1/realtime (docs/protocol.md), Socket.IO on 8002
    alerts     evaluates users' alert rules against every event (docs/alerts.md)
    replay     bundled real DefiLlama/CoinGecko data, paced by --speed
    poller     live DefiLlama polling (needs internet; DEFIWATCH_POLLER_ENABLED=true)
    """
    settings = _settings(replay_speed=speed, api_port=port)
    chosen = _roles(settings, roles)
    _check_ports(settings, chosen)
    _run(_run_platform(settings, chosen))


def _roles(settings: Settings, roles: tuple[str, ...]) -> list[str]:
    if roles and "all" not in roles:
        return list(roles)
    chosen = ["api", "processor", "gateway", "alerts", "notifier"]
    if settings.replay_enabled:
        chosen.append("replay")
    if settings.poller_enabled:
        chosen.append("poller")
    return chosen


def _listen_addresses(settings: Settings, roles: list[str]) -> list[tuple[str, int, str]]:
    """(host, port, how to change it) of every socket these roles serve clients on. Not the
    ops listener's: without its port a process runs on, with a warning (ops/listener.py)."""
    s = settings
    addresses: list[tuple[str, int, str]] = []
    if "api" in roles:
        addresses.append((s.api_host, s.api_port, "DEFIWATCH_API_PORT or --port"))
    if "gateway" in roles:
        addresses += [(s.gateway_host, s.gateway_port, "DEFIWATCH_GATEWAY_PORT"),
                      (s.gateway_host, s.socketio_port, "DEFIWATCH_SOCKETIO_PORT")]
    return addresses


def _check_ports(settings: Settings, roles: list[str]) -> None:
    """Stop with one line naming the setting when a port the roles need cannot be bound, before
    the banner announces them as up (instead of a server's traceback after it).

    Binds the way the servers do (SO_REUSEADDR, so a port in TIME_WAIT passes) and lets go at
    once; another process may still take a port in between, which the server then reports.

    Raises:
        ConfigError: a port is in use or may not be listened on.
    """
    for host, port, setting in _listen_addresses(settings, roles):
        if port == 0:
            continue  # an ephemeral port: always available
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        try:
            socket.create_server((host, port), family=family).close()
        except OSError as exc:
            why = ("is in use" if exc.errno == errno.EADDRINUSE
                   else f"cannot be listened on at {host} ({exc.strerror or exc})")
            raise ConfigError(f"port {port} {why}: set {setting}") from exc


async def _run_platform(settings: Settings, roles: list[str]) -> None:
    from defiwatch.app import open_platform, run_roles

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    if not await _migrate_when_reachable(settings, stop):
        return
    async with open_platform(settings, migrate=False) as platform:
        key = await _demo_key(platform) if settings.demo_key and "api" in roles else None
        _banner(settings, roles, key)
        with _progress() as progress:
            on_progress = _replay_progress(progress, settings) if "replay" in roles else None
            await run_roles(platform, roles, stop, on_progress=on_progress)
    console.print("defiwatch stopped.")


async def _migrate_when_reachable(settings: Settings, stop: asyncio.Event) -> bool:
    """Migrate the database, waiting with `Backoff` (0.5 s doubling to 30 s) while it cannot be
    reached: a database started after defiwatch, or restarting, is waited for, not a reason to
    exit. Returns False when `stop` was set first."""
    from defiwatch.ops.supervisor import Backoff, wait_or_stop
    from defiwatch.store import upgrade
    from defiwatch.store.db import database_unreachable

    delay: float | None = None
    while True:
        try:
            await upgrade(settings.database_url)
            return True
        except Exception as exc:  # classified below: only an unreachable database is waited for
            if not database_unreachable(exc):
                raise
            delay = Backoff().delay(delay)
            log.warning("database.unreachable", error=str(exc), error_type=type(exc).__name__,
                        retry_in_s=delay)
        if await wait_or_stop(stop, delay):
            return False


def _replay_progress(progress: Progress, settings: Settings) -> Callable[[int, int], None]:
    """Two bars for `run`'s replay: the backfill (records before the backfill date, at full
    speed), then the paced streaming of the rest."""
    from defiwatch.ingest.replay import backfill_end, count_records

    start, end = settings.replay_window
    until = backfill_end(start, end, setting=settings.replay_backfill_ts)
    backfill = count_records(start_ts=start, end_ts=until) if until is not None else 0
    speed = settings.replay_speed
    loading = progress.add_task("backfill", total=backfill)
    streaming = progress.add_task(f"streaming at {speed:g}x" if speed else "loading", total=None)

    def on_progress(done: int, total: int) -> None:
        progress.update(loading, completed=min(done, backfill))
        progress.update(streaming, completed=max(done - backfill, 0), total=total - backfill)

    return on_progress


async def _demo_key(platform: Any) -> str:
    """A demo key, created once and kept in state_dir so every `make run` can print it."""
    from defiwatch.store.keys import authenticate, create_key

    path = Path(platform.settings.state_dir) / "demo-key"
    async with platform.engine.begin() as conn:
        if path.exists():
            key = path.read_text().strip()
            if await authenticate(conn, key) is not None:
                return key
        key, _info = await create_key(conn, user="demo", tier="pro",
                                      scopes=["read", "ingest", "alerts"], name="demo",
                                      tiers=list(platform.settings.tiers))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(key + "\n")
    path.chmod(0o600)
    return key


def _banner(settings: Settings, roles: list[str], key: str | None) -> None:
    base = f"http://{settings.api_host}:{settings.api_port}"
    backend = "PostgreSQL" if settings.is_postgres else "SQLite"
    stream = "Redis" if settings.redis_dsn else "in-process"
    lines = [
        f"[bold]defiwatch {__version__}[/bold]  roles: {', '.join(roles)}  "
        f"database: {backend}  stream/cache: {stream}",
    ]
    if "api" in roles:
        lines += [
            f"  API        {base}      (OpenAPI docs: {base}/docs, metrics: {base}/metrics)",
            f"  events     curl -H 'Authorization: Bearer {key or '<key>'}' '{base}/v1/events?limit=5'",
            f"  latest     curl -H 'Authorization: Bearer {key or '<key>'}' "
            f"'{base}/v1/latest?metric=price'",
        ]
        if key:
            lines.append(f"  demo key   {key}   (kept in {settings.state_dir}/demo-key)")
    if "gateway" in roles:
        scheme = "wss" if settings.gateway_tls_cert else "ws"
        ws = f"{scheme}://{settings.gateway_host}:{settings.gateway_port}/v1/realtime"
        lines += [
            f"  realtime   {ws}   (protocol: docs/protocol.md)",
            f"  follow     {_self_command()} tail tvl_changes price_changes token:ethereum",
        ]
    if "replay" in roles:
        lines.append(f"  replay     {_replay_summary(settings)}")
    lines.append("  stop       Ctrl-C")
    for line in lines:
        console.print(line, highlight=False, soft_wrap=True)


def _replay_summary(settings: Settings) -> str:
    """What `run` replays, e.g. `bundled real data 2020-01-01 to 2025-12-19: up to 2025-11-19
    at full speed, then one day of data per second (86400x)`."""
    from defiwatch.ingest.replay import backfill_end, newest_ts

    start, end = settings.replay_window
    newest = newest_ts(start, end)
    if newest is None:
        return "bundled real data: nothing in the window (DEFIWATCH_REPLAY_FROM / _UNTIL)"
    until = backfill_end(start, end, setting=settings.replay_backfill_ts)
    speed = settings.replay_speed
    pace = ("one day of data per second (86400x)" if speed == 86_400
            else f"{speed:g} data seconds per second")
    text = f"bundled real data {_day(start) if start else 'from the start'} to {_day(newest)}: "
    if speed == 0:
        return text + "all at full speed"
    if until is None or until <= (start or 0):
        return text + f"paced at {pace}"
    if until > newest:
        return text + "all at full speed (backfill covers the window)"
    return text + f"up to {_day(until)} at full speed, then {pace}"


def _day(ts: int) -> str:
    return datetime.fromtimestamp(ts, UTC).date().isoformat()


def _self_command() -> str:
    """How the user's shell runs this same `defiwatch`: plain `defiwatch` when that is on PATH
    and is this installation, else the venv's script (relative to the working directory when
    under it, as `make run` from the repository gives `.venv/bin/defiwatch`), else
    `python -m defiwatch` with this interpreter."""
    script = Path(sys.executable).parent / "defiwatch"
    found = shutil.which("defiwatch")
    if found is not None and script.exists() and Path(found).resolve() == script.resolve():
        return "defiwatch"
    if not script.exists():
        return f"{shlex.quote(sys.executable)} -m defiwatch"
    with contextlib.suppress(ValueError):
        return shlex.quote(str(script.absolute().relative_to(Path.cwd())))
    return shlex.quote(str(script))


@cli.command()
@click.argument("channels", nargs=-1, required=True)
@click.option("--url", "urls", multiple=True,
              help="Gateway endpoint(s), tried in turn (default: this machine's gateway).")
@click.option("--key", envvar="DEFIWATCH_API_KEY",
              help="API key (default: $DEFIWATCH_API_KEY, else the demo key in var/).")
@click.option("--since", type=int, help="Start after this stream offset (replays what is retained).")
@click.option("--max-rate-ms", type=int, help="At most one frame per series per interval.")
@click.option("--json", "as_json", is_flag=True, help="Print each message as one JSON line.")
def tail(channels: tuple[str, ...], urls: tuple[str, ...], key: str | None, since: int | None,
         max_rate_ms: int | None, as_json: bool) -> None:
    """Follow channels live, e.g. `defiwatch tail protocol:aave token:ethereum tvl_changes`.

    Reconnects by itself and resumes from the last offset it printed.
    """
    from defiwatch.client import RealtimeClient, Subscription

    settings = _settings()
    scheme = "wss" if settings.gateway_tls_cert else "ws"
    endpoints = list(urls) or [f"{scheme}://{settings.gateway_host}:{settings.gateway_port}/v1/realtime"]
    demo = Path(settings.state_dir) / "demo-key"
    api_key = key or (demo.read_text().strip() if demo.exists() else None)
    if not api_key:
        raise click.UsageError("no API key: pass --key or set DEFIWATCH_API_KEY")
    subs = [Subscription(c, max_rate_ms=max_rate_ms) for c in channels]

    async def go() -> None:
        async with RealtimeClient(endpoints, api_key, subs, since=since) as client:
            async for message in client:
                out.print(_render(message, as_json), highlight=False, soft_wrap=True, markup=False)

    with contextlib.suppress(KeyboardInterrupt):
        _run(go())


def _render(message: Any, as_json: bool) -> str:
    if as_json:
        return json.dumps({"type": message.type, "channel": message.channel,
                           "offset": message.offset, "data": message.data})
    if message.type == "gap":
        return f"-- gap on {message.channel}: missed events were trimmed; current values follow"
    if message.type == "latest":
        count = len(message.data) if isinstance(message.data, list) else 0
        return f"-- latest on {message.channel}: {count} current values (use --json to see them)"
    e = message.data
    change = e.get("change_pct")
    pct = f"{change:+.2f}%" if isinstance(change, int | float) else ""
    return (f"{message.offset:>9} {message.channel:<28} {e.get('type', ''):<15} "
            f"{e.get('subject', '')}/{e.get('chain', '')} {e.get('value')} {pct}")


@cli.group()
def db() -> None:
    """Database schema."""


@db.command("upgrade")
@click.option("--revision", default="heads", show_default=True)
def db_upgrade(revision: str) -> None:
    """Apply migrations (`run` does this on start too)."""
    from defiwatch.store import upgrade

    settings = _settings()
    _run(upgrade(settings.database_url, revision))
    console.print(f"database at {revision}")


@cli.group()
def keys() -> None:
    """API keys: create, list, revoke. Keys are shown once and stored hashed."""


@keys.command("create")
@click.option("--user", required=True, help="User name (created if new).")
@click.option("--tier", default="free", show_default=True, help="free, pro or enterprise.")
@click.option("--scopes", default="read", show_default=True,
              help="Comma-separated: read, ingest, alerts, admin.")
@click.option("--name", default="default", show_default=True, help="A label for the key.")
def keys_create(user: str, tier: str, scopes: str, name: str) -> None:
    """Create a key and print it (the only time it is shown)."""
    from defiwatch.store.keys import create_key

    settings = _settings()

    async def go() -> tuple[str, Any]:
        async with _engine(settings) as engine, engine.begin() as conn:
            return await create_key(conn, user=user, tier=tier, name=name, tiers=list(settings.tiers),
                                    scopes=[s.strip() for s in scopes.split(",") if s.strip()])

    key, info = _run(go())
    out.print(key, highlight=False)
    console.print(f"created key {info.prefix} for {info.user} (tier {info.tier}, scopes "
                  f"{', '.join(info.scopes)}). Store it now: it is not shown again.")


@keys.command("list")
@click.option("--user", help="Only this user's keys.")
def keys_list(user: str | None) -> None:
    """List keys (prefixes only, never secrets)."""
    from defiwatch.store.keys import list_keys

    settings = _settings()

    async def go() -> list[Any]:
        async with _engine(settings) as engine, engine.connect() as conn:
            return await list_keys(conn, user=user)

    table = Table("prefix", "user", "tier", "scopes", "name", "status")
    for k in _run(go()):
        table.add_row(k.prefix, k.user, k.tier, ",".join(k.scopes), k.name,
                      "revoked" if k.revoked_at else "active")
    out.print(table)


@keys.command("revoke")
@click.argument("prefix")
def keys_revoke(prefix: str) -> None:
    """Revoke a key by its prefix (as `keys list` shows) or the whole key."""
    from defiwatch.store.keys import revoke_key

    settings = _settings()

    async def go() -> None:
        async with _engine(settings) as engine, engine.begin() as conn:
            await revoke_key(conn, prefix)

    _run(go())
    console.print(f"revoked {prefix}")


class _engine:
    """Migrated engine for one CLI command, disposed afterwards."""

    def __init__(self, settings: Settings) -> None:
        self._settings = settings

    async def __aenter__(self) -> Any:
        from defiwatch.store import create_engine, upgrade

        await upgrade(self._settings.database_url)
        self._engine = create_engine(self._settings.database_url, pool_size=2)
        return self._engine

    async def __aexit__(self, *exc: object) -> None:
        await self._engine.dispose()


@cli.command("replay")
@click.option("--speed", type=float, default=0.0, show_default=True,
              help="Data seconds per second; 86400 = a day per second; 0 = as fast as possible.")
@click.option("--sources", help="Comma-separated source files from the manifest (default: all).")
@click.option("--from", "start", help="Start date (YYYY-MM-DD, UTC).")
@click.option("--until", "end", help="End date (YYYY-MM-DD, UTC, exclusive).")
def replay_cmd(speed: float, sources: str | None, start: str | None, end: str | None) -> None:
    """Load the bundled real data into the database (a running processor turns it into events)."""
    from defiwatch.ingest.replay import replay
    from defiwatch.ingest.service import IngestService

    settings = _settings()

    async def go() -> Any:
        async with _engine(settings) as engine:
            with _progress() as progress:
                task = progress.add_task("replay", total=None)
                return await replay(
                    IngestService(engine), speed=speed,
                    sources=sources.split(",") if sources else None,
                    start_ts=_date(start), end_ts=_date(end),
                    on_progress=lambda done, total: progress.update(task, completed=done,
                                                                    total=total),
                )

    stats = _run(go())
    console.print(f"replayed: {stats}")


def _date(text: str | None) -> int | None:
    if text is None:
        return None
    try:
        return int(datetime.strptime(text, "%Y-%m-%d").replace(tzinfo=UTC).timestamp())
    except ValueError as exc:
        raise click.BadParameter(f"{text!r} is not a date like 2024-03-11") from exc


@cli.command("ingest-file")
@click.argument("path", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--source", default="file", show_default=True, help="Source name stored with points.")
@click.option("--batch", default=5000, show_default=True, help="Points per transaction.")
def ingest_file(path: Path, source: str, batch: int) -> None:
    """Import points from CSV (header: metric,subject,chain,ts,value) or JSON lines."""
    from defiwatch.ingest.service import IngestService

    settings = _settings()

    async def go() -> tuple[int, int, list[str]]:
        accepted = duplicates = 0
        problems: list[str] = []
        async with _engine(settings) as engine:
            service = IngestService(engine)
            size = await asyncio.to_thread(lambda: path.stat().st_size)
            with _progress() as progress, path.open("rb") as raw:
                task = progress.add_task(path.name, total=size)
                text = io.TextIOWrapper(raw, encoding="utf-8")
                for chunk, line0 in _chunks(_records(text, path.suffix), batch):
                    result = await service.ingest_points(chunk, source=source)
                    accepted += result.accepted
                    duplicates += len(result.duplicates)
                    problems += [f"record {line0 + r.index + 1}: {r.field}: {r.reason}"
                                 for r in result.rejected]
                    progress.update(task, completed=raw.tell())
        return accepted, duplicates, problems

    accepted, duplicates, problems = _run(go())
    console.print(f"{accepted} accepted, {duplicates} duplicates, {len(problems)} rejected")
    for line in problems[:20]:
        console.print(f"  {line}")
    if len(problems) > 20:
        console.print(f"  ... and {len(problems) - 20} more")
    if problems:
        sys.exit(1)


def _records(text: io.TextIOWrapper, suffix: str) -> Iterator[dict[str, Any]]:
    if suffix.lower() == ".csv":
        for row in csv.DictReader(text):
            yield {k: _number(v) if k in ("ts", "value") else v for k, v in row.items()}
        return
    for line in text:
        if line.strip():
            try:
                yield json.loads(line)
            except json.JSONDecodeError:
                yield {"_invalid": line[:80]}


def _number(text: str | None) -> Any:
    try:
        return int(text) if text and text.strip().lstrip("-").isdigit() else float(text or "")
    except ValueError:
        return text


def _chunks(items: Iterator[dict[str, Any]], size: int) -> Iterator[tuple[list[dict[str, Any]], int]]:
    chunk: list[dict[str, Any]] = []
    start = 0
    for item in items:
        chunk.append(item)
        if len(chunk) == size:
            yield chunk, start
            start += size
            chunk = []
    if chunk:
        yield chunk, start


def main() -> None:
    try:
        cli(standalone_mode=True)
    except DefiwatchError as exc:
        _fail(exc)
        sys.exit(2)


