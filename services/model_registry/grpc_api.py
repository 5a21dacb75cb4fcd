"""The registry's gRPC admin API (tierflow.v1.ModelRegistry)."""

from __future__ import annotations

import grpc

from tierflow.contracts import registry
from tierflow.runtime.grpc_server import start_grpc_server
from tierflow.services.model_registry.store import RegistryStore
from tierflow.v1 import registry_pb2 as pb
from tierflow.v1 import registry_pb2_grpc as pb_grpc

__all__ = ["start_grpc"]


def _model_pb(record: registry.ModelRecord, revision: int) -> pb.Model:
    return pb.Model(
        name=record.name,
        versions=[pb.ModelVersion(version=v.version, catalog=v.catalog, checkpoint=v.checkpoint) for v in record.versions],
        default_version=record.default_version,
        traffic=[pb.TrafficWeight(version=k, weight=w) for k, w in sorted(record.traffic.items())],
        description=record.description,
        revision=revision,
    )


def _deployment_pb(d: registry.DeploymentRecord, revision: int) -> pb.Deployment:
    return pb.Deployment(
        name=d.name,
        bundle=d.bundle,
        models=[pb.BundleModel(model=e.model, version=e.version, config=e.config) for e in d.models],
        replicas=d.replicas,
        min_replicas=d.min_replicas,
        max_replicas=d.max_replicas,
        region=d.region,
        residency=d.residency,
        profile=d.profile,
        mode=d.mode,
        revision=revision,
    )


class RegistryServicer(pb_grpc.ModelRegistryServicer):
    def __init__(self, store: RegistryStore) -> None:
        self._store = store

    async def ListModels(self, request: pb.ListModelsRequest, context: grpc.aio.ServicerContext) -> pb.ListModelsResponse:
        return pb.ListModelsResponse(models=[_model_pb(m, r) for m, r in await self._store.models()])

    async def GetModel(self, request: pb.GetModelRequest, context: grpc.aio.ServicerContext) -> pb.Model:
        if not request.name:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "name is required")
        found = await self._store.model(request.name)
        if found is None:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"model {request.name!r} is not registered")
        return _model_pb(*found)  # type: ignore[misc]

    async def ListDeployments(self, request: pb.ListDeploymentsRequest, context: grpc.aio.ServicerContext) -> pb.ListDeploymentsResponse:
        return pb.ListDeploymentsResponse(deployments=[_deployment_pb(d, r) for d, r in await self._store.deployments()])


async def start_grpc(store: RegistryStore, host: str, port: int) -> grpc.aio.Server:
    servicer = RegistryServicer(store)
    name = pb.DESCRIPTOR.services_by_name["ModelRegistry"].full_name
    return await start_grpc_server(lambda server: pb_grpc.add_ModelRegistryServicer_to_server(servicer, server), [name], host, port)
