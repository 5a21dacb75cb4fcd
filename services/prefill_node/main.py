"""The prefill-node service: prompt processing for disaggregated deployments.

It runs the same emulator as a decode node, with requests that stop after prefill
(max_tokens = 0); the KV it produces is handed to a decode node by the router.
"""

from __future__ import annotations

from tierflow.contracts import subjects
from tierflow.nodehost.serve import serve_node
from tierflow.nodehost.settings import NodeSettings as Settings
from tierflow.runtime.service import ServiceContext

__all__ = ["Settings", "main"]




async def main(ctx: ServiceContext, settings: Settings) -> None:
    await serve_node(ctx, settings, role="prefill", subject=subjects.prefill_run(settings.node_id), service="prefill-node")
