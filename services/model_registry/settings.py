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
    # The admin credential (services/model_registry/admin_auth.py): every admin call that
    # writes needs `authorization: Bearer <token>`. The token from a file (what `tierflow up`
    # passes: DATA/auth/admin.token), from TIERFLOW_ADMIN_TOKEN (a flag's value would show
    # in `ps`), or only its salted hash(es), comma separated (old and new during a rotation;
    # `tierflow keys hash` prints one). With none of them every admin write is refused.
    admin_token_file: str = ""
    admin_token: str = ""
    admin_token_hash: str = ""
    # mTLS, when the gRPC port speaks TLS: client certificates with one of these CNs (comma
    # separated) are admins too.
    admin_cert_names: str = ""
    # Reads (ListModels, GetModel, ListDeployments, ListBundles) need the credential too.
    protect_reads: bool = False
    # No credential check at all (a trusted test box): anyone who reaches the port may write.
    allow_unauthenticated_admin: bool = False
    # The audit stream (tierflow.audit.>), made or updated at start: how long and how many
    # records it keeps (0: no bound).
    audit_max_age: Annotated[float, Meta(ge=0)] = 90 * 86400.0
    audit_max_msgs: Annotated[int, Meta(ge=0)] = 1_000_000
