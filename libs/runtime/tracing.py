"""OpenTelemetry setup and W3C trace-context propagation over NATS headers.

Spans follow the GenAI semantic conventions (`gen_ai.*` attributes). Export is OTLP when
`OTEL_EXPORTER_OTLP_ENDPOINT` is set (and the `otlp` extra is installed); otherwise spans
are created (so context still propagates) but not exported. Tests install their own
in-memory exporter through `set_span_processor`.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping

from opentelemetry import propagate, trace
from opentelemetry.context import Context
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import SpanProcessor, TracerProvider

__all__ = ["configure_tracing", "tracer", "inject_headers", "extract_context", "set_span_processor"]

log = logging.getLogger(__name__)
_provider: TracerProvider | None = None


def configure_tracing(service: str) -> TracerProvider:
    global _provider
    if _provider is not None:
        return _provider
    _provider = TracerProvider(resource=Resource.create({"service.name": f"tierflow-{service}"}))
    endpoint = os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT")
    if endpoint:
        try:
            from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
            from opentelemetry.sdk.trace.export import BatchSpanProcessor

            _provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(endpoint=endpoint)))
        except ImportError:
            log.warning("OTEL_EXPORTER_OTLP_ENDPOINT is set but the otlp extra is missing: pip install 'tierflow[otlp]'")
    trace.set_tracer_provider(_provider)
    return _provider


def set_span_processor(processor: SpanProcessor) -> None:
    """Add a processor (an exporter for tests or a file sink) to the configured provider."""
    (_provider or configure_tracing("test")).add_span_processor(processor)


def tracer(name: str) -> trace.Tracer:
    return trace.get_tracer(name)


def inject_headers(headers: dict[str, str]) -> dict[str, str]:
    """Write the current span's `traceparent` (and `tracestate`) into NATS headers."""
    propagate.inject(headers)
    return headers


def extract_context(headers: Mapping[str, str] | None) -> Context | None:
    return propagate.extract(headers) if headers else None
