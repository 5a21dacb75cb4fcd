"""A local 3-server JetStream cluster (what `tierflow up --nats-cluster 3` runs) survives
losing a member: an R3 KV bucket keeps its data and takes writes, and the member, started
again with the same name, store and ports, rejoins (`wait_cluster_ready` holds again)."""

from __future__ import annotations

import asyncio
import os
import signal
from pathlib import Path

import nats
import pytest
from nats.js.api import KeyValueConfig, StorageType

from tierflow.runtime.nats_server import (
    NatsServerConfig,
    NatsServerNotReady,
    NatsServerProcess,
    cluster_configs,
    cluster_url,
    meta_group,
    wait_cluster_ready,
)
from tierflow.runtime.service import nats_servers


@pytest.fixture
def cluster(nats_cluster: tuple[list[NatsServerConfig], list[NatsServerProcess]]) -> tuple[list[NatsServerConfig], list[NatsServerProcess]]:
    return nats_cluster


async def test_losing_a_member_keeps_r3_data_and_the_member_rejoins(cluster, tmp_path: Path) -> None:
    members, servers = cluster
    nc = await nats.connect(nats_servers(cluster_url(members)), max_reconnect_attempts=-1, reconnect_time_wait=0.1)
    try:
        js = nc.jetstream(timeout=10)
        kv = await js.create_key_value(KeyValueConfig(bucket="resilience", replicas=3, storage=StorageType.FILE))
        assert (await js.stream_info("KV_resilience")).config.num_replicas == 3
        await kv.put("fleet", b"v1")

        victim = next(i for i, m in enumerate(members) if nc.connected_url is None or m.port != nc.connected_url.port)
        os.kill(servers[victim].pid, signal.SIGKILL)  # type: ignore[arg-type]
        await asyncio.wait_for(servers[victim].wait(), 10)
        with pytest.raises(NatsServerNotReady):
            await wait_cluster_ready(members, 0.5)

        async with asyncio.timeout(30):  # two of three keep a quorum: writes go on (after any re-election)
            while True:
                try:
                    await kv.put("fleet", b"v2")
                    break
                except Exception:
                    await asyncio.sleep(0.2)
        assert (await kv.get("fleet")).value == b"v2"

        servers[victim] = NatsServerProcess(members[victim], tmp_path / f"{members[victim].name}.log")
        await servers[victim].start()
        await wait_cluster_ready(members, 30)
        assert (await meta_group(members[victim])).leader  # it knows the leader again
        assert (await kv.get("fleet")).value == b"v2"
    finally:
        await nc.close()


def test_a_member_config_routes_to_the_others_only(tmp_path: Path) -> None:
    members = cluster_configs(tmp_path, 3, port=5000, monitor_port=5100, cluster_port=5200)
    assert [(m.name, m.port, m.monitor_port, m.cluster.port if m.cluster else 0) for m in members] == [
        ("nats-0", 5000, 5100, 5200), ("nats-1", 5001, 5101, 5201), ("nats-2", 5002, 5102, 5202)]  # fmt: skip
    assert members[2].cluster is not None and members[2].cluster.routes == ("nats-route://127.0.0.1:5200", "nats-route://127.0.0.1:5201")
    assert cluster_url(members) == "nats://127.0.0.1:5000,nats://127.0.0.1:5001,nats://127.0.0.1:5002"
    with pytest.raises(ValueError, match="at least 2"):
        cluster_configs(tmp_path, 1)
