"""The router's decision path, step for step as `services/router/dispatch.py` takes it.

Admission (tenant, model, context length, rate limit and quota), the traffic split, the
session's last node, the prompt's block hashes, then `CandidateIndex.rank(policy,
request, now)` with the nodes already tried excluded, a canary
version with no live node falling back to the default one, and `NodeTable.note_dispatch`
with `ModelTable.at_risk`, so decisions between two heartbeats see what the
earlier ones did. Retries follow the dispatcher too: a node that refuses before the
first token sends the request to the next one, up to `max_attempts`; when every node
tried was full, the answer is 429 "overloaded", else 502 "no_healthy_node"; nothing
eligible at all is 503 with placement's reason.

The tables are the router's own (`tierflow.placement.tables`), fed the same heartbeats
and registry records; errors are the router's own (`tierflow.runtime.errors`), so a
record carries the status and code a live client would have seen.

Decisions go through `CandidateIndex.rank`, as the dispatcher's do: the candidates are
`nodes.index().serving(model)` exactly (same views, same order), kept current change by
change, and the hotness policy scores them column-wise (`HotnessAware.rank_rows`), with
the answer of its per-node ranking.

Admission (`tierflow.placement.admission`, when `admission` is given) is the live router's:
each call holds a ticket on its model's limit, shared by request class and tenant weight,
from the end of `admit` until it finishes or fails (`release`); the nodes' queue times
feed its learned limit when the first token arrives (`started`), and the fleet's batch
slots are re-read from the node table every `CAPACITY_EVERY_S`, as the router's
housekeeping does. A call's class is the one its session plan asks for (the spec tenant's
`request_class`), resolved against the router tenant's allowance (a 403 above it).

One difference in how, not what, for speed at a thousand nodes:

- A heartbeat that repeats the last one (`heard(..., unchanged=True)`: the node did
  nothing since) is applied only when the router has changed its view of the node since
  (a dispatch noted, a failure marked) or every second interval. Its view would differ
  from the one the table holds only in `last_seen`, and a node heard within two
  intervals is live either way (placement drops a node after three), so no decision
  can tell.
"""

from __future__ import annotations

import math
import random
from collections.abc import Mapping
from dataclasses import replace
from typing import Any, Final

from tierflow.contracts import messages
from tierflow.placement import (
    NoEligibleNode,
    PlacementConfig,
    PlacementRequest,
    SessionTable,
    Tenant,
    TenantDirectory,
    TenantPolicy,
    session_key,
)
from tierflow.placement.admission import Admission, AdmissionConfig, capacity_of
from tierflow.placement.candidates import CandidateIndex
from tierflow.placement.tables import ModelTable, NodeTable
from tierflow.runtime.errors import InvalidRequest, ModelNotFound, NoCapacity, NodeFailure, RateLimited, TierflowError, Unauthenticated
from tierflow.sim.calls import Call

__all__ = ["SimRouter", "OPEN_TENANT", "tenants_from_config", "CAPACITY_EVERY_S"]

OPEN_TENANT: Final = "anonymous"
CAPACITY_EVERY_S: Final = 0.5  # the live router's housekeeping interval (services/router/main.py)


def tenants_from_config(config: Mapping[str, Any] | None) -> TenantDirectory | None:
    """The router configuration's tenants; None when it has none (everyone is the open
    tenant "anonymous", whatever key it sends, as a router without tenants answers)."""
    section = {k: v for k, v in (config or {}).items() if k in ("tenants", "anonymous_tenant")}
    return TenantDirectory.from_config(section) if section.get("tenants") else None


class SimRouter:
    """One router: its node and model tables, sessions, tenants and placement policy."""

    def __init__(
        self,
        models: ModelTable,
        *,
        placement: PlacementConfig,
        tenants: TenantDirectory | None,
        max_attempts: int = 3,
        seed: int | None = None,
        admission: AdmissionConfig | None = None,
    ) -> None:
        """`admission`: the router's admission settings (None: admit everything, as
        `--queue-budget 0`)."""
        self.nodes = NodeTable()
        self.models = models
        self.sessions = SessionTable()
        self.policy = placement.build(switch_cost=models.switch_cost, batch_turn=models.batch_turn, prefill_rate=models.prefill_rate)
        self._tenants = tenants
        self._open = Tenant.from_policy(TenantPolicy(name=OPEN_TENANT))
        self._max_attempts = max_attempts
        self._rng = random.Random(seed)
        self.candidates = CandidateIndex(self.nodes)
        self._applied: dict[str, float] = {}  # node id -> when its view was last built from a heartbeat
        self._touched: set[str] = set()  # nodes whose view the router changed since then
        self.admission = Admission(admission) if admission is not None else None
        self._capacity_at = -math.inf  # when the admission's capacities were last read

    # -- what the router hears ----------------------------------------------------------
    def heard(self, hb: messages.NodeHeartbeat, now: float, *, unchanged: bool = False) -> None:
        """A heartbeat, applied as the router applies it (see the module docstring for
        when an `unchanged` one can be skipped)."""
        node_id = hb.node_id
        if unchanged and node_id not in self._touched and now - self._applied.get(node_id, -math.inf) < 1.5 * hb.interval_s:
            return
        self.nodes.apply(hb, now, workload=self.models.workload(hb.deployment))
        self._applied[node_id] = now
        self._touched.discard(node_id)

    # -- admission --------------------------------------------------------------------
    def admit(self, call: Call, *, api_key: str, session_id: str, workload: str | None, now: float) -> None:
        """Everything before placement; raises the TierflowError the router would answer."""
        tenant = self._tenants.authenticate(api_key) if self._tenants is not None else self._open
        if tenant is None:
            raise Unauthenticated("Incorrect API key provided.", code="invalid_api_key")
        call.tenant = tenant
        route = self.models.routes.get(call.model)
        if route is None or not tenant.allows_model(call.model):
            raise ModelNotFound(f"The model `{call.model}` does not exist or is not deployed.", param="model", code="model_not_found")
        call.route = route
        request_class = call.request_class = tenant.request_class(call.run.plan.request_class)  # the spec tenant's; a 403 above the tenant's allowance
        n_prompt = call.prompt_tokens
        if n_prompt + call.max_tokens > route.max_context:
            raise InvalidRequest(
                f"This model's maximum context length is {route.max_context} tokens; the request has {n_prompt} in the prompt "
                f"and {call.max_tokens} for the completion.",
                param="max_tokens", code="context_length_exceeded",
            )  # fmt: skip
        call.reservation = tenant.admit(now, n_prompt, call.max_tokens)
        session = session_key(tenant.name, None, session_id) if session_id else ""
        call.placement = PlacementRequest(
            model=call.model,
            version=route.pick_version(self._rng),
            prompt_hashes=call.prompt_hashes,  # at self.nodes.block_size: see Simulation._send
            session_id=session,
            affinity_node=self.sessions.last_node(session, call.model) if session else None,
            boundary=tenant.boundary,
            workload=workload or tenant.workload,  # type: ignore[arg-type]
            prompt_tokens=n_prompt,
        )
        admission = self.admission
        if admission is not None:  # last of the checks, as the dispatcher's
            if now - self._capacity_at >= CAPACITY_EVERY_S:
                admission.set_capacities(capacity_of(self.nodes.views, now))
                self._capacity_at = now
            call.ticket = admission.admit(call.model, now, tenant=tenant.name, weight=tenant.weight, request_class=request_class)

    def release(self, call: Call, now: float) -> None:
        """The call is over, however it ended: its admission ticket is given back (once)."""
        if call.ticket is not None:
            call.ticket.release(now)

    # -- placement --------------------------------------------------------------------
    def next_node(self, call: Call, now: float) -> str:
        """The node of the call's next attempt, booked with `note_dispatch`; raises the
        TierflowError that ends the call when there is no further attempt."""
        if call.attempt >= self._max_attempts:
            raise self._exhausted(call)
        placement = call.placement
        route = call.route
        assert placement is not None and route is not None
        tried = call.tried
        while True:
            try:
                ranked = self.candidates.rank(self.policy, replace(placement, exclude=frozenset(tried)), now)
                break
            except NoEligibleNode as none:
                if none.code == "version_not_served" and placement.version != route.default_version:
                    placement = call.placement = replace(placement, version=route.default_version)  # a canary without a live node
                    continue
                if tried and call.overloaded == len(tried):
                    raise self._overloaded(call) from None  # every node that could serve it is full: back-pressure
                if tried:
                    raise NodeFailure(
                        f"model {call.model!r} failed on {', '.join(sorted(tried))} before producing output ({call.last_failure}), "
                        f"and no other node can take it now: {none.reason}",
                        code="no_healthy_node", retryable=True,
                    ) from None  # fmt: skip
                raise NoCapacity(none.reason, code=none.code) from None
        best = ranked.best
        node_id = best.node_id
        call.attempt += 1
        tried.add(node_id)
        call.node = node_id
        view = self.nodes.get(node_id)
        call.booked = max(0, call.prompt_tokens - best.prefix_blocks * self.nodes.block_size)
        call.started = False
        self.nodes.note_dispatch(node_id, call.model, evicts=self.models.at_risk(view, call.model) if view else (), prompt_tokens=call.booked)
        self._touched.add(node_id)
        return node_id

    def mark_suspect(self, node_id: str, now: float) -> None:
        """A node did not answer: keep new work off it for a while (the dispatcher's `NodeLost`)."""
        self.nodes.mark_suspect(node_id, now)
        self._touched.add(node_id)

    def prefill_node(self, call: Call, deployment: str, now: float) -> str | None:
        """A prefill node of the deployment for the call's prompt; None when none can take it
        (the dispatcher's "no live prefill node": the attempt fails and the next one follows)."""
        candidates = [n for n in self.nodes.prefill_nodes(deployment) if n.takes_work(now)]
        assert call.placement is not None
        if not candidates:
            call.last_failure = f"no live prefill node in deployment {deployment!r}"
            return None
        try:
            ranked = self.policy.rank(candidates, replace(call.placement, exclude=frozenset()), now, limit=1)
        except NoEligibleNode as none:
            call.last_failure = none.reason
            return None
        return ranked.best.node_id

    def started(self, call: Call, node_id: str, now: float) -> None:
        """The call's first token reached the router: it is in the node's batch and its
        prompt no longer queued there (the dispatcher's `NodeTable.note_started`), and
        its queue time on the node feeds admission (`Ticket.started`)."""
        if call.ticket is not None:
            call.ticket.started(call.queue_time, now)
        if not call.started and self.nodes.note_started(node_id, call.model, call.booked):
            call.started = True
            self._touched.add(node_id)

    def _ended(self, call: Call, node_id: str) -> None:
        """The call's leg on `node_id` is done (the dispatcher's `NodeTable.note_ended`);
        a first token heard after it moves nothing."""
        if call.booked >= 0:
            self.nodes.note_ended(node_id, call.model, started=call.started, prompt_tokens=call.booked)
            call.started, call.booked = True, -1
            self._touched.add(node_id)

    def attempt_failed(self, call: Call, node_id: str, code: str, message: str) -> None:
        """A node refused the call before its first token (retryable): remember why."""
        self._ended(call, node_id)  # nothing of it is queued there any more
        call.last_failure = f"{node_id}: {code}: {message}"
        if code == "queue_full":
            call.overloaded += 1

    def _overloaded(self, call: Call) -> TierflowError:
        return RateLimited(f"every node serving {call.model!r} is at capacity; retry shortly", retry_after=1.0, code="overloaded")

    def _exhausted(self, call: Call) -> TierflowError:
        if call.overloaded == len(call.tried):
            return self._overloaded(call)
        return NodeFailure(
            f"model {call.model!r} failed on {', '.join(sorted(call.tried))} before producing output ({call.last_failure}); retry the request",
            code="no_healthy_node", retryable=True,
        )  # fmt: skip

    def failed(self, call: Call, now: float) -> None:
        """The call ended in an error (the router gives up at `now`): its quota reservation is
        released (the simulator's failures come before any output reaches the client, or end
        it at a node's loss, which the live router would migrate; either way nothing is
        charged here) and its admission ticket given back."""
        if call.reservation is not None:
            call.reservation.settle(0)
        self.release(call, now)

    def deployment_mode(self, node_id: str) -> tuple[str, str]:
        """(deployment, mode) of a decode node as the router knows it."""
        view = self.nodes.get(node_id)
        record = self.models.deployment(view.deployment) if view is not None else None
        return (record.name, record.mode) if record is not None else ("", "aggregated")

    # -- completion -------------------------------------------------------------------
    def settle(self, call: Call, now: float, *, prompt_tokens: int, completion_tokens: int, decode_s: float) -> None:
        """The dispatcher's books once the node finished: quota reservation settled, session touched,
        the model's decode time (first token to last, as the router saw them) observed."""
        if call.reservation is not None:
            call.reservation.settle(prompt_tokens + completion_tokens)
        placement = call.placement
        if placement is not None and placement.session_id:
            self.sessions.touch(placement.session_id, call.node, call.model)
        if completion_tokens > 1:
            self.models.observe_decode(call.model, decode_s)
        self._ended(call, call.node)  # a one-token answer may end before its _PREFILLED event
        self.release(call, now)

