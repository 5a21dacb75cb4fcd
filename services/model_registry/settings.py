"""The model registry's configuration (flags and TIERFLOW_* variables)."""

from __future__ import annotations

from typing import Annotated

from msgspec import Meta, Struct

__all__ = ["Settings"]

class Settings(Struct, kw_only=True):
    nats_url: str = "nats://127.0.0.1:4222"
    grpc_host: str = "127.0.0.1"
    grpc_port: Annotated[int, Meta(ge=0, le=65535)] = 50052
    fleet: str = ""

