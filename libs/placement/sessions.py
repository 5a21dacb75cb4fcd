"""Session bookkeeping for multi-step agent workflows: which node a session used, and how many.

Placement gives a bonus to the node a session used last (its KV and prefix cache are warm
there beyond what heartbeats show); the request record reports how many nodes the
session has touched so far, the measure of how well affinity holds. The table is a
bounded LRU: the router cannot let clients grow its memory by inventing session ids.

Session ids come from the client (a header, or the OpenAI `user` field); `session_key`
scopes them by tenant, so two tenants' "user-1" are different sessions.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from dataclasses import dataclass
from typing import Final

__all__ = ["SessionInfo", "SessionTable", "session_key"]

_MAX_KEY: Final = 128


def session_key(tenant: str, header: str | None = None, user: str | None = None) -> str:
    """The table key for a request's session: the header wins over `user`; "" means none.

    Over-long ids are hashed, so a client cannot make each entry arbitrarily large.
    """
    raw = header or user or ""
    if not raw:
        return ""
    if len(raw) > _MAX_KEY:
        raw = "sha256:" + hashlib.sha256(raw.encode()).hexdigest()
    return f"{tenant}/{raw}"


@dataclass(frozen=True, slots=True)
class SessionInfo:
    """A snapshot of one session: the node it used last, every node it used, how many requests."""

    last_node: str
    nodes: frozenset[str]
    requests: int


class _Entry:
    __slots__ = ("by_model", "last", "nodes", "requests")

    def __init__(self, node: str) -> None:
        self.last = node
        self.nodes = {node}
        self.requests = 0
        # model -> the node that served the session's last request for it: a prompt's KV is
        # per model, so an agent's planner and coder steps each have their own warm node
        self.by_model: dict[str, str] = {}

    def note_model(self, model: str, node: str, cap: int) -> None:
        if model in self.by_model or len(self.by_model) < cap:
            self.by_model[model] = node


class SessionTable:
    """session id -> (last node, nodes touched, request count), LRU-bounded to `capacity`.

    A session's node set is capped at `max_nodes` (beyond it the count saturates): a
    session that has touched that many nodes has no affinity left to measure.
    """

    __slots__ = ("capacity", "max_nodes", "_entries")

    MAX_MODELS: Final = 16  # models remembered per session (an agent flow calls a handful)

    def __init__(self, capacity: int = 100_000, *, max_nodes: int = 64) -> None:
        if capacity < 1 or max_nodes < 1:
            raise ValueError(f"capacity and max_nodes must be at least 1, got {capacity} and {max_nodes}")
        self.capacity = capacity
        self.max_nodes = max_nodes
        self._entries: OrderedDict[str, _Entry] = OrderedDict()

    def touch(self, session: str, node: str, model: str = "") -> int:
        """Record that `session` sent a request for `model` to `node`; returns the nodes it
        has touched.

        An empty session id records nothing and returns 0 (a request outside any session).
        """
        if not session:
            return 0
        entries = self._entries
        entry = entries.get(session)
        if entry is None:
            entry = entries[session] = _Entry(node)
            if len(entries) > self.capacity:
                entries.popitem(last=False)
        else:
            entries.move_to_end(session)
            entry.last = node
            if len(entry.nodes) < self.max_nodes:
                entry.nodes.add(node)
        if model:
            entry.note_model(model, node, self.MAX_MODELS)
        entry.requests += 1
        return len(entry.nodes)

    def learn(self, session: str, node: str) -> None:
        """Another router placed `session` on `node`: its next request here follows it.
        Counts no request (that router's record counts it); an unknown session is added."""
        if not session:
            return
        entry = self._entries.get(session)
        if entry is None:
            self._entries[session] = _Entry(node)
            if len(self._entries) > self.capacity:
                self._entries.popitem(last=False)
            return
        entry.last = node
        if len(entry.nodes) < self.max_nodes:
            entry.nodes.add(node)

    def last_node(self, session: str, model: str = "") -> str | None:
        """The node `session` used last for `model` (for `PlacementRequest.affinity_node`),
        else the node it used last for any model (another router's gossip names no model),
        or None."""
        entry = self._entries.get(session) if session else None
        if entry is None:
            return None
        return entry.by_model.get(model, entry.last) if model else entry.last

    def nodes_touched(self, session: str) -> int:
        entry = self._entries.get(session) if session else None
        return len(entry.nodes) if entry is not None else 0

    def get(self, session: str) -> SessionInfo | None:
        entry = self._entries.get(session) if session else None
        if entry is None:
            return None
        return SessionInfo(last_node=entry.last, nodes=frozenset(entry.nodes), requests=entry.requests)

    def forget(self, session: str) -> None:
        self._entries.pop(session, None)

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, session: object) -> bool:
        return session in self._entries
