"""The small admin mutations of one model, as pure functions: record in, record out.

Each returns the record unchanged (the same object) when there is nothing to do, so the
caller writes nothing and announces nothing; otherwise a new record with `updated_at`
set to `now`. Bad input raises `errors.NotFound` / `InvalidArgument` / `AlreadyExists`
with a message that says what to do instead. Whether the result is *servable* (traffic
only to deployed versions, configurations that exist) is `rules.check_state`'s job.

Traffic semantics (weights stored as percentages):

- rollout(v, w), 0 < w < 100: a canary, {default: 100-w, v: w}, replacing any split;
- rollout(v, 100): a blue-green cut-over, {v: 100}; the default stays, so a rollback
  returns all traffic to it;
- rollout(v, 0) and rollback(): no split, all traffic to the default;
- promote(v): v becomes the default and the split is cleared.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

from msgspec import structs

from tierflow.contracts import registry
from tierflow.services.model_registry.errors import AlreadyExists, InvalidArgument, NotFound

__all__ = ["rollout", "promote", "rollback", "set_traffic", "add_version", "require_version"]

_MAX_VERSION_LEN = 64


def require_version(model: registry.ModelRecord, version: str) -> registry.ModelVersionRecord:
    if not version:
        raise InvalidArgument("version is required (e.g. --version v2)")
    found = next((v for v in model.versions if v.version == version), None)
    if found is None:
        names = ", ".join(v.version for v in model.versions)
        raise NotFound(f"model {model.name!r} has no version {version!r} (versions: {names}); add it first (AddModelVersion, or a fleet file)")
    return found


def _changed(model: registry.ModelRecord, now: float, **fields: object) -> registry.ModelRecord:
    if all(getattr(model, k) == v for k, v in fields.items()):
        return model
    return structs.replace(model, updated_at=now, **fields)


def rollout(model: registry.ModelRecord, version: str, weight: float, *, now: float) -> registry.ModelRecord:
    require_version(model, version)
    if not math.isfinite(weight) or not 0.0 <= weight <= 100.0:
        raise InvalidArgument(
            f"weight must be a percentage between 0 and 100, got {weight:g}:"
            " the share of traffic for the new version (100 cuts over blue-green, 0 stops the canary)"
        )
    if version == model.default_version:
        raise InvalidArgument(
            f"{version!r} is already the default version of {model.name!r}; roll out another version,"
            f" or run `tierflow rollback {model.name}` to send all traffic to {version!r}"
        )
    if weight == 0.0:
        traffic: dict[str, float] = {}
    elif weight == 100.0:
        traffic = {version: 100.0}
    else:
        traffic = {model.default_version: 100.0 - weight, version: weight}
    return _changed(model, now, traffic=traffic)


def promote(model: registry.ModelRecord, version: str, *, now: float) -> registry.ModelRecord:
    require_version(model, version)
    return _changed(model, now, default_version=version, traffic={})


def rollback(model: registry.ModelRecord, *, now: float) -> registry.ModelRecord:
    return _changed(model, now, traffic={})


def set_traffic(model: registry.ModelRecord, weights: Mapping[str, float], *, now: float) -> registry.ModelRecord:
    for version, weight in weights.items():
        require_version(model, version)
        if not math.isfinite(weight) or weight < 0:
            raise InvalidArgument(f"the weight of {version!r} must be a finite number >= 0, got {weight:g}")
    if weights and sum(weights.values()) <= 0:
        raise InvalidArgument("weights must not all be zero; send an empty split to route everything to the default version")
    return _changed(model, now, traffic=dict(weights))


def add_version(model: registry.ModelRecord, version: registry.ModelVersionRecord, *, now: float) -> registry.ModelRecord:
    """Append a version. Adding the same version again is a no-op (safe to retry); adding
    a different one under an existing name is refused: versions are immutable."""
    if not version.version or len(version.version) > _MAX_VERSION_LEN:
        raise InvalidArgument(f"version must be 1-{_MAX_VERSION_LEN} characters, got {version.version!r}")
    if not version.catalog and version.spec is None:
        version = structs.replace(version, catalog=model.name)  # as a fleet file would say it
    existing = next((v for v in model.versions if v.version == version.version), None)
    if existing is not None:
        if structs.replace(existing, created_at=0.0) == structs.replace(version, created_at=0.0):
            return model
        raise AlreadyExists(f"model {model.name!r} already has a different version {version.version!r}; versions are immutable, add a new one")
    return structs.replace(model, versions=[*model.versions, structs.replace(version, created_at=now)], updated_at=now)
