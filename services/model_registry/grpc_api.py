"""The registry's gRPC admin API (tierflow.v1.ModelRegistry): wire data in, operations out.

Only translation lives here: protobuf <-> records, `errors.RegistryError` -> status
codes (one table, `STATUS`), and one structured log record plus one metric per call,
naming the caller's identity; every call that writes (or tried to: refused ones too,
for a missing credential as well) is also an audit record (`tierflow.audit.registry`).
What each call does is `service.RegistryService`'s and `mutations`' business; who may
call is `admin_auth`'s, an interceptor in front of the servicer.
"""

from __future__ import annotations

import functools
import logging
import math
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import grpc
import msgspec

from tierflow.contracts import registry
from tierflow.runtime.audit import AuditLog
from tierflow.runtime.clock import Clock
from tierflow.runtime.grpc_server import start_grpc_server
from tierflow.services.model_registry import mutations
from tierflow.services.model_registry.admin_auth import CALLER, READS, UNAUTHENTICATED_ADMIN, AdminAuth, AdminAuthInterceptor, Caller
from tierflow.services.model_registry.errors import Aborted, AlreadyExists, FailedPrecondition, InvalidArgument, NotFound, RegistryError, Unavailable
from tierflow.services.model_registry.fleet import FleetError
from tierflow.services.model_registry.metrics import RegistryMetrics
from tierflow.services.model_registry.plan import Change, summary
from tierflow.services.model_registry.service import ModelResult, RegistryService
from tierflow.v1 import registry_pb2 as pb
from tierflow.v1 import registry_pb2_grpc as pb_grpc

__all__ = ["start_grpc", "RegistryServicer", "STATUS"]

log = logging.getLogger(__name__)

STATUS: dict[type[RegistryError], grpc.StatusCode] = {
    NotFound: grpc.StatusCode.NOT_FOUND,
    InvalidArgument: grpc.StatusCode.INVALID_ARGUMENT,
    FailedPrecondition: grpc.StatusCode.FAILED_PRECONDITION,
    AlreadyExists: grpc.StatusCode.ALREADY_EXISTS,
    Aborted: grpc.StatusCode.ABORTED,
    Unavailable: grpc.StatusCode.UNAVAILABLE,
}

_json = msgspec.json.Encoder()
Fields = dict[str, Any]
R = TypeVar("R")
Handler = Callable[[Any, Any, grpc.aio.ServicerContext, Fields], Awaitable[R]]


# --------------------------------------------------------------------------- records -> wire


def model_pb(record: registry.ModelRecord, revision: int) -> pb.Model:
    return pb.Model(
        name=record.name,
        versions=[
            pb.ModelVersion(
                version=v.version, catalog=v.catalog, checkpoint=v.checkpoint, configs=v.configs,
                spec_json=_json.encode(v.spec).decode() if v.spec is not None else "", created_at=v.created_at,
            )
            for v in record.versions
        ],  # fmt: skip
        default_version=record.default_version,
        traffic=[pb.TrafficWeight(version=k, weight=w) for k, w in sorted(record.traffic.items())],
        description=record.description,
        revision=revision,
        owned_by=record.owned_by,
        created_at=record.created_at,
        updated_at=record.updated_at,
    )


def _entries_pb(entries: list[registry.BundleEntry]) -> list[pb.BundleModel]:
    return [pb.BundleModel(model=e.model, version=e.version, config=e.config) for e in entries]


def deployment_pb(d: registry.DeploymentRecord, revision: int) -> pb.Deployment:
    return pb.Deployment(
        name=d.name, bundle=d.bundle, models=_entries_pb(d.models), replicas=d.replicas, min_replicas=d.min_replicas,
        max_replicas=d.max_replicas, region=d.region, residency=d.residency, profile=d.profile, mode=d.mode,
        revision=revision, workload=d.workload, prefill_replicas=d.prefill_replicas,
    )  # fmt: skip


def change_pb(c: Change) -> pb.Change:
    def text(value: Any) -> str:
        return "" if value is msgspec.UNSET else _json.encode(value).decode()

    fields = [pb.FieldChange(field=f.field, old_json=text(f.old), new_json=text(f.new)) for f in c.fields]
    return pb.Change(kind=c.kind, name=c.name, op=c.op, fields=fields, revision=c.revision)


# --------------------------------------------------------------------------- wire -> records


def _required(value: str, what: str) -> str:
    if not value:
        raise InvalidArgument(f"{what} is required")
    return value


def _version_record(v: pb.ModelVersion) -> registry.ModelVersionRecord:
    spec = None
    if v.spec_json:
        try:
            spec = msgspec.json.decode(v.spec_json)
        except msgspec.DecodeError as exc:
            raise InvalidArgument(f"version.spec_json is not valid JSON: {exc}") from None
        except RecursionError:  # msgspec's guard against deep nesting: the caller's error, not ours
            raise InvalidArgument("version.spec_json nests JSON too deeply") from None
        if not isinstance(spec, dict):
            raise InvalidArgument("version.spec_json must be a JSON object of tierflow.rdu.model_from_dict fields")
    return registry.ModelVersionRecord(version=v.version, catalog=v.catalog, checkpoint=v.checkpoint, spec=spec, configs=list(v.configs))


def _weights(traffic: Any) -> dict[str, float]:
    weights: dict[str, float] = {}
    for t in traffic:
        if t.version in weights:
            raise InvalidArgument(f"traffic names version {t.version!r} twice")
        weights[t.version] = t.weight
    return weights


# --------------------------------------------------------------------------- the servicer


def _admin(method: Handler[R]) -> Callable[[Any, Any, grpc.aio.ServicerContext], Awaitable[R]]:
    """Run one admin call: map errors to status codes, then one log record and one metric."""
    name = method.__name__

    @functools.wraps(method)
    async def call(self: RegistryServicer, request: Any, context: grpc.aio.ServicerContext) -> R:
        started = self._clock.monotonic()
        fields: Fields = {}
        code = grpc.StatusCode.OK
        message = ""
        try:
            return await method(self, request, context, fields)
        except RegistryError as exc:
            code, message = STATUS[type(exc)], exc.message
        except Exception as exc:
            log.exception("admin call %s failed", name)
            code, message = grpc.StatusCode.INTERNAL, f"internal error: {exc}"
        finally:
            self._metrics.calls.labels(name, code.name).inc()
            caller = CALLER.get() or Caller(UNAUTHENTICATED_ADMIN, True, peer=context.peer())
            record = {"method": name, "code": code.name, "duration_ms": round((self._clock.monotonic() - started) * 1000, 3), "peer": context.peer(),
                      "identity": caller.identity, **({"user": caller.user} if caller.user else {}), **fields}  # fmt: skip
            if message:
                record["error"] = message
            log.info("admin %s %s", name, code.name, extra={"fields": record})
            if name not in READS:
                self._audited(name, caller, code, message, fields, context.peer())
        await context.abort(code, message)
        raise AssertionError("unreachable: abort raises")

    return call


def _target(fields: Fields) -> str:
    return str(fields.get("model") or fields.get("source") or "")


class RegistryServicer(pb_grpc.ModelRegistryServicer):
    def __init__(self, service: RegistryService, clock: Clock, metrics: RegistryMetrics, audit: AuditLog | None = None) -> None:
        self._service = service
        self._clock = clock
        self._metrics = metrics
        self._audit = audit

    def _audited(self, method: str, caller: Caller, code: grpc.StatusCode, message: str, fields: Fields, peer: str) -> None:
        """One audit record of a call that writes (or would have), whatever its outcome."""
        if self._audit is None:
            return
        detail: Fields = {"code": code.name, "peer": peer, **{k: v for k, v in fields.items() if k not in ("model",)}}
        if caller.user:
            detail["user"] = caller.user
        if message:
            detail["error"] = message
        ok = code == grpc.StatusCode.OK and not fields.get("problems")  # an invalid fleet file is answered OK, but nothing was written
        self._audit.record("registry", method, identity=caller.identity, target=_target(fields), ok=ok, detail=detail)

    def refused(self, method: str, caller: Caller, request: Any) -> None:
        """A call the credential check turned away: counted, logged and audited like any other
        (with what it would have acted on: the request's model or fleet file name)."""
        self._metrics.calls.labels(method, grpc.StatusCode.UNAUTHENTICATED.name).inc()
        fields: Fields = {k: v for k in ("model", "source") if isinstance(v := getattr(request, k, ""), str) and v}
        log.warning("admin %s UNAUTHENTICATED", method, extra={"fields": {
            "method": method, "code": "UNAUTHENTICATED", "peer": caller.peer, "identity": caller.identity, "error": caller.problem,
            **({"user": caller.user} if caller.user else {}), **fields,
        }})  # fmt: skip
        self._audited(method, caller, grpc.StatusCode.UNAUTHENTICATED, caller.problem, fields, caller.peer)

    # ---- reads

    @_admin
    async def ListModels(self, request: pb.ListModelsRequest, context: grpc.aio.ServicerContext, fields: Fields) -> pb.ListModelsResponse:
        snap = await self._service.read()
        models = [model_pb(m, snap.revision("model", n)) for n, m in sorted(snap.state.models.items())]
        fields["count"] = len(models)
        return pb.ListModelsResponse(models=models)

    @_admin
    async def GetModel(self, request: pb.GetModelRequest, context: grpc.aio.ServicerContext, fields: Fields) -> pb.Model:
        fields["model"] = _required(request.name, "name")
        snap = await self._service.read()
        record = snap.state.models.get(request.name)
        if record is None:
            raise NotFound(f"model {request.name!r} is not registered")
        return model_pb(record, snap.revision("model", request.name))

    @_admin
    async def ListDeployments(self, request: pb.ListDeploymentsRequest, context: grpc.aio.ServicerContext, fields: Fields) -> pb.ListDeploymentsResponse:
        snap = await self._service.read()
        deployments = [deployment_pb(d, snap.revision("deployment", n)) for n, d in sorted(snap.state.deployments.items())]
        fields["count"] = len(deployments)
        return pb.ListDeploymentsResponse(deployments=deployments)

    @_admin
    async def ListBundles(self, request: pb.ListBundlesRequest, context: grpc.aio.ServicerContext, fields: Fields) -> pb.ListBundlesResponse:
        snap = await self._service.read()
        bundles = [pb.Bundle(name=n, models=_entries_pb(b.models), revision=snap.revision("bundle", n)) for n, b in sorted(snap.state.bundles.items())]
        fields["count"] = len(bundles)
        return pb.ListBundlesResponse(bundles=bundles)

    # ---- fleet files

    @_admin
    async def Apply(self, request: pb.ApplyRequest, context: grpc.aio.ServicerContext, fields: Fields) -> pb.ApplyResponse:
        fields.update(source=request.source or "fleet file", dry_run=request.dry_run, prune=request.prune)
        try:
            changes = await self._service.apply(request.fleet_yaml, dry_run=request.dry_run, prune=request.prune, source=request.source or "fleet file")
        except FleetError as exc:
            fields["problems"] = len(exc.problems)
            return pb.ApplyResponse(problems=exc.problems, dry_run=request.dry_run)
        fields.update(summary(changes))
        return pb.ApplyResponse(changes=[change_pb(c) for c in changes], dry_run=request.dry_run)

    # ---- one model

    def _done(self, result: ModelResult, fields: Fields) -> pb.Model:
        fields.update(op=result.op, revision=result.revision)
        return model_pb(result.record, result.revision)

    @_admin
    async def Rollout(self, request: pb.RolloutRequest, context: grpc.aio.ServicerContext, fields: Fields) -> pb.Model:
        fields.update(model=request.model, version=request.version, weight=request.weight if math.isfinite(request.weight) else str(request.weight))
        result = await self._service.update_model(
            _required(request.model, "model"),
            lambda m, now: mutations.rollout(m, request.version, request.weight, now=now),
            expected_revision=request.expected_revision,
        )
        return self._done(result, fields)

    @_admin
    async def Promote(self, request: pb.PromoteRequest, context: grpc.aio.ServicerContext, fields: Fields) -> pb.Model:
        fields.update(model=request.model, version=request.version)
        result = await self._service.update_model(
            _required(request.model, "model"),
            lambda m, now: mutations.promote(m, request.version, now=now),
            expected_revision=request.expected_revision,
        )
        return self._done(result, fields)

    @_admin
    async def Rollback(self, request: pb.RollbackRequest, context: grpc.aio.ServicerContext, fields: Fields) -> pb.Model:
        fields["model"] = request.model
        result = await self._service.update_model(
            _required(request.model, "model"),
            lambda m, now: mutations.rollback(m, now=now),
            expected_revision=request.expected_revision,
            check=False,  # the emergency lever: one read, one write, never refused
        )
        return self._done(result, fields)

    @_admin
    async def SetTraffic(self, request: pb.SetTrafficRequest, context: grpc.aio.ServicerContext, fields: Fields) -> pb.Model:
        weights = _weights(request.traffic)
        fields.update(model=request.model, traffic=weights)
        result = await self._service.update_model(
            _required(request.model, "model"),
            lambda m, now: mutations.set_traffic(m, weights, now=now),
            expected_revision=request.expected_revision,
        )
        return self._done(result, fields)

    @_admin
    async def AddModelVersion(self, request: pb.AddModelVersionRequest, context: grpc.aio.ServicerContext, fields: Fields) -> pb.Model:
        version = _version_record(request.version)
        fields.update(model=request.model, version=version.version)
        result = await self._service.update_model(
            _required(request.model, "model"),
            lambda m, now: mutations.add_version(m, version, now=now),
            expected_revision=request.expected_revision,
            refuse=InvalidArgument,
        )
        return self._done(result, fields)


async def start_grpc(
    service: RegistryService, clock: Clock, metrics: RegistryMetrics, host: str, port: int, *, auth: AdminAuth,
    audit: AuditLog | None = None, credentials: grpc.ServerCredentials | None = None,
) -> grpc.aio.Server:
    """Serve the admin API with `auth` checking every call's credential in front of it."""
    servicer = RegistryServicer(service, clock, metrics, audit)
    name = pb.DESCRIPTOR.services_by_name["ModelRegistry"].full_name
    interceptor = AdminAuthInterceptor(auth, name, servicer.refused)
    return await start_grpc_server(lambda server: pb_grpc.add_ModelRegistryServicer_to_server(servicer, server), [name], host, port,
                                   credentials=credentials, interceptors=[interceptor])  # fmt: skip
