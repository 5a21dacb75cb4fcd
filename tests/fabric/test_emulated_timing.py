"""The emulator's timing as a client sees it through the router: memory tiers and the prefix cache.

One decode node (so every request lands on it) that starts with its bundle in DDR.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import openai
import pytest

pytestmark = pytest.mark.fabric

SMALL, BIG = "llama-3.1-8b", "llama-3.1-70b"
SYSTEM = "You are a meticulous analyst. " + "Consider every clause of the contract carefully. " * 700  # ~5,600 tokens


@pytest.fixture(scope="module")
def tier_fabric(tmp_path_factory: pytest.TempPathFactory, fabric_factory, repo_root):
    running = fabric_factory(
        tmp_path_factory.mktemp("tiers"), "--fleet", str(repo_root / "tests/fleets/tiers.yaml"), "--deployment", "tiers",
        "--decode-nodes", "1", "--prefill-nodes", "0", "--no-restart",  # the test replaces its node by a cold one
        env={"TIERFLOW_PRELOAD": "ddr"},
    )  # fmt: skip
    try:
        yield running
    finally:
        running.stop()


def _timed(client: openai.OpenAI, model: str, messages: list[dict[str, str]]) -> tuple[float, dict[str, str], object]:
    """Client-side time to first token, the response headers, and the final usage."""
    started = time.monotonic()
    raw = client.chat.completions.with_raw_response.create(model=model, messages=messages, max_tokens=4, stream=True, stream_options={"include_usage": True})
    ttft, usage = None, None
    for chunk in raw.parse():
        if ttft is None and chunk.choices and chunk.choices[0].delta.content:
            ttft = time.monotonic() - started
        usage = chunk.usage or usage
    assert ttft is not None
    return ttft, dict(raw.headers), usage


def _router_record(fabric, request_id: str) -> dict:
    return fabric.request_record(request_id)  # waits: records are written once per router loop turn


def test_repeated_system_prompt_hits_the_prefix_cache(tier_fabric) -> None:
    client = openai.OpenAI(base_url=tier_fabric.base_url, api_key="k", max_retries=0, timeout=60)
    _timed(client, BIG, [{"role": "user", "content": "warm up"}])  # the 70B's weights into HBM first
    miss, _, miss_usage = _timed(client, BIG, [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "First question?"}])
    hit, _, hit_usage = _timed(client, BIG, [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "Second question?"}])
    assert miss_usage.prompt_tokens_details.cached_tokens == 0
    assert hit_usage.prompt_tokens_details.cached_tokens >= 0.9 * miss_usage.prompt_tokens
    print(f"prefix: miss {miss:.3f}s hit {hit:.3f}s")
    assert hit < 0.5 * miss, (hit, miss)


def test_ddr_switch_costs_milliseconds_and_a_cold_load_costs_storage_time(tier_fabric) -> None:
    client = openai.OpenAI(base_url=tier_fabric.base_url, api_key="k", max_retries=0, timeout=60)
    question = [{"role": "user", "content": "Which tier?"}]
    ddr_ttft, ddr_headers, _ = _timed(client, SMALL, question)
    hbm_ttft, hbm_headers, _ = _timed(client, SMALL, question)
    assert (ddr_headers["x-tierflow-tier"], hbm_headers["x-tierflow-tier"]) == ("ddr", "hbm")
    assert _router_record(tier_fabric, ddr_headers["x-request-id"])["tier"] == "ddr"
    # its share of the node's energy (issue 19): the node's Finished, copied into the router's record
    assert _router_record(tier_fabric, hbm_headers["x-request-id"])["energy_j"] > 0
    assert 0.010 < ddr_ttft < 0.5  # an 8B over >1 TB/s DDR->HBM: ~16 ms of copy

    # Swap the node for one that starts cold (weights in host storage): a real second process.
    status = json.loads(subprocess.run([sys.executable, "-m", "tierflow", "status", "--json", "--nats-url", tier_fabric.nats_url], capture_output=True, text=True, timeout=30,
                                       env={**os.environ, **tier_fabric.nats_env()}).stdout)  # fmt: skip
    (old,) = [n for n in status["nodes"] if n["role"] == "decode"]
    cold = subprocess.Popen(
        [sys.executable, "-m", "tierflow", "decode-node", "--nats-url", tier_fabric.nats_url, "--node-id", "cold-0", "--deployment", "tiers", "--preload", "cold"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env={**os.environ, **tier_fabric.nats_env(tier_fabric.add_identity("node", "cold-0"))},
    )
    try:
        subprocess.run(["kill", "-TERM", str(old["pid"])], check=True)
        deadline = time.monotonic() + 20
        cold_ttft, cold_headers = None, {}
        while time.monotonic() < deadline:
            try:
                cold_ttft, cold_headers, _ = _timed(client, SMALL, question)
            except openai.APIStatusError:  # 503 until the new node's heartbeat arrives
                time.sleep(0.2)
                continue
            if cold_headers["x-tierflow-node"] == "cold-0":
                break
        assert cold_headers.get("x-tierflow-node") == "cold-0"
        assert cold_headers["x-tierflow-tier"] == "cold"
        assert _router_record(tier_fabric, cold_headers["x-request-id"])["tier"] == "cold"
        print(f"tiers: ddr {ddr_ttft:.3f}s hbm {hbm_ttft:.3f}s cold {cold_ttft:.3f}s")
        assert cold_ttft > 0.5 and cold_ttft > 5 * ddr_ttft, (cold_ttft, ddr_ttft)  # 16 GB from storage at 25 GB/s
    finally:
        cold.terminate()
        cold.wait(15)
