"""The registry's admin operations: the pure core, carried out against the KV store.

Every operation reads fresh state, computes the change with pure functions (`desired`,
`plan`, `mutations`), checks it with `rules`, and writes it with compare-and-set: a fleet
apply as one atomic batch of all its records (`store.write_all`), a single-model
operation as one write. A lost
race is retried from fresh state a bounded number of times (or, when the caller named
the revision it expects, reported at once); when it still loses, the caller gets
`Aborted`, never a silently dropped update. Each committed write is counted and
announced as a `RegistryEvent`.

Writes from this process are serialized by one lock: the registry's write rate is tiny,
and this way its own callers never race each other; compare-and-set is what guards
against other processes (a second registry, an operator's script).
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Awaitable, Callable
from typing import Literal

from msgspec import Struct, structs

from tierflow.contracts import registry
from tierflow.runtime.clock import Clock
from tierflow.services.model_registry.desired import desired_state
from tierflow.services.model_registry.errors import Aborted, FailedPrecondition, NotFound, RegistryError
from tierflow.services.model_registry.fleet import FleetError, FleetLocator, parse_fleet
from tierflow.services.model_registry.metrics import RegistryMetrics
from tierflow.services.model_registry.plan import Change, plan
from tierflow.services.model_registry.rules import RegistryLocator, RuleContext, format_problems, new_problems
from tierflow.services.model_registry.state import Snapshot
from tierflow.services.model_registry.store import Conflict, RegistryStore

__all__ = ["RegistryService", "ModelResult", "Publish"]

log = logging.getLogger(__name__)

Publish = Callable[[registry.RegistryEvent], Awaitable[None]]
ModelChange = Callable[[registry.ModelRecord, float], registry.ModelRecord]


class ModelResult(Struct, kw_only=True):
    record: registry.ModelRecord
    revision: int
    op: Literal["update", "unchanged"]


class RegistryService:
    def __init__(
        self,
        store: RegistryStore,
        publish: Publish,
        clock: Clock,
        metrics: RegistryMetrics,
        *,
        rules: RuleContext | None = None,
        attempts: int = 10,
        rng: random.Random | None = None,
    ) -> None:
        if attempts < 1:
            raise ValueError(f"attempts must be >= 1, got {attempts}")
        self._store = store
        self._publish = publish
        self._clock = clock
        self._metrics = metrics
        self._rules = rules or RuleContext.builtin()
        self._attempts = attempts
        self._rng = rng or random.Random()
        self._lock = asyncio.Lock()

    async def read(self) -> Snapshot:
        return await self._store.read()

    # ------------------------------------------------------------------ fleet files

    async def apply(self, text: str | bytes, *, dry_run: bool = False, prune: bool = False, source: str = "fleet file") -> list[Change]:
        """Make the registry hold what the file declares; the changes made (or, dry run, to make).

        Every change of one apply is written as one atomic batch: readers see the registry
        before the apply or after it, never in between, even if this process dies midway.
        Raises FleetError listing every problem (nothing written), FailedPrecondition when
        the apply is larger than one batch can be, Unavailable when NATS cannot take it,
        or Aborted when other writers kept winning (nothing written; applying again is safe).
        """
        fleet = parse_fleet(text, source=source, ctx=self._rules)
        where = FleetLocator(fleet)
        async with self._lock:
            for attempt in range(self._attempts):
                snap = await self._store.read()
                desired = desired_state(fleet, snap.state, prune=prune, now=self._clock.now())
                problems = new_problems(snap.state, desired, self._rules)
                if problems:
                    raise FleetError(format_problems(problems, where))
                changes = [structs.replace(c, revision=snap.revision(c.kind, c.name)) if c.op == "unchanged" else c for c in plan(snap.state, desired)]
                if dry_run:
                    return changes
                writes = [c for c in changes if c.op != "unchanged"]
                try:
                    revisions = await self._store.write_all([(c.kind, c.name, c.record if c.op != "delete" else None, snap.expected(c.kind, c.name)) for c in writes])
                except Conflict as exc:
                    self._metrics.conflicts.labels("apply").inc()
                    log.info("apply lost a race (%s); retrying on fresh state", exc)
                    await self._backoff(attempt)
                    continue
                committed = {(c.kind, c.name): structs.replace(c, revision=r, record=None) for c, r in zip(writes, revisions, strict=True)}
                for change in committed.values():
                    await self._announce(change)
                return [committed.get((c.kind, c.name), c) for c in changes]
        raise Aborted(f"other writers kept changing the registry during {self._attempts} attempts; nothing was written. Apply again (it is idempotent)")

    # ------------------------------------------------------------------ one model

    async def update_model(
        self,
        name: str,
        change: ModelChange,
        *,
        expected_revision: int = 0,
        check: bool = True,
        refuse: type[RegistryError] = FailedPrecondition,
    ) -> ModelResult:
        """Apply `change` to model `name` with compare-and-set.

        `check` runs the fleet rules on the result and raises `refuse` for any problem
        the change would add. Without it (rollback) the operation is one read and one
        write of the model's key, nothing more, so it is as fast as the KV allows.
        """
        async with self._lock:
            for attempt in range(self._attempts):
                snap = await self._store.read() if check else None
                if snap is not None:
                    current, revision = snap.state.models.get(name), snap.revision("model", name)
                else:
                    record, revision = await self._store.get("model", name)
                    current = record if isinstance(record, registry.ModelRecord) else None
                if current is None:
                    raise NotFound(f"model {name!r} is not registered (see `tierflow models list`)")
                if expected_revision and revision != expected_revision:
                    raise Aborted(f"model {name!r} is at revision {revision}, not the expected {expected_revision}; re-read it and retry")
                updated = change(current, self._clock.now())
                if updated == current:
                    return ModelResult(record=current, revision=revision, op="unchanged")
                if snap is not None:
                    after = snap.state.copy()
                    after.models[name] = updated
                    problems = format_problems(new_problems(snap.state, after, self._rules), RegistryLocator())
                    if problems:
                        raise refuse(f"refused, it would leave the fleet broken: {'; '.join(problems)}", problems)
                try:
                    new_revision = await self._commit(Change(kind="model", name=name, op="update", record=updated), revision)
                except Conflict:
                    self._metrics.conflicts.labels("model").inc()
                    if expected_revision:
                        raise Aborted(f"model {name!r} changed after revision {expected_revision} while this update was written; re-read it and retry") from None
                    await self._backoff(attempt)
                    continue
                return ModelResult(record=updated, revision=new_revision, op="update")
        raise Aborted(f"model {name!r} kept changing under this update ({self._attempts} attempts); nothing was written, retry")

    # ------------------------------------------------------------------ shell

    async def _commit(self, change: Change, revision: int) -> int:
        """One compare-and-set write of one record, then its metric and its event."""
        record = change.record if change.op != "delete" else None
        new_revision = await self._store.write(change.kind, change.name, record, revision=revision)
        await self._announce(structs.replace(change, revision=new_revision))
        return new_revision

    async def _announce(self, change: Change) -> None:
        """Count a committed change and publish its `RegistryEvent`."""
        self._metrics.changes.labels(change.kind, change.op).inc()
        op: Literal["put", "delete"] = "delete" if change.op == "delete" else "put"
        event = registry.RegistryEvent(kind=change.kind, name=change.name, op=op, revision=change.revision)
        try:
            await self._publish(event)
        except Exception as exc:  # the write is committed; watchers of the bucket still see it
            log.warning("registry change %s %s committed but its event was not published: %s", change.kind, change.name, exc)

    async def _backoff(self, attempt: int) -> None:
        """A short random pause, so racing writers in other processes stop colliding."""
        await self._clock.sleep(self._rng.uniform(0.0, min(0.05, 0.002 * 2**attempt)))
