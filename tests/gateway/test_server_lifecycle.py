"""Shutdown (1012), a rolling restart of two gateways on Redis that loses no event, and TLS."""

from __future__ import annotations

import asyncio
import datetime
import ipaddress
import os
import ssl
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import REGISTRY
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

from defiwatch.config import Settings
from defiwatch.gateway import Gateway
from gateway.rig import BASE, WAIT, Rig, open_rig, synthetic


def closes(code: int) -> float:
    return REGISTRY.get_sample_value("defiwatch_gateway_closes_total", {"code": str(code)}) or 0.0


async def test_graceful_shutdown_closes_with_1012(rig: Rig) -> None:
    key, _ = await rig.key()
    client = await rig.connect(key)
    await client.subscribe("tvl_changes")
    authenticating = await rig.connect(None, how="none", welcome=False)
    before = closes(1012)
    await rig.gateway.stop()
    assert await client.close_code() == 1012
    assert await authenticating.close_code() == 1012
    assert rig.gateway.connection_count == 0 and rig.gateway.hub.subscription_count == 0
    assert closes(1012) - before == 2
    with pytest.raises(OSError):
        await connect(rig.gateway.url, open_timeout=WAIT)


class Follower:
    """A client as a real one would be written: follows `tvl_changes`, and on 1012 reconnects
    to whichever gateway is up, resuming with `since` and the stream epoch."""

    def __init__(self, rig: Rig, key: str, gateways: list[Gateway]) -> None:
        self.rig, self.key, self.gateways = rig, key, gateways
        self.offsets: list[int] = []
        self.acks: list[dict[str, Any]] = []
        self.reconnects = 0
        self.progress = asyncio.Event()  # set on every event frame

    async def run(self, since: int) -> None:
        epoch: str | None = None
        while True:
            gateway = next(g for g in self.gateways if not g._stopping)
            try:
                client = await self.rig.connect(self.key, gateway=gateway)
            except OSError:
                continue  # that gateway went away between the check and the connect
            epoch = epoch or client.welcome["stream"]["epoch"]
            assert client.welcome["stream"]["epoch"] == epoch  # one Redis stream behind both
            last = self.offsets[-1] if self.offsets else since
            try:
                ack = await client.request({"type": "subscribe", "channel": "tvl_changes",
                                            "since": last, "epoch": epoch})
                self.acks.append(ack)
                while True:
                    frame = await client.recv(timeout=60)
                    if frame["type"] == "event":
                        self.offsets.append(frame["offset"])
                        self.progress.set()
            except ConnectionClosed as exc:
                assert exc.rcvd is not None and exc.rcvd.code == 1012, exc
                self.reconnects += 1

    async def wait_for(self, offset: int) -> None:
        async with asyncio.timeout(WAIT):
            while not self.offsets or self.offsets[-1] < offset:
                self.progress.clear()
                await self.progress.wait()


async def test_rolling_restart_of_two_gateways_loses_no_event(
    tmp_path: os.PathLike[str], redis_url: str, redis_prefix: str
) -> None:
    """Two gateways read one Redis stream. A client on A; A restarts (the client moves to B),
    then B restarts (the client moves to the new A), while events keep being published. The
    client receives every event exactly once, in order."""
    settings = Settings(database_url=f"sqlite+aiosqlite:///{tmp_path}/defiwatch.db",
                        redis_url=redis_url, redis_prefix=redis_prefix, state_dir=tmp_path, **BASE)
    async with open_rig(settings, gateway=False) as rig:
        stream = rig.platform.stream
        key, _ = await rig.key()
        gateway_a = await rig.start_gateway()
        gateway_b = await rig.start_gateway()
        gateways = [gateway_a, gateway_b]
        follower = Follower(rig, key, gateways)
        task = asyncio.create_task(follower.run(since=await stream.last_offset()))
        n = 0

        async def publish(count: int) -> int:
            nonlocal n
            last = 0
            for _ in range(count):
                n += 1
                last = (await stream.publish([synthetic(n, subject=f"s{n % 7}")]))[0].offset
            return last

        try:
            await follower.wait_for(await publish(20))
            # Restart A while publishing: the events published during the handover are
            # recovered from B with `since`.
            stopping = asyncio.create_task(gateway_a.stop())
            await publish(30)
            await stopping
            gateways.append(await rig.start_gateway())  # the new A
            await follower.wait_for(await publish(10))
            stopping = asyncio.create_task(gateway_b.stop())
            await publish(30)
            await stopping
            await follower.wait_for(await publish(10))
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        assert follower.reconnects == 2
        assert follower.offsets == list(range(1, n + 1))
        assert [a["recovered"] for a in follower.acks] == [True, True, True]


def self_signed(directory: Path) -> tuple[str, str]:
    """A self-signed certificate for 127.0.0.1 and localhost, and its key, as PEM files."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "defiwatch test")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder().subject_name(name).issuer_name(name)
        .public_key(key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([
            x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = directory / "cert.pem", directory / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                           serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return str(cert_path), str(key_path)


async def test_tls_1_3_with_a_self_signed_certificate(tmp_path: Path) -> None:
    cert, key_file = self_signed(tmp_path)
    settings = Settings(database_url=f"sqlite+aiosqlite:///{tmp_path}/defiwatch.db",
                        state_dir=tmp_path, gateway_tls_cert=cert, gateway_tls_key=key_file,
                        **BASE)
    async with open_rig(settings) as rig:
        assert rig.gateway.url.startswith("wss://127.0.0.1:")
        key, _ = await rig.key()
        trusted = ssl.create_default_context(cafile=cert)
        client = await rig.connect(key, ssl=trusted)
        assert client.ws.transport.get_extra_info("ssl_object").version() == "TLSv1.3"
        await client.subscribe("protocol:aave")
        await rig.platform.stream.publish([synthetic(1)])
        assert (await client.event())["data"]["subject"] == "aave"

        old = ssl.create_default_context(cafile=cert)
        old.maximum_version = ssl.TLSVersion.TLSv1_2
        with pytest.raises(OSError):  # refused in the TLS handshake (SSLError or a reset)
            await connect(rig.gateway.url, ssl=old, open_timeout=WAIT)
        with pytest.raises(ssl.SSLCertVerificationError):  # an untrusted certificate
            await connect(rig.gateway.url, ssl=ssl.create_default_context(), open_timeout=WAIT)


def test_tls_needs_both_files(tmp_path: Path) -> None:
    from defiwatch.errors import ConfigError

    settings = Settings(database_url="sqlite+aiosqlite:///x.db", gateway_tls_cert=tmp_path / "c")
    with pytest.raises(ConfigError) as info:
        Gateway(settings=settings, engine=None, stream=None, cache=None)  # type: ignore[arg-type]
    assert info.value.field == "gateway_tls_key"
