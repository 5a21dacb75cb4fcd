"""Restarting children that die, the way a ReplicaSet would: with backoff, and not forever.

Why: the fabric is built so that any process can be killed and started again (state
lives in JetStream, never in a process), so `tierflow up` should do what Kubernetes does
for it in production: start a child that died again, under the same name, flags, ports
and store dir. A child that keeps dying is given up on instead of being restarted in a
tight loop; whether that ends the fabric depends on how many of its kind are left.

Pieces:

- `RestartPolicy`: pure numbers. Given when a child exited before, how long to wait
  before the next start, or None to give up (more than `max_exits` exits in `window`
  seconds). No clock of its own, no I/O.
- `Restarter`: applies the policy to a `Supervisor`'s unexpected exits. Each exit is a
  line on stderr (`report`) and a structured log record; each restart happens after its
  backoff unless the child was stopped on purpose meanwhile (`Supervisor.stop` forgets
  it: a node the autoscaler removed stays removed) or shutdown began (`close()`). Giving
  up is fatal when fewer children of that role are left (running or about to be
  restarted) than the role's `quorum`: e.g. a majority of a NATS cluster, one router, the
  registry. `fatal` then holds the reason.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

from tierflow.cli.supervisor import ChildExit, Supervisor
from tierflow.runtime.waiting import first

__all__ = ["RestartPolicy", "Restarter"]

_log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RestartPolicy:
    """Backoff that doubles with each recent exit; give up after too many in a window.

    Defaults: waits of 0.5 s, 1 s, 2 s, 4 s, 5 s before the first five restarts; a sixth
    exit within 60 s is given up on. Exits older than `window` no longer count, so a child
    that has stayed up that long starts over at `initial`.
    """

    initial: float = 0.5
    maximum: float = 5.0
    max_exits: int = 5
    window: float = 60.0

    def __post_init__(self) -> None:
        if not 0 < self.initial <= self.maximum:
            raise ValueError(f"need 0 < initial <= maximum, got {self.initial}, {self.maximum}")
        if self.max_exits < 0 or self.window <= 0:
            raise ValueError(f"need max_exits >= 0 and window > 0, got {self.max_exits}, {self.window}")

    def recent(self, exits: Sequence[float], now: float) -> list[float]:
        """The exit times that still count at `now`."""
        return [t for t in exits if now - t < self.window]

    def delay(self, exits: Sequence[float], now: float) -> float | None:
        """Seconds to wait before starting again after the latest of `exits`; None: give up."""
        count = len(self.recent(exits, now))
        if count > self.max_exits:
            return None
        return min(self.maximum, self.initial * 2 ** max(0, count - 1))


class Restarter:
    """Turns a supervisor's unexpected exits into restarts, give-ups, or a fatal reason.

    `quorum` maps a role to how many children of it must be left when one is given up on
    (roles not in it: none). `report` gets each line meant for a person (up's stderr).
    """

    def __init__(
        self,
        supervisor: Supervisor,
        policy: RestartPolicy,
        *,
        quorum: Mapping[str, int],
        report: Callable[[str], None],
        on_change: Callable[[], None] | None = None,
        clock: Callable[[], float] | None = None,
    ) -> None:
        self._supervisor = supervisor
        self._policy = policy
        self._quorum = dict(quorum)
        self._report = report
        self._on_change = on_change or (lambda: None)
        self._clock = clock or asyncio.get_running_loop().time
        self._exits: dict[str, list[float]] = {}
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._closing = asyncio.Event()
        self.given_up: set[str] = set()
        self.fatal: asyncio.Future[str] = asyncio.get_running_loop().create_future()

    @property
    def pending(self) -> set[str]:
        """Children waiting out their backoff (or being started again) right now."""
        return set(self._tasks)

    def handle(self, event: ChildExit) -> None:
        """One unexpected exit: schedule its restart, or give up on it."""
        if self._closing.is_set():
            return
        try:
            role = self._supervisor.get(event.name).role
        except KeyError:
            return  # stopped on purpose right after it died: nothing to restart
        now = self._clock()
        exits = self._policy.recent([*self._exits.get(event.name, []), now], now)
        self._exits[event.name] = exits
        delay = self._policy.delay(exits, now)
        if delay is None:
            self._give_up(event, role, f"it exited {len(exits)} times in {self._policy.window:g}s")
            return
        self._report(f"tierflow up: {event.summary()}; restarting it in {delay:g}s (see {event.log_path})")
        _log.warning("%s; restarting in %gs", event.summary(), delay,
                     extra={"fields": {"child": event.name, "role": role, "pid": event.pid, "returncode": event.returncode,
                                       "restart_in": delay, "recent_exits": len(exits)}})  # fmt: skip
        self._tasks[event.name] = asyncio.ensure_future(self._restart_later(event, role, delay))
        self._on_change()

    async def close(self) -> None:
        """No restart from now on; wait for the pending ones to notice (they start nothing)."""
        self._closing.set()
        tasks = list(self._tasks.values())
        await asyncio.gather(*tasks, return_exceptions=True)

    async def _restart_later(self, event: ChildExit, role: str, delay: float) -> None:
        name = event.name
        try:
            await first(self._closing.wait(), timeout=delay)
            if self._closing.is_set():
                return
            try:
                child = await self._supervisor.restart(name, reason=f"after it {event.how}")
            except KeyError:
                _log.info("not restarting %s: it was stopped on purpose", name)
                return
            except RuntimeError:
                return  # shutdown began while we waited
            except OSError as exc:
                self._tasks.pop(name, None)
                self._give_up(event, role, f"it cannot be started again ({exc})")
                return
            self._report(f"tierflow up: restarted {name} (pid {child.pid}, restart {child.restarts})")
            _log.warning("restarted %s (pid %d, restart %d)", name, child.pid, child.restarts,
                         extra={"fields": {"child": name, "role": role, "pid": child.pid, "restarts": child.restarts}})  # fmt: skip
        finally:
            if self._tasks.get(name) is asyncio.current_task():
                del self._tasks[name]

    def _give_up(self, event: ChildExit, role: str, why: str) -> None:
        self.given_up.add(event.name)
        left = sum(1 for c in self._supervisor.children if c.role == role and (c.returncode is None or c.name in self._tasks))
        need = self._quorum.get(role, 0)
        _log.error("giving up on %s: %s", event.name, why,
                   extra={"fields": {"child": event.name, "role": role, "left": left, "quorum": need}})  # fmt: skip
        message = f"giving up on {event.name}: {why}; last exit: {event.describe()}"
        if left < need:
            if not self.fatal.done():
                self.fatal.set_result(f"{message}\n{left} {role} process(es) left, the fabric needs {need}")
            return
        self._report(f"tierflow up: {message}\ntierflow up: {left} {role} process(es) left; the rest keeps running")
        self._on_change()
