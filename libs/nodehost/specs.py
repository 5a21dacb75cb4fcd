"""How registry records become the emulator's bundle: pure, so nodes, the registry and the
fleet simulator all turn a deployment into the same models.

A node reads the records from the registry's KV bucket (`bundle.fetch_bundle`), the
registry validates fleet files with `version_model_spec`, and the simulator reads a
fleet file; all of them end here.
"""

from __future__ import annotations

from collections.abc import Mapping

import msgspec

from tierflow.contracts import registry
from tierflow.rdu import BundleModel, DeploymentConfig, ModelSpec, model_from_dict

__all__ = ["version_model_spec", "bundle_from_records"]


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


def bundle_from_records(
    deployment: registry.DeploymentRecord, models: Mapping[str, registry.ModelRecord], catalog: Mapping[str, ModelSpec]
) -> list[BundleModel]:
    """The emulator's view of a deployment's bundle: catalog specs and parsed configurations.

    LookupError names the deployment, model or version that is missing.
    """
    bundle = []
    for entry in deployment.models:
        record = models.get(entry.model)
        if record is None:
            raise LookupError(f"deployment {deployment.name!r} bundles {entry.model!r}, which is not registered")
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
