"""What the model registry keeps in its JetStream KV bucket, as the readers see it.

The registry writes these records; the router, the nodes and the autoscaler watch the
bucket and decode them. Keys come from `subjects.model_key` / `subjects.deployment_key`.
"""

from __future__ import annotations

from typing import Annotated, Literal

import msgspec
from msgspec import Meta, Struct

__all__ = [
    "ModelVersionRecord",
    "ModelRecord",
    "BundleEntry",
    "DeploymentRecord",
    "RegistryEvent",
    "model_decoder",
    "deployment_decoder",
]

Name = Annotated[str, Meta(min_length=1, max_length=200, pattern=r"^[A-Za-z0-9][A-Za-z0-9._/:-]*$")]


class ModelVersionRecord(Struct, kw_only=True):
    version: str
    catalog: str = ""  # an entry of the emulator's model catalog (tierflow.rdu.catalog)
    checkpoint: str = ""
    created_at: float = 0.0


class ModelRecord(Struct, kw_only=True):
    """A model as clients name it, with its versions and the split of traffic over them."""

    name: Name
    versions: list[ModelVersionRecord]
    default_version: str
    traffic: dict[str, float] = {}  # version -> weight; empty means all to default_version
    description: str = ""
    owned_by: str = "tierflow"
    created_at: float = 0.0


class BundleEntry(Struct, kw_only=True):
    """One model of a bundle, with the deployment configuration it is served in."""

    model: str
    version: str
    config: str = "ss8192-bs4"


class DeploymentRecord(Struct, kw_only=True):
    """A bundle deployed as N replica nodes in one region / residency boundary."""

    name: Name
    bundle: str
    models: list[BundleEntry]
    replicas: Annotated[int, Meta(ge=0)] = 1
    min_replicas: Annotated[int, Meta(ge=0)] = 1
    max_replicas: Annotated[int, Meta(ge=0)] = 1
    region: str = "local"
    residency: str = ""
    profile: str = "sn40l-16"
    mode: Literal["aggregated", "disaggregated"] = "aggregated"
    prefill_replicas: Annotated[int, Meta(ge=0)] = 0


class RegistryEvent(Struct, kw_only=True):
    """Published on `subjects.REGISTRY_EVENTS` after every change the registry commits."""

    kind: Literal["model", "deployment"]
    name: str
    op: Literal["put", "delete"]
    revision: int


model_decoder = msgspec.json.Decoder(ModelRecord)
deployment_decoder = msgspec.json.Decoder(DeploymentRecord)
event_decoder = msgspec.json.Decoder(RegistryEvent)
