"""The fleet file: models, bundles and deployments declared in YAML and kept in git.

Parsing is strict (unknown keys are typos, and a typo in a fleet file must not pass
silently); every problem is reported with its path, all at once, so a person fixes the
file in one go. Cross-references (a bundle naming an unknown model, ...) are checked
after the shapes.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

import msgspec
from msgspec import Meta, Struct

from tierflow.contracts.registry import BundleEntry, DeploymentRecord, ModelRecord, ModelVersionRecord

__all__ = ["Fleet", "FleetError", "load_fleet", "parse_fleet", "to_records"]

Name = Annotated[str, Meta(min_length=1, max_length=200, pattern=r"^[A-Za-z0-9][A-Za-z0-9._/:-]*$")]
KeyName = Annotated[str, Meta(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9_-]+$")]


class FleetError(ValueError):
    """A fleet file that cannot be applied; `problems` lists each one with its path."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("invalid fleet file:\n" + "\n".join(f"  - {p}" for p in problems))
        self.problems = problems


class VersionSpec(Struct, forbid_unknown_fields=True):
    version: Annotated[str, Meta(min_length=1, max_length=64)]
    catalog: str = ""
    checkpoint: str = ""


class ModelSpec(Struct, forbid_unknown_fields=True):
    name: Name
    versions: Annotated[list[VersionSpec], Meta(min_length=1)]
    default_version: str | None = None
    traffic: dict[str, Annotated[float, Meta(ge=0.0)]] = {}
    description: str = ""


class BundleModelSpec(Struct, forbid_unknown_fields=True):
    model: Name
    version: str | None = None
    config: str = "ss8192-bs4"


class BundleSpec(Struct, forbid_unknown_fields=True):
    name: KeyName
    models: Annotated[list[BundleModelSpec], Meta(min_length=1)]


class DeploymentSpec(Struct, forbid_unknown_fields=True):
    name: KeyName
    bundle: KeyName
    replicas: Annotated[int, Meta(ge=0)] = 1
    min_replicas: Annotated[int, Meta(ge=0)] | None = None
    max_replicas: Annotated[int, Meta(ge=0)] | None = None
    region: str = "local"
    residency: str = ""
    profile: str = "sn40l-16"
    mode: Literal["aggregated", "disaggregated"] = "aggregated"
    prefill_replicas: Annotated[int, Meta(ge=0)] = 0


class Fleet(Struct, forbid_unknown_fields=True):
    models: list[ModelSpec] = []
    bundles: list[BundleSpec] = []
    deployments: list[DeploymentSpec] = []


def parse_fleet(text: str | bytes, *, source: str = "fleet file") -> Fleet:
    try:
        fleet = msgspec.yaml.decode(text, type=Fleet)
    except msgspec.ValidationError as exc:
        raise FleetError([f"{source}: {exc}"]) from None
    except msgspec.DecodeError as exc:
        raise FleetError([f"{source}: not valid YAML: {exc}"]) from None
    problems = _check_references(fleet)
    if problems:
        raise FleetError(problems)
    return fleet


def load_fleet(path: str | Path) -> Fleet:
    p = Path(path)
    try:
        text = p.read_bytes()
    except OSError as exc:
        raise FleetError([f"{p}: cannot read: {exc.strerror}"]) from None
    return parse_fleet(text, source=str(p))


def _duplicates(names: list[str]) -> set[str]:
    seen: set[str] = set()
    return {n for n in names if n in seen or seen.add(n)}  # type: ignore[func-returns-value]


def _check_references(fleet: Fleet) -> list[str]:
    problems: list[str] = []
    for kind, items in (("models", fleet.models), ("bundles", fleet.bundles), ("deployments", fleet.deployments)):
        for dup in sorted(_duplicates([i.name for i in items])):
            problems.append(f"$.{kind}: the name {dup!r} is declared twice")
    versions = {m.name: {v.version for v in m.versions} for m in fleet.models}
    for i, model in enumerate(fleet.models):
        known = versions[model.name]
        if model.default_version is not None and model.default_version not in known:
            problems.append(f"$.models[{i}].default_version: {model.default_version!r} is not one of {sorted(known)}")
        for version in model.traffic:
            if version not in known:
                problems.append(f"$.models[{i}].traffic: version {version!r} is not one of {sorted(known)}")
        if model.traffic and sum(model.traffic.values()) <= 0:
            problems.append(f"$.models[{i}].traffic: weights must not all be zero")
    bundles = {b.name for b in fleet.bundles}
    for i, bundle in enumerate(fleet.bundles):
        for j, entry in enumerate(bundle.models):
            path = f"$.bundles[{i}].models[{j}]"
            if entry.model not in versions:
                problems.append(f"{path}.model: {entry.model!r} is not declared under models")
            elif entry.version is not None and entry.version not in versions[entry.model]:
                problems.append(f"{path}.version: {entry.version!r} is not a version of {entry.model!r}")
    for i, dep in enumerate(fleet.deployments):
        path = f"$.deployments[{i}]"
        if dep.bundle not in bundles:
            problems.append(f"{path}.bundle: {dep.bundle!r} is not declared under bundles")
        lo = dep.min_replicas if dep.min_replicas is not None else min(dep.replicas, 1)
        hi = dep.max_replicas if dep.max_replicas is not None else max(dep.replicas, 1)
        if not lo <= dep.replicas <= hi:
            problems.append(f"{path}.replicas: {dep.replicas} is outside min_replicas..max_replicas ({lo}..{hi})")
    return problems


def to_records(fleet: Fleet) -> tuple[list[ModelRecord], list[DeploymentRecord]]:
    """The KV records a (validated) fleet turns into."""
    models = [
        ModelRecord(
            name=m.name,
            versions=[ModelVersionRecord(version=v.version, catalog=v.catalog or m.name, checkpoint=v.checkpoint) for v in m.versions],
            default_version=m.default_version or m.versions[-1].version,
            traffic=dict(m.traffic),
            description=m.description,
        )
        for m in fleet.models
    ]
    defaults = {m.name: m.default_version for m in models}
    bundles = {b.name: b for b in fleet.bundles}
    deployments = []
    for d in fleet.deployments:
        bundle = bundles[d.bundle]
        deployments.append(
            DeploymentRecord(
                name=d.name,
                bundle=d.bundle,
                models=[BundleEntry(model=e.model, version=e.version or defaults[e.model], config=e.config) for e in bundle.models],
                replicas=d.replicas,
                min_replicas=d.min_replicas if d.min_replicas is not None else min(d.replicas, 1),
                max_replicas=d.max_replicas if d.max_replicas is not None else max(d.replicas, 1),
                region=d.region,
                residency=d.residency,
                profile=d.profile,
                mode=d.mode,
                prefill_replicas=d.prefill_replicas,
            )
        )
    return models, deployments
