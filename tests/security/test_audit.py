"""The audit stream on a private nats-server: made and re-configured idempotently (and not
editable through the API), fed by nodes (cordon / drain with who sent them, refusals too)
and by the autoscaler's actuator, never blocking or failing the operation it records, and
read back by `tierflow audit`."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import nats
import pytest
import pytest_asyncio
from nats.js.errors import APIError
from prometheus_client import CollectorRegistry

from tierflow.cli.nodes import send_command
from tierflow.contracts import messages, registry, subjects
from tierflow.contracts.audit import AuditRecord
from tierflow.contracts.autoscaler import AUTOSCALER_OWNER
from tierflow.nodehost.serve import serve_node
from tierflow.nodehost.settings import NodeSettings
from tierflow.runtime.audit import AuditLog, ensure_audit_stream, read_records
from tierflow.runtime.clock import WallClock
from tierflow.runtime.nats_server import free_port
from tierflow.runtime.service import ServiceContext
from tierflow.services.autoscaler.actuators import ActuatorError, VirtualActuator
from tierflow.services.autoscaler.audited import AuditedActuator
from tierflow.services.autoscaler.node_control import NatsNodeControl, NodeRefused
from tierflow.services.model_registry.main import main as registry_main
from tierflow.services.model_registry.settings import Settings as RegistrySettings

REPO = Path(__file__).resolve().parents[2]
NODE = "audit-0"


async def _records(nats_url: str, kind: str, want: int, match: object) -> list[AuditRecord]:
    """Records of `kind` that `match` accepts, once there are `want` (they arrive in the background)."""
    nc = await nats.connect(nats_url)
    try:
        found: list[AuditRecord] = []
        for _ in range(50):
            found = [r async for r in read_records(nc.jetstream(), kind=kind, wait=1.0) if match(r)]  # type: ignore[operator]
            if len(found) >= want:
                break
            await asyncio.sleep(0.05)
        return found
    finally:
        await nc.close()


async def test_the_stream_is_made_once_its_retention_follows_the_settings_and_records_cannot_be_deleted(private_nats_url: str) -> None:
    nc = await nats.connect(private_nats_url)
    try:
        js = nc.jetstream()
        await ensure_audit_stream(js, max_age=3600, max_msgs=500, replicas=3)  # one server: one copy
        await ensure_audit_stream(js, max_age=3600, max_msgs=500, replicas=3)  # again: nothing to change
        info = await js.stream_info(subjects.AUDIT_STREAM)
        assert info.config.max_age == 3600 and info.config.max_msgs == 500 and info.config.num_replicas == 1
        assert info.config.subjects == [subjects.AUDIT_SUBJECTS] and info.config.deny_delete and info.config.deny_purge
        await ensure_audit_stream(js, max_age=7200, max_msgs=0)
        info = await js.stream_info(subjects.AUDIT_STREAM)
        assert info.config.max_age == 7200 and info.config.max_msgs == -1
        ack = await js.publish(subjects.audit("registry", "r1"), b"{}", stream=subjects.AUDIT_STREAM)
        with pytest.raises(APIError):
            await js.delete_msg(subjects.AUDIT_STREAM, ack.seq)
        with pytest.raises(APIError):
            await js.purge_stream(subjects.AUDIT_STREAM)
    finally:
        await nc.close()


async def test_recording_never_blocks_or_fails_the_caller(private_nats_url: str, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING)
    nc = await nats.connect(private_nats_url)
    metrics = CollectorRegistry()
    audit = AuditLog(nc, WallClock(), source="test", metrics=metrics, max_pending=2)
    await nc.close()  # NATS gone: the operation being recorded must go on regardless
    for i in range(3):
        audit.record("registry", "Apply", identity="token:admin", target=f"f{i}")  # returns at once, raises nothing
    await audit.flush()
    assert metrics.get_sample_value("tierflow_audit_records_total", {"kind": "registry", "outcome": "failed"}) == 2
    assert metrics.get_sample_value("tierflow_audit_records_total", {"kind": "registry", "outcome": "dropped"}) == 1
    assert any("audit record not stored" in r.getMessage() for r in caplog.records)


@pytest_asyncio.fixture(loop_scope="session", scope="module")
async def node(private_nats_url: str) -> AsyncIterator[str]:
    """A registry (which makes the stream and holds the fleet) and one decode node."""
    contexts = {name: ServiceContext(service=name, instance=f"audit-{name}") for name in ("registry", "node")}
    tasks = [
        asyncio.create_task(registry_main(contexts["registry"], RegistrySettings(nats_url=private_nats_url, grpc_port=free_port(),
                                                                                 fleet=str(REPO / "deploy/examples/fleet.yaml")))),
        asyncio.create_task(serve_node(contexts["node"], NodeSettings(nats_url=private_nats_url, node_id=NODE), role="decode",
                                       subject=subjects.node_generate(NODE), service="decode-node")),
    ]  # fmt: skip
    nc = await nats.connect(private_nats_url)
    try:
        for _ in range(400):
            for t in tasks:
                if t.done():
                    t.result()
            try:
                await nc.request(subjects.node_control(NODE), messages.encoder.encode(messages.NodeCommand(action="status")), timeout=0.5)
                break
            except (nats.errors.NoRespondersError, nats.errors.TimeoutError):
                await asyncio.sleep(0.05)
        yield private_nats_url
    finally:
        await nc.close()
        for ctx in contexts.values():
            ctx.stopping.set()
        await asyncio.gather(*tasks)


async def test_a_node_records_who_cordoned_and_drained_it_and_what_it_refused(node: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("TIERFLOW_DATA_DIR", str(tmp_path))  # no credentials of a local `tierflow up` for this private server
    drained = await send_command(node, NODE, "drain")  # `tierflow nodes drain`: the operator, as user@host
    assert drained.draining and not drained.error
    nc = await nats.connect(node)
    try:
        with pytest.raises(NodeRefused):  # a controller may not undo an operator's cordon
            await NatsNodeControl(nc, by="autoscaler:test-instance").command(NODE, "uncordon")
    finally:
        await nc.close()
    back = await send_command(node, NODE, "uncordon")
    assert not back.cordoned
    records = await _records(node, "node", 3, lambda r: r.target == NODE)
    assert sorted((r.action, r.ok) for r in records) == [("drain", True), ("uncordon", False), ("uncordon", True)]
    drain = next(r for r in records if r.action == "drain")
    refused = next(r for r in records if not r.ok)
    assert drain.identity.startswith("operator:") and "@" in drain.identity and drain.source == f"decode-node/{NODE}"
    assert refused.identity == "autoscaler:test-instance" and refused.detail["owner"] == AUTOSCALER_OWNER
    assert "cordoned by operator" in refused.detail["error"]


async def test_nodes_the_autoscaler_starts_and_stops_are_recorded(node: str) -> None:
    class Refusing(VirtualActuator):  # a provider out of capacity
        async def start_nodes(self, deployment: registry.DeploymentRecord, pool: str, count: int) -> list[str]:
            raise ActuatorError("no capacity in the zone")

    nc = await nats.connect(node)
    try:
        audit = AuditLog(nc, WallClock(), source="autoscaler/test")
        deployment = registry.DeploymentRecord(name="scaled", bundle="b", models=[])
        actuator = AuditedActuator.wrap(VirtualActuator(), audit, "autoscaler:a1")
        started = await actuator.start_nodes(deployment, "decode", 2)  # type: ignore[union-attr]
        await actuator.stop_node(deployment, "decode", started[0])  # type: ignore[union-attr]
        with pytest.raises(ActuatorError):
            await AuditedActuator.wrap(Refusing(), audit, "autoscaler:a1").start_nodes(deployment, "decode", 1)  # type: ignore[union-attr]
        await audit.flush()
    finally:
        await nc.close()
    records = await _records(node, "scaling", 3, lambda r: r.identity == "autoscaler:a1")
    assert sorted((r.action, r.target, r.ok) for r in records) == [
        ("scale_up", "scaled/decode", False), ("scale_up", "scaled/decode", True), ("stop_node", started[0], True)]
    assert next(r for r in records if r.action == "scale_up" and r.ok).detail["started"] == started
    assert next(r for r in records if not r.ok).detail["error"] == "no capacity in the zone"


async def test_tierflow_audit_reads_the_stream(node: str, tmp_path: Path) -> None:
    async def cli(*args: str) -> str:
        env = {**os.environ, "TIERFLOW_NATS_URL": node, "TIERFLOW_DATA_DIR": str(tmp_path), "COLUMNS": "400", "NO_COLOR": "1"}
        proc = await asyncio.create_subprocess_exec(sys.executable, "-m", "tierflow", "audit", *args, env=env,
                                                    stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)  # fmt: skip
        out, _ = await asyncio.wait_for(proc.communicate(), 60)
        assert proc.returncode == 0, out.decode()
        return out.decode()

    lines, table = await asyncio.gather(cli("--since", "all", "--kind", "node", "--json"), cli("--since", "1h"))
    records = [json.loads(line) for line in lines.splitlines() if line.startswith("{")]
    assert {r["kind"] for r in records} == {"node"} and ("drain", NODE) in {(r["action"], r["target"]) for r in records}
    assert "drain" in table and "scale_up" in table and "no audit records" not in table
