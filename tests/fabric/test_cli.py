"""`tierflow status` against a running fabric and against nothing."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tierflow.runtime.nats_server import free_port

pytestmark = pytest.mark.fabric


def _status(nats_url: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "tierflow", "status", "--nats-url", nats_url, *args], capture_output=True, text=True, timeout=30)


def test_status_lists_services_nodes_and_models(fabric) -> None:
    out = _status(fabric.nats_url)
    assert out.returncode == 0, out.stdout + out.stderr
    for word in ("router", "model-registry", "autoscaler", "decode-0", "decode-1", "prefill-0", "llama-3.1-8b", "gpt-oss-20b"):
        assert word in out.stdout


def test_status_json_is_machine_readable(fabric) -> None:
    out = _status(fabric.nats_url, "--json")
    data = json.loads(out.stdout)
    names = {s["name"] for s in data["services"]}
    assert {"tierflow-router", "tierflow-model-registry", "tierflow-autoscaler", "tierflow-decode-node", "tierflow-prefill-node"} <= names
    assert sorted(n["node_id"] for n in data["nodes"] if n["role"] == "decode") == ["decode-0", "decode-1"]


def test_status_without_a_fabric_fails_clearly() -> None:
    out = _status(f"nats://127.0.0.1:{free_port()}")
    assert out.returncode != 0
    assert "not running" in out.stdout + out.stderr
