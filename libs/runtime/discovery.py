"""Service discovery over NATS: every process registers as a `nats.micro` service.

That gives `$SRV.PING|INFO|STATS` for free: `tierflow status` (and any NATS tool, e.g.
`nats micro ls`) lists what runs, where, and since when, with no registry of our own.
"""

from __future__ import annotations

import asyncio
import os
import socket
import time

import msgspec
from nats.aio.client import Client as NATS
from nats.micro import add_service
from nats.micro.service import Service

from tierflow import __version__
from tierflow.contracts import subjects

__all__ = ["register", "discover", "ServiceInfo"]


async def register(nc: NATS, service: str, instance: str, **metadata: str) -> Service:
    """Announce this process; the returned Service must be stopped on shutdown."""
    meta = {"instance": instance, "host": socket.gethostname(), "pid": str(os.getpid()), "started_at": f"{time.time():.3f}"}
    meta.update(metadata)
    return await add_service(
        nc,
        name=subjects.SERVICE_NAMES[service],
        version=__version__,
        description=f"tierflow {service}",
        metadata=meta,
    )


class ServiceInfo(msgspec.Struct):
    name: str
    id: str
    version: str
    metadata: dict[str, str] = {}


async def discover(nc: NATS, timeout: float = 0.5) -> list[ServiceInfo]:
    """Every service that answers `$SRV.INFO` within `timeout` (a scatter-gather request)."""
    inbox = nc.new_inbox()
    found: list[ServiceInfo] = []
    decoder = msgspec.json.Decoder(ServiceInfo)

    async def collect(msg: object) -> None:
        try:
            found.append(decoder.decode(msg.data))  # type: ignore[attr-defined]
        except msgspec.DecodeError:
            pass

    sub = await nc.subscribe(inbox, cb=collect)
    await nc.publish(subjects.SERVICE_INFO, b"", reply=inbox)
    await asyncio.sleep(timeout)
    await sub.unsubscribe()
    return sorted(found, key=lambda s: (s.name, s.metadata.get("instance", "")))
