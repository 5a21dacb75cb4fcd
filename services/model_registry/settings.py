"""The model registry's configuration (flags and TIERFLOW_* variables)."""

from __future__ import annotations

from typing import Annotated

from msgspec import Meta, Struct

__all__ = ["Settings"]


class Settings(Struct, kw_only=True):
    nats_url: str = "nats://127.0.0.1:4222"
    grpc_host: str = "127.0.0.1"
    grpc_port: Annotated[int, Meta(ge=0, le=65535)] = 50052
    fleet: str = ""  # a fleet file applied at start (idempotent), e.g. by `tierflow up`
    # Extra hardware profiles deployments may name (the nodes' `--profiles` file format);
    # without it only the built-in profiles pass validation.
    profiles: str = ""
    # How often a write that lost a compare-and-set race is retried on fresh state
    # before the caller is told (ABORTED).
    write_attempts: Annotated[int, Meta(ge=1, le=100)] = 10
    # Copies of the registry's KV bucket across a NATS cluster: 3, so losing one server
    # of a three-server cluster loses nothing. A single server keeps 1 (it can hold no
    # more); a bucket with fewer copies is given more at start when the cluster allows.
    kv_replicas: Annotated[int, Meta(ge=1, le=5)] = 3
