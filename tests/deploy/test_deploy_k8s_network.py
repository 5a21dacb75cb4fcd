"""deploy/k8s/networkpolicy.yaml: who can reach which port, asked of the policies as the cluster would.

Every question is derived from the other manifests where it can be (the ports containers
declare, the scrape annotations, the OTLP endpoint, Grafana's data sources), so a port
or label changed elsewhere shows up here as a connection that no longer works.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import urlparse

import pytest
import yaml
from deploy_checks import DEPLOY, container_env, k8s_documents, pod_spec
from network_policy import OUTSIDE, Peer, allowed, connects, selects

DOCS = k8s_documents()
POLICIES = [doc for _, doc in DOCS if doc["kind"] == "NetworkPolicy"]
WORKLOADS = {doc["metadata"]["name"]: doc for _, doc in DOCS if pod_spec(doc) is not None}
PODS = {name: Peer(doc["spec"]["template"]["metadata"]["labels"], name=name) for name, doc in WORKLOADS.items()}
# A pod someone else starts in the namespace, without our labels.
STRANGER = Peer({"app": "debug"}, name="stranger")

ROUTER_PORTS = {8000, 50051}
NATS = "nats"
REGISTRY = "model-registry"
FABRIC = {name for name, pod in PODS.items() if pod.labels.get("app.kubernetes.io/name") == "tierflow"}
NODE_POOLS = {"tierflow-default-decode", "tierflow-default-prefill"}


def _ports(name: str) -> set[int]:
    spec = pod_spec(WORKLOADS[name])
    assert spec is not None
    return {p["containerPort"] for c in spec["containers"] for p in c.get("ports", [])}


def _component(name: str) -> str:
    return PODS[name].labels.get("app.kubernetes.io/component", PODS[name].labels["app.kubernetes.io/name"])


def test_the_fabric_is_the_five_services() -> None:
    assert {_component(n) for n in FABRIC} == {"router", "model-registry", "autoscaler", "decode-node", "prefill-node"}
    assert NODE_POOLS <= FABRIC


def test_ingress_is_denied_by_default_in_the_namespace() -> None:
    default = [p for p in POLICIES if p["spec"]["podSelector"] == {} and p["spec"]["policyTypes"] == ["Ingress"]]
    assert default and not default[0]["spec"].get("ingress"), "a policy selecting every pod with no ingress rule"
    for name, pod in PODS.items():
        for port in _ports(name):
            assert not allowed(POLICIES, "Ingress", pod, STRANGER, port) or name == "router", f"an unlabelled pod reaches {name}:{port}"


def test_every_policy_selects_pods_and_every_peer_names_pods() -> None:
    """A misspelt label selects nothing: the policy would silently do nothing (or block all)."""
    pods = list(PODS.values())
    for policy in POLICIES:
        assert any(selects(policy["spec"]["podSelector"], p.labels) for p in pods), policy["metadata"]["name"]
        for rule in policy["spec"].get("ingress", []) + policy["spec"].get("egress", []):
            for peer in rule.get("from", []) + rule.get("to", []):
                assert any(selects(peer["podSelector"], p.labels) for p in pods), f"{policy['metadata']['name']}: {peer} matches no pod"


def test_from_outside_the_namespace_only_the_router_is_reachable() -> None:
    reachable = {(name, port) for name, pod in PODS.items() for port in _ports(name) if allowed(POLICIES, "Ingress", pod, OUTSIDE, port)}
    assert reachable == {("router", port) for port in ROUTER_PORTS}
    assert _ports("router") == ROUTER_PORTS | {9100}, "the router's ports changed: update the router-ingress policy"


@pytest.mark.parametrize("source", sorted(PODS) + ["stranger"])
def test_nats_and_the_registry_admin_port_only_from_the_fabric(source: str) -> None:
    src = PODS.get(source, STRANGER)
    fabric = source in FABRIC
    assert connects(POLICIES, src, PODS[NATS], 4222) == fabric, f"{source} -> nats:4222"
    assert connects(POLICIES, src, PODS[REGISTRY], 50052) == fabric, f"{source} -> model-registry:50052"
    assert allowed(POLICIES, "Ingress", PODS[NATS], src, 6222) == (source == NATS), f"{source} -> nats:6222 (routes)"
    assert not allowed(POLICIES, "Ingress", PODS[NATS], src, 8222), f"{source} -> nats:8222 (monitor: client and subject lists)"


def test_the_nats_members_reach_each_other() -> None:
    assert connects(POLICIES, PODS[NATS], PODS[NATS], 6222)
    assert _ports(NATS) == {4222, 6222, 8222}, "NATS's ports changed: update nats-ingress"


def test_prometheus_scrapes_every_annotated_pod() -> None:
    prometheus = PODS["prometheus"]
    annotated = {name: int(doc["spec"]["template"]["metadata"]["annotations"]["prometheus.io/port"])
                 for name, doc in WORKLOADS.items()
                 if doc["spec"]["template"]["metadata"].get("annotations", {}).get("prometheus.io/scrape") == "true"}  # fmt: skip
    assert FABRIC <= set(annotated) and "otel-collector" in annotated
    for name, port in annotated.items():
        assert connects(POLICIES, prometheus, PODS[name], port), f"prometheus cannot scrape {name}:{port}"
        assert not allowed(POLICIES, "Ingress", PODS[name], OUTSIDE, port), f"{name}'s metrics are open to everyone"
        assert not allowed(POLICIES, "Ingress", PODS[name], PODS["grafana"], port), f"{name}'s metrics are open to more than Prometheus"


def test_the_services_reach_nats_and_the_collector_and_nothing_outside() -> None:
    for name in FABRIC:
        container = pod_spec(WORKLOADS[name])["containers"][0]  # type: ignore[index]
        otlp = urlparse(container_env(container)["OTEL_EXPORTER_OTLP_ENDPOINT"])
        assert connects(POLICIES, PODS[name], PODS[otlp.hostname], otlp.port), f"{name} -> {otlp.netloc}"  # type: ignore[index,arg-type]
        args = [str(a) for a in container["args"]]
        nats = urlparse(args[args.index("--nats-url") + 1])
        assert nats.hostname == "nats" and connects(POLICIES, PODS[name], PODS[NATS], nats.port), f"{name} -> {nats.netloc}"
        assert allowed(POLICIES, "Egress", PODS[name], OUTSIDE, 53, "UDP"), f"{name} cannot resolve names"
        for port in (80, 443, 4222, 6443):
            assert allowed(POLICIES, "Egress", PODS[name], OUTSIDE, port) == (name == "autoscaler" and port in (443, 6443)), \
                f"{name} -> outside:{port}"  # fmt: skip
        # No service talks to another directly: everything goes over NATS.
        for other in FABRIC - {name}:
            for port in _ports(other) - ROUTER_PORTS - {50052}:
                assert not allowed(POLICIES, "Egress", PODS[name], PODS[other], port), f"{name} -> {other}:{port}"


def test_the_autoscaler_reaches_the_kubernetes_api() -> None:
    assert allowed(POLICIES, "Egress", PODS["autoscaler"], OUTSIDE, 443)
    assert not allowed(POLICIES, "Egress", PODS["router"], OUTSIDE, 443), "a compromised router could send prompts out"


def test_nats_members_may_only_resolve_names_and_route_to_each_other() -> None:
    assert allowed(POLICIES, "Egress", PODS[NATS], OUTSIDE, 53, "UDP")
    assert not allowed(POLICIES, "Egress", PODS[NATS], OUTSIDE, 443)
    assert not allowed(POLICIES, "Egress", PODS[NATS], PODS["router"], 8000)


def test_traces_and_dashboards_flow() -> None:
    collector = yaml.safe_load((DEPLOY / "otel" / "collector.yaml").read_text())
    jaeger_host, jaeger_port = collector["exporters"]["otlp/jaeger"]["endpoint"].split(":")
    assert connects(POLICIES, PODS["otel-collector"], PODS[jaeger_host], int(jaeger_port))
    sources = yaml.safe_load((DEPLOY / "grafana/provisioning/datasources/datasources.yml").read_text())["datasources"]
    for source in sources:
        url = urlparse(source["url"])
        assert connects(POLICIES, PODS["grafana"], PODS[url.hostname], url.port), f"grafana -> {url.netloc}"  # type: ignore[index,arg-type]
    for ui, port in (("grafana", 3000), ("prometheus", 9090), ("jaeger", 16686)):
        assert not allowed(POLICIES, "Ingress", PODS[ui], OUTSIDE, port), f"{ui}'s UI: port-forward, not the network"


def _policy(name: str) -> dict[str, Any]:
    return next(p for p in POLICIES if p["metadata"]["name"] == name)


def test_the_evaluator_follows_the_api_rules() -> None:
    """The checks above are only worth something if the evaluator is right: a few known answers."""
    open_all = {"metadata": {"name": "x"}, "spec": {"podSelector": {}, "policyTypes": ["Ingress"], "ingress": [{}]}}
    assert allowed([open_all], "Ingress", PODS[NATS], OUTSIDE, 1234)
    assert allowed([], "Ingress", PODS[NATS], OUTSIDE, 4222), "no policy: not isolated"
    deny = _policy("default-deny-ingress")
    assert not allowed([deny], "Ingress", PODS[NATS], PODS["router"], 4222)
    assert allowed([deny, _policy("nats-ingress")], "Ingress", PODS[NATS], PODS["router"], 4222)
    assert not allowed([deny, _policy("nats-ingress")], "Ingress", PODS[NATS], PODS["router"], 4222, "UDP")
    assert not allowed([_policy("nats-ingress")], "Ingress", PODS[NATS], Peer(PODS["router"].labels, in_namespace=False), 4222), \
        "a podSelector peer is a pod of this namespace only"  # fmt: skip
