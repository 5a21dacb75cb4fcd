"""The usage ledger under NATS least privilege (what `tierflow up` and the deployments run
with): a router can make the stream, record its requests' usage and read the stream back
with no permission error at all; it records only as itself, cannot delete or purge what
tenants are charged, and the observer does not see usage (tenants' business, not an event)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from pathlib import Path

import nats
import pytest
import pytest_asyncio
from nats.aio.client import Client as NATS

from tierflow.cli.auth_files import AuthStore
from tierflow.contracts import subjects
from tierflow.placement import TenantDirectory
from tierflow.runtime import nats_auth
from tierflow.runtime.clock import WallClock
from tierflow.runtime.nats_server import NatsServerConfig, NatsServerProcess, free_port
from tierflow.runtime.usage_stream import ensure_usage_stream
from tierflow.services.router.dispatch import RequestRecord
from tierflow.services.router.usage_ledger import UsageLedger, restore_usage

VIOLATION = "permissions violation"


class _Server:
    def __init__(self, url: str, store: AuthStore) -> None:
        self.url, self.store = url, store
        self.clients: list[tuple[NATS, list[str]]] = []

    async def connect(self, name: str) -> tuple[NATS, list[str]]:
        errors: list[str] = []

        async def on_error(exc: Exception) -> None:
            errors.append(str(exc).lower())

        creds = nats_auth.read_creds(self.store.directory / f"{name}.creds")
        nc = await nats.connect(self.url, name=f"test-{name}", error_cb=on_error, allow_reconnect=False, max_reconnect_attempts=0,
                                **nats_auth.connect_options(creds))  # fmt: skip
        self.clients.append((nc, errors))
        return nc, errors


async def _violations(nc: NATS, errors: list[str]) -> list[str]:
    await nc.flush(timeout=5)
    await asyncio.sleep(0.1)
    return [e for e in errors if VIOLATION in e]


@pytest_asyncio.fixture(loop_scope="session", scope="module")
async def secured(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[_Server]:
    root: Path = tmp_path_factory.mktemp("usage-nats")
    store = AuthStore(root / "auth")
    store.ensure(nats_auth.fabric_identities(["r1", "r2"], ["n1"]))
    config = NatsServerConfig(store_dir=root / "store", port=free_port(), monitor_port=free_port(), name="tierflow-usage-secured",
                              extra_config=store.server_config)  # fmt: skip
    async with NatsServerProcess(config, root / "nats-server.log") as server:
        state = _Server(server.url, store)
        try:
            yield state
        finally:
            for nc, _ in state.clients:
                with contextlib.suppress(Exception):
                    await nc.close()


async def test_a_router_makes_writes_and_reads_the_ledger_with_no_permission_error(secured: _Server) -> None:
    nc, errors = await secured.connect("router-r1")
    js = nc.jetstream()
    await ensure_usage_stream(js, max_age=3600, replicas=3)
    await ensure_usage_stream(js, max_age=7200)  # a router with other settings: an update
    stopping = asyncio.Event()
    ledger = UsageLedger(js, "r1", WallClock())
    task = asyncio.create_task(ledger.run(stopping))
    record = RequestRecord(request_id="perm-1", api="chat", model="m", tenant="acme", prompt_tokens=10, completion_tokens=3, finish_reason="stop")
    record.admitted_at = WallClock().now()
    stored = ledger.note(record)
    assert stored is not None
    await stored
    stopping.set()
    await task
    assert ledger._stored._value.get() == 1  # type: ignore[attr-defined]
    directory = TenantDirectory.from_config({"tenants": [{"name": "acme", "api_keys": ["k"], "token_quota": 100, "rate_limit_rps": 1}]})
    assert await restore_usage(js, directory, "r1", WallClock(), started_at=WallClock().now()) == 1
    assert directory.tenants["acme"].quota is not None and directory.tenants["acme"].quota.used(WallClock().now()) == 13
    assert await _violations(nc, errors) == []


async def test_a_router_records_only_as_itself_and_cannot_erase_the_ledger(secured: _Server) -> None:
    admin, _ = await secured.connect("admin")
    await ensure_usage_stream(admin.jetstream(), max_age=3600)
    nc, errors = await secured.connect("router-r1")
    forged = subjects.usage("acme", "r2")
    await nc.publish(forged, b"{}")
    assert any(forged in e for e in await _violations(nc, errors))
    for api in (f"$JS.API.STREAM.DELETE.{subjects.USAGE_STREAM}", f"$JS.API.STREAM.PURGE.{subjects.USAGE_STREAM}",
                f"$JS.API.STREAM.MSG.DELETE.{subjects.USAGE_STREAM}"):  # fmt: skip
        with pytest.raises(nats.errors.TimeoutError):  # the server drops it: nobody answers
            await nc.request(api, b"{}", timeout=0.5)
        assert any(api.lower() in e for e in await _violations(nc, errors)), api
    observer, seen = await secured.connect("observer")
    await observer.subscribe(subjects.USAGE_SUBJECTS)
    assert any(subjects.USAGE_SUBJECTS in e for e in await _violations(observer, seen))


def test_a_config_made_by_an_older_tierflow_gets_the_new_permissions_and_keeps_its_keys(tmp_path: Path) -> None:
    """`tierflow up` on an existing data dir, `init-secrets.sh` run again: identities made
    before the ledger existed must still be allowed to use it."""
    store = AuthStore(tmp_path / "auth")
    identities = nats_auth.fabric_identities(["r0"], ["n1"])
    assert store.ensure(identities)
    seeds = {c.identity.name: c.seed for c in store.credentials()}
    text = store.server_config.read_text()
    stale = text.replace(f'"{subjects.usage_of_router("r0")}", ', "")  # as written before the router recorded usage
    assert stale != text
    store.server_config.write_text(stale)
    assert store.ensure(identities)  # rewritten ...
    assert store.server_config.read_text() == text and {c.identity.name: c.seed for c in store.credentials()} == seeds  # ... same keys
    assert not store.ensure(identities)  # and left alone when current
