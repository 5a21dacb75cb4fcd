"""What an emulated encoder computes: deterministic vectors, relevance scores, and the time
one forward pass takes.

Vectors are a pure function of (model, token ids), so they need no weights and come out
the same on every node and every run, yet behave as a retrieval pipeline expects: the
same input gives the same vector, inputs that share words give close vectors, unrelated
inputs nearly orthogonal ones. An input is a bag of its token unigrams and bigrams
(sublinear counts), hashed into `_BUCKETS` signed buckets and projected to the model's
dimension by a Gaussian random projection seeded by the model's name (a Johnson-
Lindenstrauss map: cosines of the bags are kept, up to noise of about 1/sqrt(dims)), then
L2-normalised. A Matryoshka model's shorter vectors are the full vector's prefix,
renormalised, as such models are used.

A reranker (cross-encoder) scores a (query, document) pair: here the cosine of the two
texts' vectors under the reranker's own projection, squashed by a logistic into (0, 1) as
bge-reranker's sigmoid-normalised scores are. Sorting by it is sorting by overlap.

Timing: an encoder's request is one forward pass over its tokens and nothing decoded, which
is what the engine's prefill is (2 x matmul parameters x tokens of compute, the weights
read once per batch, attention over the sequence). `encode_time` is that same function,
so the engine (which runs encoder requests as prefill-only requests, max_tokens 0) and
anything that estimates them agree. The prefill model counts causal attention pairs
(n(n+1)/2); a bidirectional encoder attends n^2, a few per cent more at 512 tokens.
"""

from __future__ import annotations

import base64
import hashlib
import math
from collections.abc import Iterable, Sequence
from functools import lru_cache

import numpy as np

from tierflow.tokenizer import encode

from .catalog import ModelSpec
from .hardware import HardwareProfile
from .timing import prefill_time

__all__ = [
    "embed",
    "embed_many",
    "truncate",
    "relevance",
    "rerank_scores",
    "to_base64",
    "encode_time",
    "RERANK_DIMS",
]

_BUCKETS = 1024  # hashed features; collisions among a few hundred features are rare enough
RERANK_DIMS = 256  # a reranker's internal comparison space (it outputs scores, not vectors)
_M1 = np.uint64(0x9E3779B97F4A7C15)
_M2 = np.uint64(0xC2B2AE3D27D4EB4F)
_MIX = np.uint64(0xFF51AFD7ED558CCD)


# Function words and punctuation weigh little, as a trained encoder learns they say little
# about a text (an IDF-like prior): without it "What is the X in Paris?" would be closest to
# whatever shares "is", "the" and "in". Their ids under the fabric's one tokenizer.
_FUNCTION_WORDS = (
    "a an the and or but if of in on at to for from by with about as into over under is are was were be been being "
    "do does did have has had it its this that these those there here what which who whom whose when where why how "
    "i you he she we they me him her us them my your his our their not no so than too very can will would should "
    "could may might must shall just also , . ? ! : ; ' \" ( ) - like"
).split()
_STOP_IDS = np.array(sorted({
    i for w in _FUNCTION_WORDS for form in (w, " " + w, w.capitalize(), " " + w.capitalize()) for i in encode(form)
}), dtype=np.uint64)
_STOP_WEIGHT = 0.1


@lru_cache(maxsize=16)
def _projection(model: str, dims: int) -> np.ndarray:
    """The model's fixed random projection (buckets x dims), float32, from its name."""
    seed = int.from_bytes(hashlib.blake2b(f"tierflow-encoder:{model}:{dims}".encode(), digest_size=8).digest(), "little")
    rng = np.random.default_rng(seed)
    proj = rng.standard_normal((_BUCKETS, dims), dtype=np.float32)
    proj.setflags(write=False)
    return proj


def _features(token_ids: Sequence[int]) -> np.ndarray:
    """The input's signed, hashed bag of unigrams and bigrams (sublinear counts)."""
    bag = np.zeros(_BUCKETS, dtype=np.float32)
    if not token_ids:
        return bag
    ids = np.asarray(token_ids, dtype=np.uint64)
    with np.errstate(over="ignore"):
        uni = ids * _M1
        feats = uni if len(ids) < 2 else np.concatenate([uni, (ids[:-1] * _M2) ^ (ids[1:] * _M1) ^ _MIX])
        feats ^= feats >> np.uint64(29)
        feats *= _MIX
        feats ^= feats >> np.uint64(32)
    buckets = (feats % np.uint64(_BUCKETS)).astype(np.int64)
    signs = np.where((feats >> np.uint64(40)) & np.uint64(1), 1.0, -1.0).astype(np.float32)
    # Bigrams weigh half a unigram: shared words matter most, shared phrases some more;
    # function words a tenth, and a bigram of two of them next to nothing.
    word = np.where(np.isin(ids, _STOP_IDS), _STOP_WEIGHT, 1.0).astype(np.float32)
    weights = np.concatenate([word, 0.5 * np.maximum(word[:-1], word[1:]) * np.minimum(word[:-1], word[1:]) ** 0.5]) if len(ids) > 1 else word
    np.add.at(bag, buckets, signs * weights)
    return np.sign(bag) * np.log1p(np.abs(bag))


def _normalise(v: np.ndarray) -> np.ndarray:
    norm = float(np.linalg.norm(v))
    return v / norm if norm > 0 else v


def embed(model: str, token_ids: Sequence[int], dims: int) -> np.ndarray:
    """One input's unit vector of length `dims` under `model` (float32)."""
    return _normalise(_features(token_ids) @ _projection(model, dims))


def embed_many(model: str, inputs: Iterable[Sequence[int]], dims: int) -> np.ndarray:
    """Unit vectors for several inputs (one row each), one matrix product for all."""
    rows = [_features(ids) for ids in inputs]
    bags = np.stack(rows) if rows else np.zeros((0, _BUCKETS), np.float32)
    out = bags @ _projection(model, dims)
    norms = np.linalg.norm(out, axis=1, keepdims=True)
    return out / np.where(norms > 0, norms, 1.0)


def truncate(vectors: np.ndarray, dims: int) -> np.ndarray:
    """Matryoshka truncation: the first `dims` components, renormalised."""
    cut = vectors[..., :dims]
    norms = np.linalg.norm(cut, axis=-1, keepdims=True)
    return cut / np.where(norms > 0, norms, 1.0)


def relevance(cosine: float) -> float:
    """A cosine mapped to a (0, 1) relevance score: unrelated ~0.1, identical ~1."""
    return 1.0 / (1.0 + math.exp(-(8.0 * cosine - 2.0)))


def rerank_scores(model: str, query: Sequence[int], documents: Sequence[Sequence[int]]) -> list[float]:
    """Each document's relevance to the query under the reranker `model`, in input order."""
    if not documents:
        return []
    q = embed(model, query, RERANK_DIMS)
    docs = embed_many(model, documents, RERANK_DIMS)
    return [relevance(float(c)) for c in docs @ q]


def to_base64(vector: np.ndarray) -> str:
    """OpenAI's `encoding_format: base64`: little-endian float32 bytes, base64."""
    return base64.b64encode(np.asarray(vector, dtype="<f4").tobytes()).decode()


def encode_time(spec: ModelSpec, profile: HardwareProfile, lengths: Sequence[int]) -> float:
    """Seconds for one batched forward pass over inputs of `lengths` tokens (see above)."""
    return prefill_time(spec, profile, [(n, 0) for n in lengths if n > 0])
