"""Run the tierflow services of docker-compose.yml as local processes, and use them.

No Docker engine here, so the containers' commands run as they are written, with only
what a container would get from its surroundings translated: the NATS URL (one local
nats-server instead of the cluster), listen hosts (loopback instead of 0.0.0.0),
ports (free ones, since all containers would share this machine), and the paths of
mounted volumes. Every flag stays. Then the stack must answer an OpenAI client, and
every target in deploy/prometheus/prometheus.yml must serve /metrics.

The secrets are made as on a first `docker compose up`: deploy/init-secrets.sh (what the
one-shot service secrets-init runs) writes them into a temporary directory that stands
for deploy/secrets; the NATS server reads the authorization block it wrote, so every
service connects with the credentials file its compose entry mounts, or not at all, and
the OpenAI client uses the API key it wrote (the router requires one).
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml
from deploy_checks import DEPLOY, REPO, compose_argv, compose_tierflow_services, load_compose, option_value
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample

from tierflow.runtime.nats_server import NatsServerConfig, free_port, http_get, wait_until_ready

pytestmark = pytest.mark.fabric

PORT_FLAGS = ("--http-port", "--grpc-port", "--metrics-port")
HOST_FLAGS = ("--http-host", "--grpc-host")
# Container-only environment: there is no collector to send spans to here.
DROP_ENV = ("OTEL_EXPORTER_OTLP_ENDPOINT",)


@dataclass
class LocalStack:
    """The compose services as processes: container (host, port) -> local port, and logs."""

    ports: dict[tuple[str, int], int] = field(default_factory=dict)
    processes: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)
    logs: dict[str, Path] = field(default_factory=dict)

    def local(self, service: str, port: int) -> int:
        return self.ports[(service, port)]

    def tails(self) -> str:
        out = []
        for name, path in self.logs.items():
            lines = path.read_text(errors="replace").splitlines()[-8:] if path.exists() else []
            code = self.processes[name].poll()
            out.append(f"--- {name} ({'running' if code is None else f'exited {code}'})\n" + "\n".join(lines))
        return "\n".join(out)


def host_mounts(svc: dict[str, Any], secrets: Path) -> dict[str, Path]:
    """container path -> local file of the service's bind mounts (./secrets/ is `secrets`)."""
    out = {}
    for mount in svc.get("volumes", []):
        source, target = mount.split(":")[:2]
        if source.startswith("./secrets/"):
            out[target] = secrets / source.removeprefix("./secrets/")
        elif source.startswith("./"):
            out[target] = (DEPLOY / source).resolve()
    return out


def translate(name: str, svc: dict[str, Any], nats_url: str, stack: LocalStack, secrets: Path) -> list[str]:
    """The container's argv with only host-specific values replaced (see module docstring)."""
    argv = compose_argv(svc)
    mounts = host_mounts(svc, secrets)
    out = []
    for i, arg in enumerate(argv):
        flag = argv[i - 1] if i else ""
        if flag == "--nats-url":
            arg = nats_url
        elif flag in HOST_FLAGS and arg == "0.0.0.0":
            arg = "127.0.0.1"
        elif flag in PORT_FLAGS and int(arg) > 0:
            stack.ports[(name, int(arg))] = local = free_port()
            arg = str(local)
        elif arg in mounts:
            arg = str(mounts[arg])
        out.append(arg)
    if argv[0] == "router" and int(option_value(argv, "--metrics-port") or 0) == 0:
        http = int(option_value(argv, "--http-port") or 8000)
        stack.ports[(name, http)] = int(option_value(out, "--http-port") or 0)
    return out


@pytest.fixture(scope="module")
def secrets(init_secrets: Path) -> Path:
    """deploy/secrets as secrets-init leaves it, made by the same script (tests/deploy/conftest.py)."""
    return init_secrets


@pytest.fixture(scope="module")
def nats_for_stack(tmp_path_factory: pytest.TempPathFactory, secrets: Path) -> Iterator[str]:
    """A private JetStream server with the stack's authorization: the registry writes the example fleet into it."""
    root = tmp_path_factory.mktemp("compose-nats")
    config = NatsServerConfig(store_dir=root / "store", port=free_port(), monitor_port=free_port(), name="compose-run",
                              extra_config=secrets / "nats" / "nats-auth.conf")  # fmt: skip
    config.prepare()
    with open(root / "nats.log", "wb") as log:
        server = subprocess.Popen(config.argv(), stdout=log, stderr=subprocess.STDOUT)
    try:
        asyncio.run(wait_until_ready(config, 15))
        yield config.url
    finally:
        server.terminate()
        server.wait(10)


@pytest.fixture(scope="module")
def stack(nats_for_stack: str, secrets: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalStack]:
    compose = load_compose()
    logs = tmp_path_factory.mktemp("compose-logs")
    stack = LocalStack()
    env_base = {k: v for k, v in os.environ.items() if not k.startswith(("TIERFLOW_", "OTEL_"))}
    try:
        for name, svc in compose_tierflow_services(compose).items():
            argv = [sys.executable, "-m", "tierflow", *translate(name, svc, nats_for_stack, stack, secrets)]
            mounts = host_mounts(svc, secrets)
            env = {**env_base, **{k: str(mounts.get(str(v), v)) for k, v in (svc.get("environment") or {}).items() if k not in DROP_ENV},
                   "PYTHONUNBUFFERED": "1"}  # fmt: skip
            stack.logs[name] = logs / f"{name}.log"
            with open(stack.logs[name], "wb") as log:
                stack.processes[name] = subprocess.Popen(argv, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, env=env)
        yield stack
    finally:
        for proc in stack.processes.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in stack.processes.values():
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def _get(port: int, path: str) -> tuple[int, bytes]:
    reply = asyncio.run(http_get("127.0.0.1", port, path, timeout=2.0))
    return reply.status, reply.body


def _models(port: int, api_key: str) -> tuple[int, bytes]:
    """GET /v1/models with the API key (http_get sends no headers; the router requires one)."""
    request = urllib.request.Request(f"http://127.0.0.1:{port}/v1/models", headers={"Authorization": f"Bearer {api_key}"})
    try:
        with urllib.request.urlopen(request, timeout=2) as reply:
            return reply.status, reply.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def _wait_ready(stack: LocalStack, router_port: int, decode_nodes: int, api_key: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    last = ""
    while time.monotonic() < deadline:
        dead = [n for n, p in stack.processes.items() if p.poll() is not None]
        assert not dead, f"{dead} exited:\n{stack.tails()}"
        try:
            status, body = _get(router_port, "/health")
            last = f"{status} {body[:200]!r}"
            if status == 200 and json.loads(body).get("nodes", 0) >= decode_nodes:
                # Nodes heartbeat once they have read their deployment; the router lists a
                # model once its registry watch has delivered it too. Ready is both.
                status, body = _models(router_port, api_key)
                last = f"/v1/models: {status} {body[:200]!r}"
                if status == 200 and json.loads(body).get("data"):
                    return
        except OSError as exc:
            last = str(exc)
        time.sleep(0.25)
    pytest.fail(f"the compose services never became ready (router /health: {last}):\n{stack.tails()}")


def test_compose_commands_run_serve_and_expose_metrics(stack: LocalStack, secrets: Path) -> None:
    import openai

    compose = load_compose()
    services = compose_tierflow_services(compose)
    router_http = int(option_value(compose_argv(services["router"]), "--http-port") or 8000)
    router_port = stack.local("router", router_http)
    decode = sum(compose_argv(s)[0] == "decode-node" for s in services.values())
    api_key = (secrets / "api-key").read_text().strip()
    _wait_ready(stack, router_port, decode, api_key)

    anonymous = openai.OpenAI(base_url=f"http://127.0.0.1:{router_port}/v1", api_key="not-a-key", max_retries=0)
    with pytest.raises(openai.AuthenticationError):  # compose's router requires a key (no open tenant)
        anonymous.chat.completions.create(model="llama-3.1-8b", messages=[{"role": "user", "content": "hi"}], max_tokens=1)
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{router_port}/v1", api_key=api_key, max_retries=0)
    models = {m.id for m in client.models.list()}
    assert {"llama-3.1-8b", "gpt-oss-20b"} <= models
    for i in range(3):
        r = client.chat.completions.create(model="llama-3.1-8b", messages=[{"role": "user", "content": f"compose {i}"}], max_tokens=4,
                                           extra_body={"ignore_eos": True})  # fmt: skip
        assert r.usage is not None and r.usage.completion_tokens == 4

    # Every Prometheus target of the compose stack answers, and the counts add up
    # (scraped until they do: a node counts a request as it sends the last event).
    config = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())
    deadline = time.monotonic() + 5.0
    while True:
        served = _scrape_targets(config, stack)
        e2e = sum(s.value for s in served["router"] if s.name == "tierflow_e2e_request_latency_seconds_count")
        node_requests = sum(s.value for name in services for s in served[name] if s.name == "tierflow_node_requests_total")
        if (e2e, node_requests) == (3, 3) or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert set(served) == set(services), "every tierflow service is a Prometheus target"
    assert (e2e, node_requests) == (3, 3)
    for name in services:
        assert any(s.name == "process_cpu_seconds_total" for s in served[name]), f"{name} serves no process metrics"


def _scrape_targets(config: dict[str, Any], stack: LocalStack) -> dict[str, list[Sample]]:
    """Samples of every tierflow target in prometheus.yml, by compose service name."""
    served: dict[str, list[Sample]] = {}
    for job in config["scrape_configs"]:
        if not job["job_name"].startswith("tierflow-"):
            continue
        for target in (t for sc in job["static_configs"] for t in sc["targets"]):
            host, port = target.rsplit(":", 1)
            status, body = _get(stack.local(host, int(port)), job.get("metrics_path", "/metrics"))
            assert status == 200, f"{job['job_name']} {target}: HTTP {status}"
            served[host] = [s for f in text_string_to_metric_families(body.decode()) for s in f.samples]
    return served


def test_the_cli_service_reads_the_fabric_as_admin(stack: LocalStack, nats_for_stack: str, secrets: Path, tmp_path: Path) -> None:
    """`docker compose run --rm cli status` and `... cli apply`: its commands with its environment
    and the files it mounts (a directory its environment names is rebuilt from the mounts under it)."""
    cli = load_compose()["services"]["cli"]
    mounts = host_mounts(cli, secrets)
    env = {k: str(mounts.get(str(v), v)) for k, v in cli["environment"].items() if k not in DROP_ENV}
    for key, value in cli["environment"].items():
        under = {target: source for target, source in mounts.items() if target.startswith(f"{value}/")}
        if under:
            local = tmp_path / key
            for target, source in under.items():
                (local / target.removeprefix(f"{value}/")).parent.mkdir(parents=True, exist_ok=True)
                (local / target.removeprefix(f"{value}/")).symlink_to(source)
            env[key] = str(local)
    env["TIERFLOW_NATS_URL"] = nats_for_stack  # the container's nats://nats:4222
    # In this process (the CLI's startup costs more than the commands): only its environment differs.
    from typer.testing import CliRunner

    from tierflow.cli.main import app

    unset = {k: None for k in os.environ if k.startswith(("TIERFLOW_", "OTEL_"))}
    out = CliRunner().invoke(app, compose_argv(cli), env={**unset, **env})
    assert out.exit_code == 0, out.output
    assert "decode-0" in out.output and "router" in out.output.lower(), out.output
    # A registry write (the admin token), to the registry as compose's cli reaches it.
    env["TIERFLOW_REGISTRY"] = f"127.0.0.1:{stack.local('model-registry', 50052)}"
    out = CliRunner().invoke(app, ["apply", "-f", str(mounts["/etc/tierflow/fleet.yaml"])], env={**unset, **env})
    assert out.exit_code == 0, out.output
