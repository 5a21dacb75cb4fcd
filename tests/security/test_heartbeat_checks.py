"""Hostile but well-formed heartbeats: bounds, identity, block size and the registry.

Pure: `tierflow.placement.heartbeats` over made-up messages (the NATS fuzzer in
test_fuzz_nats.py sends such messages to a running fabric).
"""

from __future__ import annotations

import logging

import msgspec
import pytest

from tierflow.contracts import messages, registry, subjects
from tierflow.placement.heartbeats import HeartbeatGate, check_heartbeat
from tierflow.placement.tables import NodeTable
from tierflow.rdu import DEFAULT_BLOCK_SIZE
from tierflow.runtime.clock import VirtualClock

DEPLOYMENT = registry.DeploymentRecord(
    name="default", bundle="agents", residency="eu",
    models=[registry.BundleEntry(model="llama", version="v1", config="ss8192-bs4"),
            registry.BundleEntry(model="gpt", version="v2", config="ss8192-bs8-cb8-64")],
)  # fmt: skip


def _beat(node: str = "decode-0", **changes: object) -> messages.NodeHeartbeat:
    beat = messages.NodeHeartbeat(
        node_id=node, deployment="default", residency="eu", max_batch=68,
        models=[messages.ModelState(name="llama", version="v1", max_batch=4), messages.ModelState(name="gpt", version="v2", max_batch=64)],
    )  # fmt: skip
    return msgspec.structs.replace(beat, **changes)


def _wire(beat: messages.NodeHeartbeat, **raw: object) -> bytes:
    return msgspec.json.encode({**msgspec.to_builtins(beat), **raw})


def _reason(beat: messages.NodeHeartbeat, subject: str | None = None) -> str | None:
    verdict = check_heartbeat(beat, subject=subject if subject is not None else subjects.node_heartbeat(beat.node_id), deployment=DEPLOYMENT)
    return verdict.reason if verdict is not None else None


def test_an_honest_heartbeat_is_believed() -> None:
    assert _reason(_beat()) is None


@pytest.mark.parametrize(
    ("beat", "subject", "reason"),
    [
        (_beat(), subjects.node_heartbeat("decode-1"), "identity"),  # speaks for another node
        (_beat(), "tierflow.node.heartbeat.decode-0.x", "identity"),
        (_beat(block_size=16), None, "block_size"),
        (_beat(models=[messages.ModelState(name="llama", version="v9", max_batch=4)], max_batch=4), None, "model"),
        (_beat(models=[messages.ModelState(name="stolen", max_batch=1)], max_batch=1), None, "model"),
        (_beat(models=[messages.ModelState(name="llama", version="v1", max_batch=400)], max_batch=400), None, "capacity"),
        (_beat(max_batch=10_000), None, "capacity"),
        (_beat(residency=""), None, "residency"),  # would be placed for tenants bound elsewhere
    ],
)
def test_lies_are_rejected_with_their_reason(beat: messages.NodeHeartbeat, subject: str | None, reason: str) -> None:
    assert _reason(beat, subject) == reason


def test_an_outdated_bundle_is_held_to_the_bounds_only() -> None:
    """A node serving the bundle it started with (the registry's changed since) keeps
    serving it until restarted: its models need not be the record's."""
    old = _beat(models=[messages.ModelState(name="llama", version="v0", max_batch=4)], max_batch=4, bundle_outdated=True)
    assert _reason(old) is None
    assert check_heartbeat(_beat(block_size=8, bundle_outdated=True), subject=None, deployment=DEPLOYMENT).reason == "block_size"  # type: ignore[union-attr]


def test_without_its_deployment_only_identity_and_block_size_are_checked() -> None:
    assert check_heartbeat(_beat(residency="anything"), subject=subjects.node_heartbeat("decode-0"), deployment=None) is None


@pytest.mark.parametrize(
    "raw",
    [
        {"interval_s": 1e9},  # would never go stale
        {"interval_s": 0},
        {"node_id": "a.b"},  # not a subject token
        {"node_id": "x" * 129},
        {"queue_depth": -1},
        {"queue_depth": 10**7},
        {"kv_usage": 1.5},
        {"deployment": "d" * 300},
        {"models": [{"name": "m"}] * 65},
        {"recent_prefix_hashes": list(range(5000))},
        {"block_size": 0},
        {"ttft_p95": 1e12},
        {"seq": 10**20},
    ],
)
def test_bounds_reject_at_decode(raw: dict[str, object]) -> None:
    with pytest.raises(msgspec.ValidationError):
        messages.heartbeat_decoder.decode(_wire(_beat(), **raw))


def test_the_gate_counts_logs_at_most_once_per_interval_and_never_raises(caplog: pytest.LogCaptureFixture) -> None:
    clock = VirtualClock(100.0)
    counted: list[str] = []
    gate = HeartbeatGate(clock, deployment={"default": DEPLOYMENT}.get, on_reject=counted.append, log_every=10.0)
    subject = subjects.node_heartbeat("decode-0")
    assert gate.admit(subject, _wire(_beat())) == _beat()
    with caplog.at_level(logging.WARNING, logger="tierflow.placement.heartbeats"):
        for _ in range(50):
            assert gate.admit(subject, _wire(_beat(), interval_s=1e9)) is None
        assert gate.admit(subject, b"\x00not json") is None
        assert gate.admit(subjects.node_heartbeat("decode-9"), _wire(_beat())) is None
        clock.advance(10.0)
        assert gate.admit(subject, _wire(_beat(), interval_s=1e9)) is None
    assert counted == ["decode"] * 51 + ["identity", "decode"]
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 3  # decode, identity, decode again after the interval
    assert "and 50 more" in lines[-1]

    def broken(name: str) -> registry.DeploymentRecord | None:
        raise RuntimeError("a bug in the lookup")

    failing = HeartbeatGate(clock, deployment=broken, on_reject=counted.append)
    assert failing.admit(subject, _wire(_beat())) is None and counted[-1] == "error"


def test_no_heartbeat_changes_how_prompts_are_hashed() -> None:
    table = NodeTable()
    table.apply(_beat(block_size=16), now=0.0)  # even one applied without the gate
    assert table.block_size == DEFAULT_BLOCK_SIZE
