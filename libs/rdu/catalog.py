"""The model catalog: architecture numbers the timing model needs, nothing more.

A model is what the accelerator must hold and stream, so a `ModelSpec` records weight
bytes (parameters × bytes per parameter of the checkpoint's dtype), which of them one
token touches (dense models: all; MoE: shared weights + the routed experts it picks), the
KV cache one token leaves behind, and the layer counts that set per-pass overheads.

KV bytes per token: for grouped-query attention it is layers × kv_heads × head_dim × 2
(K and V) × bytes per element. DeepSeek's multi-head latent attention caches one
compressed latent (512) plus a decoupled RoPE key (64) per layer instead, about 12× less
than its 128 heads would suggest. Both helpers are public so bring-your-own checkpoints
can use them.

`draft` names the small model a speculative-decoding deployment runs in front of this one
(the Llama 3.1 70B/405B figures were published with speculative decoding; Llama 3.2 1B
shares their tokenizer). Whether a profile actually speculates is the profile's call
(`HardwareProfile.spec_acceptance`).

Bring-your-own checkpoints: `model_from_dict` / `load_catalog(extra)` take the same
fields; `dtype` fills `bytes_per_param`, GQA numbers fill `kv_bytes_per_token`, and
`draft` may name a catalog entry.
"""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType
from typing import Annotated, Any, Final, Literal

import msgspec

__all__ = [
    "DTYPE_BYTES",
    "ModelKind",
    "ModelSpec",
    "gqa_kv_bytes_per_token",
    "mla_kv_bytes_per_token",
    "BUILTIN_MODELS",
    "model_from_dict",
    "load_catalog",
]

DTYPE_BYTES: Final[Mapping[str, float]] = MappingProxyType(
    {
        "fp32": 4.0,
        "bf16": 2.0,
        "fp16": 2.0,
        "fp8": 1.0,
        "int8": 1.0,
        "int4": 0.5,
        "mxfp4": 4.25 / 8,  # 4-bit elements + one 8-bit scale per 32-element block
    }
)

_PosInt = Annotated[int, msgspec.Meta(gt=0)]
# What a model does: `generate` (a decoder: tokens out), `embed` (an encoder: one vector per
# input) or `rerank` (a cross-encoder: one relevance score per query/document pair). The
# router sends each kind only to its endpoint; a node runs an encoder's request as one
# forward pass over its input (a prefill with nothing decoded).
ModelKind = Literal["generate", "embed", "rerank"]
_NonNegInt = Annotated[int, msgspec.Meta(ge=0)]


class ModelSpec(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """One checkpoint's architecture. Cross-field rules are checked on construction."""

    name: str
    total_params: _PosInt
    active_params: _PosInt  # touched by one token; == total_params for dense models
    bytes_per_param: Annotated[float, msgspec.Meta(gt=0, le=8)]
    num_layers: _PosInt
    hidden_size: _PosInt
    num_heads: _PosInt
    num_kv_heads: _PosInt
    head_dim: _PosInt
    kv_bytes_per_token: _PosInt
    max_context: _PosInt
    dtype: str = "bf16"
    num_experts: _NonNegInt = 0  # routed experts per MoE layer; 0 = dense
    experts_per_token: _NonNegInt = 0
    moe_layers: _NonNegInt = 0
    draft: ModelSpec | None = None
    # -- tensor classes (0 = unknown: every parameter counts as a streamed matmul weight) --
    lookup_params: _NonNegInt = 0  # untied input embedding: looked up, never streamed or multiplied
    head_params: _NonNegInt = 0  # unembedding: prefill computes it for each sequence's last token only
    bf16_params: _NonNegInt = 0  # kept in BF16 whatever `dtype` says (gpt-oss: all but the experts)
    # -- encoders (kind embed / rerank) --
    kind: ModelKind = "generate"
    embedding_dims: _NonNegInt = 0  # an embedder's vector length (0 for the other kinds)
    # Shorter lengths the model was trained to be truncated to (Matryoshka representation
    # learning): what the OpenAI `dimensions` parameter may ask. Empty: the full length only.
    matryoshka_dims: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        if self.kind == "embed" and not self.embedding_dims:
            raise ValueError(f"embedding model {self.name!r} needs embedding_dims")
        if self.kind != "embed" and (self.embedding_dims or self.matryoshka_dims):
            raise ValueError(f"embedding_dims/matryoshka_dims set on a {self.kind!r} model")
        if any(not 0 < d < self.embedding_dims for d in self.matryoshka_dims):
            raise ValueError(f"matryoshka_dims must lie in 1..{self.embedding_dims - 1}, got {self.matryoshka_dims}")
        if self.active_params > self.total_params:
            raise ValueError(
                f"active_params ({self.active_params}) exceeds total_params ({self.total_params})"
            )
        if self.num_experts:
            if not 0 < self.experts_per_token <= self.num_experts:
                raise ValueError(
                    f"experts_per_token must be in 1..num_experts ({self.num_experts}),"
                    f" got {self.experts_per_token}"
                )
            if not 0 < self.moe_layers <= self.num_layers:
                raise ValueError(
                    f"moe_layers must be in 1..num_layers ({self.num_layers}),"
                    f" got {self.moe_layers}"
                )
        elif self.experts_per_token or self.moe_layers:
            raise ValueError("experts_per_token/moe_layers set on a dense model (num_experts is 0)")
        elif self.active_params != self.total_params:
            raise ValueError(
                "a dense model (num_experts 0) must have active_params == total_params"
            )
        if self.lookup_params + self.head_params > self.active_params:
            raise ValueError("lookup_params + head_params exceed active_params")
        if self.bf16_params > self.total_params:
            raise ValueError("bf16_params exceed total_params")
        if self.draft is not None and self.draft.draft is not None:
            raise ValueError(f"draft model {self.draft.name!r} must not have a draft of its own")

    @property
    def weight_bytes(self) -> float:
        """Checkpoint bytes: `dtype` for most tensors, BF16 for the `bf16_params`."""
        return (self.total_params - self.bf16_params) * self.bytes_per_param + self.bf16_params * 2.0

    @property
    def shared_read_bytes(self) -> float:
        """Bytes every pass streams whatever the tokens route to: the non-expert weights
        (attention, norms, router, dense layers, shared experts, unembedding), less the
        embedding table a token only looks up. BF16 tensors sit here (gpt-oss)."""
        routed_active = (
            self.routed_params * self.experts_per_token / self.num_experts if self.num_experts else 0
        )
        shared = self.active_params - routed_active - self.lookup_params
        bf16 = min(float(self.bf16_params), shared)
        return (shared - bf16) * self.bytes_per_param + bf16 * 2.0

    @property
    def matmul_params(self) -> int:
        """Parameters one prompt token multiplies in prefill (no lookup, no unembedding)."""
        return self.active_params - self.lookup_params - self.head_params

    @property
    def is_moe(self) -> bool:
        return self.num_experts > 0

    @property
    def routed_params(self) -> int:
        """Parameters in routed experts (all layers); a token touches k/E of them."""
        if not self.num_experts:
            return 0
        frac_untouched = 1.0 - self.experts_per_token / self.num_experts
        return round((self.total_params - self.active_params) / frac_untouched)

    @property
    def attn_flops_per_pair(self) -> int:
        """FLOPs for one query token against one context token, all layers (QK^T and AV)."""
        return 4 * self.num_layers * self.num_heads * self.head_dim


def gqa_kv_bytes_per_token(
    layers: int, kv_heads: int, head_dim: int, bytes_per_elem: float = 2
) -> int:
    """K and V for every layer and KV head."""
    return round(layers * kv_heads * head_dim * 2 * bytes_per_elem)


def mla_kv_bytes_per_token(
    layers: int, kv_lora_rank: int, rope_dim: int, bytes_per_elem: float = 2
) -> int:
    """Multi-head latent attention caches one latent + one RoPE key per layer."""
    return round(layers * (kv_lora_rank + rope_dim) * bytes_per_elem)


def _llama(
    name: str,
    params: int,
    layers: int,
    hidden: int,
    heads: int,
    head_dim: int,
    draft: ModelSpec | None = None,
    *,
    vocab: int = 128_256,
    kv_heads: int = 8,
    tied: bool = False,
    context: int = 131072,
) -> ModelSpec:
    # Llama-style dense decoder in BF16. Embedding and unembedding are vocab x hidden each;
    # a tied pair (Llama 3.2 1B) is one table, streamed as the unembedding.
    table = vocab * hidden
    return ModelSpec(
        name=name,
        total_params=params,
        active_params=params,
        bytes_per_param=2.0,
        num_layers=layers,
        hidden_size=hidden,
        num_heads=heads,
        num_kv_heads=kv_heads,
        head_dim=head_dim,
        kv_bytes_per_token=gqa_kv_bytes_per_token(layers, kv_heads, head_dim),
        max_context=context,
        dtype="bf16",
        draft=draft,
        lookup_params=0 if tied else table,
        head_params=table,
    )


def _deepseek(name: str) -> ModelSpec:
    # 61 layers (3 dense + 58 MoE), 256 routed experts of which 8 per token + 1 shared,
    # FP8 weights as released, MLA with kv_lora_rank 512 and a 64-dim RoPE key. Vocabulary
    # 129,280 x 7,168 for the embedding and (untied) output head; the 37B active count is
    # taken to include the embedding (the report does not say). The MTP module (14B) is
    # not served: no source says SambaNova uses it.
    return ModelSpec(
        name=name,
        total_params=671_000_000_000,
        active_params=37_000_000_000,
        bytes_per_param=1.0,
        dtype="fp8",
        num_layers=61,
        hidden_size=7168,
        num_heads=128,
        num_kv_heads=128,
        head_dim=128,
        kv_bytes_per_token=mla_kv_bytes_per_token(61, 512, 64),
        max_context=131072,
        num_experts=256,
        experts_per_token=8,
        moe_layers=58,
        lookup_params=129_280 * 7168,
        head_params=129_280 * 7168,
    )


def _gpt_oss(
    name: str, total: int, active: int, layers: int, experts: int, expert_params: int
) -> ModelSpec:
    # Model card (arXiv 2508.10925, Tab. 1): MXFP4 on the MoE expert weights only; attention,
    # router, embedding and unembedding stay BF16 (`bf16_params` = total - experts). The
    # active count includes the unembedding, not the embedding. 64 query heads and 8 KV
    # heads of 64 dims; every layer is MoE, top-4. Layers alternate dense and 128-token
    # banded attention: only the dense half keeps KV for the whole context (the banded
    # half's <=128 tokens a sequence are left out of the per-token figure).
    vocab_table = 201_088 * 2880
    return ModelSpec(
        name=name,
        total_params=total,
        active_params=active,
        bytes_per_param=DTYPE_BYTES["mxfp4"],
        dtype="mxfp4",
        num_layers=layers,
        hidden_size=2880,
        num_heads=64,
        num_kv_heads=8,
        head_dim=64,
        kv_bytes_per_token=gqa_kv_bytes_per_token(layers // 2, 8, 64),
        max_context=131072,
        num_experts=experts,
        experts_per_token=4,
        moe_layers=layers,
        head_params=vocab_table,
        bf16_params=total - expert_params,
    )


def _encoder(
    name: str,
    params: int,
    layers: int,
    hidden: int,
    heads: int,
    vocab: int,
    context: int,
    *,
    kind: ModelKind,
    dims: int = 0,
    matryoshka: tuple[int, ...] = (),
) -> ModelSpec:
    # A BERT-style bidirectional encoder served in BF16 (the checkpoints ship FP32; servers
    # cast them). The token embedding table is looked up, never multiplied; there is no
    # unembedding (a pooler or a one-logit classifier head is counted in the matmuls). KV is
    # not kept between requests, but one pass holds each layer's K and V for its tokens,
    # which is what the engine reserves while the pass runs.
    head_dim = hidden // heads
    return ModelSpec(
        name=name,
        total_params=params,
        active_params=params,
        bytes_per_param=2.0,
        num_layers=layers,
        hidden_size=hidden,
        num_heads=heads,
        num_kv_heads=heads,
        head_dim=head_dim,
        kv_bytes_per_token=gqa_kv_bytes_per_token(layers, heads, head_dim),
        max_context=context,
        dtype="bf16",
        lookup_params=vocab * hidden,
        kind=kind,
        embedding_dims=dims,
        matryoshka_dims=matryoshka,
    )


# Encoders beside the chat models (issue 20): the shapes are the checkpoints' config.json,
# the dims, lengths and parameter counts their model cards.
#  - BAAI/bge-large-en-v1.5 (huggingface.co/BAAI/bge-large-en-v1.5): BertModel, 24 layers,
#    hidden 1024, 16 heads, vocab 30,522, max_position_embeddings 512; 1024-dim vectors,
#    512 tokens; 335M parameters (1.34 GB of FP32).
#  - intfloat/e5-large-v2 (huggingface.co/intfloat/e5-large-v2): the same BERT-large shape,
#    1024 dims, 512 tokens.
#  - nomic-ai/nomic-embed-text-v1.5 (huggingface.co/nomic-ai/nomic-embed-text-v1.5): NomicBert,
#    12 layers, n_embd 768, 12 heads, 8192-token context, 137M parameters; Matryoshka-trained
#    for 768, 512, 256, 128 and 64 dims.
#  - BAAI/bge-reranker-v2-m3 (huggingface.co/BAAI/bge-reranker-v2-m3): a cross-encoder
#    (XLMRobertaForSequenceClassification) fine-tuned from bge-m3, 24 layers, hidden 1024,
#    16 heads, vocab 250,002, max length 8192; 568M parameters.
_ENCODERS: Final = (
    _encoder("bge-large-en-v1.5", 335_141_888, 24, 1024, 16, 30_522, 512, kind="embed", dims=1024),
    _encoder("e5-large-v2", 335_141_888, 24, 1024, 16, 30_522, 512, kind="embed", dims=1024),
    _encoder(
        "nomic-embed-text-v1.5", 136_731_648, 12, 768, 12, 30_528, 8192,
        kind="embed", dims=768, matryoshka=(512, 256, 128, 64),
    ),
    _encoder("bge-reranker-v2-m3", 568_000_000, 24, 1024, 16, 250_002, 8192, kind="rerank"),
)

_LLAMA_1B: Final = _llama("llama-3.2-1b", 1_235_814_400, 16, 2048, 32, 64, tied=True)

BUILTIN_MODELS: Final[Mapping[str, ModelSpec]] = MappingProxyType(
    {
        m.name: m
        for m in (
            _LLAMA_1B,
            _llama("llama-3.1-8b", 8_030_261_248, 32, 4096, 32, 128),
            # Mistral 7B v0.1 and Llama 2 7B: the 8-socket figures (LLM-Inference-Bench) and
            # the SN40L paper's Samba-CoE experts. 32k vocabulary.
            _llama("mistral-7b", 7_241_732_096, 32, 4096, 32, 128, vocab=32_000, context=32768),
            _llama(
                "llama-2-7b", 6_738_415_616, 32, 4096, 32, 128,
                vocab=32_000, kv_heads=32, context=4096,
            ),
            _llama("llama-3.1-70b", 70_553_706_496, 80, 8192, 64, 128, draft=_LLAMA_1B),
            _llama("llama-3.1-405b", 405_853_388_800, 126, 16384, 128, 128, draft=_LLAMA_1B),
            _deepseek("deepseek-r1"),
            _deepseek("deepseek-v3"),
            # MLP parameters (experts) per the model card: 114.71B and 19.12B.
            _gpt_oss("gpt-oss-120b", 116_830_000_000, 5_130_000_000, 36, 128, 114_710_000_000),
            _gpt_oss("gpt-oss-20b", 20_910_000_000, 3_610_000_000, 24, 32, 19_120_000_000),
            *_ENCODERS,
        )
    }
)


def model_from_dict(
    d: Mapping[str, Any], *, name: str | None = None, known: Mapping[str, ModelSpec] | None = None
) -> ModelSpec:
    """A ModelSpec from config data; a ValueError names the model and the bad field.

    Conveniences: `dtype` alone sets `bytes_per_param`; without `kv_bytes_per_token` it is
    computed for grouped-query attention (optionally `kv_dtype`); `active_params` defaults
    to `total_params` and `moe_layers` to `num_layers` when `num_experts` is set; `draft`
    may be the name of a model in `known` (default: the built-ins).
    """
    known = BUILTIN_MODELS if known is None else known
    if not isinstance(d, Mapping):
        raise ValueError(f"model {name!r}: expected a mapping, got {type(d).__name__}")
    data = dict(d)
    label = name or str(data.get("name", "<unnamed>"))
    if name is not None and data.setdefault("name", name) != name:
        raise ValueError(f"model {name!r}: field 'name' is {data['name']!r}; it must match the key")
    dtype = data.setdefault("dtype", "bf16")
    if "bytes_per_param" not in data:
        if dtype not in DTYPE_BYTES:
            raise ValueError(
                f"model {label!r}: field 'dtype' is {dtype!r}; use one of {', '.join(DTYPE_BYTES)}"
                " or give 'bytes_per_param'"
            )
        data["bytes_per_param"] = DTYPE_BYTES[dtype]
    data.setdefault("active_params", data.get("total_params"))
    if data.get("num_experts"):
        data.setdefault("moe_layers", data.get("num_layers"))
    kv_dtype = data.pop("kv_dtype", "bf16")
    if "kv_bytes_per_token" not in data:
        missing = [f for f in ("num_layers", "num_kv_heads", "head_dim") if f not in data]
        if missing:
            raise ValueError(
                f"model {label!r}: give 'kv_bytes_per_token' or the fields it is computed from"
                f" (missing: {', '.join(missing)})"
            )
        if kv_dtype not in DTYPE_BYTES:
            raise ValueError(
                f"model {label!r}: field 'kv_dtype' is {kv_dtype!r};"
                f" use one of {', '.join(DTYPE_BYTES)}"
            )
        try:
            data["kv_bytes_per_token"] = gqa_kv_bytes_per_token(
                int(data["num_layers"]),
                int(data["num_kv_heads"]),
                int(data["head_dim"]),
                DTYPE_BYTES[kv_dtype],
            )
        except (TypeError, ValueError):
            raise ValueError(
                f"model {label!r}: num_layers, num_kv_heads and head_dim must be integers"
            ) from None
    draft = data.get("draft")
    if isinstance(draft, str):
        if draft not in known:
            raise ValueError(
                f"model {label!r}: field 'draft' names unknown model {draft!r}"
                f" (known: {', '.join(sorted(known))})"
            )
        data["draft"] = msgspec.to_builtins(known[draft])
    try:
        return msgspec.convert(data, ModelSpec)
    except msgspec.ValidationError as err:
        raise ValueError(f"model {label!r}: {err}") from None


def load_catalog(extra: Mapping[str, Mapping[str, Any]] | None = None) -> dict[str, ModelSpec]:
    """Built-in models plus `extra` (name -> fields); a later entry may name an earlier as draft."""
    catalog: dict[str, ModelSpec] = dict(BUILTIN_MODELS)
    for key, fields in (extra or {}).items():
        catalog[key] = model_from_dict(fields, name=key, known=catalog)
    return catalog
