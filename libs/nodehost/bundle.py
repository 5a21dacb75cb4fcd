"""What a node serves: its deployment's bundle, read from the registry's KV bucket.

A node is started with only a deployment name; the registry is the one place that says
which models (and versions and configurations) that deployment bundles. The node waits
for the record to exist, so nodes may start before the registry has applied its fleet.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping

import msgspec
from nats.js.client import JetStreamContext
from nats.js.errors import BucketNotFoundError, KeyNotFoundError

from tierflow.contracts import registry, subjects
from tierflow.rdu import BundleModel, DeploymentConfig, HardwareProfile, ModelSpec, load_catalog, load_profiles, model_from_dict
from tierflow.runtime.kv import open_bucket

__all__ = ["fetch_deployment", "build_bundle", "resolve_profile", "version_model_spec"]

log = logging.getLogger(__name__)


async def _get(js: JetStreamContext, key: str) -> bytes | None:
    try:
        kv = await open_bucket(js, subjects.REGISTRY_BUCKET)
        return (await kv.get(key)).value
    except (BucketNotFoundError, KeyNotFoundError):
        return None


async def fetch_deployment(js: JetStreamContext, name: str, stopping: asyncio.Event, *, timeout: float = 60.0) -> registry.DeploymentRecord:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        value = await _get(js, subjects.deployment_key(name))
        if value is not None:
            return registry.deployment_decoder.decode(value)
        if stopping.is_set() or loop.time() > deadline:
            raise LookupError(f"deployment {name!r} is not in the registry (apply a fleet file that declares it)")
        log.info("waiting for deployment %r in the registry", name)
        await asyncio.sleep(0.5)


async def build_bundle(js: JetStreamContext, deployment: registry.DeploymentRecord) -> list[BundleModel]:
    """The emulator's view of the bundle: catalog specs and parsed configurations."""
    catalog = load_catalog(None)
    bundle = []
    for entry in deployment.models:
        value = await _get(js, subjects.model_key(entry.model))
        if value is None:
            raise LookupError(f"deployment {deployment.name!r} bundles {entry.model!r}, which is not registered")
        record = registry.model_decoder.decode(value)
        version = next((v for v in record.versions if v.version == entry.version), None)
        if version is None:
            raise LookupError(f"model {entry.model!r} has no version {entry.version!r}")
        try:
            spec = version_model_spec(entry.model, version, catalog)
        except ValueError as exc:
            raise LookupError(str(exc)) from None
        # The API name is what requests carry; the catalog entry only supplies the shape.
        bundle.append(BundleModel(spec=spec, config=DeploymentConfig.parse(entry.config), version=entry.version))
    return bundle


def version_model_spec(model: str, version: registry.ModelVersionRecord, catalog: Mapping[str, ModelSpec]) -> ModelSpec:
    """The emulator's shape of one registered version, named as API clients name the model.

    The one place that says how a registry version becomes a `ModelSpec`: nodes build
    their bundle with it and the registry validates fleet files with it, so a file the
    registry accepts is a bundle every node can build. A bring-your-own `spec` wins over
    `catalog`; without either the model's own name is looked up in the catalog. Raises
    ValueError with a message naming the model, the version and what to fix.
    """
    if version.spec is not None:
        fields = {k: v for k, v in version.spec.items() if k != "name"}
        try:
            return model_from_dict(fields, name=model, known=catalog)
        except ValueError as exc:
            raise ValueError(f"version {version.version!r}, bring-your-own spec: {exc}") from None
    entry = version.catalog or model
    spec = catalog.get(entry)
    if spec is None:
        raise ValueError(
            f"model {model!r} version {version.version!r} names catalog entry {entry!r}, which the emulator does not know"
            f" (known: {', '.join(sorted(catalog))}); fix `catalog` or give a bring-your-own `spec`"
        )
    return msgspec.structs.replace(spec, name=model)


def resolve_profile(name: str) -> HardwareProfile:
    profiles = load_profiles(None)
    if name not in profiles:
        raise LookupError(f"hardware profile {name!r} is unknown; known: {', '.join(sorted(profiles))}")
    return profiles[name]
