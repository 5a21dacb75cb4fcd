"""What a node serves: its deployment's bundle, read from the registry's KV bucket.

A node is started with only a deployment name; the registry is the one place that says
which models (and versions and configurations) that deployment bundles. The node waits
for the record to exist, so nodes may start before the registry has applied its fleet.
"""

from __future__ import annotations

import asyncio
import logging

from nats.js.client import JetStreamContext
from nats.js.errors import BucketNotFoundError, KeyNotFoundError

from tierflow.contracts import registry, subjects
from tierflow.nodehost.specs import bundle_from_records
from tierflow.rdu import BundleModel, load_catalog
from tierflow.runtime.kv import open_bucket

__all__ = ["fetch_deployment", "build_bundle"]

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
    """The emulator's view of the bundle, from the model records in the registry."""
    models = {}
    for entry in deployment.models:
        value = await _get(js, subjects.model_key(entry.model))
        if value is not None:
            models[entry.model] = registry.model_decoder.decode(value)
    return bundle_from_records(deployment, models, load_catalog(None))
