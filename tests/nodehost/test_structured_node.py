"""The node's side of structured output and stop strings: a request that brings its
completion's token ids gets exactly those (cut at max_tokens, finish_reason `length`);
a stop string ends the stream with the text before it, held-back text never leaks, and
usage counts the tokens generated. Driven on a virtual clock, as in test_token_coalescing."""

from __future__ import annotations

import pytest
from tierflow.contracts import messages
from tierflow.nodehost.driver import EngineDriver
from tierflow.nodehost.stops import StopMatcher
from tierflow.rdu import (
    BUILTIN_MODELS,
    BUILTIN_PROFILES,
    BundleModel,
    DeploymentConfig,
    NodeEngine,
)
from tierflow.runtime.clock import VirtualClock
from tierflow.tokenizer import decode_output
from tierflow.tokenizer.pieces import encode_pieces

MODEL = "llama-3.1-8b"
PROMPT = [7, 1, 9] * 20


async def serve(window: float = 0.003, **fields) -> list[messages.StreamEvent]:
    clock = VirtualClock()
    bundle = [BundleModel(BUILTIN_MODELS[MODEL], DeploymentConfig.parse("ss8192-bs4"))]
    engine = NodeEngine(BUILTIN_PROFILES["sn40l-16"], bundle, now=clock.monotonic(), preload=[MODEL])
    sent: list[messages.StreamEvent] = []

    async def publish(reply: str, data: bytes) -> None:
        sent.append(messages.stream_decoder.decode(data))

    driver = EngineDriver(engine, clock, publish, "n0", coalesce_window=window)
    await driver.submit(messages.GenerateRequest(request_id="r", model=MODEL, prompt_token_ids=PROMPT, **fields), "reply")
    for _ in range(10_000):
        if not driver.in_flight:
            break
        clock.advance(max(0.0, await driver.tick() - clock.monotonic()))
    assert not driver.in_flight and not engine._requests  # the engine let go of it too
    return [e for e in sent if not isinstance(e, (messages.Alive, messages.Accepted, messages.Started))]


def text_ids_finish(events: list[messages.StreamEvent]) -> tuple[str, list[int], messages.Finished]:
    tokens = [e for e in events if isinstance(e, messages.Tokens)]
    expected = 0
    for e in tokens:
        assert e.index == expected
        expected += len(e.token_ids)
    assert isinstance(events[-1], messages.Finished)
    return "".join(e.text for e in tokens), [i for e in tokens for i in e.token_ids], events[-1]


async def test_a_planned_completion_is_emitted_as_planned() -> None:
    plan = encode_pieces('{"location": "Paris, FR", "unit": "celsius"}')
    text, ids, fin = text_ids_finish(await serve(max_tokens=100, output_token_ids=plan, ignore_eos=True))
    assert ids == plan and text == decode_output(plan) and (fin.finish_reason, fin.completion_tokens) == ("stop", len(plan))
    text, ids, fin = text_ids_finish(await serve(max_tokens=5, output_token_ids=plan))
    assert ids == plan[:5] and (fin.finish_reason, fin.completion_tokens) == ("length", 5)


@pytest.mark.parametrize("window", [0.0, 0.003])
async def test_a_stop_string_ends_the_stream_before_it(window: float) -> None:
    free, ids, whole = text_ids_finish(await serve(window, max_tokens=60, ignore_eos=True, seed=5))
    assert len(ids) == 60
    words = free.split(" ")
    stop = " ".join(words[20:22])  # spans two tokens: the first must not leak
    cut = free.index(stop)
    text, got, fin = text_ids_finish(await serve(window, max_tokens=60, ignore_eos=True, seed=5, stop=["zzz", stop]))
    assert text == free[:cut] and stop not in text
    assert fin.finish_reason == "stop" and fin.completion_tokens == len(got) == 21 and got == ids[:21]
    assert fin.prompt_tokens == len(PROMPT)
    assert 0 < fin.energy_j < whole.energy_j  # what its 21 tokens cost, not nothing (issue 19)


async def test_text_held_back_for_a_stop_string_goes_out_at_the_end() -> None:
    free, ids, _ = text_ids_finish(await serve(max_tokens=30, ignore_eos=True, seed=9))
    dangling = free[-2:] + "\x00"  # the end looks like the start of a stop string, which never comes
    text, got, fin = text_ids_finish(await serve(max_tokens=30, ignore_eos=True, seed=9, stop=[dangling]))
    assert text == free and got == ids and fin.finish_reason == "length"


def test_matcher() -> None:
    m = StopMatcher(["END", "xy"])
    assert m.feed("abcE") == ("abc", False)
    assert m.feed("Nq") == ("ENq", False)
    assert m.feed("aEN") == ("a", False)
    assert m.feed("D tail") == ("", True)
    assert StopMatcher(["a"]).feed("bab") == ("b", True)
