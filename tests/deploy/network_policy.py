"""Kubernetes NetworkPolicy semantics, evaluated offline, for tests/deploy.

A NetworkPolicy is only as good as its label selectors and port lists, and a typo in
either fails silently (the policy selects nothing, or the wrong pods). So the tests ask
the policies questions the way the cluster would answer them: may this pod (or a client
outside the namespace) open this port on that pod?

The rules, from the NetworkPolicy API reference:
- A pod is isolated for ingress (egress) once any policy that selects it lists Ingress
  (Egress) in `policyTypes`; an isolated pod admits only what some selecting policy's
  rules allow (the union of all of them). A pod no policy isolates admits everything.
- A rule with no `from`/`to` matches every peer; with no `ports`, every port.
- A `podSelector` peer (without `namespaceSelector`) means pods of the policy's own
  namespace whose labels match.
A connection needs both: the source's egress allows it and the destination's ingress does.
Only the subset the manifests use is implemented (matchLabels, podSelector peers, numeric
ports); anything else raises, so a new construct gets evaluated, not ignored.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

__all__ = ["Peer", "OUTSIDE", "selects", "allowed", "connects"]


@dataclass(frozen=True)
class Peer:
    """One end of a connection: a pod's labels, and whether it is in the policies' namespace.

    A client outside the namespace (another namespace, a load balancer, the internet) is
    `Peer({}, in_namespace=False)`.
    """

    labels: dict[str, str] = field(default_factory=dict)
    in_namespace: bool = True
    name: str = ""

    def __hash__(self) -> int:
        return hash((self.name, tuple(sorted(self.labels.items())), self.in_namespace))


OUTSIDE = Peer({}, in_namespace=False, name="outside")


def selects(selector: dict[str, Any], labels: dict[str, str]) -> bool:
    """A LabelSelector (matchLabels only) against a pod's labels; {} selects every pod."""
    unknown = set(selector) - {"matchLabels"}
    if unknown:
        raise NotImplementedError(f"label selector with {sorted(unknown)}: teach tests/deploy/network_policy.py")
    return selector.get("matchLabels", {}).items() <= labels.items()


def _peer_matches(peers: list[dict[str, Any]] | None, peer: Peer) -> bool:
    if not peers:
        return True
    for entry in peers:
        if set(entry) != {"podSelector"}:
            raise NotImplementedError(f"peer {entry}: teach tests/deploy/network_policy.py")
        if peer.in_namespace and selects(entry["podSelector"], peer.labels):
            return True
    return False


def _port_matches(ports: list[dict[str, Any]] | None, port: int, protocol: str) -> bool:
    if not ports:
        return True
    for entry in ports:
        if not isinstance(entry.get("port"), int) or "endPort" in entry:
            raise NotImplementedError(f"port {entry}: only numeric ports are evaluated")
        if entry.get("protocol", "TCP") == protocol and entry["port"] == port:
            return True
    return False


def allowed(policies: list[dict[str, Any]], direction: str, pod: Peer, peer: Peer, port: int, protocol: str = "TCP") -> bool:
    """Whether `pod`'s policies let `peer` in (direction "Ingress") or let `pod` reach `peer` ("Egress") on `port`.

    A pod outside the namespace is governed by no policy here (its own namespace's
    policies are not ours), so it is allowed whatever it asks.
    """
    if not pod.in_namespace:
        return True
    key, peers_key = ("ingress", "from") if direction == "Ingress" else ("egress", "to")
    selecting = [p for p in policies if direction in p["spec"].get("policyTypes", []) and selects(p["spec"]["podSelector"], pod.labels)]
    if not selecting:
        return True
    for policy in selecting:
        for rule in policy["spec"].get(key, []):
            if _port_matches(rule.get("ports"), port, protocol) and _peer_matches(rule.get(peers_key), peer):
                return True
    return False


def connects(policies: list[dict[str, Any]], source: Peer, destination: Peer, port: int, protocol: str = "TCP") -> bool:
    """Source's egress and destination's ingress both allow the connection."""
    return allowed(policies, "Egress", source, destination, port, protocol) and allowed(policies, "Ingress", destination, source, port, protocol)
