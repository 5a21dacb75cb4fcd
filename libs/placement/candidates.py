"""The nodes serving each model, kept up to date change by change instead of rebuilt per decision.

At a thousand nodes the router's decision used to start from `NodeTable.index()`, a
`FleetIndex` the table drops on every heartbeat and every dispatch: rebuilding it walks
the whole fleet, so nearly every decision paid O(fleet) before scoring a single node,
and then scored every candidate in a Python loop (~1 ms per request at a few hundred
candidates). `CandidateIndex` listens to the table instead (`NodeTable.watch`): each
change marks one row of the models the node serves, and a decision refreshes only the
rows marked since the last one. A policy that can score columns (`HotnessAware.rank_rows`)
then scores all rows at once in numpy; any other policy gets the same candidates as a
list of views.

Rows are in the order `FleetIndex.serving` gives: the order in which the table first
heard of each node (a forgotten node that comes back goes last). Ties between equal
nodes are broken by position, so the order is part of the answer.
"""

from __future__ import annotations

from bisect import bisect
from itertools import count
from typing import TYPE_CHECKING, Any

from tierflow.placement.policy import Placement, PlacementPolicy
from tierflow.placement.request import PlacementRequest
from tierflow.placement.view import NodeView

if TYPE_CHECKING:
    from tierflow.placement.tables import NodeTable

__all__ = ["CandidateIndex", "ModelCandidates"]


class ModelCandidates:
    """The decode nodes that serve one model: their ids and current views, one row each.

    `generation` changes whenever rows are added or removed (row numbers shift); a
    consumer that caches per-row data (`columns`, keyed by what it computes) rebuilds
    then, and otherwise refreshes the rows in its `dirty` set, which every change to a
    node's view adds to.
    """

    __slots__ = ("model", "ids", "views", "pos", "_ordinals", "generation", "columns", "dirty")

    def __init__(self, model: str) -> None:
        self.model = model
        self.ids: list[str] = []
        self.views: list[NodeView] = []
        self.pos: dict[str, int] = {}
        self._ordinals: list[int] = []  # when the table first heard of each row's node
        self.generation = 0
        self.columns: dict[Any, Any] = {}  # a policy's per-row cache, by its own key
        self.dirty: dict[Any, set[int]] = {}  # the rows each cache must refresh

    def __len__(self) -> int:
        return len(self.ids)

    def _add(self, view: NodeView, ordinal: int) -> None:
        at = bisect(self._ordinals, ordinal)
        self._ordinals.insert(at, ordinal)
        self.ids.insert(at, view.node_id)
        self.views.insert(at, view)
        self._reshaped()

    def _remove(self, node_id: str) -> None:
        at = self.pos[node_id]
        del self._ordinals[at], self.ids[at], self.views[at]
        self._reshaped()

    def _update(self, view: NodeView) -> None:
        row = self.pos[view.node_id]
        self.views[row] = view
        for rows in self.dirty.values():
            rows.add(row)

    def _reshaped(self) -> None:
        self.pos = {node: row for row, node in enumerate(self.ids)}
        self.generation += 1
        self.columns.clear()
        self.dirty.clear()


class CandidateIndex:
    """`FleetIndex.serving(model)` for every model, maintained from the table's changes."""

    def __init__(self, table: NodeTable) -> None:
        self._table = table
        self._by_model: dict[str, ModelCandidates] = {}
        self._member: dict[str, list[ModelCandidates]] = {}  # node id -> the models' rows it is in
        self._ordinal: dict[str, int] = {}  # node id -> when the table first heard of it
        self._next = count()
        for view in table.views:
            self._changed(view.node_id)
        table.watch(self._changed)

    def _changed(self, node_id: str) -> None:
        view = self._table.get(node_id)
        held = self._member.get(node_id)
        if view is None:  # forgotten (or a prefill node, which is never a candidate here)
            for candidates in held or ():
                candidates._remove(node_id)
            self._member.pop(node_id, None)
            self._ordinal.pop(node_id, None)
            return
        if held is None:
            held = self._member[node_id] = []
            self._ordinal[node_id] = next(self._next)
        slots = view.slots
        gone = False
        for candidates in held:
            if candidates.model in slots:
                candidates._update(view)
            else:  # no longer serves it
                candidates._remove(node_id)
                gone = True
        if gone:
            held[:] = [c for c in held if c.model in slots]
        if len(held) < len(slots):
            for model in slots:
                candidates = self._by_model.get(model)
                if candidates is None:
                    candidates = self._by_model[model] = ModelCandidates(model)
                if node_id not in candidates.pos:
                    candidates._add(view, self._ordinal[node_id])
                    held.append(candidates)

    def serving(self, model: str) -> ModelCandidates:
        """The rows of `model` (empty when no node serves it)."""
        candidates = self._by_model.get(model)
        if candidates is None:
            candidates = self._by_model[model] = ModelCandidates(model)
        return candidates

    def rank(self, policy: PlacementPolicy, request: PlacementRequest, now: float) -> Placement:
        """The best node for `request`: `policy.rank(serving, request, now, limit=1)` with
        `serving` the nodes that serve its model, scored column-wise when the policy can."""
        candidates = self.serving(request.model)
        rank_rows = getattr(policy, "rank_rows", None)
        if rank_rows is not None:
            placement: Placement = rank_rows(candidates, request, now)
            return placement
        return policy.rank(list(candidates.views), request, now, limit=1)
