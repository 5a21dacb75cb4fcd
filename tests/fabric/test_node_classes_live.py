"""A request's class, from the client's `x-tierflow-class` header through the router's
GenerateRequest to the node's engine: the decode nodes count its queue time under it."""

from __future__ import annotations

import openai
import pytest
from test_fabric_dashboard import eventually, metrics_ports, samples, scrape

pytestmark = pytest.mark.fabric

MODEL = "llama-3.1-8b"
DECODE = ("decode-0", "decode-1")


def queued_by_class(ports: dict[str, int]) -> dict[str, float]:
    out: dict[str, float] = {}
    for name in DECODE:
        for s in samples(scrape(ports[name])):
            if s.name == "tierflow_node_class_queue_time_seconds_count":
                out[s.labels["request_class"]] = out.get(s.labels["request_class"], 0.0) + s.value
    return out


def test_a_requests_class_reaches_the_node(fabric) -> None:  # noqa: ANN001
    ports = metrics_ports(fabric)
    before = queued_by_class(ports)
    client = openai.OpenAI(base_url=fabric.base_url, api_key="classes", max_retries=0, timeout=30)
    for i in range(3):
        r = client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": f"class check {i}"}], max_tokens=2,
            extra_headers={"x-tierflow-class": "batch"},
        )  # fmt: skip
        assert r.usage is not None
    r = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "class check"}], max_tokens=2, service_tier="flex")
    assert r.usage is not None  # OpenAI's "flex" tier is the batch class

    def counted() -> bool:
        return queued_by_class(ports).get("batch", 0.0) - before.get("batch", 0.0) >= 4

    eventually(counted)
    after = queued_by_class(ports)
    assert after.get("batch", 0.0) - before.get("batch", 0.0) == 4
    assert after.get("interactive", 0.0) == before.get("interactive", 0.0)
    text = scrape(ports["decode-0"])
    assert 'tierflow_node_queue_depth{node="decode-0",request_class="interactive"}' in text
    assert "tierflow_node_preemptions_total" in text
