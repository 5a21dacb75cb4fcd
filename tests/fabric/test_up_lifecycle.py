"""`tierflow up` stops every process it started, on Ctrl-C as on SIGTERM."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

pytestmark = pytest.mark.fabric


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie is dead for our purpose
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split()[2] != "Z"
    except FileNotFoundError:
        return False


def test_ctrl_c_stops_every_child_and_exits_0(tmp_path_factory: pytest.TempPathFactory, fabric_factory) -> None:
    fabric = fabric_factory(tmp_path_factory.mktemp("lifecycle"))
    try:
        out = subprocess.run([sys.executable, "-m", "tierflow", "status", "--json", "--nats-url", fabric.nats_url], capture_output=True, text=True, timeout=30,
                             env={**os.environ, **fabric.nats_env()})  # fmt: skip
        status = json.loads(out.stdout)
        pids = {int(s["metadata"]["pid"]) for s in status["services"]} | {n["pid"] for n in status["nodes"]}
        assert len(pids) == 6, status  # registry, router, autoscaler, prefill, 2 decode
        children = subprocess.run(["pgrep", "-P", str(fabric.process.pid)], capture_output=True, text=True).stdout.split()
        nats_pids = {int(p) for p in children} - pids
        assert len(nats_pids) == 1, (children, pids)  # and the NATS server
        fabric.process.send_signal(signal.SIGINT)
        assert fabric.process.wait(30) == 0
        deadline = time.monotonic() + 5
        while any(_alive(p) for p in pids | nats_pids) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not [p for p in pids | nats_pids if _alive(p)]
    finally:
        fabric.stop()


def test_a_restart_with_another_fleet_boots_its_nodes_on_that_fleet(tmp_path_factory: pytest.TempPathFactory, fabric_factory, repo_root) -> None:
    """The registry's state survives a restart; nodes must still start on the fleet just applied.

    The first run leaves the README fleet's 8k-token bundle in the registry; the second
    applies a 32k-token one. Nodes started before the registry had applied it served the
    old bundle while the router already allowed 32k, so a 10k-token prompt failed with
    context_length_exceeded on every node but the ones the autoscaler added later.
    """
    from openai import OpenAI

    data_dir = tmp_path_factory.mktemp("refleet")
    fabric_factory(data_dir, "--actuator", "none").stop()
    fabric = fabric_factory(data_dir, "--actuator", "none", "--fleet", str(repo_root / "loadtest/fleets/trace-live.yaml"))
    try:
        for node in ("decode-0", "decode-1"):
            serving = [line for line in fabric.log(node).splitlines() if " serving " in line]
            assert len(serving) == 2, serving  # once per run
            assert "ss8192-bs4" in serving[0] and "ss32768-bs4" in serving[1] and "ss8192" not in serving[1], serving
        client = OpenAI(base_url=fabric.base_url, api_key="none", max_retries=0)
        prompt = " ".join(f"w{i % 997}" for i in range(10_000))
        for model in ("llama-3.1-8b", "gpt-oss-20b"):
            reply = client.chat.completions.create(model=model, messages=[{"role": "user", "content": prompt}], max_tokens=2, extra_body={"ignore_eos": True})
            assert reply.usage is not None and reply.usage.prompt_tokens > 8192 and reply.usage.completion_tokens == 2
    finally:
        fabric.stop()


PROFILES = """\
sn40l-16-slow-storage:
  base: sn40l-16
  storage_bw: 5.0e+9
"""
CUSTOM_FLEET = """\
models:
  - name: llama-3.1-8b
    versions: [{version: v1, catalog: llama-3.1-8b}]
bundles:
  - name: one
    models: [{model: llama-3.1-8b, config: ss8192-bs4}]
deployments:
  - {name: default, bundle: one, replicas: 1, min_replicas: 1, max_replicas: 2, profile: sn40l-16-slow-storage}
"""


def test_up_passes_a_profiles_file_to_the_registry_and_every_node(tmp_path_factory: pytest.TempPathFactory, fabric_factory) -> None:
    """A deployment on a user-declared chip: the registry accepts it and the nodes emulate it."""
    from openai import OpenAI

    data_dir = tmp_path_factory.mktemp("profiles")
    (data_dir / "profiles.yaml").write_text(PROFILES)
    (data_dir / "fleet.yaml").write_text(CUSTOM_FLEET)
    fabric = fabric_factory(data_dir, "--actuator", "none", "--fleet", str(data_dir / "fleet.yaml"), "--profiles", str(data_dir / "profiles.yaml"),
                            "--decode-nodes", "1", "--prefill-nodes", "0")  # fmt: skip
    try:
        assert "on sn40l-16-slow-storage (decode)" in fabric.log("decode-0")
        reply = OpenAI(base_url=fabric.base_url, api_key="none", max_retries=0).completions.create(model="llama-3.1-8b", prompt="hi", max_tokens=3, extra_body={"ignore_eos": True})
        assert reply.usage is not None and reply.usage.completion_tokens == 3
    finally:
        fabric.stop()
