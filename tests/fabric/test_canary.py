"""Canary and rollback through the live fabric: registry CLI -> KV -> router -> nodes."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

import openai
import pytest

pytestmark = pytest.mark.fabric


@pytest.fixture(scope="module")
def canary_fabric(tmp_path_factory: pytest.TempPathFactory, fabric_factory, repo_root):
    running = fabric_factory(
        tmp_path_factory.mktemp("canary"), "--fleet", str(repo_root / "tests/fleets/canary.yaml"),
        "--deployment", "stable", "--decode-nodes", "1", "--prefill-nodes", "0",
    )  # fmt: skip
    canary = subprocess.Popen(
        [sys.executable, "-m", "tierflow", "decode-node", "--nats-url", running.nats_url, "--node-id", "canary-0", "--deployment", "canary"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env={**os.environ, **running.nats_env(running.add_identity("node", "canary-0"))},
    )
    try:
        yield running
    finally:
        canary.terminate()
        canary.wait(15)
        running.stop()


def _cli(fabric, *args: str) -> subprocess.CompletedProcess[str]:
    # TIERFLOW_DATA_DIR: the CLI finds the fabric's admin token (and TLS files) there
    env = {**os.environ, "TIERFLOW_REGISTRY": f"{fabric.host}:{fabric.registry_grpc_port}", "COLUMNS": "200", "TIERFLOW_DATA_DIR": str(fabric.data_dir)}
    return subprocess.run([sys.executable, "-m", "tierflow", *args], capture_output=True, text=True, timeout=30, env=env)


def _version(client: openai.OpenAI, i: int = 0) -> str:
    raw = client.completions.with_raw_response.create(model="chat", prompt=f"r{i}", max_tokens=1)
    return raw.headers["x-tierflow-model-version"]


def test_ten_percent_canary_then_rollback_within_a_second(canary_fabric) -> None:
    client = openai.OpenAI(base_url=canary_fabric.base_url, api_key="k", max_retries=2, timeout=30)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:  # both nodes heard from: v2 is servable
        try:
            if _version(client) == "v1":
                break
        except openai.APIStatusError:
            time.sleep(0.2)
    out = _cli(canary_fabric, "rollout", "chat", "--version", "v2", "--weight", "10")
    assert out.returncode == 0, out.stdout + out.stderr
    time.sleep(1.0)  # the router follows the registry's KV watch
    with ThreadPoolExecutor(8) as pool:
        counts = Counter(pool.map(lambda i: _version(client, i), range(2000)))
    share = counts["v2"] / 2000
    assert 0.08 <= share <= 0.12, counts

    out = _cli(canary_fabric, "rollback", "chat")
    committed = time.monotonic()  # the CLI returns once the registry's KV write is done
    assert out.returncode == 0, out.stdout + out.stderr
    started = committed
    clean_since = None
    streak = 0
    while streak < 50 and time.monotonic() - started < 10:
        if _version(client) == "v1":
            streak += 1
            clean_since = clean_since or time.monotonic()
        else:
            streak, clean_since = 0, None
    assert clean_since is not None and clean_since - committed < 1.0
    with ThreadPoolExecutor(8) as pool:
        assert set(pool.map(lambda i: _version(client, i), range(300))) == {"v1"}
