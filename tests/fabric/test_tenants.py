"""Tenants through the live router: authentication, residency that fails closed, rate limits."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import openai
import pytest

pytestmark = pytest.mark.fabric

MODEL = "llama-3.1-8b"
ASK = [{"role": "user", "content": "hello"}]


@pytest.fixture(scope="module")
def regional(tmp_path_factory: pytest.TempPathFactory, fabric_factory, repo_root):
    """`tierflow up` serving the EU deployment, plus a US node started as its own process."""
    running = fabric_factory(
        tmp_path_factory.mktemp("regions"), "--fleet", str(repo_root / "tests/fleets/regions.yaml"),
        "--deployment", "eu", "--decode-nodes", "1", "--prefill-nodes", "0",
        "--no-restart", "--actuator", "none",  # its region stays down when killed (no restart, no replacement)
        env={"TIERFLOW_CONFIG": str(repo_root / "tests/fleets/router-tenants.yaml")},
    )  # fmt: skip
    us = subprocess.Popen(
        [sys.executable, "-m", "tierflow", "decode-node", "--nats-url", running.nats_url, "--node-id", "us-0", "--deployment", "us"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        env={**{k: v for k, v in os.environ.items() if k != "TIERFLOW_CONFIG"}, **running.nats_env(running.add_identity("node", "us-0"))},
    )
    try:
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            with _health(running) as body:
                if body.get("nodes", 0) >= 2:
                    break
            time.sleep(0.2)
        yield running
    finally:
        us.terminate()
        us.wait(15)
        running.stop()


class _health:
    def __init__(self, fabric) -> None:
        self.url = f"http://{fabric.host}:{fabric.http_port}/health"

    def __enter__(self) -> dict:
        import urllib.request

        try:
            with urllib.request.urlopen(self.url, timeout=2) as r:
                return json.loads(r.read())
        except Exception:
            return {}

    def __exit__(self, *exc: object) -> None:
        return None


def _client(fabric, key: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=fabric.base_url, api_key=key, max_retries=0, timeout=30)


def _node_of(client: openai.OpenAI, **kw) -> str:
    kw.setdefault("max_tokens", 2)
    raw = client.chat.completions.with_raw_response.create(model=MODEL, messages=ASK, **kw)
    return raw.headers["x-tierflow-node"]


def test_unknown_api_key_is_401(regional) -> None:
    with pytest.raises(openai.AuthenticationError) as err:
        _client(regional, "sk-wrong").chat.completions.create(model=MODEL, messages=ASK, max_tokens=2)
    assert err.value.status_code == 401 and err.value.body["code"] == "invalid_api_key"


def test_over_the_rate_limit_is_429_with_retry_after(regional) -> None:
    client = _client(regional, "sk-tiny")
    _node_of(client)
    _node_of(client)  # the burst of 2
    with pytest.raises(openai.RateLimitError) as err:
        _node_of(client)
    assert err.value.status_code == 429 and float(err.value.response.headers["retry-after"]) >= 1


def test_region_bound_tenant_is_never_served_outside_even_with_its_region_down(regional) -> None:
    acme, globex = _client(regional, "sk-acme"), _client(regional, "sk-globex")
    assert {_node_of(acme) for _ in range(8)} == {"decode-0"}  # the EU node only
    # Six at a time (sequential ones may all find both nodes idle and go to the same one;
    # more than the two nodes' 8 batch slots would meet admission's 429).
    with ThreadPoolExecutor(6) as pool:
        assert set(pool.map(lambda i: _node_of(globex, user=f"s{i}", max_tokens=32), range(12))) == {"decode-0", "us-0"}

    status = json.loads(subprocess.run([sys.executable, "-m", "tierflow", "status", "--json", "--nats-url", regional.nats_url], capture_output=True, text=True, timeout=30,
                                       env={**os.environ, **regional.nats_env()}).stdout)  # fmt: skip
    eu_pid = next(n["pid"] for n in status["nodes"] if n["node_id"] == "decode-0")
    os.kill(eu_pid, signal.SIGKILL)  # every node of the tenant's region is down
    failures = 0
    for _ in range(6):
        try:
            node = _node_of(acme)
        except openai.APIStatusError as exc:
            assert exc.status_code in (502, 503), exc
            assert "eu" in exc.message  # the message names the boundary or the failed EU node
            failures += 1
        else:  # it waited for the EU node and got it back (the router waits a moment for a silent node)
            assert node != "us-0", "served outside the tenant's boundary"
    assert failures >= 5  # at most one request raced the kill (and still stayed in the EU)
    with pytest.raises(openai.APIStatusError) as err:
        _node_of(acme)
    assert err.value.status_code == 503 and "region" in err.value.message
    assert _node_of(globex) == "us-0"  # the rest of the fabric still serves
