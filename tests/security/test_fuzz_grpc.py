"""The gRPC APIs under hostile input: tierflow.v1.Inference (router) and ModelRegistry.

Random and truncated protobuf bytes on every method through a raw channel (no
serializer), then well-typed requests with hostile values (huge strings, NaN and
negative numbers, unknown names, YAML and JSON bombs). No answer may be UNKNOWN or
INTERNAL (our bug, not the caller's), and both servers must still answer normally after.
Calls to the registry carry the admin token (else they would stop at UNAUTHENTICATED).
"""

from __future__ import annotations

import json
import math
import random
import urllib.request
from collections.abc import Callable, Iterator
from typing import Any

import grpc
import pytest

from tierflow.harness import Fabric
from tierflow.runtime.admin_token import admin_metadata, admin_token_path
from tierflow.v1 import inference_pb2 as ipb
from tierflow.v1 import inference_pb2_grpc as igrpc
from tierflow.v1 import registry_pb2 as rpb
from tierflow.v1 import registry_pb2_grpc as rgrpc

pytestmark = pytest.mark.fabric

OUR_BUGS = {grpc.StatusCode.UNKNOWN, grpc.StatusCode.INTERNAL}
MODEL = "llama-3.1-8b"


@pytest.fixture(scope="module")
def channels(fabric: Fabric) -> Iterator[tuple[grpc.Channel, grpc.Channel, tuple[tuple[str, str], ...]]]:
    router = grpc.insecure_channel(f"{fabric.host}:{fabric.grpc_port}")
    registry = grpc.insecure_channel(f"{fabric.host}:{fabric.registry_grpc_port}")
    token = admin_token_path(fabric.data_dir)
    metadata = tuple(admin_metadata(token.read_text().strip())) if token.exists() else ()
    yield router, registry, metadata
    router.close()
    registry.close()


def _code(call: Callable[[], Any]) -> grpc.StatusCode:
    """The status a call ends with (OK when it returns); a stream is read to its end."""
    try:
        result = call()
        if isinstance(result, Iterator) or hasattr(result, "__next__"):
            for _ in result:
                pass
    except grpc.RpcError as err:
        return err.code()  # type: ignore[no-any-return]
    return grpc.StatusCode.OK


def _methods(module: Any, service: str) -> list[tuple[str, bool]]:
    described = module.DESCRIPTOR.services_by_name[service]
    return [(f"/{described.full_name}/{m.name}", m.server_streaming) for m in described.methods]


def _garbage(rng: random.Random, valid: bytes) -> list[bytes]:
    """Bytes no honest client sends: random, truncated valid messages, lying lengths,
    endless varints, unknown and wrongly typed fields."""
    out = [rng.randbytes(rng.randint(1, 300)) for _ in range(12)]
    out += [valid[:i] for i in range(1, len(valid), max(1, len(valid) // 6))]
    out += [
        b"\x0a\xff\xff\xff\xff\x0f" + b"a" * 10,  # field 1, a 4 GiB string
        b"\x20" + b"\xff" * 11,  # a varint longer than 64 bits
        b"\x0b\x0c",  # a group: start and end tags
        b"\xfa\xff\xff\xff\x0f\x01x",  # field 2**28, length-delimited
        b"\x0a\x02\xc3\x28",  # field 1 as a string: invalid UTF-8
        b"\x25\x00\x00\xc0\x7f",  # float field 4 = NaN, as fixed32
        valid + b"\x00",
    ]
    return out


def test_malformed_protobuf_bytes_are_invalid_argument_everywhere(channels: Any) -> None:
    router, registry, metadata = channels
    rng = random.Random(15)
    valid = {
        "Inference": ipb.GenerateRequest(model=MODEL, prompt="hello", max_tokens=2).SerializeToString(),
        "ModelRegistry": rpb.GetModelRequest(name=MODEL).SerializeToString(),
    }
    bad: list[tuple[str, bytes, grpc.StatusCode]] = []
    calls = 0
    for channel, module, service, meta in ((router, ipb, "Inference", ()), (registry, rpb, "ModelRegistry", metadata)):
        for path, streaming in _methods(module, service):
            make = channel.unary_stream if streaming else channel.unary_unary
            method = make(path, request_serializer=None, response_deserializer=None)
            for data in _garbage(rng, valid[service]):
                code = _code(lambda: method(data, timeout=10, metadata=meta))
                calls += 1
                if code in OUR_BUGS:
                    bad.append((path, data[:40], code))
    assert not bad, f"{len(bad)} of {calls} calls: {bad[:5]}"


def _hostile_generation() -> list[ipb.GenerateRequest]:
    chat = ipb.ChatMessages
    message = ipb.ChatMessage
    return [
        ipb.GenerateRequest(model="m" * 1_000_000, prompt="x"),
        ipb.GenerateRequest(model="\x00/../$", prompt="x"),
        ipb.GenerateRequest(model=MODEL, prompt="word " * 700_000, max_tokens=2),  # over the context: refused in windows
        ipb.GenerateRequest(model=MODEL, prompt="x", max_tokens=2**32 - 1),
        ipb.GenerateRequest(model=MODEL, prompt="x", max_tokens=2, temperature=math.nan),
        ipb.GenerateRequest(model=MODEL, prompt="x", max_tokens=2, temperature=-1.0),
        ipb.GenerateRequest(model=MODEL, prompt="x", max_tokens=2, temperature=math.inf),
        ipb.GenerateRequest(model=MODEL, prompt="x", max_tokens=2, seed=-(2**63)),
        ipb.GenerateRequest(model=MODEL, prompt="x", max_tokens=2, session_id="s" * 100_000, user="u" * 100_000),
        ipb.GenerateRequest(model=MODEL, messages=chat(messages=[message(role="user", content="x")] * 5000), max_tokens=2),
        ipb.GenerateRequest(model=MODEL, messages=chat(messages=[message(role="r" * 10_000, content="x")]), max_tokens=2),
        ipb.GenerateRequest(model=MODEL, messages=chat(messages=[]), max_tokens=2),
        ipb.GenerateRequest(model=MODEL, max_tokens=2),  # neither prompt nor messages
        ipb.GenerateRequest(model=MODEL, prompt="\udcff".encode("utf-8", "surrogatepass").decode("utf-8", "replace"), max_tokens=2),
    ]


def _bomb_yaml() -> list[str]:
    laughs = "a: &a [x, x, x, x, x, x, x, x, x]\n" + "".join(f"{chr(98 + i)}: &{chr(98 + i)} [*{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}]\n" for i in range(8))
    return [
        laughs,  # a billion laughs: 9**9 strings if expanded
        "models: " + "[" * 5000 + "]" * 5000,
        "models:\n" + "".join(f"  - name: m{i}\n    versions: []\n" for i in range(20_000)),
        "\x00\x01\x02 not yaml: [",
        "!!python/object/apply:os.system ['true']",
        json.dumps({"models": [{"name": "x" * 100_000, "versions": [{"version": "v", "spec": {"a": 1}}], "default_version": "v"}]}),
    ]


def _hostile_registry() -> list[tuple[str, Any]]:
    weight = rpb.TrafficWeight
    deep_json = '{"a":' * 5000 + "1" + "}" * 5000
    return [
        *(("Apply", rpb.ApplyRequest(fleet_yaml=text, dry_run=True, source="fuzz")) for text in _bomb_yaml()),
        ("GetModel", rpb.GetModelRequest(name="n" * 1_000_000)),
        ("GetModel", rpb.GetModelRequest(name="model.>*")),
        ("Rollout", rpb.RolloutRequest(model="no-such-model", version="v2", weight=50)),
        ("Rollout", rpb.RolloutRequest(model=MODEL, version="no-such-version", weight=math.nan)),
        ("Rollout", rpb.RolloutRequest(model=MODEL, version="v1", weight=-1e308)),
        ("Rollout", rpb.RolloutRequest(model=MODEL, version="v1", weight=math.inf, expected_revision=-5)),
        ("SetTraffic", rpb.SetTrafficRequest(model=MODEL, traffic=[weight(version="v1", weight=math.nan)])),
        ("SetTraffic", rpb.SetTrafficRequest(model=MODEL, traffic=[weight(version="v1", weight=-3.0)])),
        ("SetTraffic", rpb.SetTrafficRequest(model=MODEL, traffic=[weight(version=f"v{i}", weight=1.0) for i in range(10_000)])),
        ("Promote", rpb.PromoteRequest(model=MODEL, version="\x00")),
        ("Rollback", rpb.RollbackRequest(model="", expected_revision=2**62)),
        ("AddModelVersion", rpb.AddModelVersionRequest(model=MODEL, version=rpb.ModelVersion(version="fuzz", spec_json=deep_json))),
        ("AddModelVersion", rpb.AddModelVersionRequest(model=MODEL, version=rpb.ModelVersion(version="fuzz", spec_json="{not json"))),
        ("AddModelVersion", rpb.AddModelVersionRequest(model=MODEL, version=rpb.ModelVersion(version="", configs=["ss-1-bs0"] * 1000))),
        ("AddModelVersion", rpb.AddModelVersionRequest(model=MODEL, version=rpb.ModelVersion(version="fuzz", spec_json='{"layers": -1, "hidden": 1e308}'))),
    ]


def test_hostile_values_are_refused_as_the_callers_error(channels: Any, fabric: Fabric) -> None:
    router, registry, metadata = channels
    inference = igrpc.InferenceStub(router)
    admin = rgrpc.ModelRegistryStub(registry)
    bad: list[tuple[str, str, grpc.StatusCode]] = []
    for request in _hostile_generation():
        for name, method in (("GenerateUnary", inference.GenerateUnary), ("Generate", inference.Generate)):
            code = _code(lambda: method(request, timeout=30))
            if code in OUR_BUGS:
                bad.append((name, str(request)[:80], code))
    for name, request in _hostile_registry():
        code = _code(lambda: getattr(admin, name)(request, timeout=30, metadata=metadata))
        if code in OUR_BUGS:
            bad.append((name, str(request)[:80], code))
    # Whatever a hostile call changed is undone, then both servers still serve.
    admin.Rollback(rpb.RollbackRequest(model=MODEL), timeout=10, metadata=metadata)
    assert not bad, bad
    reply = inference.GenerateUnary(ipb.GenerateRequest(model=MODEL, prompt="still there?", max_tokens=3), timeout=30)
    assert reply.usage.completion_tokens >= 1
    assert MODEL in {m.name for m in admin.ListModels(rpb.ListModelsRequest(), timeout=10, metadata=metadata).models}
    with urllib.request.urlopen(f"http://{fabric.host}:{fabric.http_port}/health", timeout=5) as response:
        assert response.status == 200
