"""The decode-node service: one emulated RDU node serving its deployment's bundle.

In aggregated mode it also prefills. All the work is in tierflow.nodehost (shared with
the prefill node); this only names the role and the subject.
"""

from __future__ import annotations

from tierflow.contracts import subjects
from tierflow.nodehost.serve import serve_node
from tierflow.nodehost.settings import NodeSettings as Settings
from tierflow.runtime.service import ServiceContext

__all__ = ["Settings", "main"]




async def main(ctx: ServiceContext, settings: Settings) -> None:
    await serve_node(ctx, settings, role="decode", subject=subjects.node_generate(settings.node_id), service="decode-node")
