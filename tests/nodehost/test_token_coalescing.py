"""Token coalescing on the node: a stream's tokens produced within `coalesce_window` of its
last Tokens message go out together, its first token at once, nothing held past the
window or the stream's end, indices exact. Driven turn by turn (`EngineDriver.tick`) on
a virtual clock, so the times are the engine's and the test is deterministic."""

from __future__ import annotations

from tierflow.contracts import messages
from tierflow.nodehost.driver import EngineDriver
from tierflow.rdu import BUILTIN_MODELS, BUILTIN_PROFILES, BundleModel, DeploymentConfig, NodeEngine
from tierflow.runtime.clock import VirtualClock

MODEL = "llama-3.1-8b"  # about 1 ms a decode step on sn40l-16


async def serve(window: float, *, requests: int = 2, max_tokens: int = 40, most: int = 64) -> list[tuple[float, str, messages.StreamEvent]]:
    """Every message published, with the virtual time it went out."""
    clock = VirtualClock()
    bundle = [BundleModel(BUILTIN_MODELS[MODEL], DeploymentConfig.parse("ss8192-bs4"))]
    engine = NodeEngine(BUILTIN_PROFILES["sn40l-16"], bundle, now=clock.monotonic(), preload=[MODEL])
    sent: list[tuple[float, str, messages.StreamEvent]] = []

    async def publish(reply: str, data: bytes) -> None:
        sent.append((clock.monotonic(), reply, messages.stream_decoder.decode(data)))

    driver = EngineDriver(engine, clock, publish, "n0", coalesce_window=window, coalesce_tokens=most)
    for i in range(requests):
        request = messages.GenerateRequest(request_id=f"r{i}", model=MODEL, prompt_token_ids=[7, i, 9] * 20, max_tokens=max_tokens, ignore_eos=True)
        await driver.submit(request, f"reply.{i}")
    for _ in range(10_000):  # turns: a driver that stops progressing fails, not hangs
        if not driver.in_flight:
            break
        nxt = await driver.tick()
        clock.advance(max(0.0, nxt - clock.monotonic()))
    assert not driver.in_flight
    return sent


def stream_of(sent: list[tuple[float, str, messages.StreamEvent]], reply: str) -> list[tuple[float, messages.StreamEvent]]:
    return [(t, e) for t, r, e in sent if r == reply and not isinstance(e, messages.Alive)]


def tokens_of(stream: list[tuple[float, messages.StreamEvent]]) -> list[tuple[float, messages.Tokens]]:
    return [(t, e) for t, e in stream if isinstance(e, messages.Tokens)]


async def test_tokens_within_the_window_go_out_together_the_first_at_once() -> None:
    plain = await serve(0.0)
    coalesced = await serve(0.003)
    for reply in ("reply.0", "reply.1"):
        one_by_one, merged = stream_of(plain, reply), stream_of(coalesced, reply)
        # the same stream, token for token, and the same lifecycle around it
        assert [type(e) for _, e in merged if not isinstance(e, messages.Tokens)] == [messages.Started, messages.Finished]
        ids = [i for _, e in tokens_of(merged) for i in e.token_ids]
        assert ids == [i for _, e in tokens_of(one_by_one) for i in e.token_ids] and len(ids) == 40
        assert "".join(e.text for _, e in tokens_of(merged)) == "".join(e.text for _, e in tokens_of(one_by_one))
        # exact indices: each message starts where the previous one ended
        expected = 0
        for _, e in tokens_of(merged):
            assert e.index == expected
            expected += len(e.token_ids)
        # the first token is not delayed: it leaves when it would without coalescing
        (first_plain_at, first_plain), (first_at, first) = tokens_of(one_by_one)[0], tokens_of(merged)[0]
        assert first_at == first_plain_at and first.token_ids == first_plain.token_ids == [ids[0]]
        # one message per step without coalescing; a few tokens per message with it
        assert len(tokens_of(one_by_one)) == 40
        assert len(tokens_of(merged)) <= 40 // 2
        # nothing held past the window after the message before, nor past the finish
        sent_at = [t for t, _ in tokens_of(merged)]
        plain_at = {e.index: t for t, e in tokens_of(one_by_one)}
        last = -1.0
        for t, e in tokens_of(merged):
            produced = plain_at[e.index]  # when its first token was produced
            assert t <= max(produced, last + 0.003) + 1e-12
            last = t
        finished_at = next(t for t, e in merged if isinstance(e, messages.Finished))
        assert finished_at == sent_at[-1] == max(plain_at.values())


async def test_a_stream_slower_than_the_window_is_never_held() -> None:
    plain = await serve(0.0, requests=1)
    short = await serve(0.0002, requests=1)  # a decode step takes longer than this
    assert [(t, e.index, e.token_ids) for t, e in tokens_of(stream_of(short, "reply.0"))] == [
        (t, e.index, e.token_ids) for t, e in tokens_of(stream_of(plain, "reply.0"))
    ]


async def test_the_token_count_bounds_a_message() -> None:
    sent = await serve(1.0, requests=1, max_tokens=30, most=8)
    sizes = [len(e.token_ids) for _, e in tokens_of(stream_of(sent, "reply.0"))]
    assert sizes[0] == 1 and max(sizes) <= 8 and sum(sizes) == 30


async def test_a_request_that_waits_is_accepted_at_once_one_that_starts_needs_no_accepted() -> None:
    """Four batch slots, six requests: the four that start at once say Started first (it
    stands for Accepted), the two that queue say Accepted in the same turn, Started later."""
    sent = await serve(0.003, requests=6, max_tokens=3)
    for i in range(6):
        lifecycle = [(t, type(e)) for t, e in stream_of(sent, f"reply.{i}") if not isinstance(e, messages.Tokens)]
        if i < 4:
            assert [k for _, k in lifecycle] == [messages.Started, messages.Finished]
        else:
            assert [k for _, k in lifecycle] == [messages.Accepted, messages.Started, messages.Finished]
            assert lifecycle[0][0] == 0.0 < lifecycle[1][0]  # accepted on arrival, started once a slot freed
