"""Every NATS subject, KV bucket and service name the fabric uses, and nothing else.

Subjects follow `tierflow.<area>.<verb>[.<id>]`. Nothing outside this module spells a
subject: a grep for "tierflow." in services/ should find only imports of these names.
Ids that end up inside a subject (node ids, router ids, request ids) must be single
subject tokens; `check_token` is the one place that rule is enforced.
"""

from __future__ import annotations

import re
from typing import Final

__all__ = [
    "NODE_HEARTBEATS",
    "REGISTRY_BUCKET",
    "REGISTRY_EVENTS",
    "AUTOSCALER_DECISIONS",
    "SUPERVISOR_CONTROL",
    "AUDIT_STREAM",
    "AUDIT_SUBJECTS",
    "audit",
    "audit_kind",
    "USAGE_STREAM",
    "USAGE_SUBJECTS",
    "usage",
    "usage_of_router",
    "usage_of_tenant",
    "SERVICE_NAMES",
    "SERVICE_INFO",
    "SERVICE_API",
    "service_discovery",
    "check_token",
    "node_heartbeat",
    "node_of_heartbeat",
    "NODE_KV_EVENTS",
    "node_kv_events",
    "node_of_kv_events",
    "node_kv_sync",
    "node_generate",
    "node_cancel",
    "node_control",
    "prefill_run",
    "router_streams",
    "router_stream",
    "router_of_reply",
    "ROUTER_PRESENCE",
    "router_presence",
    "ROUTER_GOSSIP",
    "router_gossip",
    "AUTOSCALER_BUCKET",
    "AUTOSCALER_LEASE_KEY",
    "REMOVAL_KEYS",
    "removal_key",
    "KV_BATCH_HEADER",
    "model_key",
    "deployment_key",
    "bundle_key",
    "BUNDLE_KEYS",
    "MODEL_KEYS",
    "DEPLOYMENT_KEYS",
    "AGENT_LOOP_EVENTS",
    "agent_loop_events",
    "tenant_token",
]

_TOKEN = re.compile(r"^[A-Za-z0-9_-]{1,128}$")


def check_token(value: str, what: str) -> str:
    """Return `value` if it can stand as one subject token, else raise ValueError."""
    if not _TOKEN.match(value):
        raise ValueError(
            f"{what} {value!r} must be 1-128 characters of letters, digits, '-' or '_' "
            "(it becomes part of a NATS subject)"
        )
    return value


# Nodes announce themselves (hotness, load, health) on heartbeats.
NODE_HEARTBEATS: Final = "tierflow.node.heartbeat.*"


def node_heartbeat(node_id: str) -> str:
    return f"tierflow.node.heartbeat.{node_id}"


_HEARTBEAT_PREFIX: Final = "tierflow.node.heartbeat."


def node_of_heartbeat(subject: str) -> str | None:
    """The node id token of a subject made by `node_heartbeat` (None for any other): who
    may speak on it, once NATS permissions let each node publish only its own."""
    if not subject.startswith(_HEARTBEAT_PREFIX):
        return None
    node_id = subject[len(_HEARTBEAT_PREFIX):]
    return node_id if node_id and "." not in node_id else None


# Nodes publish their KV cache's changes (issue 17): which blocks they store, spill,
# bring back and drop, so a router's prefix index knows where each prompt's blocks are.
NODE_KV_EVENTS: Final = "tierflow.node.kv.*"
_KV_EVENTS_PREFIX: Final = "tierflow.node.kv."


def node_kv_events(node_id: str) -> str:
    return f"{_KV_EVENTS_PREFIX}{node_id}"


def node_of_kv_events(subject: str) -> str | None:
    """The node id token of a subject made by `node_kv_events` (None for any other): the
    only node whose events may arrive on it."""
    if not subject.startswith(_KV_EVENTS_PREFIX):
        return None
    node_id = subject[len(_KV_EVENTS_PREFIX):]
    return node_id if node_id and "." not in node_id else None


def node_kv_sync(node_id: str) -> str:
    """Fire-and-forget: a router that missed some of a node's KV events (a gap in their
    sequence numbers) asks for a full snapshot, which then goes to every router."""
    return f"tierflow.node.kvsync.{node_id}"


def node_generate(node_id: str) -> str:
    """A decode node's generate endpoint; the reply subject receives the token stream."""
    return f"tierflow.node.generate.{node_id}"


def node_cancel(node_id: str) -> str:
    """Fire-and-forget cancellation of a request on a node (the client went away)."""
    return f"tierflow.node.cancel.{node_id}"


def node_control(node_id: str) -> str:
    """Request/reply: cordon, uncordon or drain one node (the CLI and the autoscaler)."""
    return f"tierflow.node.control.{node_id}"


def prefill_run(node_id: str) -> str:
    return f"tierflow.prefill.run.{node_id}"


def router_streams(router_id: str) -> str:
    """The one wildcard subscription a router holds for all of its reply streams."""
    return f"tierflow.router.stream.{router_id}.*"


def router_stream(router_id: str, request_id: str) -> str:
    return f"tierflow.router.stream.{router_id}.{request_id}"


_STREAM_PREFIX: Final = "tierflow.router.stream."


def router_of_reply(reply: str) -> str | None:
    """The router id inside a reply subject made by `router_stream`; None for any other
    reply subject (a test's inbox, a tool's `nc.request`)."""
    if not reply.startswith(_STREAM_PREFIX):
        return None
    router_id, dot, _ = reply[len(_STREAM_PREFIX):].partition(".")
    return router_id if dot and router_id else None


# A router says it is alive (about once a second). Nodes drop the streams of a router
# that has fallen silent: nobody will ever read them, and their batch slots are needed.
ROUTER_PRESENCE: Final = "tierflow.router.presence.*"


def router_presence(router_id: str) -> str:
    return f"tierflow.router.presence.{router_id}"


# What one router learned that the others should know too (session -> node affinity,
# nodes that just failed): batched, a few messages a second at most.
ROUTER_GOSSIP: Final = "tierflow.router.gossip.*"


def router_gossip(router_id: str) -> str:
    return f"tierflow.router.gossip.{router_id}"


# The router's agent-loop policing (tierflow.placement.agent_loops): a session flagged or
# capped, per tenant (contracts.events.AgentLoopEvent); the observer may watch them.
AGENT_LOOP_EVENTS: Final = "tierflow.events.agent_loop.*"


def tenant_token(tenant: str) -> str:
    """A tenant name as one subject token, reversibly: tenant names may hold '.' (a subject
    separator) and '_', so '_' is written '__' and '.' '_d'. Names without either, the
    usual case, are themselves; no two names share a token, so a subscription to one
    tenant's subject never sees another's."""
    return check_token(tenant.replace("_", "__").replace(".", "_d"), "tenant")


def agent_loop_events(tenant: str) -> str:
    return f"tierflow.events.agent_loop.{tenant_token(tenant)}"


REGISTRY_EVENTS: Final = "tierflow.registry.changed"
AUTOSCALER_DECISIONS: Final = "tierflow.autoscaler.decision"
# Request/reply to the local process supervisor (`tierflow up`): start/stop/list node
# processes. The autoscaler's local actuator is its client.
SUPERVISOR_CONTROL: Final = "tierflow.supervisor.control"

# The audit stream (JetStream, made by the model registry at start): who changed what.
# `audit(kind, speaker)` is `tierflow.audit.<kind>.<speaker>`: the speaker is the process
# that recorded it (a node's id, the registry's or autoscaler's instance), so NATS
# permissions can let a node record only as itself. Publishers, one kind each:
#   registry  the model registry (admin calls, refused ones included)
#   node      decode and prefill nodes (cordon / uncordon / drain they carried out)
#   scaling   the autoscaler (scale up / down it acted on)
# Readers: `tierflow audit` (the observer identity may read it), by kind: `audit_kind(kind)`.
AUDIT_STREAM: Final = "TIERFLOW_AUDIT"
AUDIT_SUBJECTS: Final = "tierflow.audit.>"


def audit(kind: str, speaker: str) -> str:
    return f"tierflow.audit.{check_token(kind, 'audit kind')}.{speaker if speaker == '*' else check_token(speaker, 'audit speaker')}"


def audit_kind(kind: str) -> str:
    """Every speaker's records of one kind (a filter for readers)."""
    return f"tierflow.audit.{check_token(kind, 'audit kind')}.*"


# The usage ledger (JetStream, made by every router at start; tierflow.contracts.usage):
# one record per admitted request, `tierflow.usage.<tenant>.<router>`. The router token lets
# NATS permissions pin each router to its own records, and a restarted router read its own
# back; the tenant token lets readers filter by tenant. Tenant names may hold '.', which a
# subject token may not: it becomes '_' (the record's `tenant` field is the exact name).
USAGE_STREAM: Final = "TIERFLOW_USAGE"
USAGE_SUBJECTS: Final = "tierflow.usage.>"


def _tenant_token(tenant: str) -> str:
    return tenant if tenant == "*" else check_token(tenant.replace(".", "_"), "tenant name")


def usage(tenant: str, router: str) -> str:
    return f"tierflow.usage.{_tenant_token(tenant)}.{router if router == '*' else check_token(router, 'router id')}"


def usage_of_tenant(tenant: str) -> str:
    """Every router's records of one tenant (a filter for readers)."""
    return usage(tenant, "*")


def usage_of_router(router: str) -> str:
    """One router's records of every tenant (its own permission, and its own on restart)."""
    return usage("*", router)


# A header on every message of one atomic KV batch (`<batch id> <position>/<size>`): readers
# buffer a batch until its last message and apply it whole (libs/runtime/kv_watch.py).
KV_BATCH_HEADER: Final = "Tierflow-Batch"

# JetStream KV: bucket names may not contain dots; keys may.
REGISTRY_BUCKET: Final = "tierflow-registry"
MODEL_KEYS: Final = "model.>"
DEPLOYMENT_KEYS: Final = "deployment.>"
BUNDLE_KEYS: Final = "bundle.>"


# The autoscaler's own durable state: who is the active one (a lease), and the scale-downs
# it has begun (so a restarted autoscaler finishes or undoes them, and knows which
# cordons are its own).
AUTOSCALER_BUCKET: Final = "tierflow-autoscaler"
AUTOSCALER_LEASE_KEY: Final = "lease"
REMOVAL_KEYS: Final = "removal.>"


def removal_key(node_id: str) -> str:
    return f"removal.{node_id}"


def model_key(name: str) -> str:
    return f"model.{name}"


def bundle_key(name: str) -> str:
    return f"bundle.{name}"


def deployment_key(name: str) -> str:
    return f"deployment.{name}"


# The nats.micro discovery subject (defined by the NATS micro protocol, not by us).
SERVICE_INFO: Final = "$SRV.INFO"
# Every subject of that protocol (discovery requests and their per-service forms).
SERVICE_API: Final = "$SRV.>"


def service_discovery(service_name: str | None = None) -> list[str]:
    """What a nats.micro service subscribes to for discovery: `$SRV.PING|INFO|STATS`
    alone, or with its name and with its name and id (`service_name`)."""
    verbs = ("PING", "INFO", "STATS")
    if service_name is None:
        return [f"$SRV.{verb}" for verb in verbs]
    return [f"$SRV.*.{service_name}", f"$SRV.*.{service_name}.*"]

# nats.micro service names: `tierflow status` discovers services by these.
SERVICE_NAMES: Final = {
    "router": "tierflow-router",
    "model-registry": "tierflow-model-registry",
    "autoscaler": "tierflow-autoscaler",
    "prefill-node": "tierflow-prefill-node",
    "decode-node": "tierflow-decode-node",
}
