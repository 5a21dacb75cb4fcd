"""This node's configuration: the shared node settings (tierflow.nodehost.settings)."""

from tierflow.nodehost.settings import NodeSettings as Settings

__all__ = ["Settings"]
