"""`tierflow apply | models list | deployments list | rollout | promote | rollback` run as a
user runs them (`python -m tierflow ...` subprocesses) against a registry on its own NATS."""

from __future__ import annotations

import asyncio
import json
import os
import pathlib
import sys
from collections.abc import AsyncIterator
from typing import NamedTuple

import grpc
import pytest_asyncio

from tierflow.runtime.nats_server import NatsServerConfig, NatsServerProcess, free_port
from tierflow.runtime.service import ServiceContext
from tierflow.services.model_registry.main import main
from tierflow.services.model_registry.settings import Settings
from tierflow.v1 import registry_pb2 as pb
from tierflow.v1 import registry_pb2_grpc as pb_grpc

FLEET = """
models:
  - name: chat
    default_version: v1
    versions:
      - {version: v1, catalog: llama-3.1-8b}
      - {version: v2, catalog: llama-3.1-8b}
bundles:
  - {name: stable, models: [{model: chat}]}
  - {name: canary, models: [{model: chat, version: v2}]}
deployments:
  - {name: stable, bundle: stable, replicas: 2, max_replicas: 4}
  - {name: canary, bundle: canary}
"""


class Run(NamedTuple):
    code: int
    out: str
    err: str


ADMIN_TOKEN = "cli-test-admin-token"


async def tierflow(*args: str, registry: str, admin_token: str = ADMIN_TOKEN) -> Run:
    env = {**os.environ, "TIERFLOW_REGISTRY": registry, "COLUMNS": "200", "NO_COLOR": "1", "TIERFLOW_ADMIN_TOKEN": admin_token}
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "tierflow", *args, env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    return Run(proc.returncode or 0, out.decode(), err.decode())


@pytest_asyncio.fixture(loop_scope="session")
async def registry_addr(tmp_path: pathlib.Path) -> AsyncIterator[str]:
    config = NatsServerConfig(store_dir=tmp_path / "store", port=free_port(), monitor_port=free_port(), name="registry-cli")
    async with NatsServerProcess(config, tmp_path / "nats.log") as server:
        port = free_port()
        ctx = ServiceContext(service="model-registry", instance="cli")
        task = asyncio.create_task(main(ctx, Settings(nats_url=server.url, grpc_port=port, admin_token=ADMIN_TOKEN)))
        for _ in range(250):
            if task.done():
                task.result()
            try:
                async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
                    await pb_grpc.ModelRegistryStub(ch).ListModels(pb.ListModelsRequest(), timeout=1)
                break
            except grpc.aio.AioRpcError:
                await asyncio.sleep(0.02)
        try:
            yield f"127.0.0.1:{port}"
        finally:
            ctx.stopping.set()
            await task


async def test_apply_prints_a_dry_run_then_the_diff_it_makes(registry_addr: str, tmp_path: pathlib.Path) -> None:
    fleet = tmp_path / "fleet.yaml"
    fleet.write_text(FLEET)
    dry = await tierflow("apply", "-f", str(fleet), "--dry-run", registry=registry_addr)
    assert dry.code == 0, dry
    assert "+ model chat" in dry.out and "+ deployment canary" in dry.out
    assert "dry run, nothing written: would be 5 created, 0 changed, 0 deleted, 0 unchanged" in dry.out

    applied = await tierflow("apply", "-f", str(fleet), registry=registry_addr)
    assert applied.code == 0 and "applied: 5 created, 0 changed, 0 deleted, 0 unchanged" in applied.out, applied

    fleet.write_text(FLEET.replace("replicas: 2, max_replicas: 4", "replicas: 3, max_replicas: 4"))
    changed = await tierflow("apply", "-f", str(fleet), registry=registry_addr)
    assert changed.code == 0 and "+" not in changed.out, changed
    assert "~ deployment stable\n    replicas: 2 -> 3\napplied: 0 created, 1 changed, 0 deleted, 4 unchanged" in changed.out


async def test_an_invalid_file_exits_non_zero_with_every_problem(registry_addr: str, tmp_path: pathlib.Path) -> None:
    fleet = tmp_path / "fleet.yaml"
    fleet.write_text(FLEET.replace("{name: canary, bundle: canary}", "{name: canary, bundle: canary, workload: high-throughput}"))
    run = await tierflow("apply", "-f", str(fleet), registry=registry_addr)
    assert run.code == 1 and "nothing was applied (2 problems)" in run.err, run
    assert "  - $.deployments[1].workload: high-throughput needs continuous batching" in run.err
    assert "  - $.deployments[1].replicas: high-throughput needs at least 4 nodes" in run.err
    async with grpc.aio.insecure_channel(registry_addr) as ch:  # nothing of it was written
        assert not (await pb_grpc.ModelRegistryStub(ch).ListModels(pb.ListModelsRequest(), timeout=5)).models


async def test_rollout_promote_rollback_and_the_lists(registry_addr: str) -> None:
    async with grpc.aio.insecure_channel(registry_addr) as ch:
        assert not (await pb_grpc.ModelRegistryStub(ch).Apply(pb.ApplyRequest(fleet_yaml=FLEET), timeout=5, metadata=[("authorization", f"Bearer {ADMIN_TOKEN}")])).problems

    out = await tierflow("rollout", "chat", "--version", "v2", "--weight", "10", registry=registry_addr)
    assert out.code == 0 and "chat: rolled out v2 at 10%; traffic v1 90%, v2 10% (default v1" in out.out, out
    models, deployments, bad = await asyncio.gather(
        tierflow("models", "list", "--json", registry=registry_addr),
        tierflow("deployments", "list", registry=registry_addr),
        tierflow("rollout", "chat", "--version", "v2", "--weight", "150", registry=registry_addr),
    )
    (chat,) = json.loads(models.out)
    assert chat["name"] == "chat" and {t["version"]: t["weight"] for t in chat["traffic"]} == {"v1": 90.0, "v2": 10.0}
    assert deployments.code == 0 and "chat@v2 ss8192-bs4" in deployments.out and "2 (1..4)" in deployments.out
    assert bad.code == 1 and "refused (INVALID_ARGUMENT): weight must be a percentage between 0 and 100, got 150" in bad.err

    back = await tierflow("rollback", "chat", registry=registry_addr)
    assert back.code == 0 and "chat: rolled back; traffic v1 100%" in back.out
    promoted, table = await asyncio.gather(
        tierflow("promote", "chat", "--version", "v2", registry=registry_addr), tierflow("models", "list", registry=registry_addr)
    )
    assert promoted.code == 0 and "chat: promoted v2; traffic v2 100% (default v2" in promoted.out
    assert table.code == 0 and "v1, v2" in table.out  # (listed before or after the promote)


async def test_an_unreachable_registry_is_a_clear_error() -> None:
    run = await tierflow("models", "list", registry=f"127.0.0.1:{free_port()}")
    assert run.code == 2 and "cannot reach the model registry at 127.0.0.1:" in run.err and "--registry" in run.err
