"""The registry's admin credential, over real gRPC channels against an in-process registry
on a private nats-server: writes without the token are UNAUTHENTICATED (and audited as
refused), with it they succeed and the audit stream names the caller; reads stay open;
the CLI finds `tierflow up`'s token in the data dir. Plus the credential rules themselves
(no credential configured, wrong token, the mTLS certificate hook, the token file)."""

from __future__ import annotations

import asyncio
import stat
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import nats
import pytest
import pytest_asyncio

from tierflow.contracts.audit import AuditRecord
from tierflow.runtime.admin_token import admin_token_path, ensure_admin_token, find_admin_token
from tierflow.runtime.audit import read_records
from tierflow.runtime.nats_server import free_port
from tierflow.runtime.service import ServiceContext
from tierflow.services.model_registry.admin_auth import AdminAuth
from tierflow.services.model_registry.main import main
from tierflow.services.model_registry.settings import Settings
from tierflow.v1 import registry_pb2 as pb
from tierflow.v1 import registry_pb2_grpc as pb_grpc

REPO = Path(__file__).resolve().parents[2]
FLEET = """
models:
  - name: chat
    default_version: v1
    versions:
      - {version: v1, catalog: llama-3.1-8b, configs: [ss8192-bs4]}
      - {version: v2, catalog: llama-3.1-8b, configs: [ss8192-bs4]}
bundles:
  - {name: stable, models: [{model: chat}]}
  - {name: canary, models: [{model: chat, version: v2}]}
deployments:
  - {name: stable, bundle: stable}
  - {name: canary, bundle: canary}
"""


@dataclass
class Registry:
    address: str
    token: str
    data_dir: Path
    nats_url: str

    def bearer(self, token: str | None = None, user: str = "tester@ci") -> list[tuple[str, str]]:
        return [("authorization", f"Bearer {token or self.token}"), ("x-tierflow-user", user)]


@pytest_asyncio.fixture(loop_scope="session", scope="module")
async def reg(private_nats_url: str, tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Registry]:
    """A registry given its token as `tierflow up` gives it: the file DATA/auth/admin.token."""
    data_dir = tmp_path_factory.mktemp("admin-auth")
    token_file = ensure_admin_token(data_dir)
    port = free_port()
    ctx = ServiceContext(service="model-registry", instance="admin-auth")
    task = asyncio.create_task(main(ctx, Settings(nats_url=private_nats_url, grpc_port=port, admin_token_file=str(token_file))))
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
        for _ in range(250):
            if task.done():
                task.result()
            try:
                await pb_grpc.ModelRegistryStub(ch).ListModels(pb.ListModelsRequest(), timeout=1)  # reads are open
                break
            except grpc.aio.AioRpcError:
                await asyncio.sleep(0.02)
    try:
        yield Registry(f"127.0.0.1:{port}", token_file.read_text().strip(), data_dir, private_nats_url)
    finally:
        ctx.stopping.set()
        await task


async def _code(call: object) -> tuple[grpc.StatusCode, str]:
    try:
        await call  # type: ignore[misc]
    except grpc.aio.AioRpcError as exc:
        return exc.code(), exc.details() or ""
    return grpc.StatusCode.OK, ""


async def _audited(nats_url: str, want: int, match: object) -> list[AuditRecord]:
    """The registry's audit records `match` accepts, once there are `want` of them (they are
    published in the background, so each read may come a moment early)."""
    nc = await nats.connect(nats_url)
    try:
        for _ in range(50):
            found = [r async for r in read_records(nc.jetstream(), kind="registry", wait=1.0) if match(r)]  # type: ignore[operator]
            if len(found) >= want:
                return found
            await asyncio.sleep(0.05)
        return found
    finally:
        await nc.close()


async def test_writes_without_the_token_are_unauthenticated_and_audited_as_refused(reg: Registry) -> None:
    async with grpc.aio.insecure_channel(reg.address) as ch:
        stub = pb_grpc.ModelRegistryStub(ch)
        code, msg = await _code(stub.Apply(pb.ApplyRequest(fleet_yaml=FLEET, source="no-token.yaml"), timeout=5))
        assert code == grpc.StatusCode.UNAUTHENTICATED and "authorization: Bearer <token>" in msg, msg
        code, msg = await _code(stub.SetTraffic(pb.SetTrafficRequest(model="nobody-1"), timeout=5, metadata=[("x-tierflow-user", "mallory@x")]))
        assert code == grpc.StatusCode.UNAUTHENTICATED, msg
        code, msg = await _code(stub.Rollback(pb.RollbackRequest(model="nobody-2"), timeout=5, metadata=reg.bearer("tfa-not-the-token")))
        assert code == grpc.StatusCode.UNAUTHENTICATED and "not valid" in msg and "tfa-not-the-token" not in msg, msg
        for call in (stub.Promote(pb.PromoteRequest(model="x", version="v1"), timeout=5), stub.Rollout(pb.RolloutRequest(model="x"), timeout=5),
                     stub.AddModelVersion(pb.AddModelVersionRequest(model="x"), timeout=5)):  # fmt: skip
            assert (await _code(call))[0] == grpc.StatusCode.UNAUTHENTICATED
        assert not (await stub.ListModels(pb.ListModelsRequest(), timeout=5)).models  # reads stay open; nothing was written
    refused = await _audited(reg.nats_url, 3, lambda r: r.target in ("no-token.yaml", "nobody-1", "nobody-2"))
    assert {(r.action, r.target) for r in refused} == {("Apply", "no-token.yaml"), ("SetTraffic", "nobody-1"), ("Rollback", "nobody-2")}
    assert next(r for r in refused if r.target == "nobody-1").detail["user"] == "mallory@x"  # claimed, recorded as such
    assert all(r.identity == "anonymous" and not r.ok and r.detail["code"] == "UNAUTHENTICATED" for r in refused)
    assert not any("tfa-not-the-token" in str(r.detail) for r in refused)


async def test_writes_with_the_token_succeed_and_the_audit_stream_names_the_caller(reg: Registry) -> None:
    async with grpc.aio.insecure_channel(reg.address) as ch:
        stub = pb_grpc.ModelRegistryStub(ch)
        applied = await stub.Apply(pb.ApplyRequest(fleet_yaml=FLEET, source="with-token.yaml"), timeout=10, metadata=reg.bearer())
        assert not applied.problems and {c.op for c in applied.changes} == {"create"}
        model = await stub.SetTraffic(pb.SetTrafficRequest(model="chat", traffic=[pb.TrafficWeight(version="v1", weight=90),
                                                                                   pb.TrafficWeight(version="v2", weight=10)]),
                                      timeout=5, metadata=reg.bearer())  # fmt: skip
        assert {t.version: t.weight for t in model.traffic} == {"v1": 90, "v2": 10}
    records = await _audited(reg.nats_url, 2, lambda r: r.ok and r.action in ("Apply", "SetTraffic"))
    by_action = {r.action: r for r in records}
    assert by_action["Apply"].identity == "token:admin" and by_action["Apply"].target == "with-token.yaml"
    assert by_action["Apply"].detail["user"] == "tester@ci" and by_action["Apply"].detail["code"] == "OK"
    assert by_action["SetTraffic"].identity == "token:admin" and by_action["SetTraffic"].target == "chat"
    assert by_action["SetTraffic"].detail["traffic"] == {"v1": 90, "v2": 10}
    assert all(reg.token not in str(r.detail) for r in records)


async def test_the_cli_sends_the_token_it_finds_in_the_data_dir(reg: Registry, monkeypatch: pytest.MonkeyPatch) -> None:
    """`tierflow rollback/rollout` as a person runs them (in a thread: the registry serves on
    this event loop), with and without a `tierflow up` data dir holding the token."""
    from typer.testing import CliRunner

    from tierflow.cli.main import app

    monkeypatch.delenv("TIERFLOW_ADMIN_TOKEN", raising=False)

    def cli(data_dir: Path, *args: str) -> tuple[int, str]:
        result = CliRunner().invoke(app, [*args, "--registry", reg.address], env={"TIERFLOW_DATA_DIR": str(data_dir), "COLUMNS": "200"})
        return result.exit_code, result.output

    refused = await asyncio.to_thread(cli, reg.data_dir / "elsewhere", "rollback", "chat")
    assert refused[0] == 1 and "refused (UNAUTHENTICATED)" in refused[1], refused
    found = await asyncio.to_thread(cli, reg.data_dir, "rollout", "chat", "--version", "v2", "--weight", "25")
    assert found[0] == 0 and "rolled out v2 at 25%" in found[1], found
    records = await _audited(reg.nats_url, 1, lambda r: r.ok and r.action == "Rollout")
    assert records[0].identity == "token:admin" and "@" in records[0].detail["user"]


def test_no_credential_configured_refuses_every_write_and_names_the_flags() -> None:
    auth = AdminAuth.from_settings()
    caller = auth.caller({"authorization": "Bearer anything"}, {})
    assert not caller.authenticated and auth.protects("Apply") and not auth.protects("ListModels")
    assert "--admin-token-file" in caller.problem and "anything" not in caller.problem
    assert AdminAuth.from_settings(protect_reads=True).protects("ListModels")
    assert not AdminAuth.from_settings(allow_unauthenticated=True).protects("Apply")
    assert AdminAuth().protects("SomeFutureWrite")  # fail closed: only the listed reads are open


def test_admin_certificates_by_cn_and_token_hashes_for_rotation() -> None:
    from tierflow.runtime.secret_hash import salted_hash

    auth = AdminAuth.from_settings(token_hash=f"{salted_hash('old-token')}, {salted_hash('new-token')}", cert_names="tierflow-admin")
    ctx = {"x509_common_name": [b"tierflow-admin"], "transport_security_type": [b"ssl"]}
    assert auth.caller({}, ctx).identity == "cert:tierflow-admin"
    assert not auth.caller({}, {"x509_common_name": [b"node-3"]}).authenticated  # another certificate of the same CA
    assert auth.caller({"authorization": "Bearer old-token"}, {}).identity == "token:admin"
    assert auth.caller({"authorization": "Bearer new-token"}, {}).identity == "token:admin"
    with pytest.raises(ValueError, match="--admin-token-hash entry 0"):
        AdminAuth.from_settings(token_hash="sha256:nothex:zz")


def test_the_token_file_is_private_made_once_and_found(tmp_path: Path) -> None:
    path = ensure_admin_token(tmp_path)
    token = path.read_text().strip()
    assert path == admin_token_path(tmp_path) and stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700 and len(token) > 40
    assert ensure_admin_token(tmp_path).read_text().strip() == token  # reused, never replaced
    assert find_admin_token("", tmp_path) == token and find_admin_token("explicit", tmp_path) == "explicit"
    assert find_admin_token("", tmp_path / "none") is None
