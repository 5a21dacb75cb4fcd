"""deploy/docker-compose.yml and the files it mounts: valid, consistent, and runnable.

No Docker engine runs here, so each layer is checked with what works offline:
docker-compose 1.29 `config -q` for the file itself, the CLI's own parser for every
tierflow command, `nats-server -t` for the NATS config, promtool for Prometheus, and
the Dockerfile's COPY list against .dockerignore and a real wheel build.
"""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from deploy_checks import (
    DEPLOY,
    REPO,
    compose_argv,
    compose_tierflow_services,
    k8s_documents,
    load_compose,
    option_value,
    pod_spec,
    tierflow_command_problems,
)

from tierflow.runtime.nats_server import find_nats_server_binary

SERVICES_EXPECTED = {"model-registry": 1, "router": 1, "autoscaler": 1, "prefill-node": 1, "decode-node": 2}


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return load_compose()


def test_docker_compose_accepts_the_file() -> None:
    binary = shutil.which("docker-compose")
    if binary is None:
        pytest.skip("docker-compose not installed (apt-get install docker-compose); the YAML checks below still ran")
    out = subprocess.run([binary, "-f", str(DEPLOY / "docker-compose.yml"), "config", "-q"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr


def test_the_stack_has_every_part_the_issue_asks_for(compose: dict[str, Any]) -> None:
    services = compose["services"]
    nats = [name for name, svc in services.items() if str(svc.get("image", "")).startswith("nats:2.10")]
    assert len(nats) == 3, f"a NATS cluster of three, found {nats}"
    for name in nats:
        mounts = services[name]["volumes"]
        assert any(m.endswith(":/data") and not m.startswith(".") for m in mounts), f"{name} needs its own named volume at /data"
    assert len({m for name in nats for m in services[name]["volumes"] if m.endswith(":/data")}) == 3, "one volume per NATS server"
    kinds = [compose_argv(svc)[0] for svc in compose_tierflow_services(compose).values()]
    assert {k: kinds.count(k) for k in set(kinds)} == SERVICES_EXPECTED
    for part in ("prometheus", "grafana", "otel-collector", "jaeger"):
        assert part in services, f"missing {part}"
    router = compose_tierflow_services(compose)["router"]
    assert {"8000:8000", "50051:50051"} <= set(router["ports"])


def test_every_tierflow_command_is_accepted_by_the_cli(compose: dict[str, Any]) -> None:
    problems = []
    for name, svc in compose_tierflow_services(compose).items():
        problems += [f"{name}: {p}" for p in tierflow_command_problems(compose_argv(svc), svc.get("environment") or {})]
    assert not problems, "\n".join(problems)


def test_the_cli_check_catches_a_bad_flag() -> None:
    """The check above is only worth something if it fails on a typo."""
    assert tierflow_command_problems(["router", "--http-prot", "8000"])
    assert tierflow_command_problems(["decode-node", "--node-id", "has.dot"])
    assert tierflow_command_problems(["decode-node"], {"TIERFLOW_NO_SUCH_FLAG": "1"})
    assert not tierflow_command_problems(["router", "--http-port", "8000"])


def test_services_listen_beyond_loopback_and_export_traces(compose: dict[str, Any]) -> None:
    """In a container 127.0.0.1 is unreachable from the other containers."""
    for name, svc in compose_tierflow_services(compose).items():
        argv = compose_argv(svc)
        for flag in ("--http-host", "--grpc-host"):
            if flag in argv:
                assert option_value(argv, flag) == "0.0.0.0", f"{name} {flag}"
        if argv[0] in ("router", "model-registry"):
            assert option_value(argv, "--grpc-host") == "0.0.0.0", f"{name} must serve gRPC to other containers"
        assert svc["environment"]["OTEL_EXPORTER_OTLP_ENDPOINT"] == "http://otel-collector:4317"
        assert option_value(argv, "--nats-url") == "nats://nats:4222", f"{name}: reach the cluster through the `nats` alias"


def test_fleet_is_mounted_where_the_registry_reads_it(compose: dict[str, Any]) -> None:
    registry = compose_tierflow_services(compose)["model-registry"]
    fleet = option_value(compose_argv(registry), "--fleet")
    mounts = {m.split(":")[1]: m.split(":")[0] for m in registry["volumes"]}
    assert fleet in mounts
    assert (DEPLOY / mounts[fleet]).resolve() == (DEPLOY / "examples" / "fleet.yaml").resolve()


# --------------------------------------------------------------------------- NATS


def _nats_test_config(conf: Path, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(find_nats_server_binary()), "-c", str(conf), "-t"], capture_output=True, text=True, timeout=30, env={**os.environ, **env})


def _mounted_dir(svc: dict[str, Any], source_prefix: str) -> str:
    return next(m.split(":")[1] for m in svc["volumes"] if m.startswith(source_prefix)).rsplit("/", 1)[0]


def test_nats_config_is_valid_and_routes_name_every_server(compose: dict[str, Any], tmp_path: Path) -> None:
    """Checked as the container sees it: nats.conf beside the generated nats-auth.conf it includes."""
    conf = DEPLOY / "nats" / "nats.conf"
    out = subprocess.run([sys.executable, "-m", "tierflow", "nats-auth", "generate", "--out", str(tmp_path / "secrets")],
                         capture_output=True, text=True, timeout=60)  # fmt: skip
    assert out.returncode == 0, out.stdout + out.stderr
    shutil.copy(conf, tmp_path / "nats.conf")
    shutil.copy(tmp_path / "secrets" / "nats-auth.conf", tmp_path / "nats-auth.conf")
    servers = {name for name, svc in compose["services"].items() if str(svc.get("image", "")).startswith("nats:")}
    out = _nats_test_config(tmp_path / "nats.conf", dict(compose["services"]["nats-1"]["environment"]))
    assert out.returncode == 0, out.stdout + out.stderr
    routes = set(re.findall(r"nats-route://([\w.-]+):6222", conf.read_text()))
    route_hosts = set()
    for name in servers:
        svc = compose["services"][name]
        assert svc["environment"]["SERVER_NAME"] == name
        aliases = {a for net in svc["networks"].values() for a in (net or {}).get("aliases", [])}
        assert "nats" in aliases, "clients connect to the `nats` alias"
        route_hosts.add(svc["environment"]["ROUTE_HOST"])
        assert svc["environment"]["ROUTE_HOST"] in svc["networks"]["nats-routes"]["aliases"]
        assert _mounted_dir(svc, "./nats/nats.conf:") == _mounted_dir(svc, "./secrets/nats/nats-auth.conf:"), "include is relative"
    assert routes == route_hosts
    on_routes = {name for name, svc in compose["services"].items() if "nats-routes" in (svc.get("networks") or [])}
    assert on_routes == servers, "only the NATS servers may reach the (unauthenticated) route port"


# --------------------------------------------------------------------------- Prometheus


def _metrics_target(argv: list[str]) -> int:
    """The port this service serves /metrics on: --metrics-port, or the router's HTTP port."""
    port = int(option_value(argv, "--metrics-port") or 0)
    if port == 0 and argv[0] == "router":
        return int(option_value(argv, "--http-port") or 8000)
    return port


def test_prometheus_scrapes_every_tierflow_service_on_its_metrics_port(compose: dict[str, Any]) -> None:
    config = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())
    targets = {t for job in config["scrape_configs"] for sc in job.get("static_configs", []) for t in sc["targets"]}
    for name, svc in compose_tierflow_services(compose).items():
        port = _metrics_target(compose_argv(svc))
        assert port > 0, f"{name} exposes no /metrics (--metrics-port 0)"
        assert f"{name}:{port}" in targets, f"prometheus.yml does not scrape {name}:{port}"
    mounted = compose["services"]["prometheus"]["volumes"]
    assert "./prometheus/prometheus.yml:/etc/prometheus/prometheus.yml:ro" in mounted


def test_prometheus_config_passes_promtool() -> None:
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool not installed (apt-get install prometheus); structure was checked above")
    out = subprocess.run([promtool, "check", "config", str(DEPLOY / "prometheus" / "prometheus.yml")], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr


# --------------------------------------------------------------------------- OpenTelemetry, Grafana


def test_collector_pipeline_receives_otlp_and_exports_to_jaeger(compose: dict[str, Any]) -> None:
    config = yaml.safe_load((DEPLOY / "otel" / "collector.yaml").read_text())
    traces = config["service"]["pipelines"]["traces"]
    for kind in ("receivers", "processors", "exporters"):
        for component in traces[kind]:
            assert component in config[kind], f"pipeline uses {kind[:-1]} {component!r} that is not defined"
    for ext in config["service"].get("extensions", []):
        assert ext in config["extensions"]
    assert config["receivers"]["otlp"]["protocols"]["grpc"]["endpoint"].endswith(":4317")
    jaeger = [e for e in traces["exporters"] if e.startswith("otlp")]
    assert jaeger and config["exporters"][jaeger[0]]["endpoint"] == "jaeger:4317"
    assert "jaeger" in compose["services"]
    mounted = compose["services"]["otel-collector"]["volumes"][0].split(":")
    assert compose["services"]["otel-collector"]["command"] == [f"--config={mounted[1]}"]


def test_grafana_provisioning_points_at_the_mounted_dashboards(compose: dict[str, Any]) -> None:
    grafana = compose["services"]["grafana"]
    mounts = {m.split(":")[1]: m.split(":")[0] for m in grafana["volumes"] if m.startswith("./")}
    provider = yaml.safe_load((DEPLOY / "grafana/provisioning/dashboards/dashboards.yml").read_text())["providers"][0]
    dash_dir = provider["options"]["path"]
    assert mounts[dash_dir] == "./grafana/dashboards"
    assert (DEPLOY / "grafana/dashboards/tierflow.json").is_file()
    home = grafana["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    assert home == f"{dash_dir}/tierflow.json"
    assert mounts["/etc/grafana/provisioning"] == "./grafana/provisioning"
    sources = yaml.safe_load((DEPLOY / "grafana/provisioning/datasources/datasources.yml").read_text())["datasources"]
    by_type = {s["type"]: s for s in sources}
    assert by_type["prometheus"]["url"] == "http://prometheus:9090" and by_type["prometheus"]["isDefault"]
    assert by_type["jaeger"]["url"] == "http://jaeger:16686"


# --------------------------------------------------------------------------- Dockerfile


def _dockerfile() -> list[tuple[str, str]]:
    """(instruction, arguments) of deploy/Dockerfile, continuation lines joined."""
    text = re.sub(r"\\\n", " ", (DEPLOY / "Dockerfile").read_text())
    lines = [line.strip() for line in text.splitlines() if line.strip() and not line.strip().startswith("#")]
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1] if " " in line else "") for line in lines]


def _copied_sources() -> list[str]:
    sources = []
    for op, args in _dockerfile():
        if op == "COPY" and "--from" not in args:
            sources += args.split()[:-1]
    return sources


def test_dockerfile_is_one_non_root_image_running_tierflow() -> None:
    instructions = _dockerfile()
    froms = [args for op, args in instructions if op == "FROM"]
    assert froms and all(f.split()[0] == "python:3.11-slim" for f in froms)
    user = [args for op, args in instructions if op == "USER"]
    assert user and user[-1].split(":")[0] not in ("root", "0")
    assert [args for op, args in instructions if op == "ENTRYPOINT"][-1] == '["tierflow"]'
    assert any(op == "RUN" and "pip install" in args and '".[otlp]"' in args for op, args in instructions), "install the package with OTLP export"


def test_dockerfile_copies_what_exists_and_dockerignore_keeps_it() -> None:
    ignored = [line.strip() for line in (REPO / ".dockerignore").read_text().splitlines() if line.strip() and not line.startswith("#")]
    for source in _copied_sources():
        assert (REPO / source).exists(), f"COPY {source}: not in the repository"
        assert source.rstrip("/") not in ignored, f"COPY {source} but .dockerignore excludes it"
    for heavy in (".git", ".venv", "tests"):
        assert heavy in ignored


def test_the_copied_files_are_enough_to_build_the_package(tmp_path: Path) -> None:
    """What `pip install .` sees in the image: only the Dockerfile's COPY sources."""
    context = tmp_path / "context"
    context.mkdir()
    skip = shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info")
    for source in _copied_sources():
        src = REPO / source
        if src.is_dir():
            shutil.copytree(src, context / source, ignore=skip)
        else:
            shutil.copy2(src, context / source)
    # Reuse this venv's setuptools when it has one (fast, offline); else pip fetches it.
    isolation = ["--no-build-isolation"] if importlib.util.find_spec("setuptools") else []
    out = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", *isolation, "-q", "-w", str(tmp_path / "dist"), str(context)],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert out.returncode == 0, out.stdout + out.stderr
    wheel = next((tmp_path / "dist").glob("tierflow-*.whl"))
    import zipfile

    names = set(zipfile.ZipFile(wheel).namelist())
    for module in ("tierflow/cli/main.py", "tierflow/cli/top.py", "tierflow/services/router/main.py", "tierflow/v1/inference_pb2.py"):
        assert module in names, f"{module} missing from the image's install"
    entry = next(n for n in names if n.endswith("entry_points.txt"))
    assert "tierflow = tierflow.cli.main:main" in zipfile.ZipFile(wheel).read(entry).decode()


# --------------------------------------------------------------------------- reachability


def test_metrics_listen_where_prometheus_can_reach_them(compose: dict[str, Any]) -> None:
    commands = [compose_argv(svc) for svc in compose_tierflow_services(compose).values()]
    for _, doc in k8s_documents():
        spec = pod_spec(doc)
        commands += [[str(a) for a in c["args"]] for c in (spec["containers"] if spec else []) if c["image"].startswith("tierflow")]
    for argv in commands:
        if int(option_value(argv, "--metrics-port") or 0) > 0:
            assert option_value(argv, "--metrics-host") == "0.0.0.0", f"`tierflow {' '.join(argv)}` serves /metrics on loopback only"
            assert not tierflow_command_problems(argv)
