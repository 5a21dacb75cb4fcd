"""KV events on a secured NATS (issue 17): a node publishes only its own, routers read
every node's and may ask any node for a snapshot; a node hears only its own requests."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from pathlib import Path

import nats
import pytest
import pytest_asyncio
from nats.aio.client import Client as NATS
from tierflow.cli.auth_files import AuthStore
from tierflow.contracts import subjects
from tierflow.runtime import nats_auth
from tierflow.runtime.nats_server import NatsServerConfig, NatsServerProcess, free_port

VIOLATION = "permissions violation"


class Conn:
    def __init__(self, nc: NATS, errors: list[str]) -> None:
        self.nc, self.errors = nc, errors

    async def violations(self) -> list[str]:
        await self.nc.flush(timeout=5)
        await asyncio.sleep(0.1)
        return [e for e in self.errors if VIOLATION in e.lower()]


@pytest_asyncio.fixture(loop_scope="session", scope="module")
async def server(
    tmp_path_factory: pytest.TempPathFactory,
) -> AsyncIterator[tuple[str, Path, list[NATS]]]:
    root = tmp_path_factory.mktemp("kv-nats")
    store = AuthStore(root / "auth")
    store.ensure(nats_auth.fabric_identities(("r1",), ("n1", "n2")))
    config = NatsServerConfig(store_dir=root / "store", port=free_port(), monitor_port=free_port(), name="tierflow-kv-secured",
                              extra_config=store.server_config)  # fmt: skip
    clients: list[NATS] = []
    async with NatsServerProcess(config, root / "nats-server.log") as process:
        yield process.url, store.directory, clients
        for nc in clients:
            with contextlib.suppress(Exception):
                await nc.close()


async def connect(server: tuple[str, Path, list[NATS]], name: str) -> Conn:
    url, directory, clients = server
    errors: list[str] = []

    async def on_error(exc: Exception) -> None:
        errors.append(str(exc))

    creds = nats_auth.read_creds(directory / f"{name}.creds")
    nc = await nats.connect(
        url,
        error_cb=on_error,
        allow_reconnect=False,
        max_reconnect_attempts=0,
        **nats_auth.connect_options(creds),
    )
    clients.append(nc)
    return Conn(nc, errors)


async def test_kv_events_flow_node_to_router_and_snapshot_requests_back(
    server: tuple[str, Path, list[NATS]],
) -> None:
    router, node, other = (
        await connect(server, "router-r1"),
        await connect(server, "node-n1"),
        await connect(server, "node-n2"),
    )
    events = await router.nc.subscribe(subjects.NODE_KV_EVENTS)
    syncs = await node.nc.subscribe(subjects.node_kv_sync("n1"))
    await router.nc.flush()
    await node.nc.flush()
    await node.nc.publish(subjects.node_kv_events("n1"), b"mine")
    await router.nc.publish(subjects.node_kv_sync("n1"), b"{}")
    assert (await events.next_msg(timeout=2)).subject == subjects.node_kv_events("n1")
    assert (await syncs.next_msg(timeout=2)).subject == subjects.node_kv_sync("n1")
    assert await router.violations() == [] and await node.violations() == []

    await other.nc.publish(
        subjects.node_kv_events("n1"), b"forged"
    )  # n2 speaking for n1
    await other.nc.subscribe(subjects.node_kv_sync("n1"))  # nor hear n1's requests
    denied = await other.violations()
    assert any(subjects.node_kv_events("n1") in e for e in denied) and any(
        subjects.node_kv_sync("n1") in e for e in denied
    )
    await node.nc.publish(
        subjects.node_kv_sync("n2"), b"{}"
    )  # a node asks nobody for snapshots
    assert any(subjects.node_kv_sync("n2") in e for e in await node.violations())
    with pytest.raises(nats.errors.TimeoutError):
        await events.next_msg(timeout=0.3)
