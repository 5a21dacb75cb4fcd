"""What the model registry keeps in its JetStream KV bucket, as the readers see it.

The registry writes these records; the router, the nodes and the autoscaler watch the
bucket and decode them. Keys come from `subjects.model_key` / `subjects.deployment_key`.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

import msgspec
from msgspec import Meta, Struct

__all__ = [
    "ModelVersionRecord",
    "ModelRecord",
    "BundleEntry",
    "BundleRecord",
    "Workload",
    "DeploymentRecord",
    "RegistryEvent",
    "model_decoder",
    "bundle_decoder",
    "event_decoder",
    "deployment_decoder",
]

Name = Annotated[str, Meta(min_length=1, max_length=200, pattern=r"^[A-Za-z0-9][A-Za-z0-9._/:-]*$")]


class ModelVersionRecord(Struct, kw_only=True):
    """One checkpoint of a model and the configurations it was compiled for."""

    version: str
    catalog: str = ""  # an entry of the emulator's model catalog (tierflow.rdu.catalog)
    checkpoint: str = ""
    # A bring-your-own shape for the emulator (tierflow.rdu.model_from_dict fields),
    # used instead of `catalog` when the checkpoint is not in the catalog.
    spec: dict[str, Any] | None = None
    # Deployment configurations (e.g. "ss8192-bs4") this checkpoint exists in; empty means
    # any configuration whose sequence length fits the model.
    configs: list[str] = []
    created_at: float = 0.0


class ModelRecord(Struct, kw_only=True):
    """A model as clients name it, with its versions and the split of traffic over them."""

    name: Name
    versions: list[ModelVersionRecord]
    # The stable version: all traffic goes here unless `traffic` says otherwise, and a
    # rollback returns all traffic here.
    default_version: str
    # version -> weight (any scale); empty means 100% to default_version. A canary is
    # {stable: 90, canary: 10}; a blue-green cut-over is {green: 1}.
    traffic: dict[str, float] = {}
    description: str = ""
    owned_by: str = "tierflow"
    created_at: float = 0.0
    updated_at: float = 0.0


class BundleEntry(Struct, kw_only=True):
    """One model of a bundle, with the deployment configuration it is served in."""

    model: str
    version: str
    config: str = "ss8192-bs4"


class BundleRecord(Struct, kw_only=True):
    """A bundle template: which models (versions, configurations) share a node."""

    name: Name
    models: list[BundleEntry]


Workload = Literal["bundle", "high-interactivity", "high-throughput"]


class DeploymentRecord(Struct, kw_only=True):
    """A bundle deployed as N replica nodes in one region / residency boundary.

    `models` is the bundle template resolved at apply time, so readers (nodes, router,
    autoscaler) need one key, not a join; the registry rewrites deployments when their
    bundle template changes.
    """

    name: Name
    bundle: str
    models: list[BundleEntry]
    workload: Workload = "bundle"
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

    kind: Literal["model", "bundle", "deployment"]
    name: str
    op: Literal["put", "delete"]
    revision: int


model_decoder = msgspec.json.Decoder(ModelRecord)
bundle_decoder = msgspec.json.Decoder(BundleRecord)
deployment_decoder = msgspec.json.Decoder(DeploymentRecord)
event_decoder = msgspec.json.Decoder(RegistryEvent)
