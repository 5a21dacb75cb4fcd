"""The shared tokenizer and the baseline scaling policy."""

from __future__ import annotations

import pytest

from tierflow.scaling import DeploymentLoad, recommend_by_utilization
from tierflow.tokenizer import OUTPUT_VOCAB, count_tokens, decode_output, encode, render_chat


def test_encoding_is_deterministic_and_prefix_stable() -> None:
    system = render_chat([("system", "You are a planner."), ("user", "step one")])
    longer = render_chat([("system", "You are a planner."), ("user", "step one"), ("assistant", "ok"), ("user", "step two")])
    a, b = encode(system), encode(longer)
    assert a == encode(system)
    assert b[: len(a) - 3] == a[: len(a) - 3]  # same history -> same leading tokens


def test_generated_text_retokenizes_to_its_token_count() -> None:
    ids = list(range(0, 3 * len(OUTPUT_VOCAB), 7))
    assert count_tokens(decode_output(ids)) == len(ids)


@pytest.mark.parametrize(
    ("running", "waiting", "replicas", "expected"),
    [(8, 0, 2, 3), (0, 0, 2, 1), (40, 40, 2, 4), (2, 0, 2, 1)],
)
def test_target_utilization(running: int, waiting: int, replicas: int, expected: int) -> None:
    load = DeploymentLoad("d", replicas=replicas, running=running, waiting=waiting, batch_slots=4 * replicas, min_replicas=1, max_replicas=4)
    assert recommend_by_utilization(load, target=0.7).desired == expected


def test_no_signal_never_scales_down() -> None:
    load = DeploymentLoad("d", replicas=0, running=0, waiting=0, batch_slots=0, min_replicas=2, max_replicas=4)
    rec = recommend_by_utilization(load)
    assert rec.desired == 2 and "no load signal" in rec.reason
