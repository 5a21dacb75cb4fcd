"""The event loop: sessions, router, nodes, heartbeats and the autoscaler on one virtual clock.

One heap of `(time, seq, kind, a, b)` events; `seq` breaks ties in the order events were
made, so a run is a pure function of its inputs. What happens between events is what
the live fabric does, in its order:

    client --hop--> router --hop--> node ... node --hop--> router --hop--> client

- A session step runs as the live driver runs it (`tierflow.sim.client`). A call is
  admitted and placed by the router when it reaches the router, one hop after the client
  sent it, and reaches its node a hop later; the node's first token and finish reach the
  client two hops after they happen on the node.
- A disaggregated deployment takes the dispatcher's extra leg: the decode node is chosen,
  then a prefill node of the same deployment computes the prompt (max_tokens 0); its
  finish goes back to the router, which sends the call on to the decode node, which holds
  it for the KV transfer (`SimNode.receive`).
- A node refusing a call before its first token sends the refusal back (one hop) and the
  router tries the next node (`SimRouter.next_node`).
- Each node's engine is advanced exactly when its next work is due.
- Each node heartbeats every `heartbeat_s` (staggered across the interval, as processes
  started at different times are), and at once when a weight switch starts or it is
  cordoned or uncordoned; the autoscaler's view takes every beat, the router's tables
  every beat that could change a decision (`SimRouter.heard`).
- The autoscaler ticks every `AUTOSCALER_INTERVAL_S`; a node it starts comes up after its
  `start_delay` (its cold load); a node it drains is polled until empty, then stopped.

The run ends when the last session ends.
"""

from __future__ import annotations

import gc
import heapq
import itertools
from collections.abc import Callable, Collection, Iterator, Sequence
from contextlib import contextmanager
from typing import Any, Final

from tierflow.nodehost.preload import preload_models
from tierflow.placement import PlacementConfig, TenantDirectory
from tierflow.placement.tables import ModelTable
from tierflow.placement.prefix_index import PrefixIndex
from tierflow.rdu import RequestFinished, RequestStarted
from tierflow.rdu.energy import tokens_per_kwh
from tierflow.runtime.errors import InvalidRequest, NodeFailure as RouterNodeFailure, TierflowError
from tierflow.sim.autoscale import AUTOSCALER_INTERVAL_S, DRAIN_POLL_S, DRAIN_TIMEOUT_S, SimAutoscaler
from tierflow.sim.calls import Call
from tierflow.sim.checks import undeployed_models
from tierflow.sim.client import SessionRun, failed_record, ok_record
from tierflow.sim.config import SimConfig, SimError
from tierflow.sim.fleet import DeploymentPlan, FleetRecords, plan_deployments, start_delay
from tierflow.sim.node import NodeFailure, SimNode
from tierflow.sim.result import FleetPoint, SimResult, SimStats
from tierflow.sim.router import SimRouter, tenants_from_config
from tierflow.workload.records import RequestRecord
from tierflow.workload.sessions import CallPlan, SessionPlan, ToolPlan, plan_sessions
from tierflow.workload.spec import WorkloadSpec

__all__ = ["Simulation", "prepare", "rare_collections", "HOUSEKEEPING_S"]

HOUSEKEEPING_S: Final = 1.0  # the router forgets long-dead nodes this often, as its housekeeping task does
_CLIENT_ERRORS: Final = frozenset({"context_length_exceeded", "bad_request", "invalid_request"})  # the dispatcher's

# Event kinds, in no particular order.
_SESSION, _STEP, _TOOL_DONE, _RECEIVE, _KV_ARRIVED, _RETRY, _WAKE, _BEAT, _TICK, _HOUSEKEEPING, _SAMPLE, _UP, _COMMAND, _POLL, _PREFILLED = range(15)


def prepare(
    spec: WorkloadSpec, fleet: FleetRecords, config: SimConfig, *, sessions: Sequence[SessionPlan] | None = None
) -> tuple[list[DeploymentPlan], PlacementConfig, TenantDirectory | None]:
    """The deployments' plans, the placement configuration and the tenants of a run;
    SimError lists what makes the run impossible (a model the spec or the given sessions
    call that the fleet does not deploy, an unknown profile or policy, a bad router
    configuration)."""
    try:
        plans = plan_deployments(fleet, nodes=config.nodes)
    except (LookupError, ValueError) as exc:
        raise SimError([str(exc).strip("'\"")]) from None
    problems = undeployed_models(spec, {entry.model for plan in plans for entry in plan.record.models}, sessions)
    if problems:
        raise SimError(problems)
    section = dict(config.router_config.get("placement") or {})
    if config.policy is not None:
        section["policy"] = config.policy
    try:
        return plans, PlacementConfig.from_config(section), tenants_from_config(config.router_config)
    except ValueError as exc:
        raise SimError([f"router configuration: {exc}"]) from None


@contextmanager
def rare_collections() -> Iterator[None]:
    """Run with the cyclic garbage collector mostly out of the way, then put it back.

    A simulation holds millions of long-lived objects (node views, KV blocks, records)
    and allocates a few hundred per request, so at the default thresholds the collector
    walks the young generations every few hundred allocations and the whole heap every
    few thousand: a quarter of a run's CPU, measured, for almost nothing (the loop makes
    few cycles). Objects made before the run are frozen out of collection, collections
    of the young generation wait for 100,000 allocations, and full ones almost never run.
    """
    threshold = gc.get_threshold()
    gc.freeze()
    gc.set_threshold(100_000, 50, 1_000)
    try:
        yield
    finally:
        gc.set_threshold(*threshold)
        gc.unfreeze()


class Simulation:
    """One run: build it, then `run()` once."""

    def __init__(
        self,
        spec: WorkloadSpec,
        fleet: FleetRecords,
        config: SimConfig,
        *,
        part: Collection[str] | None = None,
        sessions: Sequence[SessionPlan] | None = None,
    ) -> None:
        """`part`: simulate only these deployments and the sessions that call their models
        (`tierflow.sim.shards.partition`); None simulates the whole fleet. `sessions`: run
        these session plans (a trace replay's, `tierflow.workload.replay`) instead of the
        spec's arrivals."""
        self.config = config
        self.hop = config.hop_s
        plans, placement, tenants = prepare(spec, fleet, config, sessions=sessions)
        self.plans = {p.name: p for p in plans if part is None or p.name in part}
        models = ModelTable()
        for record in fleet.models.values():
            models.put_model(record)
        for plan in self.plans.values():
            models.put_deployment(plan.record)
        self.router = SimRouter(
            models, placement=placement, tenants=tenants, max_attempts=config.max_attempts, seed=config.seed,
            admission=config.admission,
        )  # fmt: skip
        # The router's exact prefix index (issue 17), fed by the nodes' KV events in process,
        # with no delay: placement reads it as the live router does (`NodeTable.prefix_sets`).
        self.prefix_index = PrefixIndex()
        self.router.nodes.prefix_sets = self.prefix_index.holder
        if sessions is None:
            sessions = plan_sessions(spec, seed=config.seed, duration_s=config.duration_s, rate_scale=config.rate_scale)
        served = models.routes
        self.sessions = sorted(
            (p for p in sessions if part is None or all(c.model in served for c in p.calls)), key=lambda p: p.start
        )
        self.autoscaler = SimAutoscaler(list(self.plans.values()), config.scaling) if config.autoscale else None
        self.nodes: dict[str, SimNode] = {}
        self.retired: list[SimNode] = []
        self.pending: dict[tuple[str, str], int] = {}  # nodes asked for and not up yet, per pool
        self._up: dict[tuple[str, str], int] = {}  # nodes up, per pool
        self.records: list[RequestRecord] = []
        self.timeline: list[FleetPoint] = []
        self._heap: list[tuple[float, int, int, Any, Any]] = []
        self._seq = itertools.count()
        self._next_session = 0
        self._open_sessions = len(self.sessions)
        self._ordinals: dict[tuple[str, str], int] = {}
        self._events = self._calls = self._beats = 0
        self._last_busy: dict[str, float] = {}
        self._handlers: list[Callable[[float, Any, Any], None]] = [
            self._on_session, self._on_step, self._on_tool_done, self._on_receive, self._on_kv_arrived, self._on_retry,
            self._on_wake, self._on_beat, self._on_tick, self._on_housekeeping, self._on_sample, self._on_up,
            self._on_command, self._on_poll, self._on_prefilled,
        ]  # fmt: skip

    # -- the loop ---------------------------------------------------------------------
    def _push(self, t: float, kind: int, a: Any = None, b: Any = None) -> None:
        heapq.heappush(self._heap, (t, next(self._seq), kind, a, b))

    def run(self, progress: Callable[[float], None] | None = None, *, every: int = 20_000) -> SimResult:
        """Simulate to the end; `progress(t)` hears the virtual time every `every` events."""
        with rare_collections():
            return self._run(progress, every)

    def _run(self, progress: Callable[[float], None] | None, every: int) -> SimResult:
        self._start_fleet()
        if self.sessions:
            self._push(self.sessions[0].start, _SESSION, self.sessions[0])
            self._next_session = 1
        if self.autoscaler is not None:
            self._push(AUTOSCALER_INTERVAL_S, _TICK)
        self._push(HOUSEKEEPING_S, _HOUSEKEEPING)
        self._push(0.0, _SAMPLE)
        heap, pop, handlers = self._heap, heapq.heappop, self._handlers
        t = 0.0
        events = 0
        while heap and self._open_sessions:
            t, _, kind, a, b = pop(heap)
            handlers[kind](t, a, b)
            events += 1
            if progress is not None and not events % every:
                progress(t)
        self._events = events
        self._on_sample(t, None, None)
        return self._result(t)

    # -- fleet ------------------------------------------------------------------------
    def _start_fleet(self) -> None:
        initial = [(plan, pool) for plan in self.plans.values() for pool in plan.pools for _ in range(plan.initial(pool))]
        interval = self.config.heartbeat_s
        for i, (plan, pool) in enumerate(initial):
            node = self._new_node(plan, pool, 0.0)
            self._beat(node, 0.0)  # the router knows the fleet when the run starts ...
            node.beat_due = interval * (i + 1) / len(initial)  # ... and its beats are spread over the interval after
            self._push(node.beat_due, _BEAT, node, node.beat_due)

    def _node_id(self, plan: DeploymentPlan, pool: str) -> str:
        """The next id of a pool: numbered within it, as the local actuator numbers nodes
        (the number picks the node's HBM preload)."""
        key = (plan.name, pool)
        ordinal = self._ordinals.get(key, 0)
        self._ordinals[key] = ordinal + 1
        return f"{plan.name}-{pool}-{ordinal}"

    def _new_node(self, plan: DeploymentPlan, pool: str, now: float, node_id: str | None = None) -> SimNode:
        node = SimNode(plan, pool, node_id or self._node_id(plan, pool), now, token_events=self.config.token_events, kv_events=True)
        self.nodes[node.node_id] = node
        self._kv_events(node, now)  # its start snapshot: known before its first heartbeat
        self._up[(plan.name, pool)] = self._up.get((plan.name, pool), 0) + 1
        return node

    def _provisioned(self, deployment: str, pool: str) -> int:
        """Nodes of a pool the simulator runs, up or on their way (the actuator's inventory)."""
        key = (deployment, pool)
        return self._up.get(key, 0) + self.pending.get(key, 0)

    # -- sessions (the client) ----------------------------------------------------------
    def _on_session(self, t: float, plan: SessionPlan, _: None) -> None:
        if self._next_session < len(self.sessions):
            following = self.sessions[self._next_session]
            self._next_session += 1
            self._push(following.start, _SESSION, following)
        self._on_step(t, SessionRun(plan), None)

    def _on_step(self, t: float, run: SessionRun, _: None) -> None:
        step = run.next_step()
        if step is None:
            self._open_sessions -= 1
        elif isinstance(step, ToolPlan):
            self._push(t + step.latency_s, _TOOL_DONE, run, step)
        else:
            self._send(run, step, t)

    def _on_tool_done(self, t: float, run: SessionRun, step: ToolPlan) -> None:
        run.conversation.record(step, step.output_text)
        self._continue(run, t)

    def _continue(self, run: SessionRun, t: float) -> None:
        self._push(t + run.pause, _STEP, run)

    def _send(self, run: SessionRun, step: CallPlan, t: float) -> None:
        """The call leaves the client with its prompt's length and block hashes (at the
        router's block size), computed once; its token ids only when the engines read
        them (per-token events), taken now, since the conversation grows later."""
        self._calls += 1
        conversation, system = run.conversation, step.system_text
        call = Call(
            run.request_id(step), run, step, t,
            prompt_tokens=conversation.prompt_tokens(system),
            prompt_hashes=conversation.prompt_block_hashes(system, self.router.nodes.block_size),
            prompt_ids=conversation.prompt_token_ids(system) if self.config.token_events else None,
        )  # fmt: skip
        at_router = t + self.hop
        plan = run.plan
        try:
            self.router.admit(call, api_key=plan.api_key, session_id=plan.session_key, workload=plan.workload, now=at_router)
            self._attempt(call, at_router)
        except TierflowError as error:
            self._fail(call, error, at_router)

    def _fail(self, call: Call, error: TierflowError, now: float) -> None:
        """The call ends in an error answer (the router gives up at `now`); the live
        driver ends its session there."""
        self.router.failed(call, now)
        run = call.run
        self.records.append(failed_record(run, call.step, call.request_id, sent_at=call.sent_at, prompt_tokens=call.prompt_tokens, error=error))
        self._open_sessions -= 1

    # -- the router -------------------------------------------------------------------
    def _attempt(self, call: Call, t: float) -> None:
        """The router's next attempt at `t` (raises the error that ends the call)."""
        router = self.router
        while True:
            node_id = router.next_node(call, t)
            deployment, mode = router.deployment_mode(node_id)
            if mode != "disaggregated":
                self._push(t + self.hop, _RECEIVE, call, (node_id, ""))
                return
            prefill_id = router.prefill_node(call, deployment, t)
            if prefill_id is not None:
                self._push(t + self.hop, _RECEIVE, call, (prefill_id, ""))
                return
            # no prefill node can take it: that attempt failed at the router; the next one follows

    def _on_retry(self, t: float, call: Call, _: None) -> None:
        try:
            self._attempt(call, t)
        except TierflowError as error:
            self._fail(call, error, t)

    def _refused(self, call: Call, node: SimNode, failure: NodeFailure, t: float) -> None:
        """A node said no (at `t`); the router hears it a hop later and retries or gives up,
        as the dispatcher does for a decode node, and for a prefill node (always a retry)."""
        if failure.code in _CLIENT_ERRORS:
            self._fail(call, InvalidRequest(failure.message, code=failure.code), t + self.hop)
        elif node.identity.role == "decode" and not failure.retryable:
            self._fail(call, RouterNodeFailure(f"node {node.node_id} failed the request: {failure.message}", code=failure.code), t + self.hop)
        else:
            self.router.attempt_failed(call, node.node_id, failure.code, failure.message)
            self._push(t + self.hop, _RETRY, call)

    # -- nodes ------------------------------------------------------------------------
    def _on_receive(self, t: float, call: Call, target: tuple[str, str]) -> None:
        node_id, kv_from = target
        node = self.nodes.get(node_id)
        if node is None:  # stopped since the router chose it: nobody listens on its subject
            self.router.mark_suspect(node_id, t + self.hop)
            self.router.attempt_failed(call, node_id, "node_lost", "no longer listening (no responders)")
            self._push(t + self.hop, _RETRY, call)
            return
        try:
            transfer = node.receive(call, t, kv_from=kv_from)
        except NodeFailure as failure:
            self._refused(call, node, failure, t)
            return
        if transfer > 0:
            self._push(t + transfer, _KV_ARRIVED, call, node)
        else:
            self._wake(node, t)

    def _on_kv_arrived(self, t: float, call: Call, node: SimNode) -> None:
        if node.stopped_at is not None:
            return
        try:
            node.kv_arrived(call, t)
        except NodeFailure as failure:
            self._refused(call, node, failure, t)
            return
        self._wake(node, t)

    def _wake(self, node: SimNode, t: float) -> None:
        due = node.engine.next_event_time()
        if due is not None and due != node.wake_due:
            node.wake_due = due
            self._push(max(due, t), _WAKE, node, due)

    def _on_wake(self, t: float, node: SimNode, due: float) -> None:
        if node.wake_due != due or node.stopped_at is not None:
            return  # superseded by an earlier wake, or the node is gone
        node.wake_due = None
        hop = self.hop
        prefill = node.identity.role == "prefill"
        for event, stream in node.advance(t):
            call = stream.call
            if type(event) is RequestStarted:
                if not prefill:
                    call.tier = event.tier
                    call.queue_time = event.queue_time
                    # the router hears the first token a hop after it is made: at the end of
                    # the prefill it started in, as fast mode infers it (SimNode.advance), so
                    # that both modes move the router's views at the same instants
                    first = stream.first_token_at
                    if node.token_events and stream.tokens == 0:
                        due = node.engine.next_event_time()
                        first = due if due is not None else t
                    self._push(max(t, first) + hop, _PREFILLED, call, node.node_id)
            elif type(event) is RequestFinished:
                call.cached_tokens = max(call.cached_tokens, event.cached_prompt_tokens)
                call.energy_j += event.energy_j
                if prefill:  # the KV is ready: via the router to the decode node chosen for it
                    self._push(event.time + 2 * hop, _RECEIVE, call, (call.node, node.node_id))
                else:
                    self._finished(call, event, stream.first_token_at)
        self._kv_events(node, t)
        if node.switched:
            self._beat(node, t)
        self._wake(node, t)

    def _on_prefilled(self, t: float, call: Call, node_id: str) -> None:
        if call.node == node_id:  # not retried elsewhere meanwhile
            self.router.started(call, node_id, t)

    def _kv_events(self, node: SimNode, t: float) -> None:
        apply = self.prefix_index.apply
        for message in node.kv_events(t):
            apply(message, t)

    def _finished(self, call: Call, event: RequestFinished, first_token_at: float) -> None:
        hop = self.hop
        self.router.settle(
            call, event.time + hop, prompt_tokens=event.prompt_tokens, completion_tokens=event.completion_tokens,
            decode_s=event.time - first_token_at,
        )  # fmt: skip
        run = call.run
        finished_at = event.time + 2 * hop
        self.records.append(ok_record(
            run, call.step, call.request_id, sent_at=call.sent_at, first_token_at=first_token_at + 2 * hop,
            finished_at=finished_at, prompt_tokens=event.prompt_tokens, completion_tokens=event.completion_tokens,
            cached_tokens=call.cached_tokens, tier=call.tier, node=call.node, energy_j=call.energy_j,
        ))  # fmt: skip
        if run.position < len(run.plan.steps):  # a reply no later step reads is not worth tokenizing
            run.record_reply(event.completion_tokens)
        self._continue(run, finished_at)

    # -- heartbeats -------------------------------------------------------------------
    def _on_beat(self, t: float, node: SimNode, due: float) -> None:
        if node.beat_due == due and node.stopped_at is None:
            self._beat(node, t)

    def _beat(self, node: SimNode, t: float) -> None:
        """Send a heartbeat now; the next regular one follows an interval later."""
        interval = self.config.heartbeat_s
        hb, unchanged = node.heartbeat(t, interval)
        self.router.heard(hb, t, unchanged=unchanged)
        if self.autoscaler is not None:
            self.autoscaler.heard(hb, t)
        self._beats += 1
        node.beat_due = t + interval
        self._push(node.beat_due, _BEAT, node, node.beat_due)

    def _on_housekeeping(self, t: float, _a: None, _b: None) -> None:
        self.router.nodes.forget_dead(t)
        self._push(t + HOUSEKEEPING_S, _HOUSEKEEPING)

    # -- the autoscaler ---------------------------------------------------------------
    def _on_tick(self, t: float, _a: None, _b: None) -> None:
        assert self.autoscaler is not None
        for action in self.autoscaler.tick(t, self._provisioned):
            if action.kind == "start":
                plan = self.plans[action.deployment]
                key = (action.deployment, action.pool)
                self.pending[key] = self.pending.get(key, 0) + action.count
                for _ in range(action.count):
                    node_id = self._node_id(plan, action.pool)
                    delay = start_delay(plan.profile, plan.bundle, preload_models(plan.profile, plan.bundle, node_id))
                    self._push(t + delay, _UP, plan, (action.pool, node_id))
            else:
                node = self.nodes.get(action.node_id)
                if node is not None:
                    self._push(t + self.hop, _COMMAND, node, action.kind)
        self._push(t + AUTOSCALER_INTERVAL_S, _TICK)

    def _on_up(self, t: float, plan: DeploymentPlan, started: tuple[str, str]) -> None:
        pool, node_id = started
        self.pending[(plan.name, pool)] -= 1
        self._beat(self._new_node(plan, pool, t, node_id), t)

    def _on_command(self, t: float, node: SimNode, action: str) -> None:
        """A control command reaches the node: drain (cordon, and report what it holds) or
        take back (uncordon). Either way the node heartbeats at once."""
        if node.stopped_at is not None:
            return
        draining = action == "drain"
        node.cordon(draining)
        self._beat(node, t)
        identity = node.identity
        if draining:
            assert self.autoscaler is not None
            began = self.autoscaler.drain_began(identity.deployment, identity.role, node.node_id)
            self._push(t + self.hop, _POLL, node, began)  # the drain's reply carries what it holds

    def _on_poll(self, t: float, node: SimNode, began: float | None) -> None:
        assert self.autoscaler is not None
        identity = node.identity
        if node.stopped_at is not None or began is None or self.autoscaler.drain_began(identity.deployment, identity.role, node.node_id) != began:
            return  # taken back meanwhile
        if node.in_flight and t - began < DRAIN_TIMEOUT_S:
            self._push(t + DRAIN_POLL_S, _POLL, node, began)
            return
        self._stop(node, t)

    def _stop(self, node: SimNode, t: float) -> None:
        """The actuator stops the node. Anything still on it (a drain that timed out) fails
        as the node's shutdown fails it: retried when no token came out yet."""
        assert self.autoscaler is not None
        node.stopped_at = t
        node.busy_seconds = node.engine.snapshot(t).busy_seconds
        identity = node.identity
        del self.nodes[node.node_id]
        self.prefix_index.forget(node.node_id)
        self._up[(identity.deployment, identity.role)] -= 1
        self.retired.append(node)
        self.autoscaler.stopped(identity.deployment, identity.role, node.node_id, t)
        for stream in node.fail_all(t):
            call = stream.call
            if stream.started and identity.role == "decode":
                self._fail(call, RouterNodeFailure(f"node {node.node_id} was lost after streaming tokens (node_shutdown)", code="node_lost"), t + self.hop)
            else:
                self.router.attempt_failed(call, node.node_id, "node_shutdown", f"node {node.node_id} is shutting down")
                self._push(t + self.hop, _RETRY, call)

    # -- the timeline -----------------------------------------------------------------
    def _on_sample(self, t: float, _a: None, _b: None) -> None:
        nodes = self.nodes.values()
        by_deployment: dict[str, int] = dict.fromkeys(self.plans, 0)
        running = queued = draining = 0
        busy = 0.0
        last_busy = self._last_busy
        for node in nodes:
            by_deployment[node.identity.deployment] += 1
            draining += node.identity.draining
            beat = node.last_beat
            if beat is not None:
                running += beat.running
                queued += beat.queue_depth
            busy += node.busy_seconds - last_busy.get(node.node_id, node.busy_seconds)
            last_busy[node.node_id] = node.busy_seconds
        previous = self.timeline[-1].t if self.timeline else t
        span = (t - previous) * len(self.nodes)
        self.timeline.append(FleetPoint(
            t=t, nodes=len(self.nodes), starting=sum(self.pending.values()), draining=draining, running=running,
            queued=queued, busy_share=busy / span if span > 0 else 0.0, by_deployment=by_deployment,
        ))  # fmt: skip
        self._push(t + self.config.sample_s, _SAMPLE)

    # -- the result -------------------------------------------------------------------
    def _result(self, end: float) -> SimResult:
        up: dict[str, float] = dict.fromkeys(self.plans, 0.0)
        busy_in: dict[str, float] = dict.fromkeys(self.plans, 0.0)
        energy = 0.0
        everyone = [*self.nodes.values(), *self.retired]
        for n in everyone:
            deployment = n.identity.deployment
            up[deployment] += (n.stopped_at if n.stopped_at is not None else end) - n.up_at
            snap = n.engine.snapshot(n.stopped_at if n.stopped_at is not None else end, node_hashes=False)
            busy_in[deployment] += n.busy_seconds if n.stopped_at is not None else snap.busy_seconds
            energy += snap.energy_joules
        node_seconds, busy = sum(up.values()), sum(busy_in.values())
        tokens = sum(r.completion_tokens for r in self.records if r.outcome == "ok")
        initial = sum(p.initial(pool) for p in self.plans.values() for pool in p.pools)
        stats = SimStats(
            virtual_s=end, events=self._events, sessions=len(self.sessions), calls=self._calls, heartbeats=self._beats,
            node_seconds=node_seconds, busy_seconds=busy, utilisation=busy / node_seconds if node_seconds > 0 else 0.0,
            by_deployment={name: busy_in[name] / up[name] if up[name] > 0 else 0.0 for name in self.plans},
            nodes_initial=initial, nodes_peak=max((p.nodes for p in self.timeline), default=initial),
            nodes_final=len(self.nodes), nodes_started=len(everyone) - initial, nodes_stopped=len(self.retired),
            scale_events=list(self.autoscaler.events) if self.autoscaler is not None else [],
            energy_j=energy, tokens_per_kwh=tokens_per_kwh(tokens, energy),
        )  # fmt: skip
        return SimResult(records=self.records, fleet_timeline=self.timeline, stats=stats)
