"""Every rule a registry state must satisfy, as one pure function over records.

`check_state` returns `Problem`s (record, field, message a person can act on); a
`Locator` turns each into a path: `$.deployments[2].replicas` for a record that came
from the fleet file being applied, `registry:deployment/big.replicas` for one that only
the registry holds. The same rules guard fleet files and the small admin mutations
(rollout, add version, ...); a mutation is refused only for problems it would *add*, so
a record broken by an older release never blocks an unrelated change.

The deployment rules come from the SambaStack model (DESIGN.md): high-interactivity and
high-throughput deployments are dedicated (one model per bundle); high-interactivity
runs batch 1-4; high-throughput runs continuous batching at batch 64 or more on at least
4 nodes; disaggregated mode is for high-throughput and needs more prefill than decode
nodes; a bundle entry's configuration must be one its checkpoint was compiled for.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Protocol

from msgspec import Struct

from tierflow.contracts import registry
from tierflow.nodehost.specs import version_model_spec
from tierflow.rdu import BundleModel, DeploymentConfig, HardwareProfile, ModelSpec, NodeEngine, load_catalog, load_profiles
from tierflow.services.model_registry.state import Kind, State

__all__ = [
    "HI_MAX_BATCH",
    "HT_MIN_BATCH",
    "HT_MIN_NODES",
    "Problem",
    "Locator",
    "RegistryLocator",
    "RuleContext",
    "check_state",
    "new_problems",
    "format_problems",
    "traffic_percent",
]

HI_MAX_BATCH = 4  # high-interactivity: batch size 1-4
HT_MIN_BATCH = 64  # high-throughput: continuous batching from 64 up
HT_MIN_NODES = 4  # high-throughput: at least 4 nodes (prefill + decode)

_KV_KEY = re.compile(r"^[-/_=.A-Za-z0-9]+$")  # what a JetStream KV key may hold


class Problem(Struct, frozen=True, kw_only=True):
    """One rule a record breaks. `field` is below the record, or below `version` if set."""

    kind: Kind
    name: str
    message: str
    field: str = ""
    version: str | None = None


class Locator(Protocol):
    def path(self, problem: Problem) -> str:
        """Where the problem is, as the person reading it would find it."""
        ...


class RegistryLocator:
    """Paths for records as the registry holds them: `registry:model/NAME.versions[V].configs[0]`."""

    def path(self, problem: Problem) -> str:
        version = f".versions[{problem.version}]" if problem.version is not None else ""
        return f"registry:{problem.kind}/{problem.name}{version}{problem.field}"


@dataclass(frozen=True)
class RuleContext:
    """What the rules check against: the emulator's model catalog and hardware profiles."""

    catalog: Mapping[str, ModelSpec]
    profiles: Mapping[str, HardwareProfile]

    @classmethod
    def builtin(cls) -> RuleContext:
        return cls(catalog=load_catalog(None), profiles=load_profiles(None))


def format_problems(problems: list[Problem], where: Locator) -> list[str]:
    return [f"{where.path(p)}: {p.message}" for p in problems]


def new_problems(before: State, after: State, ctx: RuleContext) -> list[Problem]:
    """Problems `after` has that `before` did not: what a change would break."""
    old = set(check_state(before, ctx))
    return [p for p in check_state(after, ctx) if p not in old]


def traffic_percent(traffic: Mapping[str, float]) -> dict[str, float]:
    """The split as percentages (weights are stored on any scale)."""
    total = sum(w for w in traffic.values() if w > 0)
    return {v: (w * 100.0 / total if total > 0 and w > 0 else 0.0) for v, w in traffic.items()}


def check_state(state: State, ctx: RuleContext) -> list[Problem]:
    """Every problem of `state`, models first, then bundles, then deployments."""
    specs: dict[tuple[str, str], ModelSpec | None] = {}
    problems: list[Problem] = []
    for model in state.models.values():
        problems += _check_model(model, state, ctx, specs)
    for bundle in state.bundles.values():
        problems += _check_bundle(bundle, state, specs)
    unsound = {p.name for p in problems if p.kind == "bundle"}
    for deployment in state.deployments.values():
        problems += _check_deployment(deployment, state, ctx)
        if deployment.bundle not in unsound:
            problems += _check_fit(deployment, state, ctx, specs)
    return problems


def _parse_config(name: str) -> tuple[DeploymentConfig | None, str]:
    try:
        return DeploymentConfig.parse(name), ""
    except ValueError as exc:
        return None, str(exc)


# --------------------------------------------------------------------------- models


def _check_model(m: registry.ModelRecord, state: State, ctx: RuleContext, specs: dict[tuple[str, str], ModelSpec | None]) -> list[Problem]:
    out: list[Problem] = []

    def problem(field: str, message: str, version: str | None = None) -> None:
        out.append(Problem(kind="model", name=m.name, field=field, message=message, version=version))

    if not _KV_KEY.match(m.name):
        problem(".name", f"{m.name!r} cannot be a registry key: use letters, digits and - _ / = . only")
    names = [v.version for v in m.versions]
    known = sorted(set(names))
    if not names:
        problem(".versions", "a model needs at least one version")
    for dup in sorted({n for n in names if names.count(n) > 1}):
        problem(".versions", f"version {dup!r} is declared twice")
    if names and m.default_version not in names:
        problem(".default_version", f"{m.default_version!r} is not one of the versions {known}")
    for version, weight in sorted(m.traffic.items()):
        if version not in names:
            problem(".traffic", f"version {version!r} is not one of {known}")
        if not math.isfinite(weight) or weight < 0:
            problem(".traffic", f"the weight of {version!r} must be a finite number >= 0, got {weight}")
    if m.traffic and not sum(w for w in m.traffic.values() if math.isfinite(w) and w > 0) > 0:
        problem(".traffic", "weights must not all be zero (leave traffic empty to send everything to the default version)")
    out += _check_served(m, state)
    for v in m.versions:
        out += _check_version(m.name, v, ctx, specs)
    return out


def _check_served(m: registry.ModelRecord, state: State) -> list[Problem]:
    """Traffic may only go to versions a deployment serves (once the model is deployed at all)."""
    serving = state.serving(m.name)
    if not serving:
        return []  # declared but not deployed: nothing routes to it yet
    percent = traffic_percent(m.traffic)
    receiving = [(v, p) for v, p in sorted(percent.items()) if p > 0] if m.traffic else [(m.default_version, 100.0)]
    out = []
    for version, pct in receiving:
        if version not in serving and version in {v.version for v in m.versions}:
            field = ".traffic" if m.traffic else ".default_version"
            out.append(Problem(
                kind="model", name=m.name, field=field,
                message=(f"version {version!r} would get {pct:g}% of the traffic but no deployment serves it"
                         f" (deployed: {', '.join(sorted(serving))}); deploy it in a bundle first, or send its traffic elsewhere"),
            ))  # fmt: skip
    return out


def _check_version(model: str, v: registry.ModelVersionRecord, ctx: RuleContext, specs: dict[tuple[str, str], ModelSpec | None]) -> list[Problem]:
    out: list[Problem] = []

    def problem(field: str, message: str) -> None:
        out.append(Problem(kind="model", name=model, version=v.version, field=field, message=message))

    spec: ModelSpec | None = None
    if v.spec is not None and v.catalog:
        problem("", "give either `catalog` (an emulator catalog entry) or `spec` (a bring-your-own shape), not both")
    else:
        try:
            spec = version_model_spec(model, v, ctx.catalog)
        except ValueError as exc:
            problem(".spec" if v.spec is not None else ".catalog", str(exc))
    specs[(model, v.version)] = spec
    for i, name in enumerate(v.configs):
        config, error = _parse_config(name)
        if config is None:
            problem(f".configs[{i}]", error)
        elif spec is not None and config.seq_len > spec.max_context:
            problem(f".configs[{i}]", f"{name!r} has sequence length {config.seq_len}, above the model's maximum context of {spec.max_context} tokens")
    return out


# --------------------------------------------------------------------------- bundles


def _check_bundle(b: registry.BundleRecord, state: State, specs: dict[tuple[str, str], ModelSpec | None]) -> list[Problem]:
    out: list[Problem] = []

    def problem(field: str, message: str) -> None:
        out.append(Problem(kind="bundle", name=b.name, field=field, message=message))

    if not b.models:
        problem(".models", "a bundle needs at least one model")
    models = [e.model for e in b.models]
    for dup in sorted({n for n in models if models.count(n) > 1}):
        problem(".models", f"{dup!r} is bundled twice; a node serves one version of each model (put the other version in a bundle of its own)")
    for j, entry in enumerate(b.models):
        at = f".models[{j}]"
        model = state.models.get(entry.model)
        if model is None:
            problem(f"{at}.model", f"{entry.model!r} is not declared under models")
            continue
        version = next((v for v in model.versions if v.version == entry.version), None)
        if version is None:
            problem(f"{at}.version", f"{entry.version!r} is not a version of {entry.model!r} (versions: {', '.join(v.version for v in model.versions)})")
            continue
        config, error = _parse_config(entry.config)
        if config is None:
            problem(f"{at}.config", error)
            continue
        if version.configs:
            compiled = {c.name for c in (_parse_config(n)[0] for n in version.configs) if c is not None}
            if config.name not in compiled:
                problem(f"{at}.config", (
                    f"{entry.config!r} is not a configuration version {entry.version!r} of {entry.model!r} exists in"
                    f" (configs: {', '.join(version.configs)}); use one of those, or add it to the version's configs"
                ))  # fmt: skip
                continue
        spec = specs.get((entry.model, entry.version))
        if spec is not None and config.seq_len > spec.max_context:
            problem(f"{at}.config", f"{entry.config!r} has sequence length {config.seq_len}, above {entry.model!r}'s maximum context of {spec.max_context} tokens")
    return out


# --------------------------------------------------------------------------- deployments


def _check_deployment(d: registry.DeploymentRecord, state: State, ctx: RuleContext) -> list[Problem]:
    out: list[Problem] = []

    def problem(field: str, message: str) -> None:
        out.append(Problem(kind="deployment", name=d.name, field=field, message=message))

    bundle = state.bundles.get(d.bundle)
    if bundle is None:
        problem(".bundle", f"{d.bundle!r} is not declared under bundles")
    entries = bundle.models if bundle is not None else d.models
    if ctx.profiles and d.profile not in ctx.profiles:
        problem(".profile", f"hardware profile {d.profile!r} is unknown; known: {', '.join(sorted(ctx.profiles))}")
    if d.min_replicas > d.max_replicas:
        problem(".min_replicas", f"min_replicas ({d.min_replicas}) is above max_replicas ({d.max_replicas})")
    elif not d.min_replicas <= d.replicas <= d.max_replicas:
        problem(".replicas", f"{d.replicas} is outside min_replicas..max_replicas ({d.min_replicas}..{d.max_replicas})")
    if d.workload != "bundle":
        out += _check_dedicated(d, entries)
    if d.mode == "disaggregated":
        if d.workload != "high-throughput":
            problem(".mode", f"disaggregated mode is for high-throughput deployments, and this one is {d.workload!r}; set workload: high-throughput or mode: aggregated")
        if d.prefill_replicas <= d.replicas:
            problem(".prefill_replicas", (
                f"disaggregated mode needs more prefill than decode nodes (e.g. 3:1), but prefill_replicas is {d.prefill_replicas}"
                f" and replicas (decode) is {d.replicas}; raise prefill_replicas to at least {d.replicas + 1}"
            ))  # fmt: skip
    elif d.prefill_replicas > 0:
        problem(".prefill_replicas", "prefill_replicas only applies to mode: disaggregated (aggregated nodes prefill for themselves); remove it or set mode: disaggregated")
    return out


def _check_fit(d: registry.DeploymentRecord, state: State, ctx: RuleContext, specs: dict[tuple[str, str], ModelSpec | None]) -> list[Problem]:
    """Whether the bundle's models fit the deployment's hardware, asked of the emulator itself.

    A node builds its engine from exactly this bundle and profile and refuses to start when
    the weights or one full-length sequence's KV do not fit; the same engine is built here,
    so a fleet that would leave every node of a deployment crashing at start is refused when
    it is applied, with the engine's own message.
    """
    bundle, profile = state.bundles.get(d.bundle), ctx.profiles.get(d.profile)
    if bundle is None or profile is None:
        return []  # reported by _check_deployment
    models: list[BundleModel] = []
    for entry in bundle.models:
        spec, (config, _) = specs.get((entry.model, entry.version)), _parse_config(entry.config)
        if spec is None or config is None:
            return []  # reported on the model or the bundle
        models.append(BundleModel(spec=spec, config=config, version=entry.version))
    try:
        NodeEngine(profile, models, now=0.0)
    except ValueError as exc:
        return [Problem(kind="deployment", name=d.name, field=".profile", message=f"bundle {d.bundle!r} does not fit on {d.profile!r}: {exc}")]
    return []


def _check_dedicated(d: registry.DeploymentRecord, entries: list[registry.BundleEntry]) -> list[Problem]:
    """High-interactivity and high-throughput: one model, its batch shape, and (throughput) 4+ nodes."""
    out: list[Problem] = []

    def problem(field: str, message: str) -> None:
        out.append(Problem(kind="deployment", name=d.name, field=field, message=message))

    if len(entries) != 1:
        names = ", ".join(e.model for e in entries) or "none"
        problem(".workload", (
            f"{d.workload} deployments are dedicated: their bundle must hold exactly one model, but {d.bundle!r} holds"
            f" {len(entries)} ({names}); give this deployment a bundle of its own"
        ))  # fmt: skip
    for entry in entries:
        config, _ = _parse_config(entry.config)
        if config is None:
            continue  # reported on the bundle
        where = f"bundle {d.bundle!r} serves {entry.model!r} in {entry.config!r}"
        if d.workload == "high-interactivity" and config.batch_size > HI_MAX_BATCH:
            problem(".workload", f"high-interactivity needs batch size <= {HI_MAX_BATCH}, but {where} (batch {config.batch_size}); use a bs1..bs{HI_MAX_BATCH} configuration")
        if d.workload == "high-throughput" and (not config.continuous or config.batch_size < HT_MIN_BATCH):
            shape = f"continuous batching up to {config.batch_size}" if config.continuous else f"a static batch of {config.batch_size}"
            problem(".workload", (
                f"high-throughput needs continuous batching with a batch of at least {HT_MIN_BATCH}, but {where} ({shape});"
                f" use e.g. 'ss{config.seq_len}-bs8-cb8-128'"
            ))  # fmt: skip
    if d.workload == "high-throughput":
        nodes, floor = d.replicas + d.prefill_replicas, d.min_replicas + d.prefill_replicas
        if nodes < HT_MIN_NODES:
            problem(".replicas", (
                f"high-throughput needs at least {HT_MIN_NODES} nodes, but replicas ({d.replicas}) + prefill_replicas"
                f" ({d.prefill_replicas}) is {nodes}; raise replicas to at least {HT_MIN_NODES - d.prefill_replicas}"
            ))  # fmt: skip
        elif floor < HT_MIN_NODES:
            problem(".min_replicas", (
                f"high-throughput needs at least {HT_MIN_NODES} nodes at all times, but min_replicas ({d.min_replicas}) +"
                f" prefill_replicas ({d.prefill_replicas}) is {floor}, so scaling down would go below;"
                f" raise min_replicas to at least {HT_MIN_NODES - d.prefill_replicas}"
            ))  # fmt: skip
    return out
