"""Splitting one simulation into independent parts that can run side by side, and merging them.

Two deployments are independent when no request could ever involve both: no model is
served by both, and no session flow calls models of both. Groups of deployments that
are independent of each other share nothing the router or the autoscaler keeps (a
decision only ever ranks the nodes serving its model; the autoscaler decides each
deployment on its own), so simulating them apart gives what simulating them together
gives, except for what the router draws from its one random stream (the traffic split's
version picks) and the turn of a stateful policy (round-robin), which each part keeps
for itself. Tenants with a rate limit or a token quota share their budget across all
their requests, so a configuration that has any keeps the simulation in one part.

`partition` groups deployments into at most `parts` parts of similar estimated cost (nodes,
and a trace's calls when it is given);
`merge` puts the parts' results back together.
"""

from __future__ import annotations

import bisect
from collections.abc import Mapping, Sequence
from typing import Any

from tierflow.contracts import registry
from tierflow.placement import TenantDirectory
from tierflow.rdu.energy import tokens_per_kwh
from tierflow.sim.autoscale import ScaleEvent
from tierflow.sim.result import FleetPoint, SimResult, SimStats
from tierflow.workload.sessions import SessionPlan
from tierflow.workload.spec import CallStep, WorkloadSpec

__all__ = ["partition", "sessions_of", "merge"]


def _groups(
    spec: WorkloadSpec, deployments: Sequence[registry.DeploymentRecord], sessions: Sequence[SessionPlan] | None
) -> list[list[str]]:
    """Deployments joined by a shared model, or by a flow (or a given session) that calls
    models of both."""
    parent = {d.name: d.name for d in deployments}

    def find(name: str) -> str:
        while parent[name] != name:
            parent[name] = parent[parent[name]]
            name = parent[name]
        return name

    def join(names: Sequence[str]) -> None:
        for other in names[1:]:
            parent[find(other)] = find(names[0])

    serving: dict[str, list[str]] = {}
    for d in deployments:
        for entry in d.models:
            serving.setdefault(entry.model, []).append(d.name)
    for names in serving.values():
        join(names)
    for flow in spec.flows:
        join([d for step in flow.steps if isinstance(step, CallStep) for d in serving.get(step.model, [])])
    for models in {frozenset(call.model for call in plan.calls) for plan in sessions or ()}:
        join([d for model in sorted(models) for d in serving.get(model, [])])
    groups: dict[str, list[str]] = {}
    for d in deployments:
        groups.setdefault(find(d.name), []).append(d.name)
    return list(groups.values())


def _size(d: registry.DeploymentRecord) -> int:
    return d.replicas + (d.prefill_replicas if d.mode == "disaggregated" else 0)


def partition(
    spec: WorkloadSpec,
    deployments: Sequence[registry.DeploymentRecord],
    parts: int,
    *,
    router_config: Mapping[str, Any] | None = None,
    sessions: Sequence[SessionPlan] | None = None,
) -> list[frozenset[str]]:
    """Deployment names per part, costliest part first: at most `parts` parts, the costliest
    groups placed first, each into the part with the least cost so far (`_weights`). One part when `parts` is 1, when the
    deployments form one group, or when a tenant has a rate limit or token quota.
    `sessions`: the run's sessions when given instead of the spec's flows (a trace replay)."""
    names = frozenset(d.name for d in deployments)
    if parts <= 1:
        return [names]
    section = {k: v for k, v in (router_config or {}).items() if k in ("tenants", "anonymous_tenant")}
    if section.get("tenants"):
        tenants = TenantDirectory.from_config(section).tenants.values()
        if any(t.limiter is not None or t.quota is not None for t in tenants):
            return [names]
    groups = _groups(spec, deployments, sessions)
    weight = _weights(groups, deployments, sessions)
    groups.sort(key=lambda g: (-weight[g[0]], sorted(g)))
    bins: list[tuple[float, list[str]]] = [(0.0, []) for _ in range(min(parts, len(groups)))]
    for group in groups:
        load, members = bins.pop(0)
        bisect.insort(bins, (load + weight[group[0]], members + group), key=lambda b: b[0])
    return [frozenset(members) for _, members in reversed(bins) if members]


# What a part costs to simulate, roughly (CPU seconds on the machines the figures in the
# README come from): every node heartbeats once a second, every call is admitted, placed,
# run and recorded. Only the ratio matters: it balances parts, it predicts nothing.
_BEAT_SECONDS = 40e-6
_CALL_SECONDS = 1e-3


def _weights(
    groups: Sequence[list[str]], deployments: Sequence[registry.DeploymentRecord], sessions: Sequence[SessionPlan] | None
) -> dict[str, float]:
    """Each group's estimated cost, keyed by its first deployment: its nodes when the calls
    are not known yet (a spec's flows), else its nodes' heartbeats over the sessions' span
    plus its calls (a trace sends most of its calls to a few deployments, whatever their
    node counts)."""
    size = {d.name: _size(d) for d in deployments}
    if not sessions:
        return {g[0]: float(sum(size[n] for n in g)) for g in groups}
    group_of = {name: g[0] for g in groups for name in g}
    model_group = {entry.model: group_of[d.name] for d in deployments for entry in d.models}
    span = max(plan.start for plan in sessions)
    weight = {g[0]: sum(size[n] for n in g) * span * _BEAT_SECONDS for g in groups}
    for plan in sessions:
        for call in plan.calls:
            key = model_group.get(call.model)
            if key is not None:
                weight[key] += _CALL_SECONDS
    return weight


def sessions_of(part: frozenset[str], deployments: Sequence[registry.DeploymentRecord], sessions: Sequence[SessionPlan]) -> list[SessionPlan]:
    """The sessions a part runs: those whose every call is served inside it."""
    served = {entry.model for d in deployments if d.name in part for entry in d.models}
    return [plan for plan in sessions if all(call.model in served for call in plan.calls)]


def _merge_timelines(timelines: Sequence[Sequence[FleetPoint]]) -> list[FleetPoint]:
    """The parts' samples added up at every time any part sampled (each part's last sample
    holds until its next one)."""
    times = sorted({p.t for timeline in timelines for p in timeline})
    merged = []
    for t in times:
        held = [timeline[i - 1] for timeline in timelines if (i := bisect.bisect_right(timeline, t, key=lambda p: p.t))]
        nodes = sum(p.nodes for p in held)
        merged.append(FleetPoint(
            t=t, nodes=nodes, starting=sum(p.starting for p in held), draining=sum(p.draining for p in held),
            running=sum(p.running for p in held), queued=sum(p.queued for p in held),
            busy_share=sum(p.busy_share * p.nodes for p in held) / nodes if nodes else 0.0,
            by_deployment={k: v for p in held for k, v in p.by_deployment.items()},
        ))  # fmt: skip
    return merged


def merge(results: Sequence[SimResult]) -> SimResult:
    """One result from the parts': records in the order they were sent, figures summed."""
    if len(results) == 1:
        return results[0]
    records = sorted((r for result in results for r in result.records), key=lambda r: (r.sent_at, r.request_id))
    timeline = _merge_timelines([r.fleet_timeline for r in results])
    stats = [r.stats for r in results]
    node_seconds = sum(s.node_seconds for s in stats)
    busy = sum(s.busy_seconds for s in stats)
    events: list[ScaleEvent] = sorted((e for s in stats for e in s.scale_events), key=lambda e: (e.t, e.deployment, e.pool))
    energy = sum(s.energy_j for s in stats)
    return SimResult(
        records=records,
        fleet_timeline=timeline,
        stats=SimStats(
            virtual_s=max(s.virtual_s for s in stats), events=sum(s.events for s in stats),
            sessions=sum(s.sessions for s in stats), calls=sum(s.calls for s in stats),
            heartbeats=sum(s.heartbeats for s in stats), node_seconds=node_seconds, busy_seconds=busy,
            utilisation=busy / node_seconds if node_seconds > 0 else 0.0,
            by_deployment={k: v for s in stats for k, v in s.by_deployment.items()},
            nodes_initial=sum(s.nodes_initial for s in stats), nodes_peak=max((p.nodes for p in timeline), default=0),
            nodes_final=sum(s.nodes_final for s in stats), nodes_started=sum(s.nodes_started for s in stats),
            nodes_stopped=sum(s.nodes_stopped for s in stats), scale_events=events,
            energy_j=energy, tokens_per_kwh=tokens_per_kwh(sum(r.completion_tokens for r in records if r.outcome == "ok"), energy),
        ),  # fmt: skip
    )
