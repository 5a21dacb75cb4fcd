"""OpenTelemetry setup from the standard `OTEL_*` environment, and W3C trace context
from the front doors (HTTP headers, gRPC metadata) through NATS headers to the nodes.

Configuration (`tracing_config`, a pure function of the environment, so it is tested alone):

    OTEL_SDK_DISABLED=true                    no spans exported at all
    OTEL_SERVICE_NAME                         the resource's service.name (else tierflow-<service>);
                                              OTEL_RESOURCE_ATTRIBUTES adds to the resource
    OTEL_TRACES_EXPORTER                      otlp (default), console, none; comma-separated
    OTEL_EXPORTER_OTLP_TRACES_ENDPOINT        the traces URL as given
    OTEL_EXPORTER_OTLP_ENDPOINT               the base URL (http/protobuf appends /v1/traces)
    OTEL_EXPORTER_OTLP_[TRACES_]PROTOCOL      grpc (default, as the Python SDK's `otlp`
                                              exporter) or http/protobuf; http/json is refused
    OTEL_TRACES_SAMPLER, OTEL_TRACES_SAMPLER_ARG  the spec's six samplers (default
                                              parentbased_always_on): a caller's sampled flag
                                              is honoured
    TIERFLOW_TRACE_DIR                        also JSON lines per process there (no collector needed)

OTLP export starts when an endpoint is set (or OTEL_TRACES_EXPORTER names otlp outright):
a laptop without a collector gets no export errors. A value that cannot be honoured (an
unknown protocol or sampler, an exporter package that is not installed) is refused at start
with a message that says what to change, never ignored. Headers, TLS and timeouts of the
exporter come from the remaining `OTEL_EXPORTER_OTLP_*` variables, read by the exporter.

`exporting()` says whether any span processor is installed: a hot path (the router's
request) skips its span when nothing would ever see it. A span and its attributes cost
the router ~60 us a request, 8% of its CPU at load, for nothing when no exporter is
configured (issue 16). A caller's `traceparent` is still passed on to the nodes then
(`start_send`), so a node that exports on its own joins the caller's trace.

Span kinds: the router's request span is SERVER (child of the caller's context), each
request message it publishes on NATS a PRODUCER span (`send <subject>`, whose context the
node receives), the node's span CONSUMER (from that context to the request's last token).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from contextvars import ContextVar
from dataclasses import dataclass
from pathlib import Path

from opentelemetry import context as otel_context
from opentelemetry import propagate, trace
from opentelemetry.context import Context
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import SpanProcessor, TracerProvider, sampling
from opentelemetry.sdk.trace.export import SpanExporter
from opentelemetry.trace import Span, SpanKind

__all__ = [
    "PROVIDER_NAME",
    "TracingConfig",
    "TracingConfigError",
    "configure_tracing",
    "continue_trace",
    "exporting",
    "extract_context",
    "front_door",
    "inject_headers",
    "make_sampler",
    "note_front_door",
    "set_span_processor",
    "start_send",
    "tracer",
    "tracing_config",
]

log = logging.getLogger(__name__)
_provider: TracerProvider | None = None
_exporting = False  # a span processor is installed: spans are seen by someone

PROVIDER_NAME = "tierflow"
"""`gen_ai.provider.name` on every GenAI span the fabric makes."""

PROTOCOLS = ("grpc", "http/protobuf")
SAMPLERS = ("always_on", "always_off", "traceidratio", "parentbased_always_on", "parentbased_always_off", "parentbased_traceidratio")
_EXPORTERS = ("otlp", "console", "none")
_EXPORTER_MODULES = {
    "grpc": "opentelemetry.exporter.otlp.proto.grpc.trace_exporter",
    "http/protobuf": "opentelemetry.exporter.otlp.proto.http.trace_exporter",
}


class TracingConfigError(ValueError):
    """An `OTEL_*` setting the fabric cannot honour; the message names the variable."""


@dataclass(frozen=True, slots=True)
class TracingConfig:
    service_name: str
    otlp_protocol: str | None = None  # None: no OTLP export
    otlp_endpoint: str | None = None
    console: bool = False
    sampler: str = "parentbased_always_on"
    sampler_arg: float | None = None
    trace_dir: str | None = None
    disabled: bool = False


def tracing_config(service: str, env: Mapping[str, str] | None = None) -> TracingConfig:
    """What the standard environment asks of this process's tracing (pure: tests pass `env`)."""
    env = os.environ if env is None else env

    def get(name: str) -> str:
        return env.get(name, "").strip()

    service_name = get("OTEL_SERVICE_NAME") or f"tierflow-{service}"
    trace_dir = get("TIERFLOW_TRACE_DIR") or None
    if get("OTEL_SDK_DISABLED").lower() == "true":
        return TracingConfig(service_name=service_name, disabled=True)
    exporters = [e.strip().lower() for e in (get("OTEL_TRACES_EXPORTER") or "otlp").split(",") if e.strip()]
    unknown = [e for e in exporters if e not in _EXPORTERS]
    if unknown:
        raise TracingConfigError(f"OTEL_TRACES_EXPORTER={get('OTEL_TRACES_EXPORTER')!r}: {', '.join(unknown)} is not one of {', '.join(_EXPORTERS)}")
    traces_endpoint = get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
    base_endpoint = get("OTEL_EXPORTER_OTLP_ENDPOINT")
    protocol = (get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL") or get("OTEL_EXPORTER_OTLP_PROTOCOL") or "grpc").lower()
    otlp = "otlp" in exporters and "none" not in exporters and bool(traces_endpoint or base_endpoint or get("OTEL_TRACES_EXPORTER"))
    endpoint: str | None = None
    if otlp:
        if protocol not in PROTOCOLS:
            which = "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL" if get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL") else "OTEL_EXPORTER_OTLP_PROTOCOL"
            raise TracingConfigError(f"{which}={protocol!r} is not supported: use grpc or http/protobuf (http/json has no Python exporter)")
        if traces_endpoint:  # the signal's own URL is used as given
            endpoint = traces_endpoint
        elif protocol == "http/protobuf":
            endpoint = (base_endpoint or "http://localhost:4318").rstrip("/") + "/v1/traces"
        else:
            endpoint = base_endpoint or "http://localhost:4317"
    sampler = (get("OTEL_TRACES_SAMPLER") or "parentbased_always_on").lower()
    if sampler not in SAMPLERS:
        raise TracingConfigError(f"OTEL_TRACES_SAMPLER={sampler!r} is not one of {', '.join(SAMPLERS)}")
    arg: float | None = None
    if sampler.endswith("traceidratio"):
        raw = get("OTEL_TRACES_SAMPLER_ARG") or "1.0"
        try:
            arg = float(raw)
        except ValueError:
            arg = -1.0
        if not 0.0 <= arg <= 1.0:
            raise TracingConfigError(f"OTEL_TRACES_SAMPLER_ARG={raw!r}: {sampler} needs a ratio between 0 and 1")
    return TracingConfig(
        service_name=service_name, otlp_protocol=protocol if otlp else None, otlp_endpoint=endpoint,
        console="console" in exporters and "none" not in exporters, sampler=sampler, sampler_arg=arg, trace_dir=trace_dir,
    )


def make_sampler(config: TracingConfig) -> sampling.Sampler:
    ratio = config.sampler_arg if config.sampler_arg is not None else 1.0
    return {
        "always_on": lambda: sampling.ALWAYS_ON,
        "always_off": lambda: sampling.ALWAYS_OFF,
        "traceidratio": lambda: sampling.TraceIdRatioBased(ratio),
        "parentbased_always_on": lambda: sampling.ParentBased(sampling.ALWAYS_ON),
        "parentbased_always_off": lambda: sampling.ParentBased(sampling.ALWAYS_OFF),
        "parentbased_traceidratio": lambda: sampling.ParentBasedTraceIdRatio(ratio),
    }[config.sampler]()


def _otlp_exporter(config: TracingConfig) -> SpanExporter:
    assert config.otlp_protocol is not None
    module = _EXPORTER_MODULES[config.otlp_protocol]
    try:
        exporter_cls = __import__(module, fromlist=["OTLPSpanExporter"]).OTLPSpanExporter
    except ImportError:
        installed = [p for p, m in _EXPORTER_MODULES.items() if _importable(m)]
        have = f"installed: {', '.join(installed)}" if installed else "no OTLP exporter is installed"
        raise TracingConfigError(
            f"OTLP over {config.otlp_protocol} is asked for (OTEL_EXPORTER_OTLP_PROTOCOL) but its exporter is not installed ({have}): "
            "pip install 'tierflow[otlp]', or set OTEL_EXPORTER_OTLP_PROTOCOL to an installed one"
        ) from None
    return exporter_cls(endpoint=config.otlp_endpoint)


def _importable(module: str) -> bool:
    try:
        __import__(module)
    except ImportError:
        return False
    return True


def configure_tracing(service: str, env: Mapping[str, str] | None = None) -> TracerProvider:
    """The process's tracer provider, from the environment (once; later calls return it).
    Raises TracingConfigError for settings that cannot be honoured."""
    global _provider
    if _provider is not None:
        return _provider
    config = tracing_config(service, env)
    provider = TracerProvider(resource=Resource.create({"service.name": config.service_name}), sampler=make_sampler(config))
    processors: list[SpanProcessor] = []
    if not config.disabled:
        from opentelemetry.sdk.trace.export import (
            BatchSpanProcessor,
            ConsoleSpanExporter,
        )

        if config.otlp_protocol is not None:
            processors.append(BatchSpanProcessor(_otlp_exporter(config)))
            log.info("traces: OTLP over %s to %s", config.otlp_protocol, config.otlp_endpoint)
        if config.console:
            processors.append(BatchSpanProcessor(ConsoleSpanExporter()))
    if config.trace_dir:
        processors.append(_file_processor(Path(config.trace_dir), service))
    _provider = provider
    for processor in processors:
        _add_processor(processor)
    trace.set_tracer_provider(_provider)
    return _provider


def _add_processor(processor: SpanProcessor) -> None:
    global _exporting
    assert _provider is not None
    _provider.add_span_processor(processor)
    _exporting = True


def _file_processor(directory: Path, service: str) -> SpanProcessor:
    """Spans as JSON lines in DIR/<service>-<pid>.jsonl: traces without a collector, for
    tests across processes and for a quick look on a laptop."""
    from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter

    directory.mkdir(parents=True, exist_ok=True)
    sink = open(directory / f"{service}-{os.getpid()}.jsonl", "a", buffering=1)  # noqa: SIM115 - lives as long as the process
    exporter = ConsoleSpanExporter(out=sink, formatter=lambda span: span.to_json(indent=None) + "\n")
    return BatchSpanProcessor(exporter, schedule_delay_millis=200)


def exporting() -> bool:
    """Whether spans made now would reach an exporter (a plain read: called per request)."""
    return _exporting


def set_span_processor(processor: SpanProcessor) -> None:
    """Add a processor (an exporter for tests or a file sink) to the configured provider."""
    if _provider is None:
        configure_tracing("test", env={})
    _add_processor(processor)


def tracer(name: str) -> trace.Tracer:
    return trace.get_tracer(name)


def inject_headers(headers: dict[str, str]) -> dict[str, str]:
    """Write the current span's `traceparent` (and `tracestate`) into NATS headers."""
    propagate.inject(headers)
    return headers


def extract_context(headers: Mapping[str, str] | None) -> Context | None:
    return propagate.extract(headers) if headers else None


# ------------------------------------------------------------------ the front doors

_front_door: ContextVar[tuple[str, int, str] | None] = ContextVar("tierflow_front_door", default=None)


def continue_trace(carrier: Mapping[str, str]) -> object | None:
    """A front door's request: make the caller's W3C context (`traceparent`, `tracestate` in
    HTTP headers or gRPC metadata, lower-case names) current in this task, so the request's
    span continues the caller's trace. Returns the token for `opentelemetry.context.detach`
    (None when the caller sent no context). Cheap without a `traceparent`: one dict lookup."""
    if "traceparent" not in carrier:
        return None
    return otel_context.attach(propagate.extract(carrier))


def note_front_door(address: str, port: int, client_request_id: str = "") -> None:
    """The address and port the caller reached (`server.address`/`server.port` on the
    request's span) and the caller's own `x-request-id`, for this task's request."""
    _front_door.set((address, port, client_request_id))


def front_door() -> tuple[str, int, str] | None:
    return _front_door.get()


# ------------------------------------------------------------------ NATS

_messaging = trace.get_tracer("tierflow.nats")


def start_send(destination: str) -> tuple[dict[str, str] | None, Span | None]:
    """Headers for a request message published to `destination`, and its PRODUCER span
    (the caller ends it once the message is out) when spans are exported.

    Not exporting, a caller's context (an incoming `traceparent`) is still passed on, as
    is: a node that exports joins the caller's trace even when the router does not."""
    if _exporting:
        span = _messaging.start_span(
            f"send {destination}", kind=SpanKind.PRODUCER,
            attributes={"messaging.system": "nats", "messaging.operation.type": "send", "messaging.operation.name": "publish",
                        "messaging.destination.name": destination},
        )  # fmt: skip
        headers: dict[str, str] = {}
        propagate.inject(headers, context=trace.set_span_in_context(span))
        return headers, span
    if trace.get_current_span().get_span_context().is_valid:
        headers = {}
        propagate.inject(headers)
        return headers, None
    return None, None
