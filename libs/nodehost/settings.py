"""A node's configuration, the same for decode and prefill nodes (flags and TIERFLOW_* variables)."""

from __future__ import annotations

from typing import Annotated, Literal

from msgspec import Meta, Struct

__all__ = ["NodeSettings"]

NodeId = Annotated[str, Meta(pattern=r"^[A-Za-z0-9_-]{1,128}$")]

class NodeSettings(Struct, kw_only=True):
    nats_url: str = "nats://127.0.0.1:4222"
    node_id: NodeId = "decode-1"
    deployment: str = "default"
    region: str = ""          # empty: the deployment's region
    profile: str = ""         # empty: the deployment's hardware profile
    profiles: str = ""        # a YAML file of extra hardware profiles (see tierflow.nodehost.profiles)
    heartbeat_interval: Annotated[float, Meta(gt=0)] = 1.0
    keepalive_interval: Annotated[float, Meta(gt=0)] = 0.25
    drain_grace: Annotated[float, Meta(ge=0)] = 10.0
    # Token coalescing: a stream's tokens produced within this many seconds of its last
    # Tokens message wait for the window to pass (or for this many tokens, or the end of
    # the stream) and go out as one message; its first token never waits. 0: off.
    coalesce_window: Annotated[float, Meta(ge=0, le=1)] = 0.003
    coalesce_tokens: Annotated[int, Meta(ge=1, le=4096)] = 64
    # Drop the streams of a router silent this long (it died: nobody reads them).
    router_abandon_after: Annotated[float, Meta(gt=0)] = 10.0
    # Where the bundle's weights are when the node starts: "hbm" = all in DDR and as many
    # as fit in HBM (hot at once); "ddr" = all in DDR (first use of each costs a switch);
    # "cold" = in host storage (first use costs a load into DDR, then the switch).
    preload: Literal["hbm", "ddr", "cold"] = "hbm"
    # KV-cache events for the routers' prefix index (tierflow.nodehost.kv_events): batched
    # every this many seconds (0: none, the routers place by heartbeats' recent hashes),
    # with a full snapshot at start, on a router's request and every kv_snapshot_every (0: never).
    kv_events_interval: Annotated[float, Meta(ge=0, le=10)] = 0.05
    kv_snapshot_every: Annotated[float, Meta(ge=0)] = 30.0
    # Fair queuing (tierflow.rdu.fairness): a request class whose oldest request has waited
    # this many seconds goes before the better classes. An interactive request may take a
    # lower-class sequence's place in a full batch (its KV parked in DDR) unless `no_preemption`.
    starvation_s: Annotated[float, Meta(gt=0)] = 30.0
    no_preemption: bool = False

