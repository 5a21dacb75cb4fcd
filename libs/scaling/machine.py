"""The autoscaler's core: a discrete-event state machine per bundle deployment.

    tick(state, snapshot, now, config) -> (new_state, Decision)

No I/O, no clock: `now` is passed in, state is an immutable value, and the decision is
data the shell carries out (start nodes, or cordon -> drain -> stop one). The same code
runs live, in tests and in the simulator under a VirtualClock.

Per pool, each tick:

1. Bounds first. Below `min_replicas` -> up to it (even on missing data: an empty pool
   is exactly when there is none; `cooldown_up` apart, so a node that dies at start-up
   is not restarted in a tight loop); above `max_replicas` -> down toward it.
2. Every applicable signal asks for a replica count (tierflow.scaling.signals); the
   largest ask, clamped to the bounds, is this tick's ask and its signal is named.
   With no fresh signal (nothing heard, or the snapshot older than `max_signal_age`)
   the pool holds: no scale-down on missing data.
3. Scale up to the smallest ask of the last `panic_window` seconds (load that held for
   the whole short window), at most `max_step_up` at a time, `cooldown_up` apart.
4. Scale down to the largest ask of the last `stable_window` seconds (load that stayed
   low for the whole long window), `max_step_down` at a time, only after a whole
   stable window of fresh signals, `cooldown_down` after any change, and never while
   nodes are starting or being removed.

Steps 3-4 are what keeps an oscillating load from oscillating the replicas: any peak in
the stable window holds the count up, so it changes at most once per swing.
"""

from __future__ import annotations

from typing import Literal

from msgspec import Struct

from tierflow.scaling.config import PoolBounds, ScalingConfig
from tierflow.scaling.signals import Ask, evaluate
from tierflow.scaling.snapshot import DeploymentSnapshot, PoolSnapshot

__all__ = ["Action", "PoolState", "DeploymentState", "PoolDecision", "Decision", "tick", "tick_pool"]

Action = Literal["up", "down", "hold"]


class PoolState(Struct, frozen=True, kw_only=True):
    """What one pool's policy remembers between ticks."""

    history: tuple[tuple[float, int], ...] = ()  # (time, clamped ask) of fresh ticks in the stable window
    observed_since: float | None = None  # start of the current run of fresh signals
    last_up: float | None = None
    last_down: float | None = None


class DeploymentState(Struct, frozen=True, kw_only=True):
    pools: dict[str, PoolState] = {}


class PoolDecision(Struct, frozen=True, kw_only=True):
    """One pool's decision: what to do, which signal decided, why, and on what inputs.

    `signal` is a signal name (utilization, queue, prompt_tokens, ttft, itl) or one of
    "bounds" (min/max replicas), "stale" (snapshot too old), "none" (nothing to go on).
    """

    pool: str
    action: Action
    current: int
    desired: int
    signal: str
    reason: str
    inputs: dict[str, float] = {}

    @property
    def delta(self) -> int:
        return self.desired - self.current


class Decision(Struct, frozen=True, kw_only=True):
    deployment: str
    at: float
    pools: tuple[PoolDecision, ...] = ()

    @property
    def changes(self) -> tuple[PoolDecision, ...]:
        return tuple(p for p in self.pools if p.action != "hold")


def _inputs(s: PoolSnapshot, bounds: PoolBounds, asks: list[Ask]) -> dict[str, float]:
    out: dict[str, float] = {
        "ready": s.ready, "cordoned": s.cordoned, "starting": s.starting, "removing": s.removing,
        "min_replicas": bounds.min_replicas, "max_replicas": bounds.max_replicas,
    }
    for name in ("running", "waiting", "batch_slots", "queued_prompt_tokens", "ttft_p95", "itl_p95", "signal_age"):
        value = getattr(s, name)
        if value is not None:
            out[name] = round(float(value), 6)
    for a in asks:
        out[f"{a.signal}"] = round(a.value, 6)
        out[f"{a.signal}_target"] = a.target
        out[f"{a.signal}_ask"] = a.replicas
    return out


def _explain(a: Ask) -> str:
    if a.signal in ("ttft", "itl"):
        return f"{a.signal} p95 {a.value:.3f}s vs SLO {a.target:g}s asks {a.replicas}"
    return f"{a.signal} {a.value:.2f} vs target {a.target:g} asks {a.replicas}"


def tick_pool(
    state: PoolState, mode: str, pool: str, snap: PoolSnapshot, bounds: PoolBounds, now: float, config: ScalingConfig
) -> tuple[PoolState, PoolDecision]:
    """One pool's step of the machine (see the module docstring for the rules)."""
    current = snap.current
    asks = evaluate(mode, pool, snap, config)
    fresh = snap.signal_age is not None and snap.signal_age <= config.max_signal_age
    history = tuple(h for h in state.history if h[0] >= now - config.stable_window)
    inputs = _inputs(snap, bounds, asks)
    winner = max(asks, key=lambda a: a.replicas) if asks else None  # first of equals: signal order
    if fresh and winner is not None:
        history += ((now, bounds.clamp(winner.replicas)),)
        observed_since = state.observed_since if state.observed_since is not None else now
    else:
        observed_since = None  # a gap in the data restarts the wait before any scale-down
    new = PoolState(history=history, observed_since=observed_since, last_up=state.last_up, last_down=state.last_down)

    def hold(signal: str, reason: str) -> tuple[PoolState, PoolDecision]:
        return new, PoolDecision(pool=pool, action="hold", current=current, desired=current, signal=signal, reason=reason, inputs=inputs)

    def up(desired: int, signal: str, reason: str) -> tuple[PoolState, PoolDecision]:
        after = PoolState(history=history, observed_since=observed_since, last_up=now, last_down=state.last_down)
        return after, PoolDecision(pool=pool, action="up", current=current, desired=desired, signal=signal, reason=reason, inputs=inputs)

    def down(desired: int, signal: str, reason: str) -> tuple[PoolState, PoolDecision]:
        after = PoolState(history=history, observed_since=observed_since, last_up=state.last_up, last_down=now)
        return after, PoolDecision(pool=pool, action="down", current=current, desired=desired, signal=signal, reason=reason, inputs=inputs)

    if current < bounds.min_replicas:
        if state.last_up is not None and now - state.last_up < config.cooldown_up:  # a node that dies at start-up is not restarted in a tight loop
            return hold("bounds", f"{current} replica(s) below min_replicas {bounds.min_replicas}; scale-up cooldown")
        return up(bounds.min_replicas, "bounds", f"{current} replica(s) below min_replicas {bounds.min_replicas}")
    if current > bounds.max_replicas:
        desired = max(bounds.max_replicas, current - config.max_step_down)
        return down(desired, "bounds", f"{current} replica(s) above max_replicas {bounds.max_replicas}")
    if winner is None:
        return hold("none", "no load signal from the pool (no ready node reported): hold, never scale down blind")
    if not fresh:
        age = "never" if snap.signal_age is None else f"{snap.signal_age:.1f}s"
        return hold("stale", f"signals are stale (age {age}, max {config.max_signal_age:g}s): hold, never scale down blind")

    panic_ask = min(a for t, a in history if t >= now - config.panic_window)
    stable_ask = max(a for _, a in history)
    inputs["panic_ask"], inputs["stable_ask"] = panic_ask, stable_ask
    why = _explain(winner)
    if panic_ask > current:
        if state.last_up is not None and now - state.last_up < config.cooldown_up:
            return hold(winner.signal, f"{why}; scale-up cooldown ({now - state.last_up:.1f}s of {config.cooldown_up:g}s)")
        desired = min(panic_ask, current + config.max_step_up)
        return up(desired, winner.signal, f"{why}; held {panic_ask}+ for the {config.panic_window:g}s panic window")
    if stable_ask < current:
        observed = now - (observed_since if observed_since is not None else now)
        last_change = max((t for t in (state.last_up, state.last_down) if t is not None), default=None)
        if observed < config.stable_window:
            return hold(winner.signal, f"{why}; fresh signals for {observed:.0f}s of the {config.stable_window:g}s stable window")
        if snap.starting or snap.removing:
            return hold(winner.signal, f"{why}; waiting for {snap.starting} starting / {snap.removing} removing node(s)")
        if last_change is not None and now - last_change < config.cooldown_down:
            return hold(winner.signal, f"{why}; scale-down cooldown ({now - last_change:.1f}s of {config.cooldown_down:g}s)")
        desired = max(stable_ask, current - config.max_step_down)
        return down(desired, winner.signal, f"{why}; no ask above {stable_ask} in the {config.stable_window:g}s stable window")
    return hold(winner.signal, f"{why}; have {current} (panic-window ask {panic_ask}, stable-window ask {stable_ask})")


def tick(state: DeploymentState | None, snapshot: DeploymentSnapshot, now: float, config: ScalingConfig) -> tuple[DeploymentState, Decision]:
    """One step for a whole deployment: each pool named in `snapshot.bounds` is decided
    on its own (a pool missing from `snapshot.pools` is one nothing was heard from)."""
    state = state if state is not None else DeploymentState()
    pools: dict[str, PoolState] = {}
    decisions = []
    for pool, bounds in snapshot.bounds.items():
        snap = snapshot.pools.get(pool) or PoolSnapshot()
        pools[pool], decision = tick_pool(state.pools.get(pool) or PoolState(), snapshot.mode, pool, snap, bounds, now, config)
        decisions.append(decision)
    return DeploymentState(pools=pools), Decision(deployment=snapshot.deployment, at=now, pools=tuple(decisions))
