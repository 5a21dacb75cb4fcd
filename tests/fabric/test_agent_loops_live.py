"""Agent-loop policing through the live router: a runaway loop, sent with the official
`openai` client, is warned in a header, then refused with a 403 naming the policy, and
both are published on NATS (what the observer identity sees)."""

from __future__ import annotations

import asyncio
import random

import grpc
import nats
import openai
import pytest
from google.rpc import error_details_pb2, status_pb2

from tierflow.contracts import events, subjects
from tierflow.tokenizer import OUTPUT_VOCAB
from tierflow.v1 import inference_pb2 as pb
from tierflow.v1 import inference_pb2_grpc as pb_grpc

pytestmark = pytest.mark.fabric

MODEL = "llama-3.1-8b"
CONFIG = """
tenants:
  - name: looper
    api_keys: [sk-loop]
    agent_loops:
      max_steps: 4
      action: reject
      runaway: {window: 2, min_growth: 300, min_repeated: 0.5, action: warn}
"""


def _words(rng: random.Random, n: int) -> str:
    """`n` tokens exactly: every OUTPUT_VOCAB word is one token."""
    return "".join(rng.choices(OUTPUT_VOCAB, k=n))


async def test_a_runaway_loop_is_warned_then_capped_and_the_events_arrive(tmp_path, fabric_factory, repo_root) -> None:
    config = tmp_path / "router-config.yaml"
    config.write_text(CONFIG)
    fabric = fabric_factory(
        tmp_path, "--fleet", str(repo_root / "loadtest/fleets/zero.yaml"), "--deployment", "zero", "--decode-nodes", "1", "--prefill-nodes", "0",
        "--actuator", "none", env={"TIERFLOW_CONFIG": str(config)},
    )  # fmt: skip
    try:
        nc = await nats.connect(fabric.nats_urls, **fabric.nats_options("observer"))
        received: list[tuple[str, events.AgentLoopEvent]] = []

        async def on_event(msg) -> None:  # type: ignore[no-untyped-def]
            received.append((msg.subject, events.agent_loop_decoder.decode(msg.data)))

        await nc.subscribe(subjects.AGENT_LOOP_EVENTS, cb=on_event)
        await nc.flush()
        client = openai.AsyncOpenAI(base_url=fabric.base_url, api_key="sk-loop", max_retries=0, timeout=30)
        rng = random.Random(7)
        messages = [{"role": "system", "content": _words(rng, 1900)}, {"role": "user", "content": _words(rng, 100)}]
        headers: list[str | None] = []
        for _ in range(4):  # an agent loop: each step re-sends everything and adds ~800 tokens of tool output
            raw = await client.chat.completions.with_raw_response.create(
                model=MODEL, messages=messages, max_tokens=4, extra_headers={"x-session-id": "agent-7"},  # type: ignore[arg-type]
            )  # fmt: skip
            headers.append(raw.headers.get("x-tierflow-agent-loop"))
            reply = raw.parse().choices[0].message.content or ""
            messages += [{"role": "assistant", "content": reply}, {"role": "user", "content": _words(rng, 800)}]
        assert headers[:2] == [None, None]
        assert headers[2] is not None and headers[2].startswith("runaway; action=warn; steps=3; tokens=")
        assert headers[3] is not None and headers[3].startswith("runaway; action=warn; steps=4; ")
        with pytest.raises(openai.PermissionDeniedError) as refused:
            await client.chat.completions.create(model=MODEL, messages=messages, max_tokens=4, extra_headers={"x-session-id": "agent-7"})  # type: ignore[arg-type]
        body = refused.value.body
        assert refused.value.status_code == 403 and isinstance(body, dict) and body["code"] == "agent_loop_limit"
        assert "agent_loops.max_steps is 4 and this would be step 5" in body["message"] and "'agent-7' of tenant 'looper'" in body["message"]

        # The same session over gRPC: PERMISSION_DENIED, the code as the ErrorInfo reason.
        async with grpc.aio.insecure_channel(f"{fabric.host}:{fabric.grpc_port}") as channel:
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await pb_grpc.InferenceStub(channel).GenerateUnary(
                    pb.GenerateRequest(model=MODEL, prompt="go on", max_tokens=4, session_id="agent-7"), metadata=(("authorization", "Bearer sk-loop"),), timeout=10,
                )  # fmt: skip
        assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
        details = status_pb2.Status.FromString(dict(err.value.trailing_metadata())["grpc-status-details-bin"]).details  # type: ignore[arg-type]
        info = error_details_pb2.ErrorInfo()
        assert details[0].Unpack(info) and info.reason == "agent_loop_limit"

        for _ in range(100):
            if len(received) >= 2:
                break
            await asyncio.sleep(0.05)
        assert [(s, e.kind, e.limit, e.action, e.steps, e.session) for s, e in received] == [
            ("tierflow.events.agent_loop.looper", "flagged", "runaway", "warn", 3, "looper/agent-7"),
            ("tierflow.events.agent_loop.looper", "capped", "max_steps", "reject", 5, "looper/agent-7"),
        ]  # fmt: skip
        assert received[0][1].repeated >= 0.5 and received[0][1].router_id
        await nc.close()
        assert fabric.router_metric("tierflow_router_agent_loop_refused_total", tenant="looper", policy="max_steps", action="reject") == 2
        warned = [r for r in fabric.request_records(at_least=6) if r.get("agent_loop", "").startswith("runaway")]
        assert len(warned) == 2 and all(r["session"] == "looper/agent-7" for r in warned)
    finally:
        fabric.stop()
