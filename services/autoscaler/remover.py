"""Scale-down, carried out so that it survives the autoscaler: record -> drain -> stop.

For each node the policy gives back (`begin`), a task of its own:

1. writes `removal.<node>` (phase `draining`, this instance and its lease term) in the
   removal book, and only once that write is acknowledged
2. drains the node (cordon, owner "autoscaler") and waits until nothing is in flight
   (or `drain_timeout`);
3. moves the record to phase `stopping`, then has the actuator stop the node;
4. deletes the record.

Taking a node back (`take_back`, load returned while it drained) uncordons it, then
deletes the record. Before every start, drain, uncordon and stop the lease is checked
(`Gate.may_act`): an instance that may have lost it does nothing more, and leaves its
records to the one that has it.

Why the record comes first: a crash can then never leave a cordon of the autoscaler's
without a record. Between (1) and (2) it leaves a record for a node not yet cordoned;
between (2) and (4) a record for a cordoned (or stopped) node; the record goes only
after the node is stopped or uncordoned. So a successor that finds a node cordoned by
"autoscaler" with no record did not inherit it from a crash (an older version, a record
deleted by hand): it leaves it alone, as it leaves an operator's cordons alone.

Finishing or undoing what a predecessor began (`adopt`, at the start of every tick, for
every record with no task here): the record is rewritten with this instance's term
(compare-and-set, which fences the predecessor should it wake up), then the node is
asked for its status:
- it does not answer and is not heard: it is gone (stopped before the crash): the
  record is deleted;
- it is not cordoned, or cordoned by someone else: nothing of ours to finish; deleted;
- its deployment left the registry: nothing will decide for it any more; uncordoned;
- cordoned by "autoscaler": the removal is taken over as if begun here, but its task
  waits until the tick's policy decision has run. The decision is the one that made
  it, `tierflow.scaling.tick`, seeing this node as `removing`: scaling up takes it back
  first (the same rule as for a node draining when load returns: warm capacity at
  once), anything else lets it finish (drain -> stop). A node already `stopping` is
  past taking back and is stopped. Either way the pool ends at the policy's count.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from typing import Protocol

import msgspec

from tierflow.contracts import registry
from tierflow.contracts.autoscaler import AUTOSCALER_OWNER, Removal, RemovalPhase
from tierflow.runtime.clock import Clock
from tierflow.scaling.fleet import FleetView
from tierflow.services.autoscaler.actuators import Actuator, ActuatorError
from tierflow.services.autoscaler.metrics import AutoscalerMetrics
from tierflow.services.autoscaler.node_control import NodeControl, NodeControlError, NodeRefused
from tierflow.services.autoscaler.removals import MemoryRemovalBook, RemovalBook, RemovalConflict

__all__ = ["Gate", "Solo", "Remover"]

log = logging.getLogger("tierflow.autoscaler")
STATUS_FAILURES_BEFORE_GONE = 3


class Gate(Protocol):
    """Whether this instance may act now (the lease), and as whom."""

    holder: str
    term: int

    def may_act(self) -> bool: ...


class Solo:
    """The gate of an autoscaler that runs alone (tests, the simulator): always open."""

    holder = "autoscaler"
    term = 0

    def may_act(self) -> bool:
        return True


@dataclass(slots=True)
class _Removal:
    deployment: str
    pool: str
    node_id: str
    began_at: float  # wall clock
    phase: RemovalPhase = "draining"
    revision: int | None = None  # of the record this instance last wrote; None: none yet, or unknown
    task: asyncio.Task[None] | None = None
    # Taken back or stood down: the task must do nothing more. Checked after every await as
    # well as cancelling the task, because a cancellation can be lost: Python 3.11's
    # asyncio.wait_for (inside nats-py's request) returns the reply instead of raising when
    # the reply and the cancellation arrive together, and the drain would go on to the stop.
    called_off: bool = False


class Remover:
    def __init__(
        self,
        fleet: FleetView,
        actuator: Actuator,
        control: NodeControl,
        clock: Clock,
        metrics: AutoscalerMetrics,
        *,
        book: RemovalBook | None = None,
        gate: Gate | None = None,
        drain_timeout: float = 600.0,
        drain_poll: float = 0.25,
    ) -> None:
        self._fleet = fleet
        self._actuator = actuator
        self._control = control
        self._clock = clock
        self._metrics = metrics
        self._book: RemovalBook = book if book is not None else MemoryRemovalBook()
        self._gate: Gate = gate if gate is not None else Solo()
        self._drain_timeout = drain_timeout
        self._drain_poll = drain_poll
        self._removals: dict[tuple[str, str], dict[str, _Removal]] = {}

    # -- reading ----------------------------------------------------------------------
    def removing(self, deployment: str, pool: str) -> list[str]:
        """Nodes being removed right now (draining or stopping)."""
        return list(self._removals.get((deployment, pool), {}))

    # -- scale-down -------------------------------------------------------------------
    def begin(self, record: registry.DeploymentRecord, pool: str, node_id: str) -> None:
        """Remove `node_id` in the background (record, drain, stop)."""
        removal = _Removal(record.name, pool, node_id, began_at=self._clock.now())
        self._removals.setdefault((record.name, pool), {})[node_id] = removal
        self._run(record, removal)

    def _run(self, record: registry.DeploymentRecord, removal: _Removal) -> None:
        removal.task = asyncio.create_task(self._remove(record, removal), name=f"remove-{removal.node_id}")

    def _forget(self, removal: _Removal) -> None:
        removals = self._removals.get((removal.deployment, removal.pool), {})
        if removals.get(removal.node_id) is removal:
            del removals[removal.node_id]

    def _record(self, removal: _Removal) -> Removal:
        return Removal(deployment=removal.deployment, pool=removal.pool, node_id=removal.node_id, phase=removal.phase,  # type: ignore[arg-type]
                       began_at=removal.began_at, holder=self._gate.holder, term=self._gate.term)  # fmt: skip

    def _may_go_on(self, removal: _Removal) -> bool:
        return not removal.called_off and self._gate.may_act()

    def _count(self, removal: _Removal, operation: str, outcome: str) -> None:
        self._metrics.actuations.labels(removal.deployment, removal.pool, operation, outcome).inc()

    async def _remove(self, record: registry.DeploymentRecord, removal: _Removal) -> None:
        try:
            if removal.revision is None:
                if not await self._write_first(removal):
                    return
            if removal.phase == "draining":
                if not await self._drain(removal) or not self._may_go_on(removal):
                    return
                removal.phase = "stopping"
                if not await self._advance(removal):
                    return
            await self._stop(record, removal)
        except asyncio.CancelledError:
            raise
        except Exception:  # a bug must not vanish with its task; the record stays for the next tick
            log.exception("removing %s failed; its record stays for the next tick", removal.node_id)
        finally:
            self._forget(removal)

    async def _write_first(self, removal: _Removal) -> bool:
        if not self._may_go_on(removal):
            return False
        try:
            removal.revision = await self._book.begin(self._record(removal))
        except RemovalConflict as exc:
            log.info("deployment %s/%s: not removing %s: %s", removal.deployment, removal.pool, removal.node_id, exc)
            return False
        except Exception as exc:  # KV unreachable: nothing was touched, the policy decides again
            self._count(removal, "drain", "error")
            log.warning("deployment %s/%s: not removing %s: cannot record the removal first (%s: %s)",
                        removal.deployment, removal.pool, removal.node_id, type(exc).__name__, exc)  # fmt: skip
            return False
        return True

    async def _advance(self, removal: _Removal) -> bool:
        """Record the new phase before acting on it (compare-and-set: still ours?)."""
        try:
            removal.revision = await self._book.advance(self._record(removal), removal.revision or 0)
        except RemovalConflict as exc:
            log.warning("deployment %s/%s: leaving %s alone: %s", removal.deployment, removal.pool, removal.node_id, exc)
            return False
        except Exception as exc:  # the record still says the earlier phase: the next tick resumes from it
            log.warning("deployment %s/%s: cannot record %s of %s (%s: %s); the next tick resumes it",
                        removal.deployment, removal.pool, removal.phase, removal.node_id, type(exc).__name__, exc)  # fmt: skip
            return False
        return True

    async def _end(self, removal: _Removal) -> None:
        try:
            await self._book.end(removal.node_id, removal.revision)
        except RemovalConflict as exc:
            log.info("deployment %s/%s: %s", removal.deployment, removal.pool, exc)
        except Exception as exc:  # it stays: the next tick finds the node stopped or uncordoned and drops it
            log.warning("deployment %s/%s: cannot delete the removal record of %s (%s: %s); the next tick does",
                        removal.deployment, removal.pool, removal.node_id, type(exc).__name__, exc)  # fmt: skip

    async def _drain(self, removal: _Removal) -> bool:
        """Drain and wait until empty; False when the removal is off (refused, in doubt, fenced)."""
        node_id = removal.node_id
        if not self._may_go_on(removal):
            return False
        began = self._clock.monotonic()
        try:
            in_flight = (await self._control.command(node_id, "drain")).in_flight
        except NodeRefused as exc:  # an operator cordoned it meanwhile: theirs now
            self._count(removal, "drain", "refused")
            log.warning("deployment %s/%s: not removing %s: %s", removal.deployment, removal.pool, node_id, exc)
            await self._end(removal)
            return False
        except NodeControlError as exc:  # it may or may not have been cordoned: the next tick asks it
            self._count(removal, "drain", "error")
            log.warning("deployment %s/%s: not removing %s now: %s", removal.deployment, removal.pool, node_id, exc)
            return False
        failures = 0
        while in_flight > 0 and self._clock.monotonic() - began < self._drain_timeout and failures < STATUS_FAILURES_BEFORE_GONE:
            await self._clock.sleep(self._drain_poll)
            if not self._may_go_on(removal):
                return False
            try:
                reply = await self._control.command(node_id, "status")
            except NodeControlError:
                failures += 1  # it may have died; after a few misses it is treated as gone
                continue
            if not self._may_go_on(removal):
                return False
            failures, in_flight = 0, reply.in_flight
            if reply.cordon_owner != AUTOSCALER_OWNER:
                self._count(removal, "drain", "taken_over")
                log.warning("deployment %s/%s: %s was %s while it drained; leaving it as it is", removal.deployment, removal.pool, node_id,
                            f"cordoned by {reply.cordon_owner}" if reply.cordoned else "uncordoned")  # fmt: skip
                await self._end(removal)
                return False
        drained = self._clock.monotonic() - began
        self._metrics.drain_seconds.labels(removal.deployment, removal.pool).observe(drained)
        self._count(removal, "drain", "ok" if in_flight == 0 else "timeout")
        if in_flight > 0 and failures < STATUS_FAILURES_BEFORE_GONE:
            log.warning("deployment %s/%s: %s still has %d request(s) after %.0fs; stopping it (it drains itself on SIGTERM)",
                        removal.deployment, removal.pool, node_id, in_flight, drained)  # fmt: skip
        return True

    async def _stop(self, record: registry.DeploymentRecord, removal: _Removal) -> None:
        node_id = removal.node_id
        if not self._may_go_on(removal):
            return
        try:
            await self._actuator.stop_node(record, removal.pool, node_id)
        except ActuatorError as exc:
            self._count(removal, "stop", "error")
            log.warning("deployment %s/%s: could not stop %s (%s); putting it back in rotation", removal.deployment, removal.pool, node_id, exc)
            await self._uncordon(removal)
            return
        self._fleet.removed(node_id, self._clock.monotonic())
        self._count(removal, "stop", "ok")
        log.info("deployment %s/%s: removed %s", removal.deployment, removal.pool, node_id,
                 extra={"fields": {"deployment": removal.deployment, "pool": removal.pool, "node": node_id}})  # fmt: skip
        await self._end(removal)

    async def _uncordon(self, removal: _Removal) -> bool:
        """Put the node back in rotation and drop its record; False when it could not be reached."""
        if not self._gate.may_act():
            return False
        try:
            await self._control.command(removal.node_id, "uncordon")
        except NodeRefused as exc:  # cordoned by someone else now: theirs, and nothing of ours is left
            log.info("deployment %s/%s: leaving %s cordoned: %s", removal.deployment, removal.pool, removal.node_id, exc)
        except NodeControlError as exc:  # in doubt: the record stays, the next tick asks the node again
            self._count(removal, "reclaim", "error")
            log.warning("deployment %s/%s: could not uncordon %s: %s", removal.deployment, removal.pool, removal.node_id, exc)
            return False
        else:
            self._count(removal, "reclaim", "ok")
            log.info("deployment %s/%s: took %s back (uncordoned)", removal.deployment, removal.pool, removal.node_id,
                     extra={"fields": {"deployment": removal.deployment, "pool": removal.pool, "node": removal.node_id}})  # fmt: skip
        await self._end(removal)
        return True

    # -- taking back ------------------------------------------------------------------
    async def take_back(self, deployment: str, pool: str, count: int) -> int:
        """Load came back: put up to `count` nodes still draining back in rotation; how many."""
        taken = 0
        for removal in [r for r in self._removals.get((deployment, pool), {}).values() if r.phase == "draining"][:count]:
            await self._cancel(removal)
            self._forget(removal)
            await self._uncordon(removal)
            taken += 1
        return taken

    @staticmethod
    async def _cancel(removal: _Removal) -> None:
        """Call the removal off and wait until its task has ended (a cancellation of the
        caller still reaches the caller: `asyncio.wait` does not swallow it)."""
        removal.called_off = True
        if removal.task is not None:
            removal.task.cancel()
            await asyncio.wait([removal.task])

    # -- a predecessor's records ------------------------------------------------------
    async def adopt(self, now: float) -> list[_Removal]:
        """Take over every record no removal here runs for (see the module docstring).
        The adopted removals wait for `resume` (after the tick's decision)."""
        if not self._gate.may_act():
            return []
        try:
            pending = await self._book.pending()
        except Exception as exc:
            log.warning("cannot read the removal records (%s: %s); trying again next tick", type(exc).__name__, exc)
            return []
        adopted = []
        for record, revision in pending:
            if record.node_id in self._removals.get((record.deployment, record.pool), {}):
                continue  # running here
            # Whatever term wrote it: only the lease holder gets here, so nobody else acts on
            # it now, and the rewrite below (compare-and-set) fences whoever wrote it last.
            removal = await self._adopt(record, revision, now)
            if removal is not None:
                adopted.append(removal)
        return adopted

    async def _adopt(self, record: Removal, revision: int, now: float) -> _Removal | None:
        if not self._gate.may_act():
            return None
        removal = _Removal(record.deployment, record.pool, record.node_id, began_at=record.began_at, phase=record.phase, revision=revision)
        try:  # ours from now on: a predecessor that wakes up can no longer move it
            removal.revision = await self._book.advance(msgspec.structs.replace(record, holder=self._gate.holder, term=self._gate.term), revision)
        except RemovalConflict:
            return None  # it changed while we looked: next tick
        where = f"deployment {record.deployment}/{record.pool}"
        began = f"begun by {record.holder} (term {record.term})"
        try:
            reply = await self._control.command(record.node_id, "status")
        except NodeControlError as exc:
            if record.node_id in self._fleet.live_ids(record.deployment, record.pool, now):
                log.warning("%s: %s does not answer (%s); its removal waits for the next tick", where, record.node_id, exc)
                return None
            self._metrics.recovered.labels("gone").inc()
            log.info("%s: the removal of %s (%s, %s) is done: the node is gone", where, record.node_id, record.phase, began,
                     extra={"fields": {"node": record.node_id, "phase": record.phase, "outcome": "gone", "holder": record.holder, "term": record.term}})  # fmt: skip
            await self._end(removal)
            return None
        if reply.cordon_owner != AUTOSCALER_OWNER:
            self._metrics.recovered.labels("not_ours").inc()
            state = f"cordoned by {reply.cordon_owner or 'someone unnamed'}" if reply.cordoned else "not cordoned"
            log.info("%s: dropping the removal of %s (%s): it is %s; leaving it as it is", where, record.node_id, began, state,
                     extra={"fields": {"node": record.node_id, "phase": record.phase, "outcome": "not_ours", "holder": record.holder, "term": record.term}})  # fmt: skip
            await self._end(removal)
            return None
        if record.deployment not in self._fleet.deployments:
            self._metrics.recovered.labels("undone").inc()
            log.info("%s: deployment gone from the registry; putting %s back (%s)", where, record.node_id, began)
            await self._uncordon(removal)
            return None
        self._metrics.recovered.labels("resumed").inc()
        log.info("%s: taking over the removal of %s (%s, %s); the policy finishes or undoes it", where, record.node_id, record.phase, began,
                 extra={"fields": {"node": record.node_id, "phase": record.phase, "outcome": "resumed", "holder": record.holder, "term": record.term}})  # fmt: skip
        self._removals.setdefault((record.deployment, record.pool), {})[record.node_id] = removal
        return removal

    def resume(self, adopted: list[_Removal]) -> None:
        """Finish the adopted removals the tick's decision did not take back."""
        for removal in adopted:
            if self._removals.get((removal.deployment, removal.pool), {}).get(removal.node_id) is not removal or removal.task is not None:
                continue
            record = self._fleet.deployments.get(removal.deployment)
            if record is None:  # gone since the adoption: the next tick undoes it
                self._forget(removal)
                continue
            self._run(record, removal)

    # -- losing the lease, stopping ---------------------------------------------------
    async def stand_down(self) -> None:
        """The lease is lost: stop every removal where it is, touching nothing. Their
        records stay for whichever instance acts next (perhaps this one again)."""
        removals = [r for per_pool in self._removals.values() for r in per_pool.values()]
        for removal in removals:
            await self._cancel(removal)
        self._removals.clear()
        if removals:
            log.warning("stood down with %d removal(s) under way (%s); their records stay for the active autoscaler",
                        len(removals), ", ".join(r.node_id for r in removals))  # fmt: skip

    async def close(self) -> None:
        """A clean stop: nodes still draining go back in rotation; stops under way finish."""
        for per_pool in list(self._removals.values()):
            for removal in list(per_pool.values()):
                if removal.phase == "stopping":
                    if removal.task is not None:
                        await asyncio.wait([removal.task], timeout=20.0)
                    continue
                await self._cancel(removal)
                self._forget(removal)
                await self._uncordon(removal)
