"""TLS (issue 15): `tierflow up --tls` speaks TLS on HTTP, gRPC and NATS, every client here
verifies the fabric's CA, and a plain connection is refused.

One fabric for the module (one decode node, no prefill node, no autoscaling: the cheapest
that serves a chat call). Clients are the real ones: the official `openai` client over
httpx2, grpcio channels, nats-py; the plain connections are raw sockets, so nothing in a
client library can quietly upgrade them. The certificate helpers and the NATS server's
TLS configuration are tested first, without a fabric.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import socket
import ssl
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import httpx2
import nats
import openai
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tierflow.harness import Fabric, start_fabric
from tierflow.runtime.nats_server import ClusterMembership, NatsServerConfig, NatsServerProcess, NatsTls, free_port, wait_cluster_ready
from tierflow.runtime.tls import (
    IN_USE,
    TlsError,
    TlsFiles,
    cli_client_files,
    client_ssl_context,
    default_hosts,
    ensure_local_pki,
    server_ssl_context,
)
from tierflow.v1 import inference_pb2 as pb
from tierflow.v1 import inference_pb2_grpc as pb_grpc
from tierflow.v1 import registry_pb2, registry_pb2_grpc

REPO = Path(__file__).resolve().parents[2]
NOW = dt.datetime(2026, 12, 7, 12, 0, tzinfo=dt.UTC)


def _san(cert: Path) -> set[str]:
    from cryptography import x509

    value = x509.load_pem_x509_certificate(cert.read_bytes()).extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    return {str(ip) for ip in value.get_values_for_type(x509.IPAddress)} | set(value.get_values_for_type(x509.DNSName))


# --------------------------------------------------------------------------- no fabric


def test_local_pki_is_private_reused_and_reissued_for_new_hosts(tmp_path: Path) -> None:
    directory = tmp_path / "tls"
    pki = ensure_local_pki(directory, hosts=default_hosts(), now=NOW)
    assert {"127.0.0.1", "::1", "localhost"} <= _san(Path(pki.server.cert))
    assert oct(directory.stat().st_mode & 0o777) == "0o700"
    assert all(oct(f.stat().st_mode & 0o777) == "0o600" for f in directory.iterdir()), {f.name: oct(f.stat().st_mode) for f in directory.iterdir()}
    before = {f.name: f.read_bytes() for f in directory.iterdir()}

    ensure_local_pki(directory, hosts=default_hosts(), now=NOW + dt.timedelta(days=1))
    assert {f.name: f.read_bytes() for f in directory.iterdir()} == before  # reused as is

    ensure_local_pki(directory, hosts=default_hosts("10.0.0.7", "fabric.example"), now=NOW)
    assert {"10.0.0.7", "fabric.example"} <= _san(Path(pki.server.cert))
    assert (directory / "ca.pem").read_bytes() == before["ca.pem"]  # same CA: clients keep trusting it
    assert (directory / "client.pem").read_bytes() == before["client.pem"]

    # near its end, the server certificate is issued again
    ensure_local_pki(directory, hosts=default_hosts(), now=NOW + dt.timedelta(days=820))
    assert (directory / "server.pem").read_bytes() != before["server.pem"]


def test_tls_files_fail_with_a_sentence(tmp_path: Path) -> None:
    with pytest.raises(TlsError, match="--tls-cert needs --tls-key"):
        TlsFiles(cert=str(tmp_path / "c.pem")).check()
    with pytest.raises(TlsError, match="--tls-ca .*no such readable file"):
        TlsFiles(ca=str(tmp_path / "missing.pem")).check()
    with pytest.raises(TlsError, match="needs --tls-cert and --tls-key"):
        server_ssl_context(TlsFiles(ca=str(ensure_local_pki(tmp_path / "tls", hosts=["127.0.0.1"], now=NOW).ca)))


def test_the_cli_uses_the_data_dir_only_while_up_runs_with_tls(tmp_path: Path) -> None:
    pki = ensure_local_pki(tmp_path / "tls", hosts=["127.0.0.1"], now=NOW)
    assert cli_client_files({}, tmp_path) is None  # certificates left from an earlier --tls run: plain
    (pki.directory / IN_USE).write_text("")
    assert cli_client_files({}, tmp_path) == pki.client
    explicit = {"TIERFLOW_TLS_CA": "/elsewhere/ca.pem"}
    assert cli_client_files(explicit, tmp_path) == TlsFiles(ca="/elsewhere/ca.pem")


def test_tls_generate_makes_the_files_a_deployment_mounts(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from tierflow.cli.main import app

    result = CliRunner().invoke(app, ["tls", "generate", "--out", str(tmp_path / "tls"), "--host", "router", "--host", "nats-0.nats"])
    assert result.exit_code == 0, result.output
    assert f"--tls-cert {tmp_path / 'tls' / 'server.pem'}" in result.output
    assert {"router", "nats-0.nats", "127.0.0.1", "localhost"} <= _san(tmp_path / "tls" / "server.pem")


async def test_a_tls_cluster_forms_over_tls_routes_and_refuses_plain_clients(tmp_path: Path) -> None:
    """`--nats-cluster N --tls`: the routes speak TLS (certificates checked both ways, so a
    member needs the clientAuth use our certificates carry), and so does every client port."""
    pki = ensure_local_pki(tmp_path / "tls", hosts=default_hosts(), now=NOW)
    tls = NatsTls(Path(pki.server.cert), Path(pki.server.key), Path(pki.server.ca))
    routes = [free_port() for _ in range(2)]
    members = [
        NatsServerConfig(store_dir=tmp_path / f"nats-{i}", port=free_port(), monitor_port=free_port(), name=f"nats-{i}", tls=tls,
                         cluster=ClusterMembership("tls-test", routes[i], tuple(f"nats-route://127.0.0.1:{r}" for j, r in enumerate(routes) if j != i)))
        for i in range(2)
    ]  # fmt: skip
    assert "tls {" in members[0].config_text().split("cluster {")[1]  # the routes' own block
    assert all(m.url.startswith("tls://") for m in members)
    processes = [NatsServerProcess(m, tmp_path / f"{m.name}.log") for m in members]
    try:
        for process in processes:
            await process.start()
        await wait_cluster_ready(members, timeout=20)
        one = await nats.connect(members[0].url, tls=client_ssl_context(pki.client), allow_reconnect=False, connect_timeout=3)
        other = await nats.connect(members[1].url, tls=client_ssl_context(pki.client), allow_reconnect=False, connect_timeout=3)
        try:
            sub = await other.subscribe("tls.check")
            await other.flush()
            for _ in range(50):  # until the interest has crossed the route
                await one.publish("tls.check", b"over the route")
                try:
                    assert (await sub.next_msg(timeout=0.1)).data == b"over the route"
                    break
                except nats.errors.TimeoutError:
                    continue
            else:
                pytest.fail("no message crossed the TLS route")
        finally:
            await one.close()
            await other.close()
        assert _plain_nats_refused("127.0.0.1", members[0].port)
    finally:
        for process in processes:
            await process.stop()


# --------------------------------------------------------------------------- the fabric


@pytest.fixture(scope="module")
def fabric(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fabric]:
    running = start_fabric(tmp_path_factory.mktemp("tls"), "--tls", "--decode-nodes", "1", "--prefill-nodes", "0", "--actuator", "none", cwd=REPO)
    try:
        yield running
    finally:
        running.stop()


def _ca_only(fabric: Fabric) -> ssl.SSLContext:
    """What an API client is given: the CA, no certificate of its own."""
    assert fabric.tls_ca is not None
    return ssl.create_default_context(cafile=str(fabric.tls_ca))


def _nats_auth_options(fabric: Fabric) -> dict[str, Any]:
    """The observer's NATS credentials when the fabric runs with NATS auth (DATA/auth),
    none when it does not (TLS does not depend on it)."""
    auth = fabric.data_dir / "auth"
    if not auth.is_dir():
        return {}
    from tierflow.cli.auth_files import AuthStore
    from tierflow.runtime import nats_auth

    return nats_auth.connect_options(nats_auth.read_creds(AuthStore(auth).creds_path(nats_auth.Identity(nats_auth.OBSERVER))))


def _refused_reasons(exc: BaseException) -> str:
    """Every message along an exception's causes, to find the certificate error under the
    client library's own."""
    seen: list[str] = []
    while exc is not None and len(seen) < 10:
        seen.append(f"{type(exc).__name__}: {exc}")
        exc = exc.__cause__ or exc.__context__  # type: ignore[assignment]
    return " <- ".join(seen)


def _read_until_closed(sock: socket.socket) -> bytes:
    """Everything the peer sends until it closes, resets or stays silent past the timeout."""
    answer = b""
    try:
        while chunk := sock.recv(4096):
            answer += chunk
    except (TimeoutError, ConnectionResetError):
        pass
    return answer


def _plain_nats_refused(host: str, port: int) -> bool:
    """A client speaking NATS in the clear: the server says TLS is required and never
    answers its PING."""
    with socket.create_connection((host, port), timeout=5) as sock:
        info = sock.makefile("rb").readline()
        assert info.startswith(b"INFO ") and json.loads(info[5:])["tls_required"] is True, info
        sock.sendall(b'CONNECT {"verbose":false,"pedantic":false,"tls_required":false}\r\nPING\r\n')
        answer = _read_until_closed(sock)
    return b"PONG" not in answer


@pytest.mark.fabric
def test_the_ready_line_and_data_dir_say_tls(fabric: Fabric) -> None:
    assert "OpenAI https://" in fabric.ready_line and f"CA {fabric.tls_ca}" in fabric.ready_line
    assert all(url.startswith("tls://") for url in fabric.nats_urls)
    files = sorted(p.name for p in (fabric.data_dir / "tls").iterdir())
    assert files == sorted(["ca.pem", "ca-key.pem", "server.pem", "server-key.pem", "client.pem", "client-key.pem", IN_USE])
    assert all(oct(p.stat().st_mode & 0o777) == "0o600" for p in (fabric.data_dir / "tls").glob("*.pem"))


@pytest.mark.fabric
async def test_openai_client_verifying_the_ca_completes_a_chat(fabric: Fabric) -> None:
    async with httpx2.AsyncClient(verify=_ca_only(fabric)) as http:
        client = openai.AsyncOpenAI(base_url=fabric.base_url, api_key="k", http_client=http, max_retries=0)
        reply = await client.chat.completions.create(model="llama-3.1-8b", messages=[{"role": "user", "content": "Hi!"}], max_tokens=8, timeout=30)
    assert reply.choices[0].message.content and reply.usage is not None and reply.usage.completion_tokens >= 1


@pytest.mark.fabric
async def test_openai_client_without_the_ca_refuses_the_server(fabric: Fabric) -> None:
    client = openai.AsyncOpenAI(base_url=fabric.base_url, api_key="k", max_retries=0)  # the system's trust store
    with pytest.raises(openai.APIConnectionError) as err:
        await client.models.list()
    assert "CERTIFICATE_VERIFY_FAILED" in _refused_reasons(err.value), _refused_reasons(err.value)
    await client.close()


@pytest.mark.fabric
def test_plain_http_gets_no_answer(fabric: Fabric) -> None:
    with socket.create_connection((fabric.host, fabric.http_port), timeout=5) as sock:
        sock.sendall(f"GET /health HTTP/1.1\r\nHost: {fabric.host}\r\n\r\n".encode())
        answer = _read_until_closed(sock)
    assert not answer.startswith(b"HTTP/"), answer[:200]


@pytest.mark.fabric
async def test_grpc_over_tls_with_the_ca_and_never_in_the_clear(fabric: Fabric) -> None:
    assert fabric.tls_ca is not None
    credentials = grpc.ssl_channel_credentials(root_certificates=fabric.tls_ca.read_bytes())
    router, registry = f"{fabric.host}:{fabric.grpc_port}", f"{fabric.host}:{fabric.registry_grpc_port}"
    async with grpc.aio.secure_channel(router, credentials) as channel:
        reply = await pb_grpc.InferenceStub(channel).GenerateUnary(
            pb.GenerateRequest(model="llama-3.1-8b", prompt="The capital of France is", max_tokens=8), timeout=30)  # fmt: skip
        assert reply.usage.completion_tokens >= 1
    async with grpc.aio.secure_channel(registry, credentials) as channel:
        health = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
        assert health.status == health_pb2.HealthCheckResponse.SERVING
        try:
            models = (await registry_pb2_grpc.ModelRegistryStub(channel).ListModels(registry_pb2.ListModelsRequest(), timeout=10)).models
            assert sorted(m.name for m in models) == ["gpt-oss-20b", "llama-3.1-8b"]
        except grpc.aio.AioRpcError as exc:  # an admin credential, when the registry asks for one, is not TLS's business
            assert exc.code() in (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED), exc
    for target in (router, registry):
        async with grpc.aio.insecure_channel(target) as channel:
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
            assert err.value.code() == grpc.StatusCode.UNAVAILABLE, err.value
    # a client that trusts another CA is refused too
    async with grpc.aio.secure_channel(router, grpc.ssl_channel_credentials()) as channel:
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE


@pytest.mark.fabric
async def test_nats_over_tls_with_the_ca_and_a_client_certificate(fabric: Fabric) -> None:
    auth = _nats_auth_options(fabric)
    nc = await nats.connect(fabric.nats_urls, tls=fabric.ssl_context(), allow_reconnect=False, connect_timeout=5, **auth)
    try:
        assert nc.connected_url is not None and nc.connected_url.scheme == "tls"
        sub = await nc.subscribe("tierflow.node.heartbeat.>")  # traffic over the TLS connection: a node's next beat
        msg = await sub.next_msg(timeout=5)
        assert msg.data
    finally:
        await nc.close()

    async def quiet(exc: Exception) -> None:
        pass

    # the CA alone is not enough: the bus asks every client for a certificate signed by it
    with pytest.raises(Exception) as err:
        await nats.connect(fabric.nats_urls, tls=_ca_only(fabric), allow_reconnect=False, max_reconnect_attempts=0, connect_timeout=3,
                           error_cb=quiet, **auth)  # fmt: skip
    assert not isinstance(err.value, AssertionError)
    # nats-py upgrades to TLS on its own when told to, but then trusts only the system's CAs
    with pytest.raises(Exception) as err:
        await nats.connect(fabric.nats_urls, allow_reconnect=False, max_reconnect_attempts=0, connect_timeout=3, error_cb=quiet, **auth)
    assert "CERTIFICATE_VERIFY_FAILED" in _refused_reasons(err.value), _refused_reasons(err.value)
    # and in the clear the server answers nothing but "TLS required"
    assert _plain_nats_refused(fabric.host, fabric.nats_port)


@pytest.mark.fabric
def test_the_cli_finds_the_ca_in_the_data_dir(fabric: Fabric) -> None:
    """`tierflow models list` (gRPC) and `tierflow status` (NATS, which also asks for the
    client certificate) against the fabric, told only its data dir."""
    env = {**os.environ, "TIERFLOW_DATA_DIR": str(fabric.data_dir), "TIERFLOW_REGISTRY": f"{fabric.host}:{fabric.registry_grpc_port}"}
    for name in ("TIERFLOW_TLS_CA", "TIERFLOW_TLS_CERT", "TIERFLOW_TLS_KEY"):
        env.pop(name, None)
    commands = {
        "models": [sys.executable, "-m", "tierflow", "models", "list", "--json"],
        "status": [sys.executable, "-m", "tierflow", "status", "--json", "--nats-url", fabric.nats_url],
    }
    running = {name: subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env) for name, argv in commands.items()}
    out = {name: (process.communicate(timeout=30), process.returncode) for name, process in running.items()}
    (models_out, models_err), models_code = out["models"]
    # 0: listed over TLS; 1 with UNAUTHENTICATED: the registry answered over TLS and wants an admin credential. Never 2 (unreachable).
    assert models_code == 0 or (models_code == 1 and "UNAUTHENTICATED" in models_err), (models_code, models_out, models_err)
    if models_code == 0:
        assert {m["name"] for m in json.loads(models_out)} == {"gpt-oss-20b", "llama-3.1-8b"}
    (status_out, status_err), status_code = out["status"]
    assert status_code == 0, (status_out, status_err)
    assert any(s["name"] == "tierflow-router" for s in json.loads(status_out)["services"]), status_out
