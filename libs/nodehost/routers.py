"""Which routers are still there, as a node sees them (from their presence messages).

A router that dies leaves its streams on the nodes: nobody will read their tokens, yet
they hold batch slots and KV until they finish, which for a long generation is minutes
of capacity lost per stream. Routers announce themselves every second or so
(`subjects.router_presence`); a node drops the streams of a router it has heard before
and that has been silent for `abandon_after` seconds. A node that was itself cut off
from NATS heard nobody meanwhile: `forgive` starts every router's silence over.

Pure: every call takes `now`.
"""

from __future__ import annotations

__all__ = ["RouterLiveness"]


class RouterLiveness:
    def __init__(self, abandon_after: float = 10.0) -> None:
        if abandon_after <= 0:
            raise ValueError(f"abandon_after must be positive, got {abandon_after}")
        self.abandon_after = abandon_after
        self._heard: dict[str, float] = {}

    def heard(self, router_id: str, now: float) -> None:
        self._heard[router_id] = now

    def forgive(self, now: float) -> None:
        """Our own connection was down: nobody's silence meanwhile says anything."""
        for router_id in self._heard:
            self._heard[router_id] = now

    def gone(self, router_id: str | None, now: float) -> bool:
        """True when `router_id` was heard once and has been silent too long since. A
        router never heard (not started its presence yet, or a client that is no router)
        is not judged: the request's deadline bounds its streams instead."""
        if router_id is None:
            return False
        last = self._heard.get(router_id)
        return last is not None and now - last > self.abandon_after

    def forget_older_than(self, now: float, age: float) -> None:
        """Drop routers silent for `age` seconds (ids are per process: the table would grow)."""
        for router_id in [r for r, t in self._heard.items() if now - t > age]:
            del self._heard[router_id]
