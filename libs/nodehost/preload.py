"""Which of a bundle's models a node brings into HBM at start-up.

When a bundle does not fit in HBM at once, every node preloading the same first models
(bundle order) leaves the rest cold on *every* node: the first wave of requests for them
all pays a switch, and the fleet starts out ping-ponging weights. So each node starts the
greedy fit at a different model, rotated by its ordinal: across a deployment, every model
of the bundle starts hot on some node, and hotness-aware placement has somewhere to send it.
"""

from __future__ import annotations

import re
import zlib
from collections.abc import Sequence

from tierflow.rdu import BundleModel, HardwareProfile, hbm_preload

__all__ = ["node_ordinal", "preload_models"]

_TRAILING_NUMBER = re.compile(r"(\d+)$")


def node_ordinal(node_id: str) -> int:
    """The node's number within its deployment: the id's trailing digits ("decode-3" -> 3),
    which `tierflow up`, the local actuator and Kubernetes StatefulSets all give; else a
    stable hash of the id."""
    m = _TRAILING_NUMBER.search(node_id)
    return int(m.group(1)) if m else zlib.crc32(node_id.encode())


def preload_models(profile: HardwareProfile, bundle: Sequence[BundleModel], node_id: str) -> list[str]:
    """The models to put in HBM at start: as many as fit, starting at the node's turn."""
    if not bundle:
        return []
    k = node_ordinal(node_id) % len(bundle)
    return hbm_preload(profile, [*bundle[k:], *bundle[:k]])
