"""The OTel SDK configured from the standard OTEL_* environment (runtime/tracing.py), and
its OTLP exporters delivering to real receivers over both protocols."""

from __future__ import annotations

import http.server
import threading
from concurrent import futures

import grpc
import pytest
from opentelemetry.proto.collector.trace.v1 import (
    trace_service_pb2,
    trace_service_pb2_grpc,
)
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider, sampling
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from tierflow.runtime.nats_server import free_port
from tierflow.runtime.tracing import (
    TracingConfig,
    TracingConfigError,
    _otlp_exporter,
    make_sampler,
    tracing_config,
)


def test_defaults_export_nothing_and_name_the_service() -> None:
    config = tracing_config("router", {})
    assert config == TracingConfig(service_name="tierflow-router")
    assert isinstance(make_sampler(config), sampling.ParentBased)


def test_service_name_endpoint_and_protocol_come_from_the_environment() -> None:
    config = tracing_config("router", {"OTEL_SERVICE_NAME": "edge-router", "OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4317"})
    assert (config.service_name, config.otlp_protocol, config.otlp_endpoint) == ("edge-router", "grpc", "http://collector:4317")
    # http/protobuf appends the signal path to the base endpoint; the traces endpoint is used as given.
    config = tracing_config("node", {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4318/", "OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf"})
    assert (config.otlp_protocol, config.otlp_endpoint) == ("http/protobuf", "http://collector:4318/v1/traces")
    config = tracing_config("node", {
        "OTEL_EXPORTER_OTLP_ENDPOINT": "http://ignored:4318", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://traces:9999/custom",
        "OTEL_EXPORTER_OTLP_PROTOCOL": "grpc", "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL": "http/protobuf",
    })  # fmt: skip
    assert (config.otlp_protocol, config.otlp_endpoint) == ("http/protobuf", "http://traces:9999/custom")
    # The exporter named outright exports to the default endpoint; none and the SDK switch turn it off.
    assert tracing_config("r", {"OTEL_TRACES_EXPORTER": "otlp"}).otlp_endpoint == "http://localhost:4317"
    assert tracing_config("r", {"OTEL_TRACES_EXPORTER": "none", "OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4317"}).otlp_protocol is None
    assert tracing_config("r", {"OTEL_SDK_DISABLED": "true", "OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4317"}).disabled
    assert tracing_config("r", {"OTEL_TRACES_EXPORTER": "console"}).console


def test_samplers_follow_the_spec_names() -> None:
    ratio = make_sampler(tracing_config("r", {"OTEL_TRACES_SAMPLER": "traceidratio", "OTEL_TRACES_SAMPLER_ARG": "0.25"}))
    assert isinstance(ratio, sampling.TraceIdRatioBased) and ratio.rate == 0.25
    assert make_sampler(tracing_config("r", {"OTEL_TRACES_SAMPLER": "always_off"})) is sampling.ALWAYS_OFF
    assert isinstance(make_sampler(tracing_config("r", {"OTEL_TRACES_SAMPLER": "parentbased_traceidratio", "OTEL_TRACES_SAMPLER_ARG": "0.5"})), sampling.ParentBasedTraceIdRatio)


@pytest.mark.parametrize(("env", "names"), [
    ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4318", "OTEL_EXPORTER_OTLP_PROTOCOL": "http/json"}, "OTEL_EXPORTER_OTLP_PROTOCOL"),
    ({"OTEL_TRACES_SAMPLER": "sometimes"}, "OTEL_TRACES_SAMPLER"),
    ({"OTEL_TRACES_SAMPLER": "traceidratio", "OTEL_TRACES_SAMPLER_ARG": "2"}, "OTEL_TRACES_SAMPLER_ARG"),
    ({"OTEL_TRACES_EXPORTER": "zipkin"}, "OTEL_TRACES_EXPORTER"),
])  # fmt: skip
def test_what_cannot_be_honoured_is_refused_by_name(env: dict[str, str], names: str) -> None:
    with pytest.raises(TracingConfigError, match=names):
        tracing_config("router", env)


def _export_one(config: TracingConfig) -> None:
    provider = TracerProvider(resource=Resource.create({"service.name": config.service_name}), sampler=make_sampler(config))
    provider.add_span_processor(SimpleSpanProcessor(_otlp_exporter(config)))
    provider.get_tracer("test").start_span("exported").end()
    provider.shutdown()


def _span_names(request: trace_service_pb2.ExportTraceServiceRequest) -> list[tuple[str, str]]:
    out = []
    for rs in request.resource_spans:
        service = next(a.value.string_value for a in rs.resource.attributes if a.key == "service.name")
        out.extend((service, span.name) for ss in rs.scope_spans for span in ss.spans)
    return out


def test_http_protobuf_reaches_a_real_otlp_receiver() -> None:
    received: list[trace_service_pb2.ExportTraceServiceRequest] = []

    class Receiver(http.server.BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            assert self.path == "/v1/traces" and self.headers["content-type"] == "application/x-protobuf"
            received.append(trace_service_pb2.ExportTraceServiceRequest.FromString(self.rfile.read(int(self.headers["content-length"]))))
            body = trace_service_pb2.ExportTraceServiceResponse().SerializeToString()
            self.send_response(200)
            self.send_header("content-type", "application/x-protobuf")
            self.send_header("content-length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.HTTPServer(("127.0.0.1", 0), Receiver)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        env = {"OTEL_SERVICE_NAME": "svc-http", "OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{server.server_port}", "OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf"}
        _export_one(tracing_config("router", env))
    finally:
        server.shutdown()
    assert [name for r in received for name in _span_names(r)] == [("svc-http", "exported")]


def test_grpc_reaches_a_real_otlp_receiver() -> None:
    received: list[trace_service_pb2.ExportTraceServiceRequest] = []

    class Receiver(trace_service_pb2_grpc.TraceServiceServicer):
        def Export(self, request, context):
            received.append(request)
            return trace_service_pb2.ExportTraceServiceResponse()

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(Receiver(), server)
    port = free_port()
    server.add_insecure_port(f"127.0.0.1:{port}")
    server.start()
    try:
        _export_one(tracing_config("node", {"OTEL_SERVICE_NAME": "svc-grpc", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": f"http://127.0.0.1:{port}"}))
    finally:
        server.stop(grace=None)
    assert [name for r in received for name in _span_names(r)] == [("svc-grpc", "exported")]
