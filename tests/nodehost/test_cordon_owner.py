"""A node keeps who cordoned it, reports it (heartbeat, replies), and enforces it: a
controller cannot undo or take over an operator's cordon; an operator can do anything."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

import nats
from nats.micro import add_service

from tierflow.contracts import messages, subjects
from tierflow.contracts.autoscaler import AUTOSCALER_OWNER, OPERATOR_OWNER
from tierflow.nodehost.beat import LoadReport, NodeIdentity, build_heartbeat
from tierflow.nodehost.control import add_control_endpoint, apply_command


def identity() -> NodeIdentity:
    return NodeIdentity(node_id="n1", role="decode", deployment="d", region="r", residency="eu", profile="sn40l-16")


def cmd(action: str, owner: str = "") -> messages.NodeCommand:
    return messages.NodeCommand(action=action, owner=owner)  # type: ignore[arg-type]


def test_the_autoscaler_cannot_touch_an_operators_cordon_but_an_operator_can_take_over() -> None:
    node = identity()
    assert apply_command(node, cmd("drain", AUTOSCALER_OWNER)) == ""
    assert (node.cordoned, node.draining, node.cordon_owner) == (True, True, AUTOSCALER_OWNER)
    assert apply_command(node, cmd("drain", AUTOSCALER_OWNER)) == ""  # repeated by a restarted autoscaler
    assert apply_command(node, cmd("cordon", OPERATOR_OWNER)) == ""  # a person's word outranks a controller's
    assert node.cordon_owner == OPERATOR_OWNER and node.draining
    refused = apply_command(node, cmd("uncordon", AUTOSCALER_OWNER))
    assert refused == "cordoned by operator: autoscaler may not uncordon it" and node.cordoned
    assert apply_command(node, cmd("drain", AUTOSCALER_OWNER)).startswith("cordoned by operator")
    assert node.cordon_owner == OPERATOR_OWNER
    assert apply_command(node, cmd("status", AUTOSCALER_OWNER)) == ""
    assert apply_command(node, cmd("uncordon", OPERATOR_OWNER)) == ""
    assert (node.cordoned, node.draining, node.cordon_owner) == (False, False, "")


def test_a_caller_naming_no_owner_is_treated_as_a_person() -> None:
    """Older tools send no owner: they keep working as before, and the cordon they leave
    is nobody's the autoscaler could claim."""
    node = identity()
    apply_command(node, cmd("cordon", AUTOSCALER_OWNER))
    assert apply_command(node, cmd("cordon")) == "" and node.cordon_owner == ""
    assert apply_command(node, cmd("uncordon", AUTOSCALER_OWNER)) == "" and not node.cordoned  # nobody's: anyone may


def test_the_heartbeat_names_the_owner_while_cordoned() -> None:
    node = identity()
    # the engine snapshot's fields build_heartbeat reads (an idle node)
    snap = SimpleNamespace(models=(), block_size=64, queue_depth=0, running=0, max_batch=8, kv_usage=0.0,
                           prefix_cache_blocks=SimpleNamespace(hbm=0, ddr=0), power_w=0.0, energy_joules=0.0)  # fmt: skip
    report = LoadReport(ttft_p95=None, itl_p95=None, latency_samples=0, latency_window=10.0, in_flight=0, queued_prompt_tokens=0)
    apply_command(node, cmd("drain", AUTOSCALER_OWNER))
    hb = build_heartbeat(node, snap, report, seq=1, interval=1.0, sent_at=0.0)  # type: ignore[arg-type]
    assert (hb.cordoned, hb.draining, hb.cordon_owner) == (True, True, AUTOSCALER_OWNER)
    apply_command(node, cmd("uncordon", AUTOSCALER_OWNER))
    hb = build_heartbeat(node, snap, report, seq=2, interval=1.0, sent_at=0.0)  # type: ignore[arg-type]
    assert (hb.cordoned, hb.cordon_owner) == (False, "")


async def test_the_control_endpoint_reports_the_owner_and_the_refusal(nats_url: str) -> None:
    owner = OPERATOR_OWNER
    nc = await nats.connect(nats_url)
    node = identity()
    node.node_id = "owner-test-1"

    class Driver:
        in_flight = 2

    beat_now = asyncio.Event()
    micro = await add_service(nc, name="tierflow-owner-test", version="0.0.1")
    await add_control_endpoint(micro, node, Driver(), beat_now)

    async def send(action: str, who: str) -> messages.NodeCommandReply:
        msg = await nc.request(subjects.node_control(node.node_id), messages.encoder.encode(cmd(action, who)), timeout=2)
        return messages.command_reply_decoder.decode(msg.data)

    try:
        reply = await send("cordon", owner)
        assert (reply.cordoned, reply.cordon_owner, reply.in_flight, reply.error) == (True, owner, 2, "")
        assert beat_now.is_set()  # the router and the autoscaler hear it at once
        beat_now.clear()
        reply = await send("uncordon", AUTOSCALER_OWNER)
        assert reply.error == f"cordoned by {owner}: autoscaler may not uncordon it"
        assert (reply.cordoned, reply.cordon_owner) == (True, owner) and not beat_now.is_set()
    finally:
        await micro.stop()
        await nc.drain()
