"""Where every prompt block is: the router's exact index of the nodes' KV caches (issue 17).

A heartbeat carries only a node's 256 most recently used block hashes per model: with
12k-token prompts (~190 blocks) that is about one prompt, so a conversation that returns
after a minute finds no node that "holds" it, though one still does. Nodes now publish
their KV cache's changes (`messages.KvEvents`: blocks stored, spilled to DDR, restored
from it, removed), and this index applies them: per (node, model), the set of unsalted
block hashes the node holds, each with its tier.

Pure (no I/O, no clock of its own): the router's shell feeds it messages and acts on
what `apply` returns; the simulator feeds it in process.

- **Live sets.** `holder(node, model)` returns the same dict object for as long as the
  index keeps the node (hash -> True when in DDR, False in HBM; a `Container[int]` with
  a fast `__contains__`), so placement rows that keep a reference see every change
  without being rebuilt. None while the index does not know the node's blocks (never
  heard, or events went missing): placement then falls back to the heartbeat's list.
- **Gaps.** A node numbers its messages 1, 2, 3, ... from its start. A message that is
  not the next one (lost, or a restart without the snapshot seen) makes the node unknown
  (its sets are no longer updated nor returned) until a message with `snapshot` arrives;
  `apply` returns True when the shell should ask the node for one
  (`subjects.node_kv_sync`), at most once per `resync_after` seconds per node.
- **Snapshots.** A `snapshot` message replaces all the node knew: every model's set is
  emptied (in place: the same objects) and the lists applied. A snapshot too large for
  one message continues in the following ones as plain changes.
- **Bounds.** At most `max_blocks` hashes per node (a node's HBM and DDR hold ~10^5
  blocks; the default is several times that). Past it the oldest stored hashes of each of
  the node's models go first, in proportion to the model's share, and `trimmed` counts
  them: a safety valve against a node that lies, not a working regime (it would cut
  chains at their oldest blocks: their prefixes).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from itertools import islice, repeat
from typing import Final

from tierflow.contracts import messages

__all__ = ["DEFAULT_MAX_BLOCKS", "DEFAULT_RESYNC_AFTER", "PrefixIndex"]

DEFAULT_MAX_BLOCKS: Final = 1 << 20
DEFAULT_RESYNC_AFTER: Final = 1.0
_HBM: Final = False
_DDR: Final = True


@dataclass(slots=True)
class _Node:
    started_at: float = 0.0
    seq: int = 0  # the last message applied
    known: bool = False  # the sets are exact (a snapshot was applied, and no message missed since)
    # when the shell was last told to ask for a snapshot, and when the node was last heard
    asked_at: float = float("-inf")
    heard_at: float = 0.0
    # model -> hash -> in DDR
    models: dict[str, dict[int, bool]] = field(default_factory=dict)
    trimmed: int = 0


class PrefixIndex:
    """Per (node, model): the unsalted block hashes the node's KV cache holds, exactly."""

    def __init__(
        self,
        *,
        max_blocks: int = DEFAULT_MAX_BLOCKS,
        resync_after: float = DEFAULT_RESYNC_AFTER,
    ) -> None:
        if max_blocks < 1:
            raise ValueError(f"max_blocks must be at least 1, got {max_blocks}")
        self._nodes: dict[str, _Node] = {}
        self.max_blocks = max_blocks
        self.resync_after = resync_after
        self.gaps = 0  # messages that were not the next one (for a metric)

    # -- what placement reads ------------------------------------------------------------
    def holder(self, node_id: str, model: str) -> dict[int, bool] | None:
        """The live set of `model`'s blocks on the node (hash -> in DDR), the same object
        each time; None while the node's blocks are not known."""
        node = self._nodes.get(node_id)
        if node is None or not node.known:
            return None
        held = node.models.get(model)
        if held is None:
            held = node.models[model] = {}
        return held

    def knows(self, node_id: str) -> bool:
        node = self._nodes.get(node_id)
        return node is not None and node.known

    def nodes(self) -> list[str]:
        return list(self._nodes)

    def blocks(self, node_id: str) -> int:
        """Hashes held for the node, all models."""
        node = self._nodes.get(node_id)
        return sum(map(len, node.models.values())) if node is not None else 0

    def trimmed(self, node_id: str) -> int:
        """Hashes dropped for the node by the `max_blocks` bound."""
        node = self._nodes.get(node_id)
        return node.trimmed if node is not None else 0

    # -- what the shell feeds it -----------------------------------------------------------
    def apply(self, events: messages.KvEvents, now: float) -> bool:
        """Apply one message; True when the shell should ask the node for a snapshot now."""
        node = self._nodes.get(events.node_id)
        if node is None:
            node = self._nodes[events.node_id] = _Node(started_at=events.started_at)
        node.heard_at = now
        if events.snapshot:
            for held in node.models.values():
                held.clear()
            node.known = True
            node.started_at = events.started_at
        elif not node.known:
            node.seq = events.seq
            return self._ask(node, now)
        elif events.seq != node.seq + 1 or events.started_at != node.started_at:
            self.gaps += 1
            node.known = False
            node.seq = events.seq
            return self._ask(node, now)
        node.seq = events.seq
        models = node.models
        for m in events.models:
            held = models.get(m.name)
            if held is None:
                held = models[m.name] = {}
            elif m.cleared:
                held.clear()
            if m.removed:
                pop = held.pop
                for h in m.removed:
                    pop(h, None)
            if m.restored:  # back in HBM after a hit: recent again, for the bound's order
                pop = held.pop
                for h in m.restored:
                    pop(h, None)
                held.update(zip(m.restored, repeat(_HBM)))
            if m.stored:
                held.update(zip(m.stored, repeat(_HBM)))
            if m.spilled:
                held.update(zip(m.spilled, repeat(_DDR)))
        self._bound(node)
        return False

    def _ask(self, node: _Node, now: float) -> bool:
        if now - node.asked_at < self.resync_after:
            return False
        node.asked_at = now
        return True

    def _bound(self, node: _Node) -> None:
        total = sum(map(len, node.models.values()))
        excess = total - self.max_blocks
        if excess <= 0:
            return
        for held in node.models.values():  # oldest first, each model by its share
            cut = min(len(held), -(-excess * len(held) // total))
            for h in list(islice(held, cut)):
                del held[h]
            node.trimmed += cut

    def forget(self, node_id: str) -> None:
        """The node is gone (the router forgot it): drop what it held. Placement rows that
        still hold its sets see them empty."""
        node = self._nodes.pop(node_id, None)
        if node is not None:
            for held in node.models.values():
                held.clear()

    def forget_silent(self, now: float, after: float) -> list[str]:
        """Forget every node not heard from in `after` seconds (a node with nothing to say
        still sends its periodic snapshot); returns them."""
        gone = [n for n, node in self._nodes.items() if now - node.heard_at > after]
        for n in gone:
            self.forget(n)
        return gone

    def forget_all_but(self, node_ids: Iterable[str]) -> list[str]:
        """Forget every node not in `node_ids` (the router's live nodes); returns them."""
        keep = set(node_ids)
        gone = [n for n in self._nodes if n not in keep]
        for n in gone:
            self.forget(n)
        return gone
