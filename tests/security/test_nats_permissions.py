"""NATS least privilege: the identities `nats_auth` defines, on a real nats-server that
reads the authorization block `AuthStore` writes (what `tierflow up` runs with).

What must hold (issue 15): anonymous connections are refused; a router cannot publish a
heartbeat, read another router's reply streams, command the supervisor or delete a stream;
a node cannot speak for another node; the observer publishes nothing. And the other side:
each role can do its job (KV reads and writes, streams, requests and their answers, service
discovery), with no permission error at all, so a permission the code needs but the table
lacks fails here.

A denied publish or subscription is an asynchronous `-ERR 'Permissions Violation ...'`
from the server, which nats-py hands to the error callback; the server processes a
connection's commands in order, so after a round trip (`flush`) it has been reported.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import nats
import pytest
import pytest_asyncio
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg

from tierflow.cli.auth_files import AuthStore, reload_servers
from tierflow.contracts import messages, subjects
from tierflow.runtime import discovery, nats_auth
from tierflow.runtime.kv import KVWrite, commit_batch, follow, open_bucket, snapshot
from tierflow.runtime.nats_auth import Identity
from tierflow.runtime.nats_server import NatsServerConfig, NatsServerProcess, connect_host, free_port
from tierflow.runtime.service import server_round_trip

ROUTERS = ("r1", "r2")
NODES = ("n1", "n2")
VIOLATION = "permissions violation"


@dataclass
class Secured:
    url: str
    store: AuthStore
    server: NatsServerProcess
    clients: list[NATS] = field(default_factory=list)

    async def connect(self, name: str) -> Client:
        """A client connected as the identity called `name`, its errors collected."""
        errors: list[str] = []

        async def on_error(exc: Exception) -> None:
            errors.append(str(exc))

        creds = nats_auth.read_creds(self.store.directory / f"{name}.creds")
        nc = await nats.connect(self.url, name=f"test-{name}", error_cb=on_error, allow_reconnect=False, max_reconnect_attempts=0,
                                **nats_auth.connect_options(creds))  # fmt: skip
        self.clients.append(nc)
        return Client(nc, errors)


@dataclass
class Client:
    nc: NATS
    errors: list[str]

    async def settled(self) -> list[str]:
        """The permission errors reported so far, after a round trip with the server and a
        moment more (the server may send a violation's error after the round trip's PONG)."""
        await self.nc.flush(timeout=5)
        await asyncio.sleep(0.05)
        return [e for e in self.errors if VIOLATION in e.lower()]

    async def denied(self, what: str, timeout: float = 3.0) -> bool:
        """True once the server has reported a violation naming `what` (nats-py lowercases
        the server's error line, subject included); False if none came within `timeout`."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while not any(what.lower() in e.lower() for e in await self.settled()):
            if loop.time() > deadline:
                return False
        return True


@pytest_asyncio.fixture(loop_scope="session", scope="module")
async def secured(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Secured]:
    root = tmp_path_factory.mktemp("secured-nats")
    store = AuthStore(root / "auth")
    store.ensure(nats_auth.fabric_identities(ROUTERS, NODES))
    config = NatsServerConfig(store_dir=root / "store", port=free_port(), monitor_port=free_port(), name="tierflow-secured",
                              extra_config=store.server_config)  # fmt: skip
    async with NatsServerProcess(config, root / "nats-server.log") as server:
        state = Secured(server.url, store, server)
        try:
            yield state
        finally:
            for nc in state.clients:
                if not nc.is_closed:
                    with contextlib.suppress(Exception):
                        await nc.close()


async def _received(sub, timeout: float = 0.3) -> list[Msg]:  # type: ignore[no-untyped-def]
    got = []
    with contextlib.suppress(nats.errors.TimeoutError):
        while True:
            got.append(await sub.next_msg(timeout=timeout))
    return got


def test_credentials_are_private_files(secured: Secured) -> None:
    directory = secured.store.directory
    assert directory.stat().st_mode & 0o777 == 0o700
    names = {i.name for i in nats_auth.fabric_identities(ROUTERS, NODES)}
    assert names <= {p.stem for p in directory.glob("*.creds")}
    assert all(f.stat().st_mode & 0o777 == 0o600 for f in [*directory.glob("*.creds"), secured.store.server_config])
    text = secured.store.server_config.read_text()
    assert "no_auth_user" not in text
    for creds in secured.store.credentials():  # public keys only, never a seed
        assert creds.public_key in text and creds.seed not in text


async def test_anonymous_and_unknown_keys_are_refused(secured: Secured, tmp_path: Path) -> None:
    with pytest.raises(Exception) as anonymous:
        await nats.connect(secured.url, allow_reconnect=False, max_reconnect_attempts=0, connect_timeout=2)
    assert "authorization" in f"{type(anonymous.value).__name__} {anonymous.value}".lower()
    stranger = nats_auth.Credentials(Identity(nats_auth.ADMIN), nats_auth.new_seed())  # a well-formed key nobody registered
    with pytest.raises(Exception) as unknown:
        await nats.connect(secured.url, allow_reconnect=False, max_reconnect_attempts=0, connect_timeout=2, **nats_auth.connect_options(stranger))
    assert "authorization" in f"{type(unknown.value).__name__} {unknown.value}".lower()


async def test_a_router_cannot_publish_a_heartbeat(secured: Secured) -> None:
    router, watcher = await secured.connect("router-r1"), await secured.connect("observer")
    beats = await watcher.nc.subscribe(subjects.NODE_HEARTBEATS)
    await watcher.nc.flush()
    await router.nc.publish(subjects.node_heartbeat("n1"), b"{}")
    assert await router.denied(subjects.node_heartbeat("n1")), router.errors
    assert await _received(beats) == []
    await beats.unsubscribe()


async def test_a_router_cannot_read_another_routers_reply_streams(secured: Secured) -> None:
    router, node = await secured.connect("router-r1"), await secured.connect("node-n1")
    await router.nc.subscribe(subjects.router_streams("r2"))
    assert await router.denied(subjects.router_streams("r2"))
    wide = await router.nc.subscribe("tierflow.router.stream.>")
    assert await router.denied("tierflow.router.stream.>")
    await node.nc.publish(subjects.router_stream("r2", "req-1"), b"tokens")
    assert await node.settled() == []
    assert await _received(wide) == []


async def test_a_router_cannot_command_the_supervisor_or_nodes(secured: Secured) -> None:
    router, supervisor = await secured.connect("router-r1"), await secured.connect("supervisor")
    commands = await supervisor.nc.subscribe(subjects.SUPERVISOR_CONTROL)
    await supervisor.nc.flush()
    await router.nc.publish(subjects.SUPERVISOR_CONTROL, messages.encoder.encode(messages.SupervisorCommand(action="list")))
    assert await router.denied(subjects.SUPERVISOR_CONTROL)
    await router.nc.publish(subjects.node_control("n1"), b"{}")
    assert await router.denied(subjects.node_control("n1"))
    assert await _received(commands) == []
    await commands.unsubscribe()


async def test_only_the_admin_may_delete_a_stream(secured: Secured) -> None:
    registry, router, admin = await secured.connect("registry"), await secured.connect("router-r1"), await secured.connect("admin")
    await open_bucket(registry.nc.jetstream(), subjects.REGISTRY_BUCKET, create=True, atomic=True)
    delete = f"$JS.API.STREAM.DELETE.KV_{subjects.REGISTRY_BUCKET}"
    for who in (router, registry):
        with pytest.raises(nats.errors.TimeoutError):  # the server drops it: nobody answers
            await who.nc.request(delete, b"", timeout=0.5)
        assert await who.denied(delete)
    assert (await admin.nc.jetstream().stream_info(f"KV_{subjects.REGISTRY_BUCKET}")).config.name == f"KV_{subjects.REGISTRY_BUCKET}"
    # The admin's is the one identity that may: on a scratch stream of its own.
    js = admin.nc.jetstream()
    await js.add_stream(name="SCRATCH", subjects=["scratch.>"])
    assert await js.delete_stream("SCRATCH")
    assert await admin.settled() == []


async def test_a_node_speaks_only_for_itself(secured: Secured) -> None:
    node, watcher = await secured.connect("node-n1"), await secured.connect("observer")
    beats = await watcher.nc.subscribe(subjects.NODE_HEARTBEATS)
    await watcher.nc.flush()
    await node.nc.publish(subjects.node_heartbeat("n2"), b"forged")
    assert await node.denied(subjects.node_heartbeat("n2"))
    await node.nc.publish(subjects.node_heartbeat("n1"), b"mine")
    assert [m.subject for m in await _received(beats)] == [subjects.node_heartbeat("n1")]
    await node.nc.subscribe(subjects.node_generate("n2"))  # another node's work
    assert await node.denied(subjects.node_generate("n2"))
    await beats.unsubscribe()


async def test_the_observer_reads_events_and_publishes_nothing(secured: Secured) -> None:
    observer = await secured.connect("observer")
    for subject in (subjects.node_heartbeat("n1"), subjects.REGISTRY_EVENTS, subjects.SUPERVISOR_CONTROL, "$JS.API.INFO", subjects.SERVICE_INFO):
        await observer.nc.publish(subject, b"x")
        assert await observer.denied(subject), subject
    await observer.nc.subscribe(subjects.router_streams("r1"))  # prompts and completions are not events
    assert await observer.denied(subjects.router_streams("r1"))
    before = len(await observer.settled())
    for subject in nats_auth.EVENT_SUBJECTS:
        await observer.nc.subscribe(subject)
    assert (await observer.settled())[before:] == []


async def test_every_role_can_do_its_job(secured: Secured) -> None:
    """The fabric's own traffic, role by role, with no permission error anywhere."""
    registry, router, node, autoscaler, supervisor, admin = [
        await secured.connect(name) for name in ("registry", "router-r1", "node-n1", "autoscaler", "supervisor", "admin")
    ]
    # Registry: makes its bucket (atomic batches), writes it whole, says so.
    rjs = registry.nc.jetstream()
    await open_bucket(rjs, subjects.REGISTRY_BUCKET, create=True, atomic=True)
    await commit_batch(rjs, subjects.REGISTRY_BUCKET, [KVWrite(subjects.model_key("m"), b"model"), KVWrite(subjects.deployment_key("d"), b"dep")])
    await registry.nc.publish(subjects.REGISTRY_EVENTS, b"{}")
    # The audit stream: the registry makes it; each publisher records its own kind.
    await rjs.add_stream(name=subjects.AUDIT_STREAM, subjects=[subjects.AUDIT_SUBJECTS])
    for who, kind, speaker in ((registry, "registry", "r1"), (node, "node", "n1"), (autoscaler, "scaling", "a1")):
        assert (await who.nc.jetstream().publish(subjects.audit(kind, speaker), b"{}")).stream == subjects.AUDIT_STREAM
    # Router and node: read it whole, and follow it (a push consumer into their inbox).
    for reader in (router, node, autoscaler):
        keys = {e.key for e in await snapshot(reader.nc.jetstream(), subjects.REGISTRY_BUCKET)}
        assert {subjects.model_key("m"), subjects.deployment_key("d")} <= keys
    stopping, seen = asyncio.Event(), asyncio.Event()

    def on_put(key: str, value: bytes, revision: int) -> None:
        if key == subjects.model_key("m2"):
            seen.set()

    watch = asyncio.create_task(follow(router.nc.jetstream(), subjects.REGISTRY_BUCKET, ">", on_put=on_put, on_delete=lambda key: None, stopping=stopping))
    await commit_batch(rjs, subjects.REGISTRY_BUCKET, [KVWrite(subjects.model_key("m2"), b"model 2")])
    try:
        await asyncio.wait_for(seen.wait(), 10)
    finally:
        stopping.set()
        await watch
    # Router -> node -> router: work on the node's subject, tokens on the router's stream.
    streams = await router.nc.subscribe(subjects.router_streams("r1"))
    work = await node.nc.subscribe(subjects.node_generate("n1"))
    await node.nc.flush()
    await router.nc.publish(subjects.node_generate("n1"), b"prompt", reply=subjects.router_stream("r1", "req-1"))
    request = await work.next_msg(timeout=5)
    await node.nc.publish(request.reply, b"token")
    assert (await streams.next_msg(timeout=5)).data == b"token"
    await node.nc.publish(subjects.node_heartbeat("n1"), b"beat")
    await router.nc.publish(subjects.router_presence("r1"), b"{}")
    await router.nc.publish(subjects.router_gossip("r1"), b"{}")
    # Discovery: a node's micro service answers the supervisor's and the admin's $SRV.INFO.
    micro = await discovery.register(node.nc, "decode-node", "n1")
    try:
        for asker in (supervisor, admin):
            assert subjects.SERVICE_NAMES["decode-node"] in {s.name for s in await discovery.discover(asker.nc, timeout=0.5)}
    finally:
        await micro.stop()
    # Autoscaler: its own bucket; node control (the node answers) and supervisor commands.
    ajs = autoscaler.nc.jetstream()
    kv = await open_bucket(ajs, subjects.AUTOSCALER_BUCKET, create=True)
    await kv.put(subjects.AUTOSCALER_LEASE_KEY, b"holder")
    assert (await kv.get(subjects.AUTOSCALER_LEASE_KEY)).value == b"holder"

    async def answer(msg: Msg) -> None:
        await msg.respond(b"ok")

    answering = [await node.nc.subscribe(subjects.node_control("n1"), cb=answer),
                 await supervisor.nc.subscribe(subjects.SUPERVISOR_CONTROL, cb=answer)]  # fmt: skip
    await node.nc.flush()
    await supervisor.nc.flush()
    assert (await autoscaler.nc.request(subjects.node_control("n1"), b"{}", timeout=5)).data == b"ok"
    assert (await autoscaler.nc.request(subjects.SUPERVISOR_CONTROL, b"{}", timeout=5)).data == b"ok"
    assert (await admin.nc.request(subjects.node_control("n1"), b"{}", timeout=5)).data == b"ok"
    for sub in answering:
        await sub.unsubscribe()
    await autoscaler.nc.publish(subjects.AUTOSCALER_DECISIONS, b"{}")
    # Everyone: a round trip through its own inbox (how services check the server is there).
    for client in (registry, router, node, autoscaler, supervisor, admin):
        assert await server_round_trip(client.nc, timeout=2)
    problems = {name: await c.settled() for name, c in zip(("registry", "router", "node", "autoscaler", "supervisor", "admin"),
                                                             (registry, router, node, autoscaler, supervisor, admin), strict=True)}  # fmt: skip
    assert not any(problems.values()), problems


async def test_audit_records_come_only_from_their_own_kind_and_a_node_speaks_only_for_itself(secured: Secured) -> None:
    router, node = await secured.connect("router-r1"), await secured.connect("node-n1")
    await router.nc.publish(subjects.audit("registry", "r1"), b"{}")
    assert await router.denied(subjects.audit("registry", "r1"))
    await node.nc.publish(subjects.audit("scaling", "n1"), b"{}")
    assert await node.denied(subjects.audit("scaling", "n1"))
    await node.nc.publish(subjects.audit("node", "n2"), b"{}")  # a record claiming another node's drain
    assert await node.denied(subjects.audit("node", "n2"))


async def test_only_the_registry_writes_the_registry_bucket(secured: Secured) -> None:
    registry = await secured.connect("registry")
    await open_bucket(registry.nc.jetstream(), subjects.REGISTRY_BUCKET, create=True, atomic=True)
    for name in ("router-r1", "node-n1", "autoscaler", "admin"):
        client = await secured.connect(name)
        await client.nc.publish(f"$KV.{subjects.REGISTRY_BUCKET}.{subjects.model_key('evil')}", b"x")
        assert await client.denied(f"$KV.{subjects.REGISTRY_BUCKET}"), name


async def test_an_identity_added_while_the_server_runs_can_connect_after_a_reload(secured: Secured) -> None:
    """What `tierflow up` does for a node the autoscaler asks for."""
    assert secured.store.ensure([Identity(nats_auth.NODE, "n3")])
    assert secured.server.pid is not None
    config = secured.server.config
    await reload_servers([(secured.server.pid, connect_host(config.host), config.monitor_port)])
    node = await secured.connect("node-n3")
    await node.nc.publish(subjects.node_heartbeat("n3"), b"beat")
    assert await node.settled() == []
    assert not secured.store.ensure([Identity(nats_auth.NODE, "n3")])  # made once, reused after


async def test_the_supervisor_answers_a_start_across_the_reload_it_causes(secured: Secured) -> None:
    """`tierflow up` adds the new node's identity (a reload) before it answers the command
    that asked for the node: the answer must still reach the autoscaler."""
    supervisor, autoscaler = await secured.connect("supervisor"), await secured.connect("autoscaler")
    config = secured.server.config
    assert secured.server.pid is not None

    async def start_node(msg: Msg) -> None:
        secured.store.ensure([Identity(nats_auth.NODE, "n4")])
        await reload_servers([(secured.server.pid, connect_host(config.host), config.monitor_port)])
        await msg.respond(b"started n4")

    await supervisor.nc.subscribe(subjects.SUPERVISOR_CONTROL, cb=start_node)
    await supervisor.nc.flush()
    assert (await autoscaler.nc.request(subjects.SUPERVISOR_CONTROL, b"{}", timeout=5)).data == b"started n4"
    assert await supervisor.settled() == [] and await autoscaler.settled() == []
