"""The router's configuration: every field is a `tierflow router --flag` and a TIERFLOW_* variable."""

from __future__ import annotations

from typing import Annotated

from msgspec import Meta, Struct

__all__ = ["Settings"]

Port = Annotated[int, Meta(ge=0, le=65535)]

class Settings(Struct, kw_only=True):
    nats_url: str = "nats://127.0.0.1:4222"
    http_host: str = "127.0.0.1"
    http_port: Port = 8000
    grpc_host: str = "127.0.0.1"
    grpc_port: Port = 50051
    router_id: str = ""  # empty: a fresh id per process (each router has its own reply subjects)
    liveness_timeout: Annotated[float, Meta(gt=0)] = 1.5
    max_attempts: Annotated[int, Meta(ge=1, le=10)] = 3
    # Times one request's stream may be resumed on another node after its node failed
    # mid-generation; one more failure is a clear error to the client.
    max_migrations: Annotated[int, Meta(ge=0, le=10)] = 2
    # Seconds a request may wait for a node to come back when none can take it at once (the
    # only node of its deployment lost it; every node suspect after a NATS member died),
    # mid-stream or before its first token.
    resume_wait: Annotated[float, Meta(ge=0, le=60)] = 5.0
    # The deadline of a request that names none (its timeout header, its gRPC deadline,
    # its tenant's `timeout_s`): 10 minutes, the OpenAI clients' own default.
    request_timeout: Annotated[float, Meta(gt=0)] = 600.0
    # Admission before queueing (tierflow.placement.admission): per model, this router
    # lets in its share of the nodes' batch slots plus a queue learned so that admitted
    # requests wait at most `queue_budget` seconds in node queues (below the TTFT SLO);
    # the rest get 429 + Retry-After at once. 0 turns admission off.
    queue_budget: Annotated[float, Meta(ge=0)] = 1.0
    max_queue_factor: Annotated[float, Meta(ge=0)] = 1.0  # the most queue above the batch slots, as a fraction of them
    # Fair sharing inside the limit (issue 21): the batch slots kept free for tenants under
    # their share while another is over it, and how long a tenant counts as active after
    # its last request left (a client between two calls has not gone).
    admission_headroom: Annotated[float, Meta(ge=0, lt=1)] = 0.25
    admission_idle_grace: Annotated[float, Meta(ge=0, le=300)] = 5.0
    # How often the router announces itself (nodes drop the streams of a silent router).
    presence_interval: Annotated[float, Meta(gt=0, le=60)] = 1.0
    drain_grace: Annotated[float, Meta(ge=0)] = 5.0
    # Seconds a starting router waits for the registry's catalog (its first snapshot) before
    # it opens its ports: until then it could only answer 404, and with --reuse-port a
    # restarted router takes connections from its peers the moment it listens. Past this it
    # listens anyway (the registry may be down: requests then get clear errors).
    ready_wait: Annotated[float, Meta(ge=0, le=300)] = 10.0
    # A YAML file with `tenants:` / `anonymous_tenant:` (tierflow.placement.tenants) and
    # `placement:` (policy and weights). Without tenants every request is refused (401)
    # unless `allow_anonymous`; placement is then hotness-aware with default weights.
    config: str = ""
    # No tenants configured: serve every caller, with any key or none, as the open tenant
    # "anonymous" (an explicit opt-in: `tierflow up` turns it on for local runs).
    allow_anonymous: bool = False
    placement_policy: str = ""  # overrides the file's placement policy (hotness, round-robin, least-loaded, random)
    session_capacity: Annotated[int, Meta(gt=0)] = 100_000
    # How often to count the routers on NATS (from their presence): tenants' rate limits
    # and quotas are split evenly over them (tierflow.placement.tenants). 0: never (this
    # router keeps every limit whole).
    peer_interval: Annotated[float, Meta(ge=0)] = 5.0
    # Let several router processes listen on the same HTTP port (SO_REUSEPORT: the kernel
    # spreads connections over them). gRPC servers share their port this way by default.
    reuse_port: bool = False
    # Bounds on the front doors: open HTTP connections per process (over it: 503 and
    # close), seconds a request head may take to arrive (else 408), concurrent gRPC calls
    # (over it: RESOURCE_EXHAUSTED). 0: no bound.
    max_connections: Annotated[int, Meta(ge=0)] = 10_000
    header_timeout: Annotated[float, Meta(ge=0)] = 30.0
    # Open HTTP connections per client address (over it: 503 and close), so one address
    # cannot take every slot; behind a proxy that hides clients' addresses, raise it or
    # set 0. A request body must arrive within `body_timeout` seconds of its head plus
    # 1 s per `min_body_rate` bytes received (else 408). 0: no bound.
    max_connections_per_client: Annotated[int, Meta(ge=0)] = 1_000
    body_timeout: Annotated[float, Meta(ge=0)] = 30.0
    min_body_rate: Annotated[float, Meta(ge=0)] = 16384.0
    max_grpc_calls: Annotated[int, Meta(ge=0)] = 10_000
    # The usage ledger (JetStream stream TIERFLOW_USAGE; tierflow.contracts.usage): every
    # admitted request's record, kept `usage_max_age` seconds (0: for ever; the default,
    # 35 days, covers a monthly bill), in `usage_replicas` copies on a NATS cluster (one on
    # a single server). At most `usage_buffer` records wait to be stored while NATS is
    # unreachable; more are dropped, counted and logged (with the record). A finished
    # answer waits at most `usage_ack_wait` seconds for its record to be stored before it
    # reports its usage, so a router killed right after it cannot forget it (one JetStream
    # round trip at the answer's end; 0: never wait, a kill may lose the last records).
    usage_max_age: Annotated[float, Meta(ge=0)] = 35 * 86400.0
    usage_replicas: Annotated[int, Meta(ge=1, le=5)] = 3
    usage_buffer: Annotated[int, Meta(gt=0)] = 100_000
    usage_ack_wait: Annotated[float, Meta(ge=0, le=10)] = 0.25
