"""The timing model: how long a pass, a decode step, a switch or a load takes.

A model, not a lookup table. Every duration comes from bytes, FLOPs and link rates of a
`HardwareProfile` and the architecture of a `ModelSpec`; only the handful of efficiency
parameters at the bottom of the profile are fitted.

Physics
-------
* **One forward pass** over `batch` sequences, `q` new tokens each, with `C` context
  tokens summed over the batch, is a roofline: the slower of

  - memory: weights read + KV read, at sockets × HBM bandwidth × `hbm_efficiency`. A
    batch reads the weights once. An MoE pass reads shared weights plus the routed
    experts its ``batch × q`` tokens pick: expected coverage ``1 - (1 - k/E)^n``;
  - compute: ``2 × active_params`` FLOPs per token plus ``4 × layers × heads × head_dim``
    per (query, context) pair for attention, at sockets × BF16 FLOP/s ×
    `compute_efficiency`;

  plus a latency floor: ``step_overhead_s`` per pass (launch, sampling, host round
  trip), ``layers × layer_overhead_s`` (tensor-parallel collectives and synchronisation
  across sockets) and ``moe_layers × experts_per_token × moe_dispatch_s`` (each routed
  expert a token picks is a separate gather from a data-dependent address, plus its share
  of the dispatch and combine). Weight bytes are per tensor class
  (`ModelSpec.shared_read_bytes`): an untied embedding table is looked up, not streamed;
  gpt-oss keeps attention and unembedding in BF16 and only its experts in MXFP4.
* **Prefill** is a forward pass over the prompt's uncached tokens; prefix-cache hits are
  neither computed nor attended from scratch (their KV is only read). The unembedding is
  computed for each sequence's last prompt token only (`ModelSpec.matmul_params`).
* **Decode** is memory-bound: one pass per token at small batch. With speculative
  decoding (profile `spec_acceptance` α set and the model has a `draft`), a round is
  ``k`` draft passes plus one target pass verifying ``k + 1`` tokens, and yields
  ``(1 - α^(k+1)) / (1 - α)`` tokens per sequence on average. ``k`` is chosen in
  ``0..spec_max_draft`` (8, a typical ceiling for chain drafts) to maximise tokens per
  second, as a deployment would tune it; 0 is plain decode, which wins at large batch.
  The engine emits speculated tokens at the round's average rate, not in bursts.
* **Switch** (DDR -> HBM) moves the resident weights (target + draft) at the profile's
  switch bandwidth: on an RDU every socket copies its own shard from its own DDR, at the
  slower of its DDR read and its DMA ceiling; on a GPU node everything crosses the host
  link. `switch_then_prefill_time` overlaps a switch with the first prefill layer by layer.
  **Cold load** adds host storage -> DDR first.

Where the numbers come from: capacities, bandwidths and FLOP/s are the published
per-socket figures (`tierflow.rdu.hardware`); parameter counts, layers, heads, KV layout
and dtypes are the models' published configurations (`tierflow.rdu.catalog`).

Calibration (`tierflow.rdu.calibrate`, figures in `tierflow.rdu.figures`)
--------------------------------------------------------------------------
**Five free constants fit eleven figures**, shared by every model and by both SN40L socket
counts: `hbm_efficiency` (0.976), `layer_overhead_s` (13.8 µs), `moe_dispatch_s` (4.85 µs
per routed expert), `spec_acceptance` (0.781; fitted, no published acceptance for the
Llama 3.2 1B draft was found) and `compute_efficiency` (0.0997, from the only SN40L TTFT
figures found). The figures: five single-user decode speeds on 16 sockets, four batch-1
end-to-end latencies on 8 sockets, two TTFTs on 8 sockets. Leave-one-out errors are
printed by `tierflow emulator calibrate`. Switching takes no fitted constant: the paper's
15x/31x against DGX H100/A100 and Hot Chips' 0.01 s for an 8B switch follow from the
published DDR, DMA and host-link rates.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Final

import msgspec
import numpy as np

from .catalog import ModelSpec
from .hardware import HardwareProfile

__all__ = [
    "CALIBRATION_CONTEXT",
    "SpecPlan",
    "spec_enabled",
    "resident_bytes",
    "weights_read_bytes",
    "forward_time",
    "prefill_time",
    "spec_plan",
    "decode_step_time",
    "decode_tokens_per_second",
    "switch_time",
    "switch_then_prefill_time",
    "storage_load_time",
    "cold_load_time",
    "kv_bytes",
    "kv_write_time",
    "kv_transfer_time",
    "DecodeCostModel",
]

CALIBRATION_CONTEXT: Final = 1024
# Below about this many steps a Python loop beats NumPy's fixed cost per call (~15 us).
_LOOP_STEPS: Final = 64


class SpecPlan(msgspec.Struct, frozen=True):
    """How a decode round runs: `draft_tokens` (0 = plain decode) and what it yields."""

    draft_tokens: int
    tokens_per_round: float  # per sequence, on average
    round_seconds: float

    @property
    def seconds_per_token(self) -> float:
        return self.round_seconds / self.tokens_per_round


def spec_enabled(spec: ModelSpec, profile: HardwareProfile) -> bool:
    return profile.spec_acceptance is not None and spec.draft is not None


def resident_bytes(spec: ModelSpec, profile: HardwareProfile) -> float:
    """Bytes of HBM the model's weights occupy when served: target plus draft if speculating."""
    draft = (
        spec.draft.weight_bytes if spec.draft is not None and spec_enabled(spec, profile) else 0.0
    )
    return spec.weight_bytes + draft


def weights_read_bytes(spec: ModelSpec, tokens: int) -> float:
    """Weight bytes one pass over `tokens` tokens streams from HBM.

    Every pass reads the shared tensors (`ModelSpec.shared_read_bytes`: for a dense model
    all of it but an untied embedding table, which is only looked up) plus, for an MoE,
    the routed experts its tokens pick: expected coverage ``1 - (1 - k/E)^n``.
    """
    shared = spec.shared_read_bytes
    if not spec.num_experts:
        return shared
    coverage = 1.0 - (1.0 - spec.experts_per_token / spec.num_experts) ** max(tokens, 1)
    return shared + spec.routed_params * coverage * spec.bytes_per_param


def _rate(bandwidth: float, efficiency: float) -> float:
    return bandwidth * efficiency


def _overhead(spec: ModelSpec, profile: HardwareProfile) -> float:
    """Latency floor of one forward pass, whatever its size."""
    return (
        profile.step_overhead_s
        + spec.num_layers * profile.layer_overhead_s
        + spec.moe_layers * spec.experts_per_token * profile.moe_dispatch_s
    )


def _pass_coeffs(
    spec: ModelSpec, profile: HardwareProfile, batch: int, q: int
) -> tuple[float, float, float, float, float]:
    """(mem_s, mem_s per context token, compute_s, compute_s per context token, overhead_s)."""
    n = batch * q
    bw = _rate(profile.node_hbm_bw, profile.hbm_efficiency)
    fl = _rate(profile.node_flops, profile.compute_efficiency)
    return (
        weights_read_bytes(spec, n) / bw,
        spec.kv_bytes_per_token / bw,
        2.0 * (spec.active_params - spec.lookup_params) * n / fl,
        spec.attn_flops_per_pair * q / fl,
        _overhead(spec, profile),
    )


def _eval(coeffs: tuple[float, float, float, float, float], context_tokens: float) -> float:
    a, c, f, g, o = coeffs
    mem = a + c * context_tokens
    comp = f + g * context_tokens
    return (mem if mem > comp else comp) + o


def forward_time(
    spec: ModelSpec,
    profile: HardwareProfile,
    *,
    batch: int = 1,
    tokens_per_seq: int = 1,
    context_tokens: int = 0,
) -> float:
    """One forward pass: roofline of weight+KV reads vs FLOPs, plus per-layer latency."""
    return _eval(_pass_coeffs(spec, profile, batch, tokens_per_seq), context_tokens)


def prefill_time(
    spec: ModelSpec, profile: HardwareProfile, segments: Iterable[tuple[int, int]]
) -> float:
    """One batched prefill pass; `segments` are (new_tokens, cached_tokens) per request.

    Cached (prefix-hit) tokens cost only the read of their KV as attention context.
    """
    new_total = 0
    pairs = 0.0
    cached_total = 0
    sequences = 0
    for new, cached in segments:
        new_total += new
        cached_total += cached
        pairs += new * cached + new * (new + 1) / 2
        sequences += 1 if new else 0
    if new_total == 0:
        return 0.0
    bw = _rate(profile.node_hbm_bw, profile.hbm_efficiency)
    fl = _rate(profile.node_flops, profile.compute_efficiency)
    mem = (
        weights_read_bytes(spec, new_total) + spec.kv_bytes_per_token * (cached_total + new_total)
    ) / bw
    # the unembedding runs only where a token is sampled: each sequence's last prompt token
    matmul = spec.matmul_params * new_total + spec.head_params * sequences
    comp = (2.0 * matmul + spec.attn_flops_per_pair * pairs) / fl
    overhead = _overhead(spec, profile)
    return max(mem, comp) + overhead


def _expected_tokens(alpha: float, k: int) -> float:
    return (1.0 - alpha ** (k + 1)) / (1.0 - alpha)


def spec_plan(
    spec: ModelSpec, profile: HardwareProfile, *, batch: int = 1, context_tokens: int = 0
) -> SpecPlan:
    """The best decode round for this batch: plain, or speculative with the best k."""
    best = SpecPlan(0, 1.0, forward_time(spec, profile, batch=batch, context_tokens=context_tokens))
    alpha = profile.spec_acceptance
    draft = spec.draft
    if alpha is None or draft is None:
        return best
    draft_step = forward_time(draft, profile, batch=batch, context_tokens=context_tokens)
    for k in range(1, profile.spec_max_draft + 1):
        target = forward_time(
            spec, profile, batch=batch, tokens_per_seq=k + 1, context_tokens=context_tokens
        )
        plan = SpecPlan(k, _expected_tokens(alpha, k), target + k * draft_step)
        if plan.seconds_per_token < best.seconds_per_token:
            best = plan
    return best


def decode_step_time(
    spec: ModelSpec, profile: HardwareProfile, *, batch: int = 1, context_tokens: int = 0
) -> float:
    """Seconds per generated token per sequence, for a batch of `batch` sequences."""
    return spec_plan(spec, profile, batch=batch, context_tokens=context_tokens).seconds_per_token


def decode_tokens_per_second(
    spec: ModelSpec, profile: HardwareProfile, context_tokens: int = CALIBRATION_CONTEXT
) -> float:
    """Single-user decode speed: the figure vendors publish."""
    step = decode_step_time(spec, profile, batch=1, context_tokens=context_tokens)
    return math.inf if step == 0 else 1.0 / step


def switch_time(spec: ModelSpec, profile: HardwareProfile) -> float:
    """DDR -> HBM copy of the resident weights."""
    return resident_bytes(spec, profile) / profile.switch_bw


def switch_then_prefill_time(spec: ModelSpec, profile: HardwareProfile, prefill_s: float) -> float:
    """A switch followed by a prefill, overlapped layer by layer: layer i computes once its
    weights have arrived, so the pair ends at the later of the copy plus one layer's compute
    and one layer's copy plus the whole prefill (not at their sum)."""
    copy = switch_time(spec, profile)
    per_layer_copy = copy / spec.num_layers
    per_layer_compute = prefill_s / spec.num_layers
    return max(copy + per_layer_compute, per_layer_copy + prefill_s)


def storage_load_time(spec: ModelSpec, profile: HardwareProfile) -> float:
    """Host storage -> DDR of the resident weights (first half of a cold load)."""
    return resident_bytes(spec, profile) / profile.storage_bw


def cold_load_time(spec: ModelSpec, profile: HardwareProfile) -> float:
    """Storage -> DDR, then DDR -> HBM."""
    return storage_load_time(spec, profile) + switch_time(spec, profile)


def kv_bytes(spec: ModelSpec, tokens: int) -> int:
    return spec.kv_bytes_per_token * tokens


def kv_write_time(spec: ModelSpec, profile: HardwareProfile, tokens: int) -> float:
    """Writing `tokens` tokens of KV that arrived from elsewhere into HBM."""
    return kv_bytes(spec, tokens) / _rate(profile.node_hbm_bw, profile.hbm_efficiency)


def kv_transfer_time(spec: ModelSpec, profile: HardwareProfile, tokens: int) -> float:
    """Shipping `tokens` tokens of KV to another node (disaggregated prefill -> decode)."""
    return kv_bytes(spec, tokens) / profile.internode_bw


class DecodeCostModel:
    """Decode step time for one model, cheap enough to call once per batch step.

    The speculative draft length is chosen once per batch size at a reference context of
    `CALIBRATION_CONTEXT` tokens per sequence (a deployment compiles a fixed k; it does
    not re-tune it every step); the step time then tracks the live context exactly.
    """

    __slots__ = ("_spec", "_profile", "_plans")

    def __init__(self, spec: ModelSpec, profile: HardwareProfile) -> None:
        self._spec = spec
        self._profile = profile
        self._plans: dict[int, tuple[tuple[float, ...], tuple[float, ...] | None, int, float]] = {}

    def _plan(self, batch: int) -> tuple[tuple[float, ...], tuple[float, ...] | None, int, float]:
        plan = spec_plan(
            self._spec, self._profile, batch=batch, context_tokens=batch * CALIBRATION_CONTEXT
        )
        k = plan.draft_tokens
        target = _pass_coeffs(self._spec, self._profile, batch, k + 1)
        draft = None
        if k and self._spec.draft is not None:
            draft = _pass_coeffs(self._spec.draft, self._profile, batch, 1)
        entry = (target, draft, k, 1.0 / plan.tokens_per_round)
        self._plans[batch] = entry
        return entry

    def draft_tokens(self, batch: int) -> int:
        return (self._plans.get(batch) or self._plan(batch))[2]

    def step_seconds(self, batch: int, context_tokens: float) -> float:
        """Seconds for every sequence in the batch to gain one token (on average)."""
        target, draft, k, per_round = self._plans.get(batch) or self._plan(batch)
        a, c, f, g, o = target
        mem, comp = a + c * context_tokens, f + g * context_tokens
        t = (mem if mem > comp else comp) + o
        if draft is not None:
            a, c, f, g, o = draft
            mem, comp = a + c * context_tokens, f + g * context_tokens
            t += k * ((mem if mem > comp else comp) + o)
        return t * per_round

    def step_ends(
        self,
        batch: int,
        context_tokens: int,
        start: float,
        steps: int,
        until: float = math.inf,
    ) -> list[float]:
        """End times of up to `steps` back-to-back steps of a fixed batch from `start`,
        stopping after the first end at or past `until`.

        Each step gives every sequence one token, so the context grows by `batch` a step.
        The ends are summed one step at a time (``end += step_seconds(...)``), in the same
        order and with the same operations as a step-by-step caller, so they are
        bit-identical to it: a short run in a Python loop, the rest vectorised (a NumPy
        cumulative sum is the same left-to-right sum).
        """
        target, draft, k, per_round = self._plans.get(batch) or self._plan(batch)
        a, c, f, g, o = target
        a2, c2, f2, g2, o2 = draft if draft is not None else (0.0, 0.0, 0.0, 0.0, 0.0)
        ends: list[float] = []
        append = ends.append
        end = start
        ctx = context_tokens
        head = min(steps, _LOOP_STEPS)
        last = ctx + batch * (head - 1)
        # Both sides of each roofline grow with the context, and rounding keeps that order:
        # if the memory side at the first step beats the compute side at the last, it wins
        # every step in between, and the loop can skip the comparison (decode's usual case).
        memory_bound = a + c * ctx > f + g * last
        if memory_bound and draft is None:
            for _ in range(head):
                end += ((a + c * ctx) + o) * per_round
                append(end)
                if end >= until:
                    return ends
                ctx += batch
        elif memory_bound and a2 + c2 * ctx > f2 + g2 * last:
            for _ in range(head):
                end += ((a + c * ctx) + o + k * ((a2 + c2 * ctx) + o2)) * per_round
                append(end)
                if end >= until:
                    return ends
                ctx += batch
        else:
            for _ in range(head):
                mem, comp = a + c * ctx, f + g * ctx
                x = (mem if mem > comp else comp) + o
                if draft is not None:
                    mem, comp = a2 + c2 * ctx, f2 + g2 * ctx
                    x += k * ((mem if mem > comp else comp) + o2)
                end += x * per_round
                append(end)
                if end >= until:
                    return ends
                ctx += batch
        left = steps - head
        while left > 0:
            # Steps only get longer as the context grows, so at the last step's length
            # this many reach `until` (+2 for rounding); a short count is looped again.
            n = left
            last_step = end - (ends[-2] if len(ends) > 1 else start)
            if until < math.inf and last_step > 0:
                n = min(n, int((until - end) / last_step) + 2)
            ctxs = np.arange(n, dtype=np.float64) * batch + ctx
            acc = np.empty(n + 1)
            acc[0] = end
            x = np.maximum(a + c * ctxs, f + g * ctxs) + o
            if draft is not None:
                x += k * (np.maximum(a2 + c2 * ctxs, f2 + g2 * ctxs) + o2)
            np.multiply(x, per_round, out=acc[1:])
            np.cumsum(acc, out=acc)
            run = acc[1:]
            stop = int(np.searchsorted(run, until))
            if stop < n:
                ends.extend(run[: stop + 1].tolist())
                return ends
            ends.extend(run.tolist())
            end = ends[-1]
            ctx += n * batch
            left -= n
        return ends
