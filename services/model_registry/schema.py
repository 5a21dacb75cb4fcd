"""The fleet file's shape: what a platform team writes and keeps in git.

Strict on purpose (`forbid_unknown_fields`): an unknown key is a typo, and a typo in a
fleet file must not pass silently. Fields a person may leave out have defaults; the two
that describe *runtime* state (`default_version`, `traffic`) are `None` when left out,
which means "keep what the registry has", so re-applying the file from git never undoes
a rollout made with `tierflow rollout`.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from msgspec import Meta, Struct

__all__ = ["Fleet", "VersionDecl", "ModelDecl", "BundleModelDecl", "BundleDecl", "DeploymentDecl", "SECTIONS"]

Name = Annotated[str, Meta(min_length=1, max_length=200, pattern=r"^[A-Za-z0-9][A-Za-z0-9._/:-]*$")]
KeyName = Annotated[str, Meta(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9_-]+$")]
VersionName = Annotated[str, Meta(min_length=1, max_length=64)]
Workload = Literal["bundle", "high-interactivity", "high-throughput"]


class VersionDecl(Struct, forbid_unknown_fields=True):
    version: VersionName
    catalog: str = ""  # emulator catalog entry; default: the model's name (unless `spec`)
    checkpoint: str = ""
    spec: dict[str, Any] | None = None  # bring-your-own shape instead of a catalog entry
    configs: list[str] = []  # the configurations this checkpoint was compiled for


class ModelDecl(Struct, forbid_unknown_fields=True):
    name: Name
    versions: Annotated[list[VersionDecl], Meta(min_length=1)]
    default_version: str | None = None  # None: keep the registry's (new model: last version)
    traffic: dict[str, Annotated[float, Meta(ge=0.0)]] | None = None  # None: keep the registry's
    description: str = ""


class BundleModelDecl(Struct, forbid_unknown_fields=True):
    model: Name
    version: str | None = None  # None: the model's default_version in this file, else its last
    config: str = "ss8192-bs4"


class BundleDecl(Struct, forbid_unknown_fields=True):
    name: KeyName
    models: Annotated[list[BundleModelDecl], Meta(min_length=1)]


class DeploymentDecl(Struct, forbid_unknown_fields=True):
    name: KeyName
    bundle: KeyName
    workload: Workload = "bundle"
    replicas: Annotated[int, Meta(ge=0)] = 1  # decode (or aggregated) nodes
    min_replicas: Annotated[int, Meta(ge=0)] | None = None
    max_replicas: Annotated[int, Meta(ge=0)] | None = None
    region: str = "local"
    residency: str = ""
    profile: str = "sn40l-16"
    mode: Literal["aggregated", "disaggregated"] = "aggregated"
    prefill_replicas: Annotated[int, Meta(ge=0)] = 0


class Fleet(Struct, forbid_unknown_fields=True):
    models: list[ModelDecl] = []
    bundles: list[BundleDecl] = []
    deployments: list[DeploymentDecl] = []


# section name -> the type of one item, in the order the file is checked
SECTIONS: dict[str, type[Struct]] = {"models": ModelDecl, "bundles": BundleDecl, "deployments": DeploymentDecl}
