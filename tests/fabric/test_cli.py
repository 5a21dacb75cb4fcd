"""`tierflow status` against a running fabric and against nothing."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tierflow.runtime.nats_server import free_port

pytestmark = pytest.mark.fabric


def _status(nats_url: str, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "tierflow", "status", "--nats-url", nats_url, *args], capture_output=True, text=True, timeout=30,
                          env={**os.environ, **(env or {})})  # fmt: skip


def test_status_lists_services_nodes_and_models(fabric) -> None:
    out = _status(fabric.nats_url, env=fabric.nats_env())
    assert out.returncode == 0, out.stdout + out.stderr
    for word in ("router", "model-registry", "autoscaler", "decode-0", "decode-1", "prefill-0", "llama-3.1-8b", "gpt-oss-20b"):
        assert word in out.stdout


def test_status_json_is_machine_readable(fabric) -> None:
    out = _status(fabric.nats_url, "--json", env=fabric.nats_env())
    data = json.loads(out.stdout)
    names = {s["name"] for s in data["services"]}
    assert {"tierflow-router", "tierflow-model-registry", "tierflow-autoscaler", "tierflow-decode-node", "tierflow-prefill-node"} <= names
    assert sorted(n["node_id"] for n in data["nodes"] if n["role"] == "decode") == ["decode-0", "decode-1"]


def test_status_without_a_fabric_fails_clearly() -> None:
    out = _status(f"nats://127.0.0.1:{free_port()}")
    assert out.returncode != 0
    assert "not running" in out.stdout + out.stderr


def test_status_without_credentials_is_refused_clearly(fabric, tmp_path) -> None:
    """NATS auth: no identity (none named, none under the data dir) is no connection."""
    out = _status(fabric.nats_url, env={"TIERFLOW_NATS_CREDS": "", "TIERFLOW_DATA_DIR": str(tmp_path)})
    assert out.returncode != 0
    said = " ".join((out.stdout + out.stderr).split())  # rich wraps lines
    assert "refused a connection without credentials" in said and "--nats-creds" in said, said


def test_cordon_takes_a_node_out_of_rotation_and_uncordon_puts_it_back(fabric) -> None:
    import openai

    client = openai.OpenAI(base_url=fabric.base_url, api_key="k", max_retries=0)

    def nodes_used(n: int) -> set[str]:
        used = set()
        for i in range(n):
            raw = client.completions.with_raw_response.create(model="llama-3.1-8b", prompt=f"where {i}", max_tokens=1)
            used.add(raw.headers["x-tierflow-node"])
        return used

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        env = {**os.environ, "COLUMNS": "200", **fabric.nats_env()}  # rich wraps tables at 80 columns without a terminal
        return subprocess.run([sys.executable, "-m", "tierflow", "nodes", *args, "--nats-url", fabric.nats_url], capture_output=True, text=True, timeout=30, env=env)

    out = cli("cordon", "decode-0")
    try:
        assert out.returncode == 0 and "decode-0: cordoned" in out.stdout, out.stdout + out.stderr
        assert nodes_used(8) == {"decode-1"}
        listing = cli("list")
        assert "cordoned" in listing.stdout
    finally:
        back = cli("uncordon", "decode-0")
    assert back.returncode == 0 and "decode-0: ready" in back.stdout
    assert nodes_used(8) == {"decode-0", "decode-1"}
    assert cli("cordon", "no-such-node").returncode == 1
