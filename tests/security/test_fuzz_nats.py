"""Every NATS subject a service subscribes to, sprayed with garbage and with hostile but
well-formed messages, on a running fabric (with NATS auth, as the identity that may
publish there: admin for node work and control and the supervisor, a node's identity for
heartbeats and reply streams, a router's for presence and gossip).

Then every process must still be running (none restarted), every service must answer
discovery, the router must serve a normal request on the same node, and the lying
heartbeats must have been counted as rejected, not believed.
"""

from __future__ import annotations

import asyncio
import json
import random
import urllib.request
from typing import Any

import msgspec
import nats
import pytest

from tierflow.contracts import messages, subjects
from tierflow.harness import Fabric
from tierflow.runtime import discovery

pytestmark = pytest.mark.fabric

MODEL = "llama-3.1-8b"


def _garbage(rng: random.Random, max_payload: int) -> list[bytes]:
    depth = min(100_000, (max_payload - 2048) // 6)
    deep = b'{"a":' * depth + b"1" + b"}" * depth
    return [
        b"", b"{}", b"[]", b"null", b"1e999", b'"\xff"', b"{" * 1000, deep, b"\x00" * 64,
        rng.randbytes(max_payload - 1024),  # near the server's payload limit
        *(rng.randbytes(rng.randint(1, 200)) for _ in range(10)),
        json.dumps({"v": 99, "unexpected": [1, 2, {"x": None}]}).encode(),
    ]


def _heartbeat(node: str, **raw: Any) -> bytes:
    beat = messages.NodeHeartbeat(node_id=node, deployment="default", models=[messages.ModelState(name=MODEL, tier="hbm", max_batch=4)], max_batch=4)
    return msgspec.json.encode({**msgspec.to_builtins(beat), **raw})


def _lying_heartbeats(own: str, victim: str) -> list[bytes]:
    """Well-formed, within the wire's type rules, and lies (or out of bounds)."""
    return [
        _heartbeat(own, interval_s=1e9),  # never stale
        _heartbeat(own, block_size=1),  # rehash every prompt
        _heartbeat(victim),  # speaks for another node
        _heartbeat(own, models=[{"name": "stolen-model", "tier": "hbm", "max_batch": 4}]),
        _heartbeat(own, max_batch=1_000_000, queue_depth=0),
        _heartbeat(own, kv_usage=-1.0),
        _heartbeat(own, recent_prefix_hashes=list(range(100_000))),
        _heartbeat(own, models=[{"name": MODEL}] * 1000),
        _heartbeat(own, node_id="../../etc"),
    ]


def _hostile_work(rng: random.Random) -> list[bytes]:
    encode = messages.encoder.encode
    base = {"request_id": "fuzz-1", "model": MODEL, "prompt_token_ids": [1, 2, 3], "max_tokens": 2}
    return [
        msgspec.json.encode({**base, "prompt_token_ids": [2**40, -1]}),
        msgspec.json.encode({**base, "prompt_token_ids": [200_000, 2**32 - 1] * 40}),  # outside the vocabulary, inside the wire bounds
        msgspec.json.encode({**base, "max_tokens": 2**62}),
        msgspec.json.encode({**base, "model": "no-such-model"}),
        msgspec.json.encode({**base, "stop": ["x" * 4096] * 64}),
        msgspec.json.encode({**base, "resume_token_ids": [1] * 100_000, "max_tokens": 3}),
        msgspec.json.encode({**base, "temperature": 1e308, "seed": -(2**63), "timeout_s": 1e-9}),
        msgspec.json.encode({**base, "request_id": "r" * 10_000}),
        msgspec.json.encode({**base, "kv_source": "ghost-prefill"}),
        encode(messages.CancelRequest(request_id="no-such-request")),
        *(msgspec.json.encode({**base, "request_id": f"fuzz-{i}", "prompt_token_ids": [rng.randrange(1 << 17) for _ in range(rng.randint(1, 3000))]}) for i in range(5)),
    ]


async def _connect(fabric: Fabric, identity: str) -> Any:
    errors: list[BaseException] = []

    async def on_error(exc: BaseException) -> None:  # permission violations arrive here
        errors.append(exc)

    return await nats.connect(fabric.nats_urls, error_cb=on_error, **fabric.nats_options(identity))


async def _spray(nc: Any, subject: str, payloads: list[bytes], *, request: bool = False) -> int:
    sent = 0
    for data in payloads:
        if request:
            try:
                await nc.request(subject, data, timeout=2)
            except (nats.errors.TimeoutError, nats.errors.NoRespondersError):
                pass
        else:
            await nc.publish(subject, data, reply=nc.new_inbox())
        sent += 1
    await nc.flush(timeout=10)
    return sent


def _metric(fabric: Fabric, name: str, **labels: str) -> float:
    return fabric.router_metric(name, **labels)


def _chat(fabric: Fabric) -> tuple[int, dict[str, Any], dict[str, str]]:
    body = json.dumps({"model": MODEL, "messages": [{"role": "user", "content": "still serving?"}], "max_tokens": 3}).encode()
    request = urllib.request.Request(f"http://{fabric.host}:{fabric.http_port}/v1/chat/completions", data=body, headers={"content-type": "application/json"})
    with urllib.request.urlopen(request, timeout=30) as response:
        return response.status, json.loads(response.read()), dict(response.headers)


async def test_every_subscribed_subject_survives_garbage_and_lies(fabric: Fabric) -> None:
    rng = random.Random(15)
    before = {c.name: c.restarts for c in fabric.children()}
    admin = await _connect(fabric, "admin")
    services = await discovery.discover(admin)
    instances = {(s.name, s.metadata.get("instance", "")) for s in services}
    routers = sorted(i for n, i in instances if n == subjects.SERVICE_NAMES["router"])
    nodes = sorted(i for n, i in instances if n == subjects.SERVICE_NAMES["decode-node"])
    assert routers and nodes, instances
    node_as = fabric.add_identity("node", "fuzz")  # a node of our own: it may beat only as "fuzz"
    node = await _connect(fabric, node_as)
    router = await _connect(fabric, f"router-{routers[0]}") if fabric.nats_auth else admin
    garbage = _garbage(rng, admin.max_payload)
    rejected_before = _metric(fabric, "tierflow_router_heartbeats_rejected_total")
    sent = 0
    try:
        for target in nodes:
            work = garbage + _hostile_work(rng)
            sent += await _spray(admin, subjects.node_generate(target), work)
            sent += await _spray(admin, subjects.node_cancel(target), work)
            sent += await _spray(admin, subjects.node_control(target), [*garbage[:12], b'{"action":"status"}', b'{"action":"explode"}', b'{"action":"status","owner":"' + b"o" * 300 + b'"}'], request=True)
            sent += await _spray(admin, subjects.prefill_run(target), garbage[:8])
        sent += await _spray(admin, subjects.SUPERVISOR_CONTROL, [*garbage[:12], b'{"action":"list"}', b'{"action":"stop","node_id":"no-such-node"}', b'{"action":"stop","node_id":"../x"}'], request=True)
        for verb in ("PING", "INFO", "STATS"):
            sent += await _spray(admin, f"$SRV.{verb}", garbage[:6])
        sent += await _spray(node, subjects.node_heartbeat("fuzz"), garbage + _lying_heartbeats("fuzz", nodes[0]))
        for target in routers:
            sent += await _spray(node, subjects.router_stream(target, "no-such-request"), garbage)
        own = routers[0]
        presences = [*garbage, msgspec.json.encode({"router_id": own, "interval_s": 1e9}), msgspec.json.encode({"router_id": "ghost", "leaving": True})]
        gossips = [*garbage, msgspec.json.encode({"router_id": own, "sessions": [["s", "n"]] * 10_001}),
                   msgspec.json.encode({"router_id": own, "sessions": [["s1", "ghost-node"]], "suspects": ["ghost-node"] * 100})]  # fmt: skip
        sent += await _spray(router, subjects.router_presence(own), presences)
        sent += await _spray(router, subjects.router_gossip(own), gossips)
        await asyncio.sleep(1.0)  # a heartbeat of every node: whatever broke shows now

        after = {c.name: (c.restarts, c.state) for c in fabric.children()}
        assert all(state == "running" for _, state in after.values()), after
        assert {name: restarts for name, (restarts, _) in after.items()} == before, "a process died and was restarted"
        still = {(s.name, s.metadata.get("instance", "")) for s in await discovery.discover(admin)}
        assert instances <= still, instances - still
        status, body, headers = await asyncio.to_thread(_chat, fabric)
        assert status == 200 and body["usage"]["completion_tokens"] >= 1
        assert headers.get("x-tierflow-node") in nodes  # not "fuzz", whatever it claimed
        rejected = _metric(fabric, "tierflow_router_heartbeats_rejected_total") - rejected_before
        assert rejected >= len(garbage) + 8, rejected  # every garbage and lying beat but the one honest shape
        assert _metric(fabric, "tierflow_router_heartbeats_rejected_total", reason="identity") >= 1
        assert sent > 200
    finally:
        for nc in {id(c): c for c in (admin, node, router)}.values():
            await nc.close()
