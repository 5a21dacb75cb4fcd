"""Emulated encoders (issue 20): deterministic vectors that behave like embeddings, rerank
scores that order by relevance, Matryoshka truncation, and the forward pass's timing."""

from __future__ import annotations

import base64

import numpy as np
import pytest

from tierflow.rdu import BUILTIN_PROFILES, load_catalog, model_from_dict
from tierflow.rdu.encoders import embed, embed_many, encode_time, rerank_scores, to_base64, truncate
from tierflow.tokenizer import encode

CAT = load_catalog()
PARIS = encode("The capital of France is Paris, a city on the Seine.")
QUESTION = encode("What is the capital of France?")
PLANTS = encode("Photosynthesis converts light into chemical energy in plants.")


def test_same_input_same_vector_and_unit_length() -> None:
    a, b = embed("bge-large-en-v1.5", PARIS, 1024), embed("bge-large-en-v1.5", list(PARIS), 1024)
    assert a.shape == (1024,) and np.array_equal(a, b)
    assert abs(float(np.linalg.norm(a)) - 1.0) < 1e-5
    assert np.allclose(embed_many("bge-large-en-v1.5", [PARIS, PLANTS], 1024)[0], a, atol=1e-6)


def test_similar_inputs_are_closer_than_unrelated_ones() -> None:
    m = "bge-large-en-v1.5"
    p, q, u = (embed(m, ids, 1024) for ids in (PARIS, QUESTION, PLANTS))
    assert p @ q > 0.3 > max(p @ u, q @ u)
    assert not np.allclose(embed("e5-large-v2", PARIS, 1024), p)  # another model, another space


def test_matryoshka_prefix_is_renormalised_and_keeps_similarity() -> None:
    full = embed_many("nomic-embed-text-v1.5", [PARIS, QUESTION, PLANTS], 768)
    short = truncate(full, 128)
    assert short.shape == (3, 128) and np.allclose(np.linalg.norm(short, axis=1), 1.0, atol=1e-5)
    assert np.allclose(short[0], full[0, :128] / np.linalg.norm(full[0, :128]))
    assert short[0] @ short[1] > short[0] @ short[2]


def test_base64_is_little_endian_float32() -> None:
    v = embed("bge-large-en-v1.5", PARIS, 1024)
    assert np.array_equal(np.frombuffer(base64.b64decode(to_base64(v)), dtype="<f4"), v.astype(np.float32))


def test_rerank_scores_order_by_relevance() -> None:
    scores = rerank_scores("bge-reranker-v2-m3", QUESTION, [PLANTS, PARIS])
    assert all(0.0 < s < 1.0 for s in scores) and scores[1] > scores[0]
    assert rerank_scores("bge-reranker-v2-m3", QUESTION, [PLANTS, PARIS]) == scores


def test_encoder_pass_time_is_one_forward_pass_with_weights_read_once() -> None:
    spec, profile = CAT["bge-large-en-v1.5"], BUILTIN_PROFILES["sn40l-16"]
    one = encode_time(spec, profile, [256])
    batch = encode_time(spec, profile, [256] * 16)
    assert 0 < one < batch < 16 * one  # batched inputs share the weight read and the pass overhead
    assert encode_time(spec, profile, [512]) > one
    assert encode_time(CAT["bge-reranker-v2-m3"], profile, [256]) > encode_time(CAT["nomic-embed-text-v1.5"], profile, [256])


def test_catalog_encoders_carry_kind_dims_and_context() -> None:
    bge, nomic, rerank = CAT["bge-large-en-v1.5"], CAT["nomic-embed-text-v1.5"], CAT["bge-reranker-v2-m3"]
    assert (bge.kind, bge.embedding_dims, bge.max_context, bge.matryoshka_dims) == ("embed", 1024, 512, ())
    assert (nomic.embedding_dims, nomic.max_context, nomic.matryoshka_dims) == (768, 8192, (512, 256, 128, 64))
    assert (rerank.kind, rerank.embedding_dims, rerank.max_context) == ("rerank", 0, 8192)
    assert CAT["llama-3.1-8b"].kind == "generate"
    custom = model_from_dict({"total_params": 10**8, "num_layers": 6, "hidden_size": 512, "num_heads": 8, "num_kv_heads": 8,
                              "head_dim": 64, "max_context": 512, "kind": "embed", "embedding_dims": 384, "matryoshka_dims": [128]}, name="mini")
    assert custom.matryoshka_dims == (128,)
    with pytest.raises(ValueError, match="embedding_dims"):
        model_from_dict({"total_params": 10**8, "num_layers": 6, "hidden_size": 512, "num_heads": 8, "num_kv_heads": 8,
                         "head_dim": 64, "max_context": 512, "kind": "embed"}, name="nodims")
