"""The `nats_url` / `nats_client` fixtures give a real server, with JetStream on."""

from __future__ import annotations

import asyncio
import uuid

import nats
from nats.aio.client import Client as NatsClient


async def test_publish_subscribe_round_trip(nats_client: NatsClient) -> None:
    """A message published on a subject reaches a subscriber on it, byte for byte."""
    subject = f"tierflow.test.echo.{uuid.uuid4().hex}"
    sub = await nats_client.subscribe(subject)
    await nats_client.publish(subject, b"hello fabric")
    await nats_client.flush()
    msg = await sub.next_msg(timeout=2)
    assert msg.subject == subject
    assert msg.data == b"hello fabric"


async def test_request_reply_between_two_connections(nats_url: str, nats_client: NatsClient) -> None:
    """Two independent connections to the session server can do request/reply."""
    subject = f"tierflow.test.rpc.{uuid.uuid4().hex}"

    async def answer(msg: nats.aio.msg.Msg) -> None:
        await msg.respond(msg.data.upper())

    other = await nats.connect(nats_url)
    try:
        await other.subscribe(subject, cb=answer)
        # Twice on purpose: nats-py 2.16's flush() writes its PING straight to the socket
        # while the SUB may still sit in the pending buffer, so one PONG does not prove the
        # server has the subscription (~0.3% "no responders" here). The second PING is
        # queued behind the SUB that the flusher wrote during the first round trip.
        await other.flush()
        await other.flush()
        reply = await nats_client.request(subject, b"ping", timeout=2)
        assert reply.data == b"PING"
    finally:
        await other.drain()


async def test_jetstream_key_value_put_get(nats_client: NatsClient) -> None:
    """JetStream is enabled: a KV bucket can be created, written and read back."""
    js = nats_client.jetstream()
    bucket = f"tierflow_test_{uuid.uuid4().hex[:12]}"
    kv = await asyncio.wait_for(js.create_key_value(bucket=bucket), 5)
    try:
        revision = await kv.put("model.llama-3.1-8b", b"hbm")
        entry = await kv.get("model.llama-3.1-8b")
        assert entry.value == b"hbm"
        assert entry.revision == revision
    finally:
        await js.delete_key_value(bucket)
