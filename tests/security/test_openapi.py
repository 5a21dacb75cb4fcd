"""/openapi.json describes what the router answers: every route, every $ref resolvable."""

from __future__ import annotations

import json
from typing import Any

from prometheus_client import CollectorRegistry

from tierflow.placement.tables import ModelTable, NodeTable
from tierflow.runtime.clock import VirtualClock
from tierflow.services.router.metrics import RouterMetrics
from tierflow.services.router.openai_api import OpenAIApi
from tierflow.services.router.openapi import PATHS, openapi_document, openapi_json


def test_every_route_is_documented_and_nothing_else() -> None:
    api = OpenAIApi(None, ModelTable(), NodeTable(), VirtualClock(), RouterMetrics(CollectorRegistry()), CollectorRegistry(), nats_connected=lambda: True)  # type: ignore[arg-type]
    assert set(PATHS) == api.paths


def _refs(node: Any) -> list[str]:
    if isinstance(node, dict):
        return [node["$ref"]] if "$ref" in node else [r for v in node.values() for r in _refs(v)]
    if isinstance(node, list):
        return [r for v in node for r in _refs(v)]
    return []


def test_the_document_is_openapi_31_and_its_refs_resolve() -> None:
    document = json.loads(openapi_json())
    assert document == json.loads(json.dumps(openapi_document()))
    assert document["openapi"] == "3.1.0"
    schemas = document["components"]["schemas"]
    for ref in _refs(document):
        assert ref.startswith("#/components/schemas/") and ref.rsplit("/", 1)[1] in schemas, ref
    chat = schemas["ChatCompletionRequest"]["properties"]
    assert chat["messages"]["maxItems"] == 4096  # the limits are in the document
