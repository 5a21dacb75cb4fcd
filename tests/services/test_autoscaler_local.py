"""The local actuator and its other end in `tierflow up` (the supervisor control subject),
over a real nats-server, with stand-in node processes."""

from __future__ import annotations

import stat
from pathlib import Path

import nats
import pytest

from tierflow.cli.supervisor import Supervisor
from tierflow.cli.up import NodeLauncher, SupervisorControl, UpConfig, service_specs
from tierflow.contracts import messages, registry, subjects
from tierflow.runtime.nats_server import free_port
from tierflow.services.autoscaler.actuators import ActuatorError
from tierflow.services.autoscaler.local import LocalActuator


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except FileNotFoundError:
        return False


@pytest.fixture
async def local(tmp_path: Path, nats_url: str):
    fake_python = tmp_path / "python"  # stands in for `python -m tierflow decode-node ...`
    fake_python.write_text("#!/bin/sh\nexec sleep 600\n")
    fake_python.chmod(fake_python.stat().st_mode | stat.S_IEXEC)
    config = UpConfig(data_dir=tmp_path / "data", decode_nodes=2, prefill_nodes=1, metrics_base_port=free_port(), deployment="default")
    supervisor = Supervisor()
    launcher = NodeLauncher(config, supervisor, service_specs(config), python=str(fake_python))
    control = SupervisorControl(launcher)
    await control.start(nats_url)
    nc = await nats.connect(nats_url)
    try:
        yield LocalActuator(nc, timeout=5), supervisor, control, config
    finally:
        await control.close()
        await supervisor.stop_all(grace=2)
        await nc.drain()


def record(name: str = "default", region: str = "eu-west") -> registry.DeploymentRecord:
    return registry.DeploymentRecord(name=name, bundle="b", models=[], region=region, residency="eu")


async def test_start_list_and_stop_nodes_through_the_supervisor(local) -> None:
    actuator, supervisor, _, config = local
    assert await actuator.provisioned(record(), "decode") == 0  # the up-time nodes are not running here
    started = await actuator.start_nodes(record(), "decode", 2)
    assert started == ["decode-2", "decode-3"]  # next ids after the two `tierflow up` starts
    [prefill] = await actuator.start_nodes(record(), "prefill", 1)
    assert prefill == "prefill-1"
    assert await actuator.provisioned(record(), "decode") == 2
    assert await actuator.provisioned(record(), "prefill") == 1
    assert await actuator.provisioned(record("other"), "decode") == 0

    argv = supervisor.get("decode-3").spec.argv
    assert argv[1:4] == ["-m", "tierflow", "decode-node"]
    flags = dict(zip(argv[4::2], argv[5::2]))
    assert flags["--node-id"] == "decode-3" and flags["--deployment"] == "default" and flags["--region"] == "eu-west"
    assert int(flags["--metrics-port"]) >= config.metrics_base_port + config.static_metrics_ports  # past the static ones
    assert supervisor.get("decode-3").spec.log_path == config.logs_dir / "decode-3.log"

    pid = supervisor.get("decode-2").pid
    await actuator.stop_node(record(), "decode", "decode-2")
    assert not _alive(pid)
    assert await actuator.provisioned(record(), "decode") == 1
    assert [c.name for c in supervisor.children] == ["decode-3", "prefill-1"]


async def test_only_nodes_can_be_stopped_and_errors_come_back(local) -> None:
    actuator, *_ = local
    with pytest.raises(ActuatorError, match="'router' is not a node"):
        await actuator.stop_node(record(), "decode", "router")
    with pytest.raises(ActuatorError, match="needs a deployment"):
        await actuator._call(messages.SupervisorCommand(action="start"))


async def test_no_supervisor_is_a_clear_actuator_error(local, nats_url: str) -> None:
    actuator, _, control, _ = local
    await control.close()
    with pytest.raises(ActuatorError, match="no local supervisor answers"):
        await actuator.provisioned(record(), "decode")


async def test_undecodable_command_gets_an_error_reply(local, nats_url: str) -> None:
    nc = await nats.connect(nats_url)
    try:
        reply = messages.supervisor_reply_decoder.decode((await nc.request(subjects.SUPERVISOR_CONTROL, b'{"action": "explode"}', timeout=5)).data)
    finally:
        await nc.drain()
    assert not reply.ok and "undecodable" in reply.error
