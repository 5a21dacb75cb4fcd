"""The autoscaler's configuration (flags and TIERFLOW_* variables)."""

from __future__ import annotations

from typing import Annotated

from msgspec import Meta, Struct

__all__ = ["Settings"]

class Settings(Struct, kw_only=True):
    nats_url: str = "nats://127.0.0.1:4222"
    interval: Annotated[float, Meta(gt=0)] = 5.0
    target_utilization: Annotated[float, Meta(gt=0, le=1)] = 0.7

