"""What goes into and comes out of a `NodeEngine`: requests, events, snapshots.

Events are one tagged union (`EngineEvent`), so a shell can encode them as they are and
decode them with one typed decoder. Token events are created once per generated token,
so they are `gc=False` Structs holding only scalars: cheap to make, invisible to the GC.
"""

from __future__ import annotations

from typing import Literal

import msgspec

from .catalog import ModelSpec
from .deployment import DeploymentConfig

__all__ = [
    "BundleModel",
    "EngineRequest",
    "RequestRejected",
    "RequestStarted",
    "TokenGenerated",
    "RequestFinished",
    "EngineEvent",
    "FinishReason",
    "ModelState",
    "TierCounts",
    "EngineSnapshot",
]

FinishReason = Literal["stop", "length", "prefill"]


class BundleModel(msgspec.Struct, frozen=True):
    """One model of a node's bundle, in the configuration it is served with."""

    spec: ModelSpec
    config: DeploymentConfig
    version: str = "v1"

    @property
    def name(self) -> str:
        return self.spec.name


class EngineRequest(msgspec.Struct):
    """One request to a node.

    `prompt_block_hashes`: the prompt's `tierflow.rdu.block_hashes` at the engine's block
    size, for a caller that already computed them (placement scores prefix overlap with
    them): the engine then does not hash the prompt again. It trusts them and checks only
    their count; in fast mode with `ignore_eos` it then reads no token id, only how many.

    `resume_from`: the last `resume_from` ids of `prompt_token_ids` are completion tokens
    another node already generated (it died mid-stream). The engine prefills all of
    `prompt_token_ids`, but keys the completion by the prompt before them, so it continues
    the very completion that node was producing, from token index `resume_from`;
    `max_tokens` is the whole completion's budget, those tokens included.
    """

    request_id: str
    model: str
    prompt_token_ids: list[int]
    max_tokens: int  # 0: prefill only (the prefill node), finish right after the prompt
    seed: int = 0
    ignore_eos: bool = False
    prefilled: bool = False  # KV arrived from a prefill node: charge only its write into HBM
    prompt_block_hashes: list[int] | None = None
    resume_from: int = 0
    # The completion's token ids, decided by the caller (structured output: JSON a schema
    # asked for), emitted in place of drawn ones; it ends with them ("stop") or at
    # max_tokens ("length"). None: drawn as usual.
    output_token_ids: list[int] | None = None
    # Who goes first where the queue forms (`tierflow.rdu.fairness`): the class in strict
    # priority ("interactive", "standard", "batch"), then the tenants of a class by the
    # service each has received over its weight (> 0).
    request_class: str = "standard"
    tenant: str = ""
    tenant_weight: float = 1.0


class RequestRejected(Exception):
    """A request the engine will not take. `code` is stable; `message` says what to do."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message


class RequestStarted(msgspec.Struct, frozen=True, gc=False, tag=True):
    """The request joined its model's batch. `tier`: where the weights were when it was
    scheduled ("hbm", or "ddr"/"cold" if a load ran for it); `switch_seconds`: how much of
    its wait was that load."""

    request_id: str
    time: float
    queue_time: float
    tier: Literal["hbm", "ddr", "cold"]
    switch_seconds: float
    prefix_hit_tokens: int


class TokenGenerated(msgspec.Struct, frozen=True, gc=False, tag=True):
    request_id: str
    time: float
    index: int  # 0 is the first token
    token_id: int  # index into tierflow.tokenizer.OUTPUT_VOCAB
    text: str


class RequestFinished(msgspec.Struct, frozen=True, gc=False, tag=True):
    """`energy_j`: the request's share of the node's energy (`tierflow.rdu.energy`): an
    equal part of each prefill and decode step it was in; 0 on a profile without a power
    figure. `itl_buckets`: fast mode only (no token events), the request's gaps between
    consecutive tokens as (bucket, count) pairs of `tierflow.rdu.itl`, so a simulated node
    keeps the per-token latency a live one measures; empty in token mode."""

    request_id: str
    time: float
    finish_reason: FinishReason
    prompt_tokens: int
    completion_tokens: int
    cached_prompt_tokens: int
    energy_j: float = 0.0
    itl_buckets: tuple[tuple[int, int], ...] = ()


EngineEvent = RequestStarted | TokenGenerated | RequestFinished


class ModelState(msgspec.Struct, frozen=True):
    name: str
    version: str
    tier: Literal["hbm", "ddr", "loading", "cold"]
    weight_bytes: int  # resident bytes in HBM when served (target + draft)
    in_flight: int  # admitted: prefilling or decoding, holding KV
    last_used: float | None
    queued: int = 0
    max_batch: int = 0
    config: str = ""
    recent_prefix_hashes: list[int] = []  # this model's most recently used, newest first
    energy_joules: float = 0.0  # drawn for this model's finished work: loads, prefills, steps
    preemptions: int = 0  # sequences taken out of its batch for interactive work, since start


class TierCounts(msgspec.Struct, frozen=True):
    hbm: int
    ddr: int


class EngineSnapshot(msgspec.Struct, frozen=True):
    """The node as the router and autoscaler see it."""

    time: float
    profile: str
    models: list[ModelState]
    queue_depth: int  # waiting, all models
    running: int  # admitted, all models
    max_batch: int  # sum of the bundle's batch limits
    kv_usage: float  # 0..1 of the HBM KV pool held by admitted requests
    prefix_cache_blocks: TierCounts
    prefix_cache_queries: int  # prompt tokens looked up (full blocks)
    prefix_cache_hits: int  # of which found in the cache
    bytes_moved: dict[str, int]  # per tier pair, e.g. "ddr->hbm"
    transfer_seconds: dict[str, float]  # time charged for those bytes
    # most recently used block hashes over all models, newest first; `block_hashes` does
    # not depend on the model, so per-model lists are in `models[i].recent_prefix_hashes`
    recent_prefix_hashes: list[int]
    block_size: int
    current_model: str | None = None
    busy_until: float | None = None  # end of the work the chip is committed to
    busy_seconds: float = 0.0  # chip time spent on finished work since start (utilisation)
    # The node's energy since start (busy at active power, the rest at idle power where
    # published) and its power now; 0 on a profile without a power figure.
    energy_joules: float = 0.0
    power_w: float = 0.0
    # waiting (preempted ones included) per request class, in `fairness.CLASS_NAMES` order
    queued_by_class: list[int] = []
    preemptions: int = 0  # all models, since start
