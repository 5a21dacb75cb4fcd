"""What a fleet file means, given what the registry already holds: the desired state.

Pure: records in, records out, the time passed in. The file is the truth for what it
declares, with two deliberate exceptions that keep re-applying a file from git harmless:

- `default_version` and `traffic` left out of a model keep the registry's values, so an
  apply never undoes a rollout, promote or rollback made through the admin API (a new
  model gets its last version as default and no split);
- versions the registry has and the file does not (added with AddModelVersion) are kept,
  after the file's own.

Records the file does not mention are kept too, unless `prune`; kept deployments are
re-resolved from their (possibly changed) bundle template. A bundle entry without a
version pins the model's `default_version` as written in the file, else its last
version: it depends on the file alone, so the same file always yields the same bundles.

Construction is lenient (an unknown reference resolves to an empty version or no
models) so that `rules.check_state` can report every problem at once, with its path.
"""

from __future__ import annotations

from msgspec import structs

from tierflow.contracts import registry
from tierflow.services.model_registry.schema import Fleet, ModelDecl
from tierflow.services.model_registry.state import State

__all__ = ["desired_state", "to_records"]


def to_records(fleet: Fleet) -> State:
    """The records a fleet file turns into on an empty registry (timestamps 0)."""
    return desired_state(fleet, State(), prune=True, now=0.0)


def desired_state(fleet: Fleet, current: State, *, prune: bool, now: float) -> State:
    desired = State() if prune else current.copy()
    for decl in fleet.models:
        desired.models[decl.name] = _model(decl, current.models.get(decl.name), prune=prune, now=now)
    pins = {m.name: _pinned_version(m) for m in fleet.models}
    for b in fleet.bundles:
        entries = [registry.BundleEntry(model=e.model, version=e.version or pins.get(e.model, ""), config=e.config) for e in b.models]
        desired.bundles[b.name] = registry.BundleRecord(name=b.name, models=entries)
    for d in fleet.deployments:
        bundle = desired.bundles.get(d.bundle)
        desired.deployments[d.name] = registry.DeploymentRecord(
            name=d.name,
            bundle=d.bundle,
            models=list(bundle.models) if bundle is not None else [],
            workload=d.workload,
            replicas=d.replicas,
            min_replicas=d.min_replicas if d.min_replicas is not None else min(d.replicas, 1),
            max_replicas=d.max_replicas if d.max_replicas is not None else max(d.replicas, 1),
            region=d.region,
            residency=d.residency,
            profile=d.profile,
            mode=d.mode,
            prefill_replicas=d.prefill_replicas,
        )
    declared = {d.name for d in fleet.deployments}
    for name, dep in list(desired.deployments.items()):
        bundle = desired.bundles.get(dep.bundle)
        if name not in declared and bundle is not None and bundle.models != dep.models:
            desired.deployments[name] = structs.replace(dep, models=list(bundle.models))  # template changed
    return desired


def _pinned_version(m: ModelDecl) -> str:
    return m.default_version or m.versions[-1].version


def _model(decl: ModelDecl, current: registry.ModelRecord | None, *, prune: bool, now: float) -> registry.ModelRecord:
    old_versions = {v.version: v for v in current.versions} if current is not None else {}
    versions = []
    for v in decl.versions:
        candidate = registry.ModelVersionRecord(
            version=v.version,
            catalog=v.catalog or (decl.name if v.spec is None else ""),
            checkpoint=v.checkpoint,
            spec=v.spec,
            configs=list(v.configs),
            created_at=now,
        )
        old = old_versions.get(v.version)
        versions.append(structs.replace(candidate, created_at=old.created_at) if old is not None else candidate)
    if current is not None and not prune:
        declared = {v.version for v in decl.versions}
        versions += [v for v in current.versions if v.version not in declared]
    names = {v.version for v in versions}
    if decl.default_version is not None:
        default = decl.default_version
    elif current is not None and current.default_version in names:
        default = current.default_version
    else:
        default = decl.versions[-1].version
    if decl.traffic is not None:
        traffic = dict(decl.traffic)
    else:
        traffic = dict(current.traffic) if current is not None else {}
    record = registry.ModelRecord(
        name=decl.name,
        versions=versions,
        default_version=default,
        traffic=traffic,
        description=decl.description,
        owned_by=current.owned_by if current is not None else "tierflow",
        created_at=current.created_at if current is not None else now,
        updated_at=current.updated_at if current is not None else now,
    )
    if current is not None and record != current:
        record = structs.replace(record, updated_at=now)
    return record
