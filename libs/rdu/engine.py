"""`NodeEngine`: one node as a discrete-event state machine.

The chip runs one thing at a time: a weight load, a batched prefill, one decode step of
one model's running batch (it executes one model's graph at a time), or the copy of a
preempted sequence's KV to DDR. The engine
commits to the next piece of work when the chip frees up, stamps events with the time
that work ends, and hands them out from `advance(now)`. It never reads a clock: the
decode-node shell drives it with wall time, the simulator with virtual time, and the
results do not depend on how often `advance` is called, because work only ever considers
requests that had arrived when it started.

Scheduling, per model, is continuous batching under the deployment's batch limit:
waiting requests are admitted prefill first (like vLLM's default), their first token
comes out of the prefill, then the batch decodes a step at a time. KV is reserved for
prompt + max_tokens on admission, so an admitted request never runs out of it. Who is
admitted next (`tierflow.rdu.fairness`): the request class strictly (interactive, then
standard, then batch; a class whose oldest request has waited `starvation_s` goes before
the better ones), then the tenant of that class that has received the least service over
its weight, then first come, first served within the tenant. With one class and one
tenant that is plain FCFS.

Preemption: when an interactive request is next and its model's batch is full with a
standard or batch sequence in it, the lowest-class, most recently started such sequence
leaves the batch. Its prompt's KV stays in the prefix cache (which spills it to DDR
under pressure, as any cached block), the KV of the tokens it generated is copied to DDR
(`KVCache.park`; the copy is a piece of chip work before the next admission), and it
waits at the head of its class. It resumes as a prefill of its prompt against the prefix
cache plus the copy of its tokens' KV back, and continues the same completion. A sequence
is preempted at most once, so every request finishes; one whose KV DDR cannot hold stays.

Across models the chip is time-sliced round-robin (`time_slice` seconds per turn while
others wait), among the models with work of the best class on the node (decoding or
waiting; a starving class as above) when classes differ; a slice under way is not cut
short for a better class. Turning to a model whose weights are in DDR (or in storage)
first runs the load, which takes real time, evicting the coldest idle models if HBM is
short; a model with requests in flight is never evicted. Admission is FCFS across models
too, per class: once a model cannot get HBM (for weights or KV), models whose oldest
waiter is of a worse class, or of the same class and younger, stop admitting, so they
drain and it gets its turn instead of starving.

Fast mode (`token_events=False`), for the fleet simulator, which needs each request's
start and finish but not its tokens: no `TokenGenerated` events, no token ids drawn, and
a batch decodes as one *run* of many steps, one piece of work up to the first step
boundary where the step-by-step engine could decide anything but "the same batch takes
another step" (a request finishes, the time slice ends while another model has work, the
model's waiting head arrives and might be admitted). Arrivals are not known in advance,
so a `submit` or `cancel` during a run cuts it at the first boundary the step-by-step
engine would have seen it at. Step ends are summed exactly as step by step, so both modes
emit the same `RequestStarted` and `RequestFinished` events and pass through the same
snapshots. What fast mode keeps of the tokens is each request's gaps between them, as a
small histogram (`tierflow.rdu.itl`): a run's gaps are counted once for its whole batch.
The tenants' fairness counters are read the same way, from each model's decode step
count: nothing is charged per token, and both modes read the same counters.

Energy (`tierflow.rdu.energy`) is charged from the same clock-time accounting, in both
modes: each piece of work costs the node's active power times its duration, all of it to
the model it ran for; a prefill's cost is shared equally by its batch, and a decode
step's by the sequences in it (per model, one running sum of "joules per sequence" that a
request reads when it joins the batch and when it leaves, so a step costs O(1)).

The step-by-step engine takes the same shortcut when steps are already due: a decode step
that `advance(now)` would finish by `now` starts a run of every step of that batch ending
by `now` (up to the same boundaries), and the run emits each step's tokens with that
step's time. A shell that fell behind, or a profile whose steps take no time (`zero`),
pays the scheduling once per run instead of once per step; the events are the same.
"""

from __future__ import annotations

import math
from bisect import bisect_left, bisect_right
from collections import deque
from collections.abc import Sequence
from operator import attrgetter
from typing import Final, Literal

import numpy as np

from tierflow.tokenizer import OUTPUT_VOCAB, decode_output
from tierflow.tokenizer.pieces import OutputTexts

from .catalog import ModelSpec
from .deployment import DeploymentConfig
from .events import (
    BundleModel,
    EngineEvent,
    EngineRequest,
    EngineSnapshot,
    ModelState,
    RequestFinished,
    RequestRejected,
    RequestStarted,
    TierCounts,
    TokenGenerated,
)
from .energy import node_energy, power_for
from .fairness import CLASS_NAMES, CLASS_RANK, DEFAULT_STARVATION_S, N_CLASSES, FairShares, TenantShare
from .hardware import HardwareProfile
from .itl import bucket, buckets
from .kvcache import DEFAULT_BLOCK_SIZE, KVAllocation, KVCache, KvChanges, hashes_from_packed, pack_tokens
from .memory import TransferLedger, WeightTiers
from .outputs import completion_tokens, output_plan
from .timing import DecodeCostModel, prefill_time, resident_bytes

__all__ = ["NodeEngine"]

_WAITING: Final = 0
_PREFILLING: Final = 1
_RUNNING: Final = 2
_DONE: Final = 3
_PARKED: Final = 4  # preempted: waiting to resume, its generated tokens' KV in DDR

_LOAD: Final = 0
_PREFILL: Final = 1
_DECODE: Final = 2
_RUN: Final = 3  # fast mode: many decode steps of one batch
_SWAP: Final = 4  # a preempted sequence's KV copied out to DDR
_NUMPY_STEPS: Final = 32  # a run's energy and gaps vectorised past this many steps
_ARRIVAL: Final = attrgetter("arrival")


class _Req:
    __slots__ = (
        "id",
        "model",
        "prompt_len",
        "max_tokens",
        "arrival",
        "target",
        "reason",
        "key",
        "tokens",
        "generated",
        "alloc",
        "hashes",
        "prefilled",
        "state",
        "hit_tokens",
        "resumed",
        "energy",
        "last_at",
        "itl",
        "rank",
        "share",
        "queued_at",
        "pass_hits",
        "parked",
        "preempted",
        "joined_at",
        "started_at",
        "itl_acc",
        "victim",
    )

    def __init__(
        self,
        rid: str,
        model: _Model,
        prompt_len: int,
        max_tokens: int,
        arrival: float,
        target: int,
        reason: Literal["stop", "length", "prefill"],
        key: int,
        hashes: list[int],
        prefilled: bool,
        resumed: int,
        share: TenantShare,
    ) -> None:
        self.id = rid
        self.model = model
        self.prompt_len = prompt_len
        self.max_tokens = max_tokens
        self.arrival = arrival
        self.target = target
        self.reason: Literal["stop", "length", "prefill"] = reason
        self.key = key
        self.tokens: list[int] = []
        # A resumed request (see EngineRequest.resume_from) counts its tokens from where
        # the node that died left off; `prompt_len` is the original prompt, and its
        # prefill also covers the `resumed` completion tokens sent along with it.
        self.resumed = resumed
        self.generated = resumed
        self.alloc: KVAllocation | None = None
        self.hashes = hashes
        self.prefilled = prefilled
        self.state = _WAITING
        self.hit_tokens = 0
        # Joules: its prefill share; while running, minus the model's `per_seq` at joining.
        self.energy = 0.0
        self.last_at = 0.0  # fast mode: its first token's time
        self.itl: dict[int, int] | None = None  # fast mode: its model's `gaps` when it joined (corrected)
        self.rank = share.rank  # its class (fairness.CLASS_NAMES)
        self.share = share  # its tenant's service in that class
        self.queued_at = arrival  # since when it waits: its arrival, or its preemption
        self.pass_hits = 0  # prompt tokens its (latest) prefill found in the prefix cache
        self.parked = 0  # bytes of its KV parked in DDR while preempted
        self.preempted = 0  # times it left the batch for interactive work (at most once)
        self.joined_at = 0  # its model's `steps` when it joined the batch (fairness counters)
        self.started_at = 0.0  # when it was first admitted
        self.itl_acc: dict[int, int] | None = None  # fast mode: its gaps before a preemption
        self.victim = False  # decoding, below interactive, never preempted: may be preempted


class _Model:
    __slots__ = (
        "index",
        "name",
        "version",
        "spec",
        "config",
        "config_name",
        "cost",
        "block_bytes",
        "max_batch",
        "resident",
        "waiting",
        "fifo",
        "queues",
        "resume",
        "nq",
        "n_waiting",
        "n_parked",
        "run_n",
        "victims",
        "steps",
        "last_end",
        "preemptions",
        "blocked_rank",
        "running",
        "ctx_sum",
        "load_source",
        "load_start",
        "load_end",
        "blocked_since",
        "kv_blocked_epoch",
        "energy",
        "per_seq",
        "gaps",
        "run_end",
        "joined",
    )

    def __init__(
        self, index: int, bundle: BundleModel, profile: HardwareProfile, block_size: int
    ) -> None:
        self.index = index
        self.name = bundle.spec.name
        self.version = bundle.version
        self.spec: ModelSpec = bundle.spec
        self.config: DeploymentConfig = bundle.config
        self.config_name = str(bundle.config)
        self.cost = DecodeCostModel(bundle.spec, profile)
        self.block_bytes = bundle.spec.kv_bytes_per_token * block_size
        self.max_batch = bundle.config.batch_size
        self.resident = math.ceil(resident_bytes(bundle.spec, profile))
        # Waiting requests: every one in arrival order (`waiting`, and `fifo` per class:
        # lazy, an entry whose request left the queue is dropped when it reaches the front),
        # and exactly, per class, a FIFO per tenant (`queues`) and the preempted (`resume`).
        self.waiting: deque[_Req] = deque()
        self.fifo: list[deque[_Req]] = [deque() for _ in range(N_CLASSES)]
        self.queues: list[dict[TenantShare, deque[_Req]]] = [{} for _ in range(N_CLASSES)]
        self.resume: list[deque[_Req]] = [deque() for _ in range(N_CLASSES)]
        self.nq = [0] * N_CLASSES  # waiting per class, preempted ones included
        self.n_waiting = 0
        self.n_parked = 0
        self.run_n = [0] * N_CLASSES  # admitted per class (prefilling or decoding)
        self.victims = 0  # decoding below interactive and never preempted: may be preempted
        self.steps = 0  # decode steps its batch has taken (fairness counters read it)
        self.last_end = -math.inf  # when its last piece of work ended
        self.preemptions = 0
        self.blocked_rank = 0  # the class of the waiter `blocked_since` dates
        self.running: list[_Req] = []
        self.ctx_sum = 0  # prompt + generated tokens over the running batch
        self.load_source: Literal["ddr", "cold"] = "ddr"
        self.load_start = -math.inf
        self.load_end: float | None = None
        self.blocked_since: float | None = None  # the oldest waiter of a class denied HBM (weights or KV)
        self.kv_blocked_epoch = -1  # KV release epoch at which its head last failed to fit
        self.energy = 0.0  # joules of its finished work (loads, prefills, decode steps)
        self.per_seq = 0.0  # joules each sequence in its batch has paid for decode steps so far
        # fast mode: gaps between tokens (see NodeEngine._run_gaps)
        self.gaps: dict[int, int] = {}
        self.run_end = 0.0
        self.joined: list[_Req] = []


class _Work:
    __slots__ = ("kind", "model", "start", "end", "batch")

    def __init__(
        self, kind: int, model: _Model, start: float, end: float, batch: list[_Req]
    ) -> None:
        self.kind = kind
        self.model = model
        self.start = start
        self.end = end
        self.batch = batch


class _Run(_Work):
    """Decode steps of one batch back to back (fast mode): `ends[i]` ends step i.

    `seen` is the latest time `advance` ran to: the step-by-step engine has already begun
    every step starting by then, so news can only reach the first boundary after it.
    `renew`: no other model had work, so a time slice ending inside the run just starts
    another (`_choose` picks the same model again and changes nothing else).
    """

    __slots__ = ("ends", "seen", "renew")

    def __init__(self, model: _Model, start: float, ends: list[float], renew: bool) -> None:
        super().__init__(_RUN, model, start, ends[-1], model.running)
        self.ends = ends
        self.seen = start
        self.renew = renew

    def cut(self, not_before: float) -> None:
        """End at the first boundary after `seen` and at or after `not_before`."""
        ends = self.ends
        i = max(bisect_right(ends, self.seen), bisect_left(ends, not_before))
        if i < len(ends) - 1:
            del ends[i + 1 :]
            self.end = ends[i]


DEFAULT_KV_CACHE_FRACTION: Final = 0.25
# A model not in HBM is switched in while other models have work only once its oldest
# request has waited this long (`NodeEngine._choose`); the router prices it in (ModelTable).
DEFAULT_SWITCH_PATIENCE: Final = 0.5


def hbm_preload(profile: HardwareProfile, bundle: Sequence[BundleModel], *, kv_cache_fraction: float = DEFAULT_KV_CACHE_FRACTION) -> list[str]:
    """The bundle's models that fit in HBM together, taken in bundle order.

    What a node loads into HBM at start when it wants to be hot at once: as much of
    its bundle as the weights part of HBM (all but the KV pool) holds; the rest stays
    in DDR and costs a switch on first use.
    """
    room = profile.hbm_capacity - int(profile.hbm_capacity * kv_cache_fraction)
    chosen = []
    for entry in bundle:
        size = math.ceil(resident_bytes(entry.spec, profile))
        if size <= room:
            chosen.append(entry.spec.name)
            room -= size
    return chosen


class NodeEngine:
    """One node serving a bundle of models. Pure: every call takes `now` in seconds."""

    def __init__(
        self,
        profile: HardwareProfile,
        bundle: Sequence[BundleModel],
        *,
        now: float,
        preload: Sequence[str] = (),
        max_queue: int = 1024,
        block_size: int = DEFAULT_BLOCK_SIZE,
        ddr_resident: Sequence[str] | None = None,
        kv_cache_fraction: float = DEFAULT_KV_CACHE_FRACTION,
        ddr_kv_cache_bytes: int | None = None,
        time_slice: float = 0.05,
        max_prefill_tokens: int = 16384,
        hotness_half_life: float = 300.0,
        switch_patience: float = DEFAULT_SWITCH_PATIENCE,
        recent_hashes: int = 256,
        token_events: bool = True,
        kv_events: bool = False,
        starvation_s: float = DEFAULT_STARVATION_S,
        preemption: bool = True,
    ) -> None:
        """`preload`: models already in HBM; `ddr_resident`: models already in DDR (default:
        the whole bundle; the rest start cold, in host storage). `kv_cache_fraction` of HBM
        is the KV pool; `ddr_kv_cache_bytes` bounds KV spilled to DDR (default 2x the pool).
        `token_events=False` is fast mode (see the module docstring): same starts, finishes
        and snapshots, no tokens. `kv_events=True` logs the KV cache's changes for
        `drain_kv_events` (a node host publishes them to the routers' prefix index).
        `starvation_s`: a class whose oldest request has waited this long goes before the
        better classes waiting beside it (module docstring, `tierflow.rdu.fairness`).
        `preemption=False`: interactive requests wait for a free batch slot like the rest.
        """
        if not bundle:
            raise ValueError("bundle is empty: a node serves at least one model")
        if max_queue < 0 or max_prefill_tokens <= 0 or time_slice <= 0 or block_size <= 0:
            raise ValueError("max_queue >= 0, and max_prefill_tokens, time_slice, block_size > 0")
        if not starvation_s > 0:
            raise ValueError(f"starvation_s must be > 0 seconds, got {starvation_s}")
        if not 0 < kv_cache_fraction < 1:
            raise ValueError(f"kv_cache_fraction must be in (0, 1), got {kv_cache_fraction}")
        names = [b.spec.name for b in bundle]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"bundle lists {', '.join(dupes)} more than once")
        for group, label in ((preload, "preload"), (ddr_resident or (), "ddr_resident")):
            unknown = [n for n in group if n not in names]
            if unknown:
                raise ValueError(f"{label} names models not in the bundle: {', '.join(unknown)}")

        self._profile = profile
        self._bundle = tuple(bundle)
        self._block_size = block_size
        self._max_queue = max_queue
        self._time_slice = time_slice
        self._switch_patience = switch_patience
        self._max_prefill_tokens = max_prefill_tokens
        self._starvation = starvation_s
        self._preemption = preemption
        self._shares = FairShares()
        self._class_n = [0] * N_CLASSES  # requests per class on the node, waiting or admitted
        self._top_rank = N_CLASSES - 1  # the best class ever submitted (fast mode's run cuts)
        self._preemptions = 0
        self._ledger = TransferLedger()
        kv_hbm = int(profile.hbm_capacity * kv_cache_fraction)
        weights_hbm = profile.hbm_capacity - kv_hbm
        ddr_kv = 2 * kv_hbm if ddr_kv_cache_bytes is None else ddr_kv_cache_bytes
        ddr_kv = max(0, min(ddr_kv, profile.ddr_capacity // 2))
        self._weights = WeightTiers(
            hbm_capacity=weights_hbm,
            ddr_capacity=profile.ddr_capacity - ddr_kv,
            switch_bw=profile.switch_bw,
            storage_bw=profile.storage_bw,
            ledger=self._ledger,
            half_life_s=hotness_half_life,
        )
        self._kv = KVCache(
            block_size=block_size,
            hbm_bytes=kv_hbm,
            ddr_bytes=ddr_kv,
            copy_bw=profile.switch_bw,
            ledger=self._ledger,
            recent_limit=recent_hashes,
            events=kv_events,
        )
        self._models = [_Model(i, b, profile, block_size) for i, b in enumerate(bundle)]
        self._by_name = {m.name: m for m in self._models}
        self._max_batch = sum(m.max_batch for m in self._models)
        in_ddr = set(names if ddr_resident is None else ddr_resident) | set(preload)
        for m in self._models:
            self._validate_model(m, weights_hbm, kv_hbm)
            where: Literal["hbm", "ddr", "cold"] = (
                "hbm" if m.name in preload else "ddr" if m.name in in_ddr else "cold"
            )
            self._weights.add(m.name, m.resident, tier=where)

        self._token_events = token_events
        # Word ids index the vocabulary; a structured-output id decodes itself (pieces.py).
        self._texts = (
            OutputTexts((i, decode_output([i])) for i in range(len(OUTPUT_VOCAB)))
            if token_events
            else OutputTexts()
        )
        self._requests: dict[str, _Req] = {}
        self._n_waiting = 0
        self._n_admitted = 0
        self._kv_epoch = 0
        self._pending: _Work | None = None
        self._free_at = now
        self._busy = 0.0
        self._started = now
        self._power = power_for(profile)
        self._active_w = self._power.node_active_w if self._power is not None else 0.0
        self._current: _Model | None = None
        self._slice_end = now
        self._horizon = -math.inf  # the `now` of the advance under way (decode runs end by it)

    def _validate_model(self, m: _Model, weights_hbm: int, kv_hbm: int) -> None:
        gb = 1e9
        if m.config.seq_len > m.spec.max_context:
            raise ValueError(
                f"{m.name}: deployment {m.config} has sequence length {m.config.seq_len},"
                f" above the model's maximum context of {m.spec.max_context} tokens"
            )
        if m.resident > weights_hbm:
            raise ValueError(
                f"{m.name} needs {m.resident / gb:.1f} GB of HBM for weights; {self._profile.name}"
                f" has {weights_hbm / gb:.1f} GB after reserving {kv_hbm / gb:.1f} GB for the KV"
                " cache (use a larger profile or a smaller kv_cache_fraction)"
            )
        seq_bytes = math.ceil(m.config.seq_len / self._block_size) * m.block_bytes
        if seq_bytes > kv_hbm:
            raise ValueError(
                f"{m.name}: one {m.config.seq_len}-token sequence needs {seq_bytes / gb:.1f} GB of"
                f" KV, more than the {kv_hbm / gb:.1f} GB KV pool (raise kv_cache_fraction)"
            )

    # ------------------------------------------------------------------ public surface
    @property
    def profile(self) -> HardwareProfile:
        return self._profile

    @property
    def bundle(self) -> tuple[BundleModel, ...]:
        return self._bundle

    @property
    def block_size(self) -> int:
        return self._block_size

    def drain_kv_events(self) -> KvChanges:
        """The KV cache's net changes since the last drain (`KVCache.drain_events`)."""
        return self._kv.drain_events()

    def kv_held(self) -> dict[str, tuple[list[int], list[int]]]:
        """Every cached KV block, per model: (HBM, DDR) hashes (`KVCache.held`)."""
        return self._kv.held()

    def submit(self, request: EngineRequest, now: float) -> None:
        """Queue a request that arrived at `now`.

        Raises RequestRejected (codes: context_length_exceeded, model_not_in_bundle,
        queue_full, invalid_request, duplicate_request); never truncates silently.
        """
        rid = request.request_id
        if rid in self._requests:
            raise RequestRejected(
                "duplicate_request", f"request id {rid!r} is already in flight on this node"
            )
        m = self._by_name.get(request.model)
        if m is None:
            raise RequestRejected(
                "model_not_in_bundle",
                f"model {request.model!r} is not served by this node (bundle:"
                f" {', '.join(self._by_name)}); route it to a node that serves it",
            )
        prompt = request.prompt_token_ids
        n = len(prompt)
        resumed = request.resume_from
        if n == 0:
            raise RequestRejected(
                "invalid_request", "prompt_token_ids is empty; send at least one token"
            )
        if request.max_tokens < 0:
            raise RequestRejected(
                "invalid_request", f"max_tokens must be >= 0, got {request.max_tokens}"
            )
        if not 0 <= resumed < n or (request.max_tokens and resumed > request.max_tokens):
            raise RequestRejected(
                "invalid_request",
                f"resume_from must count completion tokens at the end of a non-empty prompt"
                f" and within max_tokens; got {resumed} of {n} prompt ids, max_tokens"
                f" {request.max_tokens}",
            )
        rank = CLASS_RANK.get(request.request_class)
        if rank is None:
            raise RequestRejected(
                "invalid_request",
                f"request_class must be one of {', '.join(CLASS_NAMES)}; got {request.request_class!r}",
            )
        weight = request.tenant_weight
        if not (weight > 0 and math.isfinite(weight)):
            raise RequestRejected("invalid_request", f"tenant_weight must be a positive number, got {weight!r}")
        n -= resumed  # the prompt proper; the resumed tokens are part of the completion
        seq_len = m.config.seq_len
        if n + request.max_tokens > seq_len:
            room = seq_len - n
            advice = (
                f"set max_tokens to at most {room}"
                if room > 0
                else f"shorten the prompt below {seq_len} tokens"
            )
            raise RequestRejected(
                "context_length_exceeded",
                f"prompt ({n} tokens) + max_tokens ({request.max_tokens})"
                f" = {n + request.max_tokens}"
                f" tokens exceeds {m.name}'s sequence length of {seq_len} in deployment"
                f" {m.config}; {advice}",
            )
        if self._n_waiting >= self._max_queue:
            raise RequestRejected(
                "queue_full",
                f"{self._n_waiting} requests already waiting (limit {self._max_queue});"
                " retry later",
            )
        max_tokens = request.max_tokens
        bs = self._block_size
        hashes = request.prompt_block_hashes
        # The prompt's bytes feed its block hashes, unless the caller brings them, and the
        # completion's draw, unless no token ids are drawn and its length is already fixed.
        draws = max_tokens > 0 and (self._token_events or not request.ignore_eos)
        packed = b""
        if hashes is None or draws:
            try:
                packed = pack_tokens(prompt)
            except ValueError as err:
                raise RequestRejected("invalid_request", f"prompt_token_ids: {err}") from None
        everything = n + resumed  # what is prefilled (and hashed into KV blocks)
        if hashes is None:
            hashes = hashes_from_packed(packed, bs)
        elif len(hashes) != everything // bs:
            raise RequestRejected(
                "invalid_request",
                f"prompt_block_hashes has {len(hashes)} hashes but a {everything}-token prompt has"
                f" {everything // bs} full blocks of {bs} tokens; send"
                f" tierflow.rdu.block_hashes(prompt_token_ids, {bs}) or nothing",
            )
        # Keyed by the prompt alone: a resumed request continues the same completion.
        plan_bytes = packed[: 4 * n] if resumed else packed
        natural, key = output_plan(m.name, request.seed, plan_bytes) if draws else (0, 0)
        forced = request.output_token_ids
        if forced:  # the router's plan (structured output): it ends where the plan does
            natural = len(forced)
        reason: Literal["stop", "length", "prefill"]
        if max_tokens == 0:
            target, reason = 0, "prefill"
        elif (forced or not request.ignore_eos) and natural <= max_tokens:
            target, reason = natural, "stop"
        else:
            target, reason = max_tokens, "length"
        run = self._pending
        if type(run) is _Run:
            if run.model is m:
                if len(m.running) < m.max_batch:
                    # the new head, or of a class that may go where the waiting could not
                    if not m.n_waiting or (m.kv_blocked_epoch != self._kv_epoch and self._fair(m, rank, now)):
                        run.cut(now)  # admissible from the next step
                elif rank == 0 and m.victims and self._fair(m, 0, now):
                    run.cut(now)  # a sequence may leave the batch for it at the next step
            elif run.renew:
                run.cut(max(now, self._slice_end))  # the slice no longer renews unseen
        share = self._shares.enqueue(rank, request.tenant, weight)
        r = _Req(rid, m, n, max_tokens, now, target, reason, key, hashes, request.prefilled, resumed, share)
        if forced:
            r.tokens = forced
        m.waiting.append(r)
        m.fifo[rank].append(r)
        queue = m.queues[rank].get(share)
        if queue is None:
            queue = m.queues[rank][share] = deque()
        queue.append(r)
        m.nq[rank] += 1
        m.n_waiting += 1
        self._n_waiting += 1
        self._class_n[rank] += 1
        if rank < self._top_rank:
            self._top_rank = rank
        self._requests[rid] = r

    def energy_of(self, request_id: str) -> float:
        """Joules charged to a request so far (its `RequestFinished.energy_j` if it ended now):
        for a shell that ends it itself (a stop string) and still reports its energy."""
        r = self._requests.get(request_id)
        if r is None:
            return 0.0
        return r.energy + r.model.per_seq if r.state == _RUNNING else r.energy

    def cancel(self, request_id: str, now: float) -> None:
        """The client went away: drop it from the queue or free its batch slot and KV.

        Emits no event (the caller already knows); unknown or finished ids are ignored.
        A step already under way finishes, but produces nothing more for this request.
        """
        r = self._requests.pop(request_id, None)
        if r is None:
            return
        run = self._pending
        if type(run) is _Run:
            run.cut(-math.inf)  # freed KV, a slot or a queue place: decide at the next step
        m = r.model
        if r.state == _WAITING or r.state == _PARKED:
            self._unqueue(m, r, head=False)
            if r.state == _PARKED:
                self._kv.unpark(r.parked, restore=False)
                r.parked = 0
            m.blocked_since = None  # recomputed at the next decision
        else:
            if r.state == _RUNNING:
                m.running.remove(r)
                m.ctx_sum -= r.prompt_len + r.generated
                # fast mode: the steps of the run under way that its shell has seen (token
                # mode has taken them one by one): the tenant's counter as in token mode
                seen = bisect_right(run.ends, run.seen) if type(run) is _Run and run.model is m else 0
                self._leave_batch(m, r, m.steps + seen)
            self._release(r)
        r.state = _DONE
        self._class_n[r.rank] -= 1
        self._shares.idle(r.share)

    def next_event_time(self) -> float | None:
        """When `advance` next has something to do; None when idle."""
        if self._pending is not None:
            return self._pending.end
        return self._next_start()

    def advance(self, now: float) -> list[EngineEvent]:
        """Run all work due up to `now`; return what happened, in time order."""
        events: list[EngineEvent] = []
        self._horizon = now
        while True:
            work = self._pending
            if work is not None:
                end = work.end
                if end > now:
                    break
                self._pending = None
                self._free_at = end
                work.model.last_end = end
                self._busy += end - work.start
                if self._active_w:
                    self._charge(work)
                if work.kind == _DECODE:
                    self._decode(work.model, end, events)
                elif work.kind == _RUN:
                    self._finish_run(work, events)  # type: ignore[arg-type]
                else:
                    self._complete(work, events)
            start = self._free_at if self._n_admitted else self._next_start()
            if start is None or start > now:
                break
            self._begin(start, events)
        run = self._pending
        if type(run) is _Run and now > run.seen:
            run.seen = now
        return events

    def _charge(self, work: _Work) -> None:
        """The work's energy: all to its model, shared by the sequences it ran for. A run
        is charged step by step, in the same float operations as the step-by-step engine,
        so a request's energy does not depend on how often `advance` was called, nor on
        the mode (the simulator compares records bit for bit)."""
        m = work.model
        if type(work) is _Run:
            w, n, ends = self._active_w, len(m.running), work.ends
            if len(ends) > _NUMPY_STEPS:  # the same operations, vectorised (accumulate sums left to right)
                steps = np.empty(len(ends) + 1)
                steps[0], steps[1:] = work.start, ends
                joules = w * np.diff(steps)
                steps[0], steps[1:] = m.energy, joules
                m.energy = float(np.add.accumulate(steps)[-1])
                if n:
                    steps[0], steps[1:] = m.per_seq, joules / n
                    m.per_seq = float(np.add.accumulate(steps)[-1])
                return
            energy, per_seq, prev = m.energy, m.per_seq, work.start
            for end in ends:
                joules = w * (end - prev)
                energy += joules
                if n:
                    per_seq += joules / n
                prev = end
            m.energy, m.per_seq = energy, per_seq
            return
        joules = self._active_w * (work.end - work.start)
        m.energy += joules
        if work.kind == _PREFILL:
            share = joules / len(work.batch)
            for r in work.batch:
                r.energy += share
        elif work.kind == _DECODE and m.running:
            m.per_seq += joules / len(m.running)

    def snapshot(self, now: float, *, node_hashes: bool = True) -> EngineSnapshot:
        """The node as heartbeats report it; cheap enough to take every second on every
        node of a simulated fleet, so a hash list that has not changed is the same list
        object as in the previous snapshot: read it, do not modify it.

        `node_hashes=False` leaves the node-wide recent-hash list empty: a heartbeat sends
        only the per-model lists, and merging a second list of the same hashes was half
        of what a snapshot cost."""
        work = self._pending
        busy_until = None if work is None else work.end
        busy = self._busy
        run_model, run_energy = None, 0.0
        if type(work) is _Run:  # report the step under way, as the step-by-step engine does
            i = bisect_right(work.ends, work.seen)
            busy_until = work.ends[i]
            if i:
                busy += work.ends[i - 1] - work.start
                run_model, run_energy = work.model, self._active_w * (work.ends[i - 1] - work.start)
        w, kv = self._weights, self._kv
        models = [
            ModelState(
                name=m.name,
                version=m.version,
                tier=w.tier(m.name),
                weight_bytes=m.resident,
                in_flight=w.pins(m.name),
                last_used=w.last_used(m.name),
                queued=m.n_waiting,
                max_batch=m.max_batch,
                config=m.config_name,
                recent_prefix_hashes=kv.recent_hashes(m.name),
                energy_joules=m.energy + run_energy if m is run_model else m.energy,
                preemptions=m.preemptions,
            )
            for m in self._models
        ]
        power = self._power
        working = work is not None and work.start <= now
        power_w = 0.0 if power is None else power.node_active_w if working else power.node_idle_w or 0.0
        return EngineSnapshot(
            time=now,
            profile=self._profile.name,
            models=models,
            queue_depth=self._n_waiting,
            running=self._n_admitted,
            max_batch=self._max_batch,
            kv_usage=kv.usage,
            prefix_cache_blocks=TierCounts(hbm=kv.hbm_blocks, ddr=kv.ddr_blocks),
            prefix_cache_queries=kv.query_tokens,
            prefix_cache_hits=kv.hit_tokens,
            bytes_moved=self._ledger.bytes_moved(),
            transfer_seconds=self._ledger.seconds(),
            recent_prefix_hashes=kv.recent_hashes() if node_hashes else [],
            block_size=self._block_size,
            current_model=self._current.name if self._current is not None else None,
            busy_until=busy_until,
            busy_seconds=busy,
            energy_joules=node_energy(power, busy, now - self._started),
            power_w=power_w,
            queued_by_class=[sum(m.nq[c] for m in self._models) for c in range(N_CLASSES)],
            preemptions=self._preemptions,
        )

    # ------------------------------------------------------------------ scheduling
    @staticmethod
    def _head(m: _Model) -> _Req | None:
        """`m`'s earliest-arriving request still waiting (preempted ones aside)."""
        w = m.waiting
        while w:
            r = w[0]
            if r.state == _WAITING:
                return r
            w.popleft()
        return None

    def _since(self, m: _Model) -> float:
        """When `m`'s longest-waiting request began to wait (arrived or not; inf: none)."""
        head = self._head(m)
        since = head.arrival if head is not None else math.inf
        if m.n_parked:
            for q in m.resume:
                if q and q[0].queued_at < since:
                    since = q[0].queued_at
        return since

    def _next_start(self) -> float | None:
        if self._n_admitted:
            return self._free_at
        earliest = min((self._since(m) for m in self._models if m.n_waiting), default=None)
        if earliest is None:
            return None
        return max(self._free_at, earliest)

    def _kv_args(self, r: _Req) -> tuple[int, int]:
        bs = self._block_size
        return -(-(r.prompt_len + r.max_tokens) // bs), (r.prompt_len + r.resumed - 1) // bs

    @staticmethod
    def _oldest(m: _Model, c: int, t: float) -> float:
        """Since when the longest-waiting request of class `c` on `m` that arrived by `t`
        waits (inf: none has)."""
        f = m.fifo[c]
        while f and f[0].state != _WAITING:
            f.popleft()
        since = f[0].arrival if f and f[0].arrival <= t else math.inf
        q = m.resume[c]
        if q and q[0].queued_at < since:
            since = q[0].queued_at
        return since

    def _serve_class(self, m: _Model, t: float) -> tuple[int, float]:
        """The class `m` admits from next, and since when its oldest request waits: the
        best class with a request arrived by `t`, unless a worse one starves (its oldest
        has waited `starvation_s` and longer than the best class's oldest; the oldest
        such goes first). (-1, inf) when no request has arrived."""
        nq = m.nq
        n = m.n_waiting
        for c in range(N_CLASSES):
            if nq[c] == n:  # one class waits (the usual case): its oldest, if arrived
                since = self._oldest(m, c, t)
                return (c, since) if since < math.inf else (-1, since)
            if nq[c]:
                break
        best = -1
        since_best = math.inf
        for c in range(N_CLASSES):
            if not nq[c]:
                continue
            since = self._oldest(m, c, t)
            if since == math.inf:
                continue
            if best < 0:
                best, since_best = c, since
            elif since < since_best and t - since > self._starvation:
                best, since_best = c, since
        return best, since_best

    def _fair(self, m: _Model, rank: int, since: float) -> bool:
        """No admitting ahead of a waiter denied HBM elsewhere: one of a better class, or of
        the same class and older (FCFS across models, per class)."""
        for other in self._models:
            b = other.blocked_since
            if b is not None and other is not m and (other.blocked_rank < rank or (other.blocked_rank == rank and b < since)):
                return False
        return True

    def _pick(self, m: _Model, c: int, t: float) -> _Req:
        """The request of class `c` (which has one arrived by `t`) `m` admits next: a
        preempted one first, else the head of the tenant with the least effective counter
        (`tierflow.rdu.fairness`; ties to the earlier arrival). Changes nothing."""
        parked = m.resume[c]
        if parked:
            return parked[0]
        queues = m.queues[c]
        if len(queues) == 1:
            for q in queues.values():
                return q[0]
        shares = self._shares
        floor: float | None = None
        best: _Req | None = None
        best_v = 0.0
        for ts, q in queues.items():
            r = q[0]
            if r.arrival > t:
                continue
            if ts.fresh:
                if floor is None:
                    floor = shares.floor(c)
                v = shares.effective(ts, floor)
            else:
                v = ts.counter()
            if best is None or v < best_v or (v == best_v and r.arrival < best.arrival):
                best, best_v = r, v
        assert best is not None, "the class has a request arrived"
        return best

    def _unqueue(self, m: _Model, r: _Req, *, head: bool) -> None:
        """Take `r` (its queue's head when admitted, anywhere when cancelled) out of the queue."""
        c = r.rank
        if r.state == _PARKED:
            q = m.resume[c]
            m.n_parked -= 1
        else:
            q = m.queues[c][r.share]
        if head:
            q.popleft()
        else:
            q.remove(r)
        if not q and r.state != _PARKED:
            del m.queues[c][r.share]
        m.nq[c] -= 1
        m.n_waiting -= 1
        self._n_waiting -= 1
        r.share.queued -= 1

    def _admissible(self, m: _Model, t: float) -> bool:
        """Can `m` (weights in HBM) admit its next request at `t`?"""
        if not m.n_waiting or len(m.running) >= m.max_batch or m.kv_blocked_epoch == self._kv_epoch:
            return False
        c, since = self._serve_class(m, t)
        if c < 0 or not self._fair(m, c, since):
            return False
        head = self._pick(m, c, t)
        total, max_hits = self._kv_args(head)
        if self._kv.fits(m.name, m.block_bytes, head.hashes, total, max_hit_blocks=max_hits):
            return True
        m.kv_blocked_epoch = self._kv_epoch
        if m.blocked_since is None:
            m.blocked_since, m.blocked_rank = since, c
        return False

    def _runnable(self, m: _Model, t: float) -> bool:
        if self._weights.tier(m.name) == "hbm":
            return bool(m.running) or self._admissible(m, t)
        if not m.n_waiting:
            return False
        c, since = self._serve_class(m, t)
        if c < 0:
            return False
        if self._weights.plan_load(m.name, t) is None:
            if m.blocked_since is None:
                m.blocked_since, m.blocked_rank = since, c
            return False
        return self._fair(m, c, since)

    def _choose(self, t: float) -> _Model:
        """The model to run next: the current one until its slice ends, then, in rotation,
        one whose weights are already in HBM; a model that must be switched in goes first
        only once its oldest request has waited `switch_patience` (or nothing hot has work).
        When the node holds work of several classes, the rotation is among the models
        with work of the class to serve (`_class_turn`), if any of them can run.

        Plain rotation would alternate between two models that do not fit in HBM together,
        paying a DDR->HBM copy every time slice: a node thrashing on its own queue.
        """
        cur = self._current
        if cur is not None and t < self._slice_end and self._runnable(cur, t):
            return cur
        classes = self._class_n
        allowed = self._class_turn(t) if (classes[0] > 0) + (classes[1] > 0) + (classes[2] > 0) > 1 else None
        chosen = self._rotate(t, allowed)
        if chosen is None and allowed is not None:
            chosen = self._rotate(t, None)
        if chosen is None:
            raise RuntimeError("scheduler invariant broken: requests are pending but no model can run")
        self._current = chosen
        self._slice_end = t + self._time_slice
        return chosen

    def _rotate(self, t: float, allowed: list[_Model] | None) -> _Model | None:
        cur = self._current
        n = len(self._models)
        first = cur.index + 1 if cur is not None else 0
        while True:
            hot = cold = None
            for j in range(n):
                m = self._models[(first + j) % n]
                if allowed is not None and m not in allowed:
                    continue
                if not self._runnable(m, t):
                    continue
                if self._weights.tier(m.name) == "hbm":
                    hot = hot or m
                elif m.n_waiting and t - self._since(m) >= self._switch_patience:
                    hot = None
                    cold = m
                    break
                else:
                    cold = cold or m
            chosen = hot or cold
            if chosen is None:
                return None
            # Checking a later model may mark it blocked (no HBM to load it into), and an
            # older blocked waiter makes an earlier pick wait its turn (`_fair`): choose
            # again until the pick still holds. Each pass that changes the answer has set
            # some model's `blocked_since`, so this ends within a pass per model.
            if self._runnable(chosen, t):
                return chosen

    def _class_turn(self, t: float) -> list[_Model] | None:
        """The models whose turn it is when the node holds work of several classes: those
        with work (decoding, or waiting and arrived) of the best class; or the one model
        whose worse class starves (its oldest work has waited `starvation_s`, and longer
        than any of the best class: a decoding batch waits since its model last ran).
        None: every model with work."""
        present: list[tuple[_Model, int, list[tuple[int, float]]]] = []
        best = N_CLASSES
        for m in self._models:
            if not m.running and not m.n_waiting:
                continue
            work = [(c, m.last_end) for c in range(N_CLASSES) if m.run_n[c]]
            for c in range(N_CLASSES):
                if m.nq[c]:
                    since = self._oldest(m, c, t)
                    if since < math.inf:
                        work.append((c, since))
            if not work:
                continue
            top = min(c for c, _ in work)
            present.append((m, top, work))
            if top < best:
                best = top
        since_best = min((s for _, _, work in present for c, s in work if c == best), default=math.inf)
        starving, oldest = None, since_best
        for m, _, work in present:
            for c, s in work:
                if c > best and s < oldest and t - s > self._starvation:
                    starving, oldest = m, s
        if starving is not None:
            return [starving]
        turn = [m for m, top, _ in present if top == best]
        return None if len(turn) == len(present) else turn

    def _begin(self, t: float, events: list[EngineEvent]) -> None:
        m = self._current
        if m is not None and m.running and t < self._slice_end:
            # The common case, once per decode step: the same batch takes another step
            # (nothing has arrived that could join it, or it is full and no interactive
            # request waits that a sequence could leave it for).
            if len(m.running) >= m.max_batch:
                if not (m.victims and m.nq[0]):
                    self._pending = self._decode_work(m, t)
                    return
            elif not m.n_parked:
                w = m.waiting
                while w and w[0].state != _WAITING:
                    w.popleft()
                if not w or w[0].arrival > t:
                    self._pending = self._decode_work(m, t)
                    return
        m = self._choose(t)
        if self._weights.tier(m.name) != "hbm":
            plan = self._weights.begin_load(m.name, t)
            m.load_source, m.load_start, m.load_end = plan.source, t, t + plan.seconds
            m.blocked_since = None
            self._slice_end = m.load_end + self._time_slice
            self._pending = _Work(_LOAD, m, t, m.load_end, [])
            return
        if m.victims and m.nq[0] and len(m.running) >= m.max_batch and self._preempt(m, t):
            return
        batch = self._admit(m, t, events) if self._admissible(m, t) else []
        if batch:
            self._pending = _Work(_PREFILL, m, t, t + self._prefill_seconds(m, batch), batch)
        elif not m.running:
            raise RuntimeError(
                f"scheduler invariant broken: {m.name} was chosen with nothing to do"
            )
        else:
            self._pending = self._decode_work(m, t)

    def _preempt(self, m: _Model, t: float) -> bool:
        """An interactive request is next on `m` and its batch is full: the lowest-class,
        most recently started sequence below interactive (never preempted before) leaves
        it, its generated tokens' KV copied to DDR (the `_SWAP` work that follows), and
        waits at the head of its class. False, changing nothing, if the interactive
        request is not next (another class starves, or it is not fair to admit it now) or
        DDR cannot hold the KV."""
        c, since = self._serve_class(m, t)
        if c != 0 or not self._fair(m, 0, since):
            return False
        victim: _Req | None = None
        for r in m.running:
            if r.victim and (
                victim is None or r.rank > victim.rank or (r.rank == victim.rank and r.started_at >= victim.started_at)
            ):
                victim = r
        if victim is None:
            return False
        nbytes = (victim.generated - victim.resumed) * m.spec.kv_bytes_per_token
        seconds = self._kv.park(nbytes)
        if seconds is None:
            return False
        r = victim
        m.running.remove(r)
        m.ctx_sum -= r.prompt_len + r.generated
        r.energy += m.per_seq  # what it paid for the batch's steps so far (as `energy_of`)
        if not self._token_events:  # its gaps so far, and when its last token came out
            acc: dict[int, int] = {}
            if r.itl is None:  # it joined after the batch's last run: one token, no gap yet
                m.joined.remove(r)
            else:
                base = r.itl
                for b, n in m.gaps.items():
                    d = n - base.get(b, 0)
                    if d:
                        acc[b] = d
                r.last_at = m.run_end
            r.itl, r.itl_acc = None, acc
        self._leave_batch(m, r, m.steps)
        r.share.queued += 1  # before it stops being admitted: its tenant stays active
        self._release(r)
        r.state = _PARKED
        r.parked = nbytes
        r.preempted += 1
        r.queued_at = t
        r.prefilled = False  # its prompt's KV, if not in the cache any more, is computed here
        m.resume[r.rank].append(r)
        m.n_parked += 1
        m.nq[r.rank] += 1
        m.n_waiting += 1
        self._n_waiting += 1
        m.preemptions += 1
        self._preemptions += 1
        self._pending = _Work(_SWAP, m, t, t + seconds, [])
        return True

    def _decode_work(self, m: _Model, t: float) -> _Work:
        if not self._token_events:
            return self._run(m, t)
        end = t + m.cost.step_seconds(len(m.running), m.ctx_sum)
        if end > self._horizon:
            return _Work(_DECODE, m, t, end, m.running)
        return self._run(m, t, self._horizon)  # steps already due: one run, finished at once

    def _run(self, m: _Model, t: float, horizon: float = math.inf) -> _Run:
        """Fast mode: the batch's steps up to the first boundary that needs a decision.

        Inside the run every boundary is one where `_begin` would take its first branch,
        or pass through `_choose`, `_preempt` and `_admissible` without changing anything:
        nothing has arrived that could be admitted, or the batch is full (and no
        interactive request is due that a sequence could leave it for), or what waits is
        refused for a reason no step can change (no KV room since the last release, an
        older waiter elsewhere, DDR full). Token mode passes `horizon`: the run stops at the
        last boundary by then, which is a boundary `_begin` then sees as the step-by-step
        engine would.
        """
        running = m.running
        steps = min([r.target - r.generated for r in running])
        until = math.inf
        if len(running) < m.max_batch:
            if m.n_waiting and m.kv_blocked_epoch != self._kv_epoch:
                until = self._admission_news(m, t)
        elif m.victims and m.nq[0]:
            f = m.fifo[0]
            while f and f[0].state != _WAITING:
                f.popleft()
            if f and f[0].arrival > t and self._fair(m, 0, f[0].arrival):
                until = f[0].arrival
        # no other model has work (nothing is prefilling while a batch decodes)
        renew = self._n_waiting == m.n_waiting and self._n_admitted == len(running)
        if not renew and self._slice_end < until:
            until = self._slice_end
        if horizon < math.inf:  # token mode: only the steps ending by `horizon`
            ends = m.cost.step_ends(len(running), m.ctx_sum, t, steps, min(until, math.nextafter(horizon, math.inf)))
            if len(ends) > 1 and ends[-1] > horizon:
                ends.pop()  # not due yet: the run ends at the boundary before it
        else:
            ends = m.cost.step_ends(len(running), m.ctx_sum, t, steps, until)
        return _Run(m, t, ends, renew)

    def _admission_news(self, m: _Model, t: float) -> float:
        """When `m` (room in its batch, not waiting for KV) may next admit: the head's
        arrival if nothing has arrived (unless no request arriving then could go ahead of
        the waiter another model holds HBM for). If arrived requests wait anyway (that
        waiter goes first), at the next arrival a better class could bring, or when a class
        begins to starve."""
        head = self._head(m)
        if not m.n_parked and (head is None or head.arrival > t):
            if head is not None and self._fair(m, self._top_rank, head.arrival):
                return head.arrival
            return math.inf
        until = math.inf
        w = m.waiting
        if w and w[-1].arrival > t:
            nxt = w[bisect_right(w, t, key=_ARRIVAL)].arrival
            if self._fair(m, self._top_rank, nxt):
                until = nxt
        arrived = [(c, s) for c in range(N_CLASSES) if m.nq[c] and (s := self._oldest(m, c, t)) < math.inf]
        for c, s in arrived[1:]:  # the best class's own wait changes nothing
            if not t - s > self._starvation and s + self._starvation < until:
                until = s + self._starvation
        return until

    def _admit(self, m: _Model, t: float, events: list[EngineEvent]) -> list[_Req]:
        batch: list[_Req] = []
        budget = self._max_prefill_tokens
        room = m.max_batch - len(m.running)
        weights = self._weights
        shares = self._shares
        bs = self._block_size
        while room and m.n_waiting:
            c, since = self._serve_class(m, t)
            if c < 0 or not self._fair(m, c, since):
                break
            if shares.fresh[c]:
                shares.settle(c)  # lifts of tenants that became active (fairness.FairShares)
            r = self._pick(m, c, t)
            if batch and r.prompt_len + r.resumed > budget:
                break
            total, max_hits = self._kv_args(r)
            alloc = self._kv.allocate(
                m.name, m.block_bytes, r.hashes, total, max_hit_blocks=max_hits
            )
            if alloc is None:
                m.kv_blocked_epoch = self._kv_epoch
                m.blocked_since, m.blocked_rank = since, c
                break
            m.blocked_since = None
            self._unqueue(m, r, head=True)
            self._n_admitted += 1
            room -= 1
            r.alloc = alloc
            hits = alloc.hit_blocks * bs
            r.pass_hits = hits
            new = r.prompt_len + r.resumed - hits
            budget -= new
            r.share.fixed += new
            r.share.admitted += 1
            m.run_n[c] += 1
            weights.pin(m.name)
            batch.append(r)
            if r.state == _PARKED:  # resuming: its generated tokens' KV comes back from DDR
                alloc.seconds += self._kv.unpark(r.parked)
                r.parked = 0
                r.state = _PREFILLING
                continue
            r.state = _PREFILLING
            r.hit_tokens = hits
            r.started_at = t
            tier: Literal["hbm", "ddr", "cold"] = "hbm"
            switch = 0.0
            if m.load_end is not None and r.arrival < m.load_end:
                tier, switch = m.load_source, m.load_end - max(m.load_start, r.arrival)
            events.append(RequestStarted(r.id, t, t - r.arrival, tier, switch, r.hit_tokens))
        if batch:
            weights.touch(m.name, t)
        return batch

    def _prefill_seconds(self, m: _Model, batch: list[_Req]) -> float:
        segments = []
        copies = 0.0
        written = 0
        for r in batch:
            copies += r.alloc.seconds  # type: ignore[union-attr]
            new = r.prompt_len + r.resumed - r.pass_hits
            if r.prefilled:
                written += new
            else:
                segments.append((new, r.pass_hits))
        profile = self._profile
        write_bw = profile.node_hbm_bw * profile.hbm_efficiency
        copies += self._ledger.charge("net", "hbm", written * m.spec.kv_bytes_per_token, write_bw)
        return prefill_time(m.spec, profile, segments) + copies

    # ------------------------------------------------------------------ completion
    def _complete(self, work: _Work, events: list[EngineEvent]) -> None:
        m = work.model
        if work.kind == _LOAD:
            self._weights.finish_load(m.name)
        elif work.kind == _PREFILL:
            self._finish_prefill(m, work, events)
        elif work.kind == _DECODE:
            self._decode(m, work.end, events)
        # _SWAP: the KV is in DDR now; nothing else changes

    def _finish_prefill(self, m: _Model, work: _Work, events: list[EngineEvent]) -> None:
        t = work.end
        texts = self._texts
        vocab = len(OUTPUT_VOCAB)
        for r in work.batch:
            if r.state == _DONE:  # cancelled while its prompt was being computed
                continue
            self._kv.commit(r.alloc)  # type: ignore[arg-type]
            i = r.generated  # 0, or where a resumed completion continues
            if i >= r.target:  # prefill only, or a resumed completion that was already whole
                self._finish(r, t, events)
                continue
            if self._token_events:
                if not r.tokens:  # else the plan the request brought
                    r.tokens = completion_tokens(r.key, r.target, vocab)
                tok = r.tokens[i]
                events.append(TokenGenerated(r.id, t, i, tok, texts[tok]))
            elif r.preempted:  # resumed: the gap since its last token before it left the batch
                acc = r.itl_acc
                if acc is not None:
                    b = bucket(t - r.last_at)
                    acc[b] = acc.get(b, 0) + 1
            r.generated = i = i + 1
            r.share.fixed += 1
            if i >= r.target:
                self._finish(r, t, events)
            else:
                r.state = _RUNNING
                r.energy -= m.per_seq
                r.joined_at = r.share.join(m)
                if r.rank and not r.preempted and self._preemption:
                    r.victim = True
                    m.victims += 1
                if not self._token_events:
                    r.last_at = t
                    m.joined.append(r)
                m.running.append(r)
                m.ctx_sum += r.prompt_len + i

    def _decode(self, m: _Model, t: float, events: list[EngineEvent]) -> None:
        """One token for every running request: the per-token hot path, kept minimal."""
        texts = self._texts
        append = events.append
        token = TokenGenerated
        done: list[_Req] = []
        for r in m.running:
            i = r.generated
            tok = r.tokens[i]
            append(token(r.id, t, i, tok, texts[tok]))
            r.generated = i = i + 1
            if i >= r.target:
                done.append(r)
        m.ctx_sum += len(m.running)
        m.steps += 1
        if done:
            for r in done:
                m.ctx_sum -= r.prompt_len + r.generated
                self._finish(r, t, events)
            m.running = [r for r in m.running if r.state == _RUNNING]

    def _finish_run(self, run: _Run, events: list[EngineEvent]) -> None:
        """Every request still in the batch gained one token per step of the run."""
        m = run.model
        ends = run.ends
        steps = len(ends)
        if run.renew:  # replay the slices that ended inside the run, as `_choose` renews them
            inner = steps - 1
            slice_end, ts = self._slice_end, self._time_slice
            i = bisect_left(ends, slice_end, 0, inner)
            while i < inner:
                slice_end = ends[i] + ts
                i = bisect_left(ends, slice_end, i + 1, inner)
            self._slice_end = slice_end
        if self._token_events:
            self._run_tokens(m.running, ends, events)
        else:
            self._run_gaps(m, ends)
        done: list[_Req] = []
        for r in m.running:
            r.generated += steps
            if r.generated >= r.target:
                done.append(r)
        m.ctx_sum += steps * len(m.running)
        m.steps += steps
        if done:
            for r in done:
                m.ctx_sum -= r.prompt_len + r.generated
                self._finish(r, run.end, events)
            m.running = [r for r in m.running if r.state == _RUNNING]

    def _run_tokens(self, running: list[_Req], ends: list[float], events: list[EngineEvent]) -> None:
        """The tokens of a run's steps, step by step as `_decode` emits them."""
        texts = self._texts
        append = events.append
        token = TokenGenerated
        for j, t in enumerate(ends):
            for r in running:
                i = r.generated + j
                tok = r.tokens[i]
                append(token(r.id, t, i, tok, texts[tok]))

    @staticmethod
    def _run_gaps(m: _Model, ends: list[float]) -> None:
        """Fast mode: the run's gaps, counted once for its whole batch (as `per_seq` for
        energy). `m.gaps` counts every gap a sequence in the batch since the model started
        would have seen: a sequence that was in the last run waited from its end to this
        run's first step, then the gaps between steps. A request keeps `m.gaps` as it was
        when it joined, corrected for its own first gap (from its prefill, not from the
        last run), and its gaps at the end are the difference."""
        acc = m.gaps
        first = ends[0]
        carried = bucket(first - m.run_end)
        for r in m.joined:
            if r.state != _RUNNING:
                continue
            own = bucket(first - r.last_at)
            acc.setdefault(own, 0)  # so the difference at its end sees every bucket its base has
            base = dict(acc)
            base[own] = base.get(own, 0) - 1
            base[carried] = base.get(carried, 0) + 1
            r.itl = base
        m.joined.clear()
        acc[carried] = acc.get(carried, 0) + 1
        steps = len(ends)
        if steps < 2:
            pass
        elif (b := bucket(ends[1] - first)) == bucket(ends[-1] - ends[-2]):
            # Steps only get longer as the context grows: all between the first two and the
            # last two are in the same bucket (decode's usual case: one bucket a run).
            acc[b] = acc.get(b, 0) + steps - 1
        elif steps > _NUMPY_STEPS:
            values, counts = np.unique(buckets(np.diff(np.asarray(ends))), return_counts=True)
            for b, n in zip(values.tolist(), counts.tolist(), strict=True):
                acc[b] = acc.get(b, 0) + n
        else:
            prev = first
            for t in ends[1:]:
                b = bucket(t - prev)
                acc[b] = acc.get(b, 0) + 1
                prev = t
        m.run_end = ends[-1]

    def _finish(self, r: _Req, t: float, events: list[EngineEvent]) -> None:
        m = r.model
        energy = r.energy + m.per_seq if r.state == _RUNNING else r.energy  # as energy_of
        base = r.itl
        itl = () if base is None else tuple((b, n - base.get(b, 0)) for b, n in m.gaps.items() if n != base.get(b, 0))
        if r.itl_acc:  # fast mode, preempted once: its gaps before that too
            gaps = dict(r.itl_acc)
            for b, n in itl:
                gaps[b] = gaps.get(b, 0) + n
            itl = tuple((b, n) for b, n in gaps.items() if n)
        events.append(RequestFinished(r.id, t, r.reason, r.prompt_len, r.generated, r.hit_tokens, energy, itl))
        if r.state == _RUNNING:
            self._leave_batch(m, r, m.steps)
        del self._requests[r.id]
        self._release(r)
        r.state = _DONE
        self._class_n[r.rank] -= 1
        share = r.share
        if not share.queued and not share.admitted:
            self._shares.idle(share)

    @staticmethod
    def _leave_batch(m: _Model, r: _Req, steps: int) -> None:
        """A decoding sequence leaves `m`'s batch after its step `steps`: its tenant's
        counter keeps the tokens it decoded."""
        r.share.leave(m, r.joined_at, steps)
        if r.victim:
            r.victim = False
            m.victims -= 1

    def _release(self, r: _Req) -> None:
        self._kv.release(r.alloc)  # type: ignore[arg-type]
        self._kv_epoch += 1
        self._n_admitted -= 1
        self._weights.unpin(r.model.name)
        r.model.run_n[r.rank] -= 1
        r.share.admitted -= 1
