"""The workload spec: tenants, agent flows, a model mix, arrivals and SLOs, from one YAML file.

    name: agentic-small
    duration_s: 600
    seed: 7
    slo: {ttft_ms: 2000, itl_ms: 150, e2e_ms: 60000}
    tenants:
      - {name: acme, api_key: sk-acme, weight: 3, workload: interactive}
      - {name: batchco, api_key: sk-batch, weight: 1, workload: batch}
    flows:                                  # agent flows: a session runs the steps in order
      - name: coding-agent
        weight: 1
        task_tokens: 300                    # the session's task, after the role's system prompt
        steps:
          - {model: planner, role: planner, system_tokens: 400, max_tokens: 64}
          - {tool: search, latency_s: 0.5, output_tokens: 200}   # a tool call: waits, adds its output to history
          - {model: reasoner, role: reasoner, system_tokens: 400, max_tokens: 256}
          - {model: summarizer, role: summarizer, system_tokens: 200, max_tokens: 64}
        think_s: 0.2                        # client-side pause between steps
    mix:                                    # single calls outside any flow (optional)
      weight: 0.5                           # relative to the flows' weights
      prompt_tokens: {mean: 800, sd: 200}
      max_tokens: {mean: 128, sd: 32}
      models: [{model: planner, weight: 2}, {model: summarizer, weight: 1}]
    arrivals:                               # sessions (and single calls) per second
      - {kind: poisson, rate: 2.0, duration_s: 300}
      - {kind: bursts, rate: 1.0, burst_rate: 5.0, every_s: 60, burst_s: 10, duration_s: 300}
      - {kind: diurnal, rate: 2.0, amplitude: 0.5, period_s: 600, duration_s: 600}
      - {kind: steady, rate: 1.0, duration_s: 60}

Phases run one after another; `duration_s` at the top caps the whole run. Every size is
in tokens of `tierflow.tokenizer`, so the simulator and the live fabric count alike.

A spec may replay a production trace instead of flows and arrivals (`trace:`, see
`TraceSpec`): the trace says when each request arrives and how many tokens go in and
come out; the spec says which fleet model and tenant each row goes to and how the
trace's time is cut and stretched:

    name: mooncake-replay
    slo: {ttft_ms: 2000, itl_ms: 100}
    tenants: [{name: acme, api_key: sk-acme}]
    trace:
      file: traces/mooncake_trace.jsonl   # relative to this file; `--trace FILE` overrides
      format: mooncake                    # mooncake | azure | burstgpt | tierflow; default: detected
      models: {GPT-4: llama-3.1-70b}      # the trace's model column -> a fleet model
      mix: [{model: llama-3.1-8b, weight: 3}, {model: gpt-oss-20b, weight: 1}]  # rows without one
      sticky: prefix                      # rows with one first prefix block get one model (or: session, row)
      window: {start_s: 600, duration_s: 600}   # trace seconds from its first row
      speed: 10                           # replay 10x faster
      rate_scale: 2.5                     # 2.5x the rows (each row keeps its tokens)

`parse_spec` / `load_spec` read a file and report every problem at once, each with its
path, e.g. "$.flows[0].steps[2].max_tokens: Expected `int` >= 1": a person fixes the
whole file in one pass instead of one typo per run.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar

import msgspec
from msgspec import Meta

__all__ = [
    "SpecError",
    "Slo",
    "TenantSpec",
    "Distribution",
    "CallStep",
    "ToolStep",
    "FlowSpec",
    "MixModel",
    "MixSpec",
    "Arrival",
    "TRACE_FORMATS",
    "TraceFormat",
    "TraceWindow",
    "TraceSpec",
    "WorkloadSpec",
    "parse_spec",
    "load_spec",
]

Positive = Annotated[float, Meta(gt=0)]
NonNegative = Annotated[float, Meta(ge=0)]
Name = Annotated[str, Meta(min_length=1, max_length=128)]


class SpecError(ValueError):
    """A spec that cannot run; `problems` lists each one with its path (`$.flows[0].steps[2].model`)."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("invalid workload spec:\n" + "\n".join(f"  - {p}" for p in problems))
        self.problems = problems


class Slo(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """Per-request targets; a request meets the SLO when it meets every one that is set."""

    ttft_ms: Positive | None = None
    itl_ms: Positive | None = None
    e2e_ms: Positive | None = None


class TenantSpec(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    name: Name
    api_key: str = "tierflow"  # what the live driver sends as the bearer token
    weight: Positive = 1.0
    workload: Literal["interactive", "batch"] | None = None
    # The class its calls ask for (a class name or an OpenAI service_tier; None: the
    # router tenant's default), as `service_tier` live and in the simulator.
    request_class: Literal["interactive", "standard", "batch", "auto", "default", "priority", "flex", "scale"] | None = None


class Distribution(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """A token count drawn per use: normal around `mean`, clipped to [min, max]; sd 0 is fixed."""

    mean: Positive
    sd: NonNegative = 0.0
    min: Annotated[int, Meta(ge=1)] = 1
    max: Annotated[int, Meta(ge=1)] | None = None

    def __post_init__(self) -> None:
        if self.max is not None and self.max < self.min:
            raise ValueError(f"max ({self.max}) is below min ({self.min}); a draw is clipped to [min, max]")


class CallStep(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    """A model call: the role's system prompt, the session's task, then the history so far."""

    model: Name
    role: Name | None = None  # names the system prompt; defaults to the model name
    system_tokens: Annotated[int, Meta(ge=0)] = 200
    max_tokens: Annotated[int, Meta(ge=1)] | Distribution = 128


class ToolStep(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    """A tool call between model calls: takes `latency_s`, appends `output_tokens` to the history."""

    tool: Name
    latency_s: NonNegative = 0.0
    output_tokens: Annotated[int, Meta(ge=0)] = 0


class FlowSpec(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    name: Name
    # msgspec cannot decode an untagged union of two Structs: parse_spec picks the type
    # from the step's key (`model` or `tool`), so never msgspec.convert a FlowSpec.
    steps: Annotated[list[CallStep | ToolStep], Meta(min_length=1)]
    weight: Positive = 1.0
    task_tokens: Annotated[int, Meta(ge=0)] | Distribution = 200
    think_s: NonNegative = 0.0
    tenants: list[str] | None = None  # None: every tenant runs this flow


class MixModel(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    model: Name
    weight: Positive = 1.0


class MixSpec(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    models: Annotated[list[MixModel], Meta(min_length=1)]
    weight: Positive = 1.0
    prompt_tokens: Distribution = Distribution(mean=512)
    max_tokens: Distribution = Distribution(mean=128)


class Arrival(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    """One phase of arrivals (sessions or single calls per second).

    - steady: exactly every 1/rate seconds; poisson: exponential gaps at `rate`;
    - bursts: `rate`, and `burst_rate` for the last `burst_s` of every `every_s` seconds;
    - diurnal: rate(t) = rate * (1 + amplitude * sin(2 pi t / period_s)), Poisson-thinned.
    """

    kind: Literal["steady", "poisson", "bursts", "diurnal"]
    rate: Positive
    duration_s: Positive
    burst_rate: Positive | None = None
    every_s: Positive | None = None
    burst_s: Positive | None = None
    amplitude: Annotated[float, Meta(ge=0, le=1)] = 0.0
    period_s: Positive | None = None

    def __post_init__(self) -> None:
        # Fields of another kind are errors, not ignored: `period_s` on a poisson phase is
        # almost always a phase whose `kind` was mistyped or forgotten.
        stray = [f"{f} (a {kind} field)" for kind, fields in _KIND_FIELDS.items() if kind != self.kind for f in fields if _is_set(self, f)]
        if stray:
            raise ValueError(f"kind {self.kind!r} takes no {', '.join(stray)}")
        if self.kind == "bursts":
            missing = [f for f in ("burst_rate", "every_s", "burst_s") if getattr(self, f) is None]
            if missing:
                raise ValueError(f"kind 'bursts' needs burst_rate, every_s and burst_s (missing: {', '.join(missing)})")
            assert self.burst_s is not None and self.every_s is not None
            if self.burst_s >= self.every_s:
                raise ValueError(f"burst_s ({self.burst_s:g}) must be shorter than every_s ({self.every_s:g}): a burst is part of each cycle")
        if self.kind == "diurnal" and self.period_s is None:
            raise ValueError("kind 'diurnal' needs period_s (the length of one cycle, in seconds)")


_KIND_FIELDS: dict[str, tuple[str, ...]] = {
    "steady": (),
    "poisson": (),
    "bursts": ("burst_rate", "every_s", "burst_s"),
    "diurnal": ("amplitude", "period_s"),
}


def _is_set(arrival: Arrival, field: str) -> bool:
    value = getattr(arrival, field)
    return value is not None and not (field == "amplitude" and value == 0.0)


TraceFormat = Literal["mooncake", "azure", "burstgpt", "tierflow"]
TRACE_FORMATS: tuple[str, ...] = ("mooncake", "azure", "burstgpt", "tierflow")


class TraceWindow(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """The part of a trace to replay, in the trace's own seconds since its first row."""

    start_s: NonNegative = 0.0
    duration_s: Positive | None = None  # None: to the trace's end


class TraceSpec(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    """How a production trace maps onto the fleet (see `tierflow.workload.replay`).

    - `models`: the trace's model column (BurstGPT's `Model`, tierflow's own `model`) to
      fleet models; a name without an entry goes as it is written.
    - `mix`: the model of every row without a model column (Mooncake, Azure), by weight.
      Rows that share a `sticky` key get the same model and tenant: `prefix` (the first
      `sticky_blocks` 512-token prefix blocks, so rows that share a prefix share a model
      and its cache), `session` (the trace's session column) or `row`; default: session
      when the trace has sessions, else prefix. A trace whose rows all open with one
      block (a common system prompt) sends every row to one model at `sticky_blocks: 1`;
      2 splits them below it, giving up only that block's sharing across models.
    - `window`, `speed` (2 = twice as fast) and `rate_scale` (rows thinned or replicated,
      each keeping its tokens) fit the trace to the run; CLI flags override them.
    """

    file: str | None = None
    format: TraceFormat | None = None  # None: detected from the file
    models: dict[str, Name] = {}
    mix: Annotated[list[MixModel], Meta(min_length=1)] | None = None
    sticky: Literal["session", "prefix", "row"] | None = None
    sticky_blocks: Annotated[int, Meta(ge=1)] = 1
    window: TraceWindow = TraceWindow()
    speed: Positive = 1.0
    rate_scale: Positive = 1.0


class WorkloadSpec(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    """A synthetic workload (`arrivals` of `flows` and `mix` calls) or a trace replay (`trace`)."""

    name: Name
    arrivals: list[Arrival] = []  # required unless `trace` is set (parse_spec checks)
    tenants: list[TenantSpec] = msgspec.field(default_factory=lambda: [TenantSpec(name="default")])
    flows: list[FlowSpec] = []
    mix: MixSpec | None = None
    slo: Slo = Slo()
    seed: Annotated[int, Meta(ge=0)] = 0
    duration_s: Positive | None = None  # caps the phases' total
    trace: TraceSpec | None = None


# ------------------------------------------------------------------------------ reading

_AT = re.compile(r"^(?P<msg>.*?)(?: - at `\$(?P<path>[^`]*)`)?$", re.S)
_S = TypeVar("_S", bound=msgspec.Struct)
_BAD: Any = object()  # a value that did not decode; its problem is already recorded
_Decoder = Callable[[Any, str], Any]


def _kind_of(raw: object) -> str:
    names = {dict: "a mapping", list: "a list", str: "a string", bool: "a boolean", int: "a number", float: "a number"}
    return "nothing" if raw is None else names.get(type(raw), type(raw).__name__)


class _Reader:
    """Decodes a document piece by piece so that every problem is found, each with its path.

    msgspec stops at the first error of whatever it decodes; decoding field by field and
    item by item instead lets one run list every typo in the file.
    """

    def __init__(self, declared_tenants: set[str] | None) -> None:
        self.problems: list[str] = []
        self._declared_tenants = declared_tenants  # None: the tenants section is unreadable, skip reference checks

    def value(self, raw: Any, typ: Any, path: str) -> Any:
        try:
            return msgspec.convert(raw, typ)
        except msgspec.ValidationError as exc:
            m = _AT.match(str(exc))
            assert m is not None  # the pattern matches any string
            self.problems.append(f"{path}{m['path'] or ''}: {m['msg']}")
            return _BAD

    def fields(self, raw: Any, cls: type[msgspec.Struct], path: str, custom: dict[str, _Decoder] | None = None) -> dict[str, Any] | None:
        """The fields of `cls` in `raw` that decoded (None when `raw` is not a mapping)."""
        infos = {f.name: f for f in msgspec.structs.fields(cls)}
        if not isinstance(raw, dict):
            self.problems.append(f"{path}: expected a mapping with {', '.join(infos)}; got {_kind_of(raw)}")
            return None
        values: dict[str, Any] = {}
        for key, item in raw.items():  # in the file's order, so problems read top to bottom
            info = infos.get(key)
            sub = f"{path}.{key}"
            if info is None:
                self.problems.append(f"{sub}: unknown field (expected one of: {', '.join(infos)})")
                continue
            decode = (custom or {}).get(key)
            value = decode(item, sub) if decode else self.value(item, info.type, sub)
            if value is not _BAD:
                values[key] = value
        self.problems += [f"{path}: missing required field `{name}`" for name, info in infos.items() if info.required and name not in raw]
        return values

    def struct(self, raw: Any, cls: type[_S], path: str, custom: dict[str, _Decoder] | None = None) -> _S:
        """`cls` from `raw`, or _BAD with its problems recorded (its own checks included)."""
        before = len(self.problems)
        values = self.fields(raw, cls, path, custom)
        if values is None or len(self.problems) > before:
            return _BAD
        try:
            return cls(**values)
        except (ValueError, TypeError) as exc:  # the struct's own cross-field checks (__post_init__)
            self.problems.append(f"{path}: {exc}")
            return _BAD

    def items(self, raw: Any, path: str, decode_item: _Decoder, *, what: str) -> list[Any]:
        """Each item decoded on its own, so every bad one is reported; the good ones returned."""
        if not isinstance(raw, list):
            self.problems.append(f"{path}: expected a list of {what}s; got {_kind_of(raw)}")
            return _BAD
        if not raw:
            self.problems.append(f"{path}: needs at least one {what}")
        decoded = [decode_item(item, f"{path}[{i}]") for i, item in enumerate(raw)]
        return [d for d in decoded if d is not _BAD]

    def named_items(self, raw: Any, path: str, decode_item: _Decoder, *, what: str) -> list[Any]:
        good = self.items(raw, path, decode_item, what=what)
        if good is not _BAD:
            # Names as written, so a duplicate is found even when one of its items is malformed.
            names = [item.get("name") for item in raw if isinstance(item, dict) and isinstance(item.get("name"), str)]
            for name in sorted({n for n in names if names.count(n) > 1}):
                self.problems.append(f"{path}: the {what} name {name!r} is declared {names.count(name)} times; names must be unique")
        return good

    # --------------------------------------------------------------- sections

    def tenant(self, raw: Any, path: str) -> TenantSpec:
        return self.struct(raw, TenantSpec, path)

    def arrival(self, raw: Any, path: str) -> Arrival:
        return self.struct(raw, Arrival, path)

    def mix(self, raw: Any, path: str) -> MixSpec:
        return self.struct(raw, MixSpec, path, custom={"models": lambda r, p: self.items(r, p, lambda i, q: self.struct(i, MixModel, q), what="model")})

    def trace(self, raw: Any, path: str) -> TraceSpec:
        return self.struct(raw, TraceSpec, path, custom={
            "mix": lambda r, p: self.items(r, p, lambda i, q: self.struct(i, MixModel, q), what="model"),
            "window": lambda r, p: self.struct(r, TraceWindow, p),
        })  # fmt: skip

    def flow(self, raw: Any, path: str) -> FlowSpec:
        return self.struct(raw, FlowSpec, path, custom={
            "name": self.flow_name,
            "steps": lambda r, p: self.items(r, p, self.step, what="step"),
            "tenants": self.tenant_refs,
        })  # fmt: skip

    def flow_name(self, raw: Any, path: str) -> str:
        name = self.value(raw, Name, path)
        if name == "mix":
            self.problems.append(f"{path}: the flow name 'mix' is reserved for the single calls of `mix`; choose another")
            return _BAD
        return name

    def step(self, raw: Any, path: str) -> CallStep | ToolStep:
        # The step's type is its key: msgspec cannot tell two untagged Structs apart.
        if not isinstance(raw, dict):
            self.problems.append(f"{path}: expected a mapping with `model` (a model call) or `tool` (a tool step); got {_kind_of(raw)}")
            return _BAD
        if ("model" in raw) == ("tool" in raw):
            which = "has both `model` and `tool`" if "model" in raw else "has neither `model` nor `tool`"
            self.problems.append(f"{path}: {which}; a step is a model call (`model`) or a tool step (`tool`)")
            return _BAD
        return self.struct(raw, CallStep if "model" in raw else ToolStep, path)

    def tenant_refs(self, raw: Any, path: str) -> list[str] | None:
        names = self.value(raw, list[str] | None, path)
        if names is _BAD or names is None:
            return names
        if not names:
            self.problems.append(f"{path}: names no tenant; leave `tenants` out to let every tenant run this flow")
            return _BAD
        declared = self._declared_tenants
        unknown = [(k, n) for k, n in enumerate(names) if declared is not None and n not in declared]
        for k, name in unknown:
            self.problems.append(f"{path}[{k}]: no tenant is named {name!r} (declared: {', '.join(sorted(declared or ())) or 'none'})")
        return _BAD if unknown else names


def _declared_tenant_names(doc: dict[Any, Any]) -> set[str] | None:
    """Tenant names as written (even in malformed entries), so a bad tenant never makes its flows' references look wrong too."""
    if "tenants" not in doc:
        return {"default"}
    raw = doc["tenants"]
    if not isinstance(raw, list):
        return None
    return {item["name"] for item in raw if isinstance(item, dict) and isinstance(item.get("name"), str)}


def parse_spec(text: str | bytes, *, source: str = "workload spec") -> WorkloadSpec:
    """The spec in `text`, or SpecError listing every problem by path."""
    try:
        doc: Any = msgspec.yaml.decode(text)
    except msgspec.DecodeError as exc:
        raise SpecError([f"{source}: not valid YAML: {exc}"]) from None
    if not isinstance(doc, dict):
        raise SpecError([f"$: {source} must be a mapping with name, arrivals and flows or mix; got {_kind_of(doc)}"])
    reader = _Reader(_declared_tenant_names(doc))
    values = reader.fields(doc, WorkloadSpec, "$", custom={
        "tenants": lambda r, p: reader.named_items(r, p, reader.tenant, what="tenant"),
        "flows": lambda r, p: reader.named_items(r, p, reader.flow, what="flow") if r != [] else [],
        "arrivals": lambda r, p: reader.items(r, p, reader.arrival, what="arrival phase"),
        "mix": lambda r, p: None if r is None else reader.mix(r, p),
        "slo": lambda r, p: reader.struct(r, Slo, p),
        "trace": lambda r, p: reader.trace(r, p),
    })  # fmt: skip
    if "trace" in doc:
        # A replay's arrivals, calls and length are the trace's: a synthetic section beside
        # it would be silently ignored, so it is an error instead.
        reader.problems += [
            f"$.{key}: a trace replay takes its {what} from the trace; remove `{key}` (or `trace`)"
            for key, what in (("arrivals", "arrivals"), ("flows", "calls"), ("mix", "calls"), ("duration_s", "length (trace.window)"))
            if key in doc
        ]
    else:
        if "arrivals" not in doc:
            reader.problems.append("$: missing required field `arrivals`")
        if not doc.get("flows") and doc.get("mix") is None:
            reader.problems.append("$: nothing to run; declare at least one flow under `flows` or a model mix under `mix`")
    if reader.problems or values is None:
        raise SpecError(reader.problems)
    return WorkloadSpec(**values)


def load_spec(path: str | Path) -> WorkloadSpec:
    """The spec in the YAML file at `path` (see `parse_spec`)."""
    p = Path(path)
    try:
        text = p.read_bytes()
    except OSError as exc:
        raise SpecError([f"{p}: cannot read: {exc.strerror}"]) from None
    return parse_spec(text, source=str(p))
