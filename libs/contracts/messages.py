"""Messages between the fabric's services, as msgspec Structs (JSON on the wire).

Rules that keep rolling upgrades safe (see msgspec's schema-evolution guide):
new fields get defaults, a field is never retyped, unknown fields are ignored, and a
missing required field is a decode error that names its path. `v` is bumped only for
a change old readers cannot survive.

Every field a service reads off the bus is bounded (`Meta`: lengths of strings and
lists, ranges of numbers), so a hostile but well-formed message is a decode error at the
edge, never unbounded memory or a value no code expects (a heartbeat's `interval_s` of
1e9 once kept a node "live" forever). Bounds are checked on decode only: the simulator,
which builds these Structs directly, is not limited by them.
"""

from __future__ import annotations

from typing import Annotated, Literal

import msgspec
from msgspec import Meta, Struct

__all__ = [
    "Tier",
    "ModelState",
    "NodeHeartbeat",
    "GenerateRequest",
    "CancelRequest",
    "Accepted",
    "Alive",
    "Started",
    "Tokens",
    "Finished",
    "Failed",
    "StreamEvent",
    "AutoscalerDecision",
    "NodeCommand",
    "NodeCommandReply",
    "SupervisorCommand",
    "SupervisedNode",
    "SupervisorReply",
    "RouterPresence",
    "RouterGossip",
    "ModelKvEvents",
    "KvEvents",
    "KvSyncRequest",
    "MAX_KV_EVENT_HASHES",
]

Tier = Literal["sram", "hbm", "ddr", "loading", "cold"]
NonNegInt = Annotated[int, Meta(ge=0)]
NonNegFloat = Annotated[float, Meta(ge=0.0)]
# Bounds for what arrives over NATS (see the module docstring).
Token = Annotated[str, Meta(pattern=r"^[A-Za-z0-9_-]{1,128}$")]  # an id that is a subject token (subjects.check_token)
Label = Annotated[str, Meta(max_length=256)]  # names: deployment, model, version, region, host...
Count = Annotated[int, Meta(ge=0, le=1_000_000)]  # requests, batch slots, queue entries
BigCount = Annotated[int, Meta(ge=0, le=1 << 48)]  # tokens, blocks, samples, sequence numbers
Seconds = Annotated[float, Meta(ge=0.0, le=86_400.0)]
BlockHash = Annotated[int, Meta(ge=0)]
TokenIds = Annotated[list[Annotated[int, Meta(ge=0, lt=1 << 32)]], Meta(max_length=1 << 20)]
MAX_RECENT_HASHES = 4096  # a node sends its 256 most recent per model
MAX_BUNDLE_MODELS = 64
# Hashes in one KV-events message, all lists together: a node splits what it has to say
# over several messages (about 20 bytes a hash in JSON: ~330 KB, under NATS's 1 MB payload).
MAX_KV_EVENT_HASHES = 16_384
KvHashes = Annotated[list[BlockHash], Meta(max_length=MAX_KV_EVENT_HASHES)]


class ModelState(Struct, kw_only=True):
    """Where one model of a node's bundle lives right now."""

    name: Label
    version: Label = "v1"
    tier: Tier = "ddr"
    in_flight: Count = 0
    queued: Count = 0
    max_batch: Count = 0
    # This model's most recently used prompt-block hashes: block hashes do not depend on
    # the model, so a node-wide list would make a prompt cached for one model look cached
    # for every model of the bundle.
    recent_prefix_hashes: Annotated[list[BlockHash], Meta(max_length=MAX_RECENT_HASHES)] = []


class NodeHeartbeat(Struct, kw_only=True):
    """A node's periodic report: what is hot on it, how loaded it is, whether it takes work.

    The router places by it (a node silent for 3 intervals is out of rotation) and the
    autoscaler scales by it, so it carries everything both need and nothing per request.
    """

    v: int = 1
    node_id: Token
    role: Literal["decode", "prefill"] = "decode"
    deployment: Label = ""
    region: Label = "local"
    residency: Label = ""
    profile: Label = ""
    host: Label = ""
    pid: Annotated[int, Meta(ge=0, lt=1 << 32)] = 0
    started_at: float = 0.0
    sent_at: float = 0.0
    # Readers call a node gone after 3 intervals: a minute at most, or a node that lies
    # about it would stay "live" long after it died.
    interval_s: Annotated[float, Meta(gt=0.0, le=60.0)] = 1.0
    seq: BigCount = 0
    models: Annotated[list[ModelState], Meta(max_length=MAX_BUNDLE_MODELS)] = []
    queue_depth: Count = 0
    running: Count = 0
    max_batch: Count = 0
    kv_usage: Annotated[float, Meta(ge=0.0, le=1.0)] = 0.0
    prefix_cache_blocks: BigCount = 0
    recent_prefix_hashes: Annotated[list[BlockHash], Meta(max_length=MAX_RECENT_HASHES)] = []
    # Tokens per KV block, for information: routers hash prompts with the fabric's block
    # size (tierflow.rdu.DEFAULT_BLOCK_SIZE) and refuse a heartbeat that says otherwise.
    block_size: Annotated[int, Meta(gt=0, le=1 << 16)] = 64
    cordoned: bool = False
    draining: bool = False
    # Who cordoned it ("autoscaler", "operator", ...; empty when not cordoned or unknown):
    # a restarted autoscaler undoes or finishes only its own cordons, never an operator's.
    cordon_owner: Label = ""
    # The registry now holds another bundle (models, versions, configs, profile) for this
    # node's deployment than the one it serves: a node reads its bundle once, at start,
    # so it serves the old one until restarted.
    bundle_outdated: bool = False
    # What the autoscaler scales on besides queue and batch (added with defaults; old
    # nodes simply report none of it). Latencies are the node's own view over its last
    # `latency_window_s`: TTFT from arrival on the node to the first token (a prefill
    # node: to its KV being ready), ITL between consecutive tokens of a request. None
    # means no sample in the window (no traffic), which is not the same as fast.
    ttft_p95: Seconds | None = None
    itl_p95: Seconds | None = None
    latency_samples: BigCount = 0
    latency_window_s: Seconds = 0.0
    in_flight: Count = 0  # requests the node holds (queued, running, or waiting for their KV)
    queued_prompt_tokens: BigCount = 0  # prompt tokens of requests not started yet
    # Power drawn now, watts, and energy since the node started, joules (tierflow.rdu.energy:
    # the node's published power while busy, its idle power if published); 0: not known.
    power_w: Annotated[float, Meta(ge=0.0)] = 0.0
    energy_j: Annotated[float, Meta(ge=0.0)] = 0.0


RequestClass = Literal["interactive", "standard", "batch"]
"""Where queues form, which work goes first: strict priority in this order (tierflow.placement.classes)."""


class GenerateRequest(Struct, kw_only=True):
    """Router -> node: generate for one request; the stream goes to the message's reply subject."""

    v: int = 1
    request_id: Label
    model: Label
    version: Label = "v1"
    prompt_token_ids: TokenIds
    max_tokens: Annotated[int, Meta(ge=0, le=1 << 24)]
    seed: Annotated[int, Meta(ge=-(1 << 63), le=(1 << 63) - 1)] = 0
    temperature: NonNegFloat = 1.0
    ignore_eos: bool = False
    stop: Annotated[list[Annotated[str, Meta(max_length=4096)]], Meta(max_length=64)] = []
    tenant: Label = ""
    session_id: Annotated[str, Meta(max_length=1024)] = ""
    attempt: Annotated[int, Meta(ge=1, le=1000)] = 1
    # Disaggregated serving: the prefill node that computed this prompt's KV. The decode
    # node then skips prefill and pays the KV transfer over the inter-node link instead.
    kv_source: Label = ""
    # Resuming a generation another node started (it died or stalled mid-stream): the
    # completion tokens already streamed to the client. The node prefills prompt + these,
    # and continues the *same* completion (its plan is keyed by the prompt alone) from
    # token index len(resume_token_ids): with the deterministic emulator the client's
    # stream is exactly what one node would have sent. `max_tokens` stays the request's
    # whole budget, these tokens included.
    resume_token_ids: TokenIds = []
    # Seconds the request may still take, counted from when the node receives it (0: no
    # deadline). Past it the node drops the work and answers `deadline_exceeded`.
    timeout_s: NonNegFloat = 0.0
    # Structured output (a tool call's arguments, JSON a schema asked for): the whole
    # completion's token ids, decided by the router from the request's seed
    # (tierflow.rdu.structured). The node emits them, with its usual timing, instead of
    # drawn words, and finishes when they end ("stop") or at max_tokens ("length").
    # Empty: words drawn as usual.
    output_token_ids: TokenIds = []
    # Who goes first where the node's queue forms (tierflow.placement.classes): the class
    # in strict priority, then tenants of one class by weighted service received.
    request_class: RequestClass = "standard"
    tenant_weight: Annotated[float, Meta(gt=0.0, le=1e6)] = 1.0


class CancelRequest(Struct, kw_only=True):
    request_id: Label


# The token stream a node sends back is a tagged union: one decoder, then `match`.


class Accepted(Struct, tag="accepted", kw_only=True):
    """The node has the request queued; from here on, silence means the node is gone."""

    request_id: Label
    node_id: Label
    queue_depth: NonNegInt = 0


class Alive(Struct, tag="alive", kw_only=True):
    """Keep-alive while a request waits or prefills, so a dead node is noticed in time."""

    request_id: Label


class Started(Struct, tag="started", kw_only=True):
    """The request entered a batch: how long it queued and where its model was found."""

    request_id: Label
    queue_time: NonNegFloat = 0.0
    tier: Tier = "hbm"
    switch_seconds: NonNegFloat = 0.0
    prefix_hit_tokens: NonNegInt = 0


class Tokens(Struct, tag="tokens", kw_only=True):
    """Consecutive completion tokens; `index` is the first one's position in the completion.

    Indices are the stream's integrity check: the router expects exactly the next index,
    drops tokens it already has (a resumed stream may repeat), and treats a gap as a
    failure of the node (a message lost), never as text silently missing."""

    request_id: Label
    index: NonNegInt
    token_ids: Annotated[list[int], Meta(max_length=1 << 16)]
    text: Annotated[str, Meta(max_length=1 << 20)]


class Finished(Struct, tag="finished", kw_only=True):
    request_id: Label
    finish_reason: Literal["stop", "length", "prefill", "cancelled"]
    prompt_tokens: NonNegInt
    completion_tokens: NonNegInt
    cached_tokens: NonNegInt = 0
    # The request's share of the node's energy, joules (tierflow.rdu.energy); 0: not known
    energy_j: Annotated[float, Meta(ge=0.0)] = 0.0


class Failed(Struct, tag="failed", kw_only=True):
    """The node could not serve the request. `retryable` says another node might.

    Codes: queue_full, model_not_in_bundle, draining, node_cordoned, node_shutdown
    (retryable); context_length_exceeded, invalid_request, bad_request (the caller's);
    deadline_exceeded (the request's `timeout_s` passed on the node); duplicate_request."""

    request_id: Label
    code: Label
    message: Annotated[str, Meta(max_length=1 << 16)]
    retryable: bool = False


StreamEvent = Accepted | Alive | Started | Tokens | Finished | Failed


class NodeCommand(Struct, kw_only=True):
    """Server management. cordon: take no new work; drain: cordon and let in-flight work
    finish (the heartbeat then shows `draining` with nothing running: safe to stop)."""

    action: Literal["cordon", "uncordon", "drain", "status"]
    owner: Label = ""  # who asks (cordon/drain): shown in the heartbeat's `cordon_owner`
    # Who sent it, for the audit stream (`operator:<user>@<host>`, `autoscaler:<instance>`):
    # claimed by the sender, whose NATS identity is what may publish node control at all.
    by: str = ""


class NodeCommandReply(Struct, kw_only=True):
    node_id: str
    cordoned: bool
    draining: bool
    in_flight: NonNegInt
    error: str = ""
    cordon_owner: str = ""


class AutoscalerDecision(Struct, kw_only=True):
    """One autoscaling decision with the inputs that led to it (explainability).

    One per pool per tick, holds included. `signal` names what decided (a signal such as
    "utilization", "queue", "ttft", "itl", "prompt_tokens", or "bounds", "stale",
    "none"); `inputs` has every number the policy looked at (missing ones are absent).
    """

    v: int = 1
    deployment: str
    at: float
    current_replicas: NonNegInt
    desired_replicas: NonNegInt
    reason: str
    inputs: dict[str, float] = {}
    pool: Literal["decode", "prefill"] = "decode"
    action: Literal["up", "down", "hold"] = "hold"
    signal: str = ""
    actuator: str = ""  # who carries it out: "local", "kubernetes", "virtual", "none" (advisory)
    victims: list[str] = []  # on scale-down: the nodes being cordoned, drained and stopped


class SupervisorCommand(Struct, kw_only=True):
    """To the local supervisor (`tierflow up`): start a node process, stop one, or list them.

    start: a `role` node for `deployment` (next free node id and metrics port; the node
    takes region and residency from the deployment, or `region` when given). stop: the
    node `node_id` (SIGTERM: it stops taking work and drains before exiting).
    """

    action: Literal["start", "stop", "list"]
    role: Literal["decode", "prefill"] = "decode"
    deployment: Label = ""
    region: Label = ""
    node_id: Label = ""


class SupervisedNode(Struct, kw_only=True):
    node_id: str
    role: Literal["decode", "prefill"]
    deployment: str
    pid: NonNegInt = 0
    metrics_port: NonNegInt = 0


class SupervisorReply(Struct, kw_only=True):
    ok: bool = True
    error: str = ""
    node_id: str = ""
    nodes: list[SupervisedNode] = []


class RouterPresence(Struct, kw_only=True):
    """A router is alive (on `subjects.router_presence`, every `interval_s`)."""

    router_id: Token
    interval_s: Annotated[float, Meta(gt=0.0, le=60.0)] = 1.0
    leaving: bool = False  # a clean stop: forget this router now, not after its silence


class RouterGossip(Struct, kw_only=True):
    """What one router shares with the others, batched: the node each session last ran
    on (so a session keeps its node whichever router its next request reaches), and nodes
    it just found failing (so the others stop placing on them before their heartbeats lapse)."""

    router_id: Token
    sessions: Annotated[list[tuple[Annotated[str, Meta(max_length=1024)], Label]], Meta(max_length=10_000)] = []  # (session key, node id)
    suspects: Annotated[list[Label], Meta(max_length=10_000)] = []


class ModelKvEvents(Struct, kw_only=True, gc=False):
    """One model's KV changes on a node, as unsalted block hashes (`tierflow.rdu.block_hashes`).

    Each hash is in one list at most, the one of its last change: stored and restored
    blocks are in HBM now (restored: brought back from DDR by a hit), spilled ones in DDR,
    removed ones gone. `cleared`: forget every block of this model first."""

    name: Label
    cleared: bool = False
    stored: KvHashes = []
    spilled: KvHashes = []
    restored: KvHashes = []
    removed: KvHashes = []


class KvEvents(Struct, kw_only=True, gc=False):
    """A node's KV cache changes since its last message (on `subjects.node_kv_events`).

    `seq` counts the node's messages from 1 at its start, one by one: a reader that sees
    one missing knows it no longer knows the node's blocks, and asks for a snapshot
    (`subjects.node_kv_sync`). `snapshot`: the node's whole cache starts here: forget
    every block of the node, then apply the lists (a large snapshot continues in the
    following messages, as plain changes). `started_at` tells a restarted node from the
    one a reader knew."""

    v: int = 1
    node_id: Token
    seq: BigCount
    started_at: float = 0.0
    snapshot: bool = False
    models: Annotated[list[ModelKvEvents], Meta(max_length=MAX_BUNDLE_MODELS)] = []


class KvSyncRequest(Struct, kw_only=True):
    """Router -> node: send a KV snapshot (the router missed events; `router_id` for the log)."""

    router_id: Label = ""


# Built once, reused everywhere (msgspec perf tip): encoders/decoders are not free to make.
encoder = msgspec.json.Encoder()
heartbeat_decoder = msgspec.json.Decoder(NodeHeartbeat)
generate_decoder = msgspec.json.Decoder(GenerateRequest)
cancel_decoder = msgspec.json.Decoder(CancelRequest)
stream_decoder: msgspec.json.Decoder[StreamEvent] = msgspec.json.Decoder(StreamEvent)
decision_decoder = msgspec.json.Decoder(AutoscalerDecision)
command_decoder = msgspec.json.Decoder(NodeCommand)
command_reply_decoder = msgspec.json.Decoder(NodeCommandReply)
supervisor_command_decoder = msgspec.json.Decoder(SupervisorCommand)
supervisor_reply_decoder = msgspec.json.Decoder(SupervisorReply)
presence_decoder = msgspec.json.Decoder(RouterPresence)
gossip_decoder = msgspec.json.Decoder(RouterGossip)
kv_events_decoder = msgspec.json.Decoder(KvEvents)
kv_sync_decoder = msgspec.json.Decoder(KvSyncRequest)
