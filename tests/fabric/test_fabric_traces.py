"""One connected trace per request across the router and decode-node processes.

The fabric runs with TIERFLOW_TRACE_DIR, so every process writes its spans as JSON lines;
the test reads them all and links each node span to its router span through the W3C
traceparent carried in the NATS headers.
"""

from __future__ import annotations

import json
import time
from collections import defaultdict

import openai
import pytest

pytestmark = pytest.mark.fabric


def test_each_request_is_one_trace_from_router_process_to_node_process(tmp_path_factory, fabric_factory) -> None:
    trace_dir = tmp_path_factory.mktemp("traces")
    fabric = fabric_factory(tmp_path_factory.mktemp("traced"), "--prefill-nodes", "0", "--actuator", "none", env={"TIERFLOW_TRACE_DIR": str(trace_dir)})
    try:
        client = openai.OpenAI(base_url=fabric.base_url, api_key="k", max_retries=0, timeout=30)
        ids = []
        for i in range(4):
            raw = client.chat.completions.with_raw_response.create(model="llama-3.1-8b", messages=[{"role": "user", "content": f"trace {i}"}], max_tokens=3)
            ids.append(raw.headers["x-request-id"])
        time.sleep(1.0)  # the batch span processors flush every 200 ms
    finally:
        fabric.stop()
    spans_by_file: dict[str, list[dict]] = defaultdict(list)
    for path in trace_dir.glob("*.jsonl"):
        spans_by_file[path.name.split("-")[0]].extend(json.loads(line) for line in path.read_text().splitlines() if line.strip())
    router = [s for s in spans_by_file["router"] if s["attributes"].get("tierflow.request_id") in ids]
    nodes = [s for name, spans in spans_by_file.items() if name == "decode" for s in spans if s["attributes"].get("tierflow.request_id") in ids]
    assert len(router) == 4 and len(nodes) == 4, (len(router), len(nodes), list(spans_by_file))
    for r in router:
        (child,) = [n for n in nodes if n["attributes"]["tierflow.request_id"] == r["attributes"]["tierflow.request_id"]]
        assert child["context"]["trace_id"] == r["context"]["trace_id"]
        # router SERVER span -> its PRODUCER span for the NATS publish -> the node's CONSUMER span
        (send,) = [s for s in spans_by_file["router"] if s["context"]["span_id"] == child["parent_id"]]
        assert send["parent_id"] == r["context"]["span_id"] and send["kind"].endswith("PRODUCER"), send
        assert r["resource"]["attributes"]["service.name"] == "tierflow-router"
        assert child["resource"]["attributes"]["service.name"] == "tierflow-decode-node"
    assert len({r["context"]["trace_id"] for r in router}) == 4
