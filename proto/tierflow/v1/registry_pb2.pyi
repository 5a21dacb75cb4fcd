from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class ModelVersion(_message.Message):
    __slots__ = ("version", "catalog", "checkpoint", "configs", "spec_json", "created_at")
    VERSION_FIELD_NUMBER: _ClassVar[int]
    CATALOG_FIELD_NUMBER: _ClassVar[int]
    CHECKPOINT_FIELD_NUMBER: _ClassVar[int]
    CONFIGS_FIELD_NUMBER: _ClassVar[int]
    SPEC_JSON_FIELD_NUMBER: _ClassVar[int]
    CREATED_AT_FIELD_NUMBER: _ClassVar[int]
    version: str
    catalog: str
    checkpoint: str
    configs: _containers.RepeatedScalarFieldContainer[str]
    spec_json: str
    created_at: float
    def __init__(self, version: _Optional[str] = ..., catalog: _Optional[str] = ..., checkpoint: _Optional[str] = ..., configs: _Optional[_Iterable[str]] = ..., spec_json: _Optional[str] = ..., created_at: _Optional[float] = ...) -> None: ...

class TrafficWeight(_message.Message):
    __slots__ = ("version", "weight")
    VERSION_FIELD_NUMBER: _ClassVar[int]
    WEIGHT_FIELD_NUMBER: _ClassVar[int]
    version: str
    weight: float
    def __init__(self, version: _Optional[str] = ..., weight: _Optional[float] = ...) -> None: ...

class Model(_message.Message):
    __slots__ = ("name", "versions", "default_version", "traffic", "description", "revision", "owned_by", "created_at", "updated_at")
    NAME_FIELD_NUMBER: _ClassVar[int]
    VERSIONS_FIELD_NUMBER: _ClassVar[int]
    DEFAULT_VERSION_FIELD_NUMBER: _ClassVar[int]
    TRAFFIC_FIELD_NUMBER: _ClassVar[int]
    DESCRIPTION_FIELD_NUMBER: _ClassVar[int]
    REVISION_FIELD_NUMBER: _ClassVar[int]
    OWNED_BY_FIELD_NUMBER: _ClassVar[int]
    CREATED_AT_FIELD_NUMBER: _ClassVar[int]
    UPDATED_AT_FIELD_NUMBER: _ClassVar[int]
    name: str
    versions: _containers.RepeatedCompositeFieldContainer[ModelVersion]
    default_version: str
    traffic: _containers.RepeatedCompositeFieldContainer[TrafficWeight]
    description: str
    revision: int
    owned_by: str
    created_at: float
    updated_at: float
    def __init__(self, name: _Optional[str] = ..., versions: _Optional[_Iterable[_Union[ModelVersion, _Mapping]]] = ..., default_version: _Optional[str] = ..., traffic: _Optional[_Iterable[_Union[TrafficWeight, _Mapping]]] = ..., description: _Optional[str] = ..., revision: _Optional[int] = ..., owned_by: _Optional[str] = ..., created_at: _Optional[float] = ..., updated_at: _Optional[float] = ...) -> None: ...

class ListModelsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListModelsResponse(_message.Message):
    __slots__ = ("models",)
    MODELS_FIELD_NUMBER: _ClassVar[int]
    models: _containers.RepeatedCompositeFieldContainer[Model]
    def __init__(self, models: _Optional[_Iterable[_Union[Model, _Mapping]]] = ...) -> None: ...

class GetModelRequest(_message.Message):
    __slots__ = ("name",)
    NAME_FIELD_NUMBER: _ClassVar[int]
    name: str
    def __init__(self, name: _Optional[str] = ...) -> None: ...

class BundleModel(_message.Message):
    __slots__ = ("model", "version", "config")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    CONFIG_FIELD_NUMBER: _ClassVar[int]
    model: str
    version: str
    config: str
    def __init__(self, model: _Optional[str] = ..., version: _Optional[str] = ..., config: _Optional[str] = ...) -> None: ...

class Bundle(_message.Message):
    __slots__ = ("name", "models", "revision")
    NAME_FIELD_NUMBER: _ClassVar[int]
    MODELS_FIELD_NUMBER: _ClassVar[int]
    REVISION_FIELD_NUMBER: _ClassVar[int]
    name: str
    models: _containers.RepeatedCompositeFieldContainer[BundleModel]
    revision: int
    def __init__(self, name: _Optional[str] = ..., models: _Optional[_Iterable[_Union[BundleModel, _Mapping]]] = ..., revision: _Optional[int] = ...) -> None: ...

class ListBundlesRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListBundlesResponse(_message.Message):
    __slots__ = ("bundles",)
    BUNDLES_FIELD_NUMBER: _ClassVar[int]
    bundles: _containers.RepeatedCompositeFieldContainer[Bundle]
    def __init__(self, bundles: _Optional[_Iterable[_Union[Bundle, _Mapping]]] = ...) -> None: ...

class Deployment(_message.Message):
    __slots__ = ("name", "bundle", "models", "replicas", "min_replicas", "max_replicas", "region", "residency", "profile", "mode", "revision", "workload", "prefill_replicas")
    NAME_FIELD_NUMBER: _ClassVar[int]
    BUNDLE_FIELD_NUMBER: _ClassVar[int]
    MODELS_FIELD_NUMBER: _ClassVar[int]
    REPLICAS_FIELD_NUMBER: _ClassVar[int]
    MIN_REPLICAS_FIELD_NUMBER: _ClassVar[int]
    MAX_REPLICAS_FIELD_NUMBER: _ClassVar[int]
    REGION_FIELD_NUMBER: _ClassVar[int]
    RESIDENCY_FIELD_NUMBER: _ClassVar[int]
    PROFILE_FIELD_NUMBER: _ClassVar[int]
    MODE_FIELD_NUMBER: _ClassVar[int]
    REVISION_FIELD_NUMBER: _ClassVar[int]
    WORKLOAD_FIELD_NUMBER: _ClassVar[int]
    PREFILL_REPLICAS_FIELD_NUMBER: _ClassVar[int]
    name: str
    bundle: str
    models: _containers.RepeatedCompositeFieldContainer[BundleModel]
    replicas: int
    min_replicas: int
    max_replicas: int
    region: str
    residency: str
    profile: str
    mode: str
    revision: int
    workload: str
    prefill_replicas: int
    def __init__(self, name: _Optional[str] = ..., bundle: _Optional[str] = ..., models: _Optional[_Iterable[_Union[BundleModel, _Mapping]]] = ..., replicas: _Optional[int] = ..., min_replicas: _Optional[int] = ..., max_replicas: _Optional[int] = ..., region: _Optional[str] = ..., residency: _Optional[str] = ..., profile: _Optional[str] = ..., mode: _Optional[str] = ..., revision: _Optional[int] = ..., workload: _Optional[str] = ..., prefill_replicas: _Optional[int] = ...) -> None: ...

class ListDeploymentsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListDeploymentsResponse(_message.Message):
    __slots__ = ("deployments",)
    DEPLOYMENTS_FIELD_NUMBER: _ClassVar[int]
    deployments: _containers.RepeatedCompositeFieldContainer[Deployment]
    def __init__(self, deployments: _Optional[_Iterable[_Union[Deployment, _Mapping]]] = ...) -> None: ...

class ApplyRequest(_message.Message):
    __slots__ = ("fleet_yaml", "dry_run", "prune", "source")
    FLEET_YAML_FIELD_NUMBER: _ClassVar[int]
    DRY_RUN_FIELD_NUMBER: _ClassVar[int]
    PRUNE_FIELD_NUMBER: _ClassVar[int]
    SOURCE_FIELD_NUMBER: _ClassVar[int]
    fleet_yaml: str
    dry_run: bool
    prune: bool
    source: str
    def __init__(self, fleet_yaml: _Optional[str] = ..., dry_run: _Optional[bool] = ..., prune: _Optional[bool] = ..., source: _Optional[str] = ...) -> None: ...

class FieldChange(_message.Message):
    __slots__ = ("field", "old_json", "new_json")
    FIELD_FIELD_NUMBER: _ClassVar[int]
    OLD_JSON_FIELD_NUMBER: _ClassVar[int]
    NEW_JSON_FIELD_NUMBER: _ClassVar[int]
    field: str
    old_json: str
    new_json: str
    def __init__(self, field: _Optional[str] = ..., old_json: _Optional[str] = ..., new_json: _Optional[str] = ...) -> None: ...

class Change(_message.Message):
    __slots__ = ("kind", "name", "op", "fields", "revision")
    KIND_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    OP_FIELD_NUMBER: _ClassVar[int]
    FIELDS_FIELD_NUMBER: _ClassVar[int]
    REVISION_FIELD_NUMBER: _ClassVar[int]
    kind: str
    name: str
    op: str
    fields: _containers.RepeatedCompositeFieldContainer[FieldChange]
    revision: int
    def __init__(self, kind: _Optional[str] = ..., name: _Optional[str] = ..., op: _Optional[str] = ..., fields: _Optional[_Iterable[_Union[FieldChange, _Mapping]]] = ..., revision: _Optional[int] = ...) -> None: ...

class ApplyResponse(_message.Message):
    __slots__ = ("changes", "problems", "dry_run")
    CHANGES_FIELD_NUMBER: _ClassVar[int]
    PROBLEMS_FIELD_NUMBER: _ClassVar[int]
    DRY_RUN_FIELD_NUMBER: _ClassVar[int]
    changes: _containers.RepeatedCompositeFieldContainer[Change]
    problems: _containers.RepeatedScalarFieldContainer[str]
    dry_run: bool
    def __init__(self, changes: _Optional[_Iterable[_Union[Change, _Mapping]]] = ..., problems: _Optional[_Iterable[str]] = ..., dry_run: _Optional[bool] = ...) -> None: ...

class RolloutRequest(_message.Message):
    __slots__ = ("model", "version", "weight", "expected_revision")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    WEIGHT_FIELD_NUMBER: _ClassVar[int]
    EXPECTED_REVISION_FIELD_NUMBER: _ClassVar[int]
    model: str
    version: str
    weight: float
    expected_revision: int
    def __init__(self, model: _Optional[str] = ..., version: _Optional[str] = ..., weight: _Optional[float] = ..., expected_revision: _Optional[int] = ...) -> None: ...

class PromoteRequest(_message.Message):
    __slots__ = ("model", "version", "expected_revision")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    EXPECTED_REVISION_FIELD_NUMBER: _ClassVar[int]
    model: str
    version: str
    expected_revision: int
    def __init__(self, model: _Optional[str] = ..., version: _Optional[str] = ..., expected_revision: _Optional[int] = ...) -> None: ...

class RollbackRequest(_message.Message):
    __slots__ = ("model", "expected_revision")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    EXPECTED_REVISION_FIELD_NUMBER: _ClassVar[int]
    model: str
    expected_revision: int
    def __init__(self, model: _Optional[str] = ..., expected_revision: _Optional[int] = ...) -> None: ...

class SetTrafficRequest(_message.Message):
    __slots__ = ("model", "traffic", "expected_revision")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    TRAFFIC_FIELD_NUMBER: _ClassVar[int]
    EXPECTED_REVISION_FIELD_NUMBER: _ClassVar[int]
    model: str
    traffic: _containers.RepeatedCompositeFieldContainer[TrafficWeight]
    expected_revision: int
    def __init__(self, model: _Optional[str] = ..., traffic: _Optional[_Iterable[_Union[TrafficWeight, _Mapping]]] = ..., expected_revision: _Optional[int] = ...) -> None: ...

class AddModelVersionRequest(_message.Message):
    __slots__ = ("model", "version", "expected_revision")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    EXPECTED_REVISION_FIELD_NUMBER: _ClassVar[int]
    model: str
    version: ModelVersion
    expected_revision: int
    def __init__(self, model: _Optional[str] = ..., version: _Optional[_Union[ModelVersion, _Mapping]] = ..., expected_revision: _Optional[int] = ...) -> None: ...
