"""deploy/docker-compose.yml's exposure and privileges (issue 15).

Only the router is published on the host's interfaces; the UIs only on its loopback;
NATS and the registry's admin gRPC not at all. NATS and the services live on an
internal network; every container drops its capabilities and cannot gain privileges;
ours and NATS run with a read-only root filesystem.
"""

from __future__ import annotations

from typing import Any

import pytest
import yaml
from deploy_checks import DEPLOY, compose_argv, compose_tierflow_containers, compose_tierflow_services, load_compose

NEVER_PUBLISHED = {4222, 6222, 8222, 50052, 9100}
ROUTER_PORTS = {8000, 50051}


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return load_compose()


def published(service: dict[str, Any]) -> list[tuple[str, int, int]]:
    """(host address, host port, container port) of each `ports:` entry ("" = every interface)."""
    out = []
    for entry in service.get("ports", []):
        if isinstance(entry, dict):  # the long syntax
            out.append((str(entry.get("host_ip", "")), int(entry["published"]), int(entry["target"])))
            continue
        parts = str(entry).split("/")[0].split(":")
        if len(parts) == 1:
            raise AssertionError(f"{entry}: a bare container port is published on a random host port of every interface")
        host_ip = parts[0] if len(parts) == 3 else ""
        out.append((host_ip, int(parts[-2]), int(parts[-1])))
    return out


def test_only_the_routers_ports_are_published_on_every_interface(compose: dict[str, Any]) -> None:
    everywhere = {(name, container) for name, svc in compose["services"].items() for ip, _, container in published(svc) if ip in ("", "0.0.0.0")}
    assert everywhere == {("router", port) for port in ROUTER_PORTS}
    assert compose_argv(compose["services"]["router"])[0] == "router"


def test_nats_and_the_registry_are_not_published_and_uis_only_on_loopback(compose: dict[str, Any]) -> None:
    for name, svc in compose["services"].items():
        for ip, host, container in published(svc):
            assert container not in NEVER_PUBLISHED and host not in NEVER_PUBLISHED, f"{name} publishes {container}"
            if name != "router":
                assert ip == "127.0.0.1", f"{name}:{container} is published beyond the host's loopback"
        assert "expose" not in svc or name == "router"
        assert svc.get("network_mode") != "host", f"{name}: host networking bypasses all of this"


def test_nats_and_the_services_are_on_internal_networks(compose: dict[str, Any]) -> None:
    networks = compose["networks"]
    internal = {name for name, net in networks.items() if (net or {}).get("internal")}
    nats = [name for name, svc in compose["services"].items() if str(svc.get("image", "")).startswith("nats:")]

    def joined(svc: dict[str, Any]) -> set[str]:
        nets = svc.get("networks", ["default"])
        return set(nets) if isinstance(nets, list) else set(nets)

    for name in nats:
        assert joined(compose["services"][name]) <= internal, f"{name} must be reachable only on internal networks"
    reach_nats = set.union(*(joined(compose["services"][n]) for n in nats))
    for name, svc in compose_tierflow_services(compose).items():
        assert joined(svc) & reach_nats, f"{name} cannot reach NATS"
        if name != "router":
            assert joined(svc) <= internal, f"{name} is on a network with a route out"
    # Prometheus reaches what prometheus.yml scrapes; the collector reaches Jaeger.
    config = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())
    for job in config["scrape_configs"]:
        for target in (t for sc in job.get("static_configs", []) for t in sc["targets"]):
            host = target.split(":")[0]
            if host != "localhost":
                assert joined(compose["services"]["prometheus"]) & joined(compose["services"][host]), f"prometheus cannot reach {target}"
    assert joined(compose["services"]["otel-collector"]) & joined(compose["services"]["jaeger"])
    for name in ("grafana",):
        for source in ("prometheus", "jaeger"):
            assert joined(compose["services"][name]) & joined(compose["services"][source]), f"{name} cannot reach {source}"


# secrets-init chowns the files it made to the uid the others run as; it needs nothing else
# and runs with no network.
ONE_SHOT_CAPS = {"secrets-init": ["CHOWN", "DAC_OVERRIDE", "FOWNER"]}


def test_every_container_drops_capabilities_and_privilege_escalation(compose: dict[str, Any]) -> None:
    for name, svc in compose["services"].items():
        assert svc.get("cap_drop") == ["ALL"], f"{name}: cap_drop [ALL]"
        assert svc.get("cap_add", []) == ONE_SHOT_CAPS.get(name, []), f"{name}: cap_add {svc.get('cap_add')}"
        if name in ONE_SHOT_CAPS:
            assert svc["network_mode"] == "none" and svc["restart"] == "no", name
        assert "no-new-privileges:true" in svc.get("security_opt", []), f"{name}: no-new-privileges"
        assert not svc.get("privileged"), name
        for key in ("pid", "ipc"):
            assert svc.get(key) != "host", f"{name}: {key}: host"


def test_our_containers_and_nats_run_as_10001_with_a_read_only_root(compose: dict[str, Any]) -> None:
    ours = compose_tierflow_containers(compose)
    nats = {name: svc for name, svc in compose["services"].items() if str(svc.get("image", "")).startswith("nats:")}
    for name, svc in {**ours, **nats}.items():
        assert svc.get("read_only") is True, f"{name}: read_only"
    for name, svc in ours.items():
        assert "/tmp" in svc.get("tmpfs", []), f"{name}: Python needs a writable /tmp"
        if name not in ONE_SHOT_CAPS:
            assert str(svc.get("user", "10001")).split(":")[0] == "10001", f"{name} runs as {svc.get('user')}, not the image's user"
    for name, svc in nats.items():
        assert svc.get("user") == "10001:10001", f"{name}: the nats image has no USER (it would be root)"
