"""A generation resumed on another engine continues the very same completion.

This is what lets the router move a stream whose node died mid-generation: it sends the
prompt plus the tokens already streamed, and the client's stream is exactly what one
node would have produced (the emulator is deterministic), in both engine modes.
"""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tierflow.rdu import (
    BUILTIN_MODELS,
    BUILTIN_PROFILES,
    BundleModel,
    DeploymentConfig,
    EngineRequest,
    NodeEngine,
    RequestFinished,
    RequestRejected,
    RequestStarted,
    TokenGenerated,
)

M8B = "llama-3.1-8b"


def _engine(**kw: object) -> NodeEngine:
    bundle = [BundleModel(BUILTIN_MODELS[M8B], DeploymentConfig.parse("ss8192-bs4"))]
    return NodeEngine(BUILTIN_PROFILES["sn40l-16"], bundle, now=0.0, preload=[M8B], **kw)  # type: ignore[arg-type]


def _run(engine: NodeEngine, request: EngineRequest) -> tuple[list[TokenGenerated], RequestFinished]:
    engine.submit(request, 0.0)
    tokens: list[TokenGenerated] = []
    while (due := engine.next_event_time()) is not None:
        for event in engine.advance(due):
            if isinstance(event, TokenGenerated):
                tokens.append(event)
            elif isinstance(event, RequestFinished):
                return tokens, event
    raise AssertionError("the engine went idle without finishing the request")


PROMPT = list(range(1000, 1300))


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), max_tokens=st.integers(1, 400), cut=st.floats(0.0, 1.0), ignore_eos=st.booleans())
def test_a_resumed_completion_is_the_rest_of_the_same_completion(seed: int, max_tokens: int, cut: float, ignore_eos: bool) -> None:
    whole, done = _run(_engine(), EngineRequest("a", M8B, PROMPT, max_tokens, seed=seed, ignore_eos=ignore_eos))
    k = min(len(whole), math.floor(cut * len(whole)))
    sent = [t.token_id for t in whole[:k]]
    rest, resumed_done = _run(_engine(), EngineRequest("a", M8B, PROMPT + sent, max_tokens, seed=seed, ignore_eos=ignore_eos, resume_from=k))
    assert [(t.index, t.token_id, t.text) for t in rest] == [(t.index, t.token_id, t.text) for t in whole[k:]]
    assert (resumed_done.finish_reason, resumed_done.completion_tokens, resumed_done.prompt_tokens) == (
        done.finish_reason, done.completion_tokens, done.prompt_tokens,
    )


def test_fast_mode_resumes_to_the_same_finish() -> None:
    whole, done = _run(_engine(), EngineRequest("a", M8B, PROMPT, 300, seed=11))
    assert len(whole) > 10
    sent = [t.token_id for t in whole[:10]]
    fast = _engine(token_events=False)
    tokens, finished = _run(fast, EngineRequest("a", M8B, PROMPT + sent, 300, seed=11, resume_from=10))
    assert tokens == [] and finished.completion_tokens == done.completion_tokens and finished.finish_reason == done.finish_reason


def test_the_resumed_tokens_are_prefilled_not_free() -> None:
    """Resuming recomputes the KV of prompt + the tokens streamed so far: its first token
    comes later than a fresh request's (no magic copy of the dead node's cache)."""
    fresh, resumed = _engine(), _engine()
    fresh.submit(EngineRequest("a", M8B, PROMPT, 600, seed=1, ignore_eos=True), 0.0)
    resumed.submit(EngineRequest("a", M8B, PROMPT + list(range(500)), 600, seed=1, ignore_eos=True, resume_from=500), 0.0)

    def first_token_at(engine: NodeEngine) -> float:
        while (due := engine.next_event_time()) is not None:
            for event in engine.advance(due):
                if isinstance(event, TokenGenerated):
                    return event.time
        raise AssertionError("no token")

    assert first_token_at(resumed) > first_token_at(fresh)


def test_a_completion_that_was_already_whole_finishes_at_once() -> None:
    """The node died after its last token but before its `Finished` reached the router."""
    whole, done = _run(_engine(), EngineRequest("a", M8B, PROMPT, 50, seed=3, ignore_eos=True))
    sent = [t.token_id for t in whole]
    tokens, finished = _run(_engine(), EngineRequest("a", M8B, PROMPT + sent, 50, seed=3, ignore_eos=True, resume_from=len(sent)))
    assert tokens == [] and finished.completion_tokens == 50 and finished.finish_reason == "length"


@pytest.mark.parametrize("resume_from, max_tokens", [(-1, 10), (len(PROMPT), 10), (11, 10)])
def test_impossible_resumes_are_refused(resume_from: int, max_tokens: int) -> None:
    with pytest.raises(RequestRejected) as err:
        _engine().submit(EngineRequest("a", M8B, PROMPT, max_tokens, resume_from=resume_from), 0.0)
    assert err.value.code == "invalid_request" and "resume_from" in err.value.message


def test_the_context_limit_counts_the_resumed_tokens_once() -> None:
    """prompt + max_tokens is the limit; the resumed tokens are inside max_tokens."""
    engine = _engine()
    prompt = list(range(8192 - 100))
    engine.submit(EngineRequest("a", M8B, prompt + list(range(60)), 100, resume_from=60), 0.0)
    with pytest.raises(RequestRejected) as err:
        engine.submit(EngineRequest("b", M8B, prompt + list(range(60)), 101, resume_from=60), 0.0)
    assert err.value.code == "context_length_exceeded"


def test_started_reports_the_resumed_request() -> None:
    engine = _engine()
    engine.submit(EngineRequest("a", M8B, PROMPT + [1, 2, 3], 10, resume_from=3, ignore_eos=True), 0.0)
    events = engine.advance(10.0)
    assert any(isinstance(e, RequestStarted) for e in events)
    assert [e.index for e in events if isinstance(e, TokenGenerated)][0] == 3
