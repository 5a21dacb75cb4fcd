"""The live driver against a scripted OpenAI endpoint: what it sends, and how it records each outcome.

The endpoint is the router's own HTTP server with a handler whose answer depends on the
model asked for, so every outcome (streamed ok, 429, 503, 404, an error event after the
first token) is produced on purpose and in milliseconds; tests/fabric covers the real fabric.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator

import pytest

from tierflow.services.router.http_server import Request, Response, StreamingResponse, serve, shutdown
from tierflow.tokenizer import encode, render_chat
from tierflow.workload.conversation import Conversation
from tierflow.workload.live import LiveProgress, run_live, served_models
from tierflow.workload.sessions import CallPlan, SessionPlan, ToolPlan

CACHED = 7


def _sse(obj: object) -> bytes:
    return b"data: " + json.dumps(obj).encode() + b"\n\n"


def _chunk(request_id: str, delta: dict[str, str], finish: str | None = None) -> dict[str, object]:
    return {"id": request_id, "object": "chat.completion.chunk", "created": 0, "model": "m", "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}


def _error(status: int, code: str) -> Response:
    return Response(status, json.dumps({"error": {"message": code, "type": "test", "param": None, "code": code}}).encode())


class ScriptedEndpoint:
    """Answers by model: `ok` streams max_tokens one-token words; the others fail as named."""

    def __init__(self) -> None:
        self.bodies: list[dict[str, object]] = []
        self.headers: list[dict[str, str]] = []

    async def __call__(self, request: Request) -> Response | StreamingResponse:
        if request.method == "GET" and request.path == "/v1/models":
            return Response(200, json.dumps({"object": "list", "data": [{"id": "ok", "object": "model", "created": 0, "owned_by": "t"}]}).encode())
        body = json.loads(request.body)
        self.bodies.append(body)
        self.headers.append(request.headers)
        model = body["model"]
        if model == "busy":
            return _error(429, "rate_limit_exceeded")
        if model == "gone":
            return _error(503, "no_capacity")
        if model == "missing":
            return _error(404, "model_not_found")
        request_id = f"chatcmpl-{len(self.bodies)}"
        prompt = len(encode(render_chat([(m["role"], m["content"]) for m in body["messages"]])))
        return StreamingResponse(200, self._stream(request_id, model, body["max_tokens"], prompt), headers=(("x-request-id", request_id), ("x-tierflow-node", "decode-7"), ("x-tierflow-tier", "ddr")))

    async def _stream(self, request_id: str, model: str, max_tokens: int, prompt: int) -> AsyncIterator[bytes]:
        yield _sse(_chunk(request_id, {"role": "assistant", "content": ""}))
        for _ in range(max_tokens if model == "ok" else 1):
            yield _sse(_chunk(request_id, {"content": " ba"}))
        if model == "midway":
            yield _sse({"error": {"message": "node lost", "type": "node_failure", "param": None, "code": "node_lost"}})
            return
        yield _sse(_chunk(request_id, {}, "length"))
        usage = {"prompt_tokens": prompt, "completion_tokens": max_tokens, "total_tokens": prompt + max_tokens, "prompt_tokens_details": {"cached_tokens": CACHED}}
        yield _sse({"id": request_id, "object": "chat.completion.chunk", "created": 0, "model": model, "choices": [], "usage": usage})
        yield b"data: [DONE]\n\n"


def _session(index: int, start: float, *steps: CallPlan | ToolPlan, think_s: float = 0.0, workload: str | None = None) -> SessionPlan:
    return SessionPlan(f"s{index:06d}", f"tenant{index}", f"key{index}", workload, "flow", start, " the task", steps, think_s)


def _call(index: int, model: str, max_tokens: int = 3, system: str = " be brief") -> CallPlan:
    return CallPlan(index, model, "role", system, max_tokens)


PLANS = [
    _session(0, 0.0, _call(0, "ok"), ToolPlan(1, "search", 0.05, " found it"), _call(2, "ok", 2, ""), think_s=0.05, workload="interactive"),
    _session(1, 0.02, _call(0, "busy"), _call(1, "ok")),
    _session(2, 0.04, _call(0, "gone")),
    _session(3, 0.06, _call(0, "midway")),
    _session(4, 0.08, _call(0, "missing")),
]


@pytest.fixture
async def endpoint() -> AsyncIterator[tuple[str, ScriptedEndpoint]]:
    script = ScriptedEndpoint()
    server = await serve(script, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}/v1", script
    finally:
        await shutdown(server, 1.0)


async def test_each_outcome_is_recorded_and_a_failed_step_ends_its_session(endpoint: tuple[str, ScriptedEndpoint]) -> None:
    url, script = endpoint
    seen: list[tuple[int, int, int]] = []
    run = await run_live(PLANS, base_url=url, on_progress=lambda p: seen.append((p.done, p.skipped, p.in_flight)))
    by_key = {(r.session_id, r.step): r for r in run.records}
    assert sorted(by_key) == [("s000000", 0), ("s000000", 2), ("s000001", 0), ("s000002", 0), ("s000003", 0), ("s000004", 0)]

    first, second = by_key["s000000", 0], by_key["s000000", 2]
    assert (first.outcome, first.status, first.node, first.tier, first.cached_tokens) == ("ok", 200, "decode-7", "ddr", CACHED)
    assert first.request_id.startswith("chatcmpl-") and first.completion_tokens == 3 and (first.tenant, first.flow) == ("tenant0", "flow")
    assert first.sent_at <= first.first_token_at <= first.finished_at  # type: ignore[operator]
    # The second call carries the history: task, the first reply, the tool's output (no system prompt).
    conversation = Conversation(" the task")
    conversation.record(PLANS[0].steps[0], " ba ba ba")  # type: ignore[arg-type]
    conversation.record(PLANS[0].steps[1], " found it")  # type: ignore[arg-type]
    assert second.prompt_tokens == conversation.prompt_tokens("") and second.completion_tokens == 2
    # think 0.05 + tool 0.05 + think 0.05 between the first reply and the second call.
    assert second.sent_at - first.finished_at >= 0.15  # type: ignore[operator]

    assert [(by_key[s, 0].outcome, by_key[s, 0].status, by_key[s, 0].error) for s in ("s000001", "s000002", "s000004")] == [
        ("rejected", 429, "rate_limit_exceeded"), ("rejected", 503, "no_capacity"), ("error", 404, "model_not_found"),
    ]  # fmt: skip
    midway = by_key["s000003", 0]
    assert (midway.outcome, midway.status, midway.error) == ("error", 200, "node_lost")
    assert midway.first_token_at is not None and midway.finished_at is None and midway.completion_tokens == 1

    for plan in PLANS:  # open loop: no session starts before its time
        assert min(r.sent_at for r in run.records if r.session_id == plan.session_id) >= plan.start
    final = run.progress
    assert (final.planned, final.done, final.ok, final.rejected, final.errors, final.skipped, final.in_flight) == (7, 6, 2, 2, 2, 1, 0)
    assert final.sessions_started == 5 and seen[-1] == (6, 1, 0) and max(s[2] for s in seen) >= 1
    assert run.wall_s >= 0.15


async def test_what_the_driver_sends(endpoint: tuple[str, ScriptedEndpoint]) -> None:
    url, script = endpoint
    await run_live(PLANS[:2], base_url=url)
    sent = {(b["user"], len(b["messages"])): (b, h) for b, h in zip(script.bodies, script.headers, strict=True)}  # type: ignore[misc]
    body, headers = sent["s000000", 2]
    assert body["messages"] == [{"role": "system", "content": " be brief"}, {"role": "user", "content": " the task"}]
    assert (body["model"], body["max_tokens"], body["stream"], body["ignore_eos"]) == ("ok", 3, True, True)
    assert body["stream_options"] == {"include_usage": True}
    assert headers["authorization"] == "Bearer key0" and headers["x-tierflow-workload"] == "interactive"
    later, _ = sent["s000000", 3]  # the same session's next call: same `user`, so the router keeps it on its node
    assert [m["role"] for m in later["messages"]] == ["user", "assistant", "user"]  # type: ignore[union-attr]
    _, other = sent["s000001", 2]
    assert other["authorization"] == "Bearer key1" and "x-tierflow-workload" not in other
    assert await served_models(url, "any") == {"ok"}


async def test_a_stop_ends_the_run_early_and_keeps_what_finished(endpoint: tuple[str, ScriptedEndpoint]) -> None:
    url, _ = endpoint
    plans = [_session(0, 0.0, _call(0, "ok")), _session(1, 0.0, _call(0, "ok"), ToolPlan(1, "slow", 30.0, " x"), _call(2, "ok")), _session(2, 30.0, _call(0, "ok"))]
    stop = asyncio.Event()

    def stop_once_both_first_calls_are_done(progress: LiveProgress) -> None:
        # On the event, not on a timer: a slow CI box may take longer than any fixed delay
        # for its first two calls (the client's first connection), and the test would race.
        if progress.done == 2:
            stop.set()

    run = await run_live(plans, base_url=url, stop=stop, on_progress=stop_once_both_first_calls_are_done)
    assert run.stopped_early and run.wall_s < 5.0
    assert sorted((r.session_id, r.step, r.outcome) for r in run.records) == [("s000000", 0, "ok"), ("s000001", 0, "ok")]
    assert (run.progress.planned, run.progress.done, run.progress.sessions_started, run.progress.in_flight) == (4, 2, 2, 0)
