"""What a spec asks of a fleet that the fleet cannot give, found before anything runs."""

from __future__ import annotations

from collections.abc import Collection, Sequence

from tierflow.workload.sessions import SessionPlan
from tierflow.workload.spec import CallStep, WorkloadSpec

__all__ = ["undeployed_models"]


def undeployed_models(spec: WorkloadSpec, served: Collection[str], sessions: Sequence[SessionPlan] | None = None) -> list[str]:
    """One problem per model the fleet does not deploy: by its path into the spec, or, for
    given sessions (a trace replay), by the first session that calls it."""
    known = ", ".join(sorted(served)) or "none"
    problems = []
    for i, flow in enumerate(spec.flows):
        for j, step in enumerate(flow.steps):
            if isinstance(step, CallStep) and step.model not in served:
                problems.append(f"$.flows[{i}].steps[{j}].model: {step.model!r} is not deployed by the fleet (deployed: {known})")
    if spec.mix is not None:
        for k, entry in enumerate(spec.mix.models):
            if entry.model not in served:
                problems.append(f"$.mix.models[{k}].model: {entry.model!r} is not deployed by the fleet (deployed: {known})")
    first: dict[str, str] = {}
    for plan in sessions or ():
        for call in plan.calls:
            if call.model not in served:
                first.setdefault(call.model, plan.session_id)
    problems += [f"session {session}: model {model!r} is not deployed by the fleet (deployed: {known})" for model, session in first.items()]
    return problems
