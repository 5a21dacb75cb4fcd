"""Who may say what on the fabric's NATS: one identity per process, its exact permissions.

Why: every service shares nothing but NATS, so whoever reaches the server could read every
prompt (`tierflow.router.stream.>`), fake heartbeats, cordon nodes, start node processes or
delete the registry bucket. With auth on, the server refuses anonymous connections and each
identity may publish and subscribe to exactly the subjects its role uses (all derived from
`tierflow.contracts.subjects`, so a new subject is one edit here, next to the role using it).

Identities (`Identity(role, instance)`; the name is `role` or `role-instance`):

| role | instance | may |
|---|---|---|
| router | its router id | read heartbeats, KV events, presence, gossip, the registry bucket; send work and KV snapshot requests to any node; read only *its own* reply streams; announce only its own presence and gossip; publish agent-loop events; make and read the usage ledger's stream, record usage only as itself (`usage(<any tenant>, <its id>)`) |
| registry | - | write the registry bucket (and create it), publish registry events; make the audit stream, record `audit("registry")` |
| autoscaler | - | read heartbeats and the registry; write its own bucket; publish decisions; send node control and supervisor commands; record `audit("scaling")` |
| node | its node id | publish only its own heartbeat and KV events; take work (and KV snapshot requests) only on its own subjects; answer on router reply streams; read the registry; record `audit("node", <its id>)`, never as another node |
| supervisor | - | (`tierflow up`) answer supervisor commands; discover services |
| observer | - | subscribe to the event subjects (heartbeats, KV events, registry events, decisions, router presence, agent-loop events, audit records as they are stored); publish nothing. What external NATS subscribers are given. |
| admin | - | (the CLI, tests, benchmarks) discover services, read heartbeats/events and both buckets, cordon/drain nodes, send supervisor commands, probe a node directly with replies on its own stream (`router_stream("admin", ...)`), and the JetStream API whole: the only identity that may delete a stream |

Each identity has its own inbox prefix (`_INBOX_<name>`, given to nats-py's
`inbox_prefix`): request replies and JetStream API answers land there, and only its owner
may subscribe to it. A service may publish into the inboxes of the roles allowed to ask it
something (discovery: admin and supervisor; node control: autoscaler and admin; supervisor
commands: autoscaler and admin), and has `allow_responses` besides (once to the reply
subject of a request it received, within two minutes) for anyone else who may ask.

Credentials are NATS nkeys (Ed25519): the server config holds only public keys, each
process holds only its own seed, and a client proves its key by signing the server's nonce,
so no secret crosses the wire (which matters while the fabric runs without TLS, as local runs and
compose do by default) and a leaked server config lets nobody in. A user/password pair
would put a reusable secret on the wire at every connect and in the server config. The
cost is the `nkeys` package (nats-py's own optional dependency for exactly this).

A credentials file (`render_creds`) is the seed on its own line (`SU...`) below comment
lines that name the identity; nats-py gets the seed (`nkeys_seed_str`) and the inbox
prefix from `connect_options` (nats-py's own `nkeys_seed=FILE` wants a file holding the
seed alone). `CREDS_ENV` (`TIERFLOW_NATS_CREDS`) names the file a process uses.

Limits: identities are static users in the server config, so a node id nobody made an
identity for means a new user and a config reload (`tierflow up` makes its nodes' ahead, in
batches); a router's id is its identity's, so a restarted router keeps its id (nodes do not
see it leave: streams it had open run on until they finish); a permission is a subject
pattern, so "reply streams of any router" cannot be narrowed to the routers that sent this
node work (the request keys inside them are unguessable ids).

Pure: no I/O except `read_creds` / `identity_from_env` (a file named by the caller or the
environment, read when called) and randomness in `new_seed`.
"""

from __future__ import annotations

import json
import os
import secrets
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

from tierflow.contracts import subjects

__all__ = [
    "ADMIN",
    "ADMIN_STREAM_ID",
    "EVENT_SUBJECTS",
    "fabric_identities",
    "AUTOSCALER",
    "CREDS_ENV",
    "NODE",
    "OBSERVER",
    "REGISTRY",
    "ROLES",
    "ROUTER",
    "SUPERVISOR",
    "Credentials",
    "Identity",
    "Permissions",
    "authorization_block",
    "connect_options",
    "identity_from_env",
    "new_seed",
    "own_id",
    "parse_creds",
    "permissions",
    "public_key",
    "read_creds",
    "render_creds",
]

CREDS_ENV: Final = "TIERFLOW_NATS_CREDS"

ROUTER: Final = "router"
REGISTRY: Final = "registry"
AUTOSCALER: Final = "autoscaler"
NODE: Final = "node"
SUPERVISOR: Final = "supervisor"
OBSERVER: Final = "observer"
ADMIN: Final = "admin"
ROLES: Final = (ROUTER, REGISTRY, AUTOSCALER, NODE, SUPERVISOR, OBSERVER, ADMIN)
_PER_INSTANCE: Final = frozenset({ROUTER, NODE})  # one identity per router id / node id

# How a service may answer a request it received: once, within this long (nats-server's
# own defaults for `allow_responses: true`, written out so the config says what it does).
RESPONSE_MAX_MSGS: Final = 1
RESPONSE_EXPIRES: Final = "2m"

# The router id in the reply subjects of the admin's node probes (`router_stream(ADMIN_STREAM_ID, key)`).
ADMIN_STREAM_ID: Final = "admin"

# The subjects external subscribers may watch: what happened, never what was asked.
EVENT_SUBJECTS: Final = (
    subjects.NODE_HEARTBEATS,
    subjects.NODE_KV_EVENTS,
    subjects.REGISTRY_EVENTS,
    subjects.AUTOSCALER_DECISIONS,
    subjects.ROUTER_PRESENCE,
    subjects.AGENT_LOOP_EVENTS,
    subjects.AUDIT_SUBJECTS,  # live, as records are stored; the stream's history is the admin's to read
)


@dataclass(frozen=True, order=True)
class Identity:
    """One NATS user: a role, and for routers and nodes the id they speak for."""

    role: str
    instance: str = ""

    def __post_init__(self) -> None:
        if self.role not in ROLES:
            raise ValueError(f"unknown NATS role {self.role!r}; one of {', '.join(ROLES)}")
        if self.role in _PER_INSTANCE:
            if not self.instance:
                raise ValueError(f"a {self.role} identity needs its {self.role} id")
            subjects.check_token(self.instance, f"{self.role} id")
        elif self.instance:
            raise ValueError(f"the {self.role} role has one identity; got instance {self.instance!r}")

    @property
    def name(self) -> str:
        """`admin`, `registry`, ..., or `router-<id>` / `node-<id>` (also the file stem)."""
        return f"{self.role}-{self.instance}" if self.instance else self.role

    @property
    def inbox_prefix(self) -> str:
        """This identity's own inbox (one subject token): `_INBOX_<name>`."""
        return f"_INBOX_{self.name}"

    @classmethod
    def parse(cls, name: str) -> Identity:
        """The identity called `name` (`router-r1` -> router r1, `admin` -> admin)."""
        role, dash, instance = name.partition("-")
        if role not in ROLES:
            raise ValueError(f"{name!r} is not an identity name: it must start with one of {', '.join(ROLES)}")
        return cls(role, instance if dash else "")


@dataclass(frozen=True)
class Permissions:
    """What one identity may publish and subscribe to (NATS subject patterns)."""

    publish: tuple[str, ...]
    subscribe: tuple[str, ...]
    responses: bool = False  # allow_responses: answer requests received, once each

    def __post_init__(self) -> None:  # the building blocks overlap ($JS.API.INFO): list each once
        object.__setattr__(self, "publish", tuple(dict.fromkeys(self.publish)))
        object.__setattr__(self, "subscribe", tuple(dict.fromkeys(self.subscribe)))

    def server_block(self) -> dict[str, Any]:
        """The `permissions` map of a nats-server user (an empty publish list denies all)."""
        block: dict[str, Any] = {
            "publish": {"allow": list(self.publish)} if self.publish else {"deny": [">"]},
            "subscribe": {"allow": list(self.subscribe)} if self.subscribe else {"deny": [">"]},
        }
        if self.responses:
            block["allow_responses"] = {"max": RESPONSE_MAX_MSGS, "expires": RESPONSE_EXPIRES}
        return block


# --------------------------------------------------------------------------- building blocks


def _kv_read(bucket: str) -> list[str]:
    """The JetStream API a reader of a KV bucket uses: open it (stream info), read it whole
    (`kv.snapshot`: stream info + message gets, direct or not), follow it (`kv_watch`: an
    ephemeral push consumer into the caller's inbox, flow control, delete when done)."""
    stream = f"KV_{bucket}"
    return [
        "$JS.API.INFO",
        f"$JS.API.STREAM.INFO.{stream}",
        f"$JS.API.STREAM.MSG.GET.{stream}",
        f"$JS.API.DIRECT.GET.{stream}",
        f"$JS.API.DIRECT.GET.{stream}.>",
        f"$JS.API.CONSUMER.CREATE.{stream}",
        f"$JS.API.CONSUMER.CREATE.{stream}.>",
        f"$JS.API.CONSUMER.INFO.{stream}.*",
        f"$JS.API.CONSUMER.DELETE.{stream}.*",
        f"$JS.FC.{stream}.>",
        f"$JS.ACK.{stream}.>",
    ]


def _kv_write(bucket: str) -> list[str]:
    """A bucket's owner: what readers do, plus create it, change its stream (replicas,
    atomic batches: `kv.open_bucket(create=True)`) and write keys (puts, compare-and-set,
    deletes and `kv_batch` atomic batches are all publishes on `$KV.<bucket>.<key>`)."""
    stream = f"KV_{bucket}"
    return [*_kv_read(bucket), f"$JS.API.STREAM.CREATE.{stream}", f"$JS.API.STREAM.UPDATE.{stream}", f"$KV.{bucket}.>"]


def _audit_owner() -> list[str]:
    """Who makes the audit stream (the registry, at start: `audit.ensure_audit_stream`).
    Its records are JetStream publishes on `subjects.audit(kind, speaker)`, acknowledged in the
    publisher's inbox; each publisher may use only its own kind."""
    stream = subjects.AUDIT_STREAM
    return [f"$JS.API.STREAM.INFO.{stream}", f"$JS.API.STREAM.CREATE.{stream}", f"$JS.API.STREAM.UPDATE.{stream}"]


def _usage_ledger(router_id: str) -> list[str]:
    """A router's use of the usage ledger (`subjects.USAGE_STREAM`): make it or bring its
    retention up to date at start (`usage_stream.ensure_usage_stream`), read it back (an
    ordered consumer into its inbox, flow control, delete when done), and record its own
    requests' usage, as itself only (JetStream publishes, acknowledged in its inbox). It
    may not delete or purge the stream, nor its records (the stream denies both anyway)."""
    stream = subjects.USAGE_STREAM
    return [
        subjects.usage_of_router(router_id),
        "$JS.API.INFO",
        f"$JS.API.STREAM.INFO.{stream}",
        f"$JS.API.STREAM.CREATE.{stream}",
        f"$JS.API.STREAM.UPDATE.{stream}",
        f"$JS.API.CONSUMER.CREATE.{stream}",
        f"$JS.API.CONSUMER.INFO.{stream}.*",
        f"$JS.API.CONSUMER.DELETE.{stream}.*",
        f"$JS.FC.{stream}.>",
    ]


def _micro(*services: str) -> list[str]:
    """What a nats.micro service subscribes to for discovery (`$SRV.PING|INFO|STATS`, alone,
    with its name, with its name and id) under the names it registers as."""
    names = [subjects.SERVICE_NAMES[s] for s in services]
    return [*subjects.service_discovery(), *(subject for n in names for subject in subjects.service_discovery(n))]


def _inbox(identity: Identity) -> list[str]:
    """Its own inbox: replies to its requests, JetStream answers and deliveries; publishing
    there too (`service.server_round_trip` asks the server with a request to a fresh inbox)."""
    return [f"{identity.inbox_prefix}.>"]


def _answers(*requesters: str) -> list[str]:
    """The inboxes of the roles allowed to ask this one something (nats.micro discovery:
    the admin and the supervisor; node control: the autoscaler and the admin; supervisor
    commands: the autoscaler and the admin). `allow_responses` alone is not enough: a
    config reload (a node being added) forgets the replies a server had allowed, and
    `tierflow up` answers the very start command that caused the reload."""
    return [f"{Identity(role).inbox_prefix}.>" for role in requesters]


def permissions(identity: Identity) -> Permissions:
    """Exactly what `identity` needs; see the module docstring's table."""
    role, own = identity.role, _inbox(identity)
    discovered = _answers(ADMIN, SUPERVISOR)
    any_node = "*"
    if role == ROUTER:
        router_id = identity.instance
        return Permissions(
            publish=(
                subjects.node_generate(any_node), subjects.prefill_run(any_node), subjects.node_cancel(any_node),
                subjects.node_kv_sync(any_node), subjects.router_presence(router_id), subjects.router_gossip(router_id),
                subjects.AGENT_LOOP_EVENTS, *_kv_read(subjects.REGISTRY_BUCKET), *_usage_ledger(router_id), *discovered, *own,
            ),
            subscribe=(
                subjects.NODE_HEARTBEATS, subjects.NODE_KV_EVENTS, subjects.router_streams(router_id), subjects.ROUTER_PRESENCE,
                subjects.ROUTER_GOSSIP, *_micro("router"), *own,
            ),
            responses=True,
        )  # fmt: skip
    if role == REGISTRY:
        return Permissions(
            publish=(subjects.REGISTRY_EVENTS, *_kv_write(subjects.REGISTRY_BUCKET), subjects.audit("registry", "*"), *_audit_owner(), *discovered, *own),
            subscribe=(*_micro("model-registry"), *own),
            responses=True,
        )
    if role == AUTOSCALER:
        return Permissions(
            publish=(
                subjects.AUTOSCALER_DECISIONS, subjects.SUPERVISOR_CONTROL, subjects.node_control(any_node), subjects.audit("scaling", "*"),
                *_kv_read(subjects.REGISTRY_BUCKET), *_kv_write(subjects.AUTOSCALER_BUCKET), *discovered, *own,
            ),
            subscribe=(subjects.NODE_HEARTBEATS, *_micro("autoscaler"), *own),
            responses=True,
        )  # fmt: skip
    if role == NODE:
        node_id = identity.instance
        return Permissions(
            publish=(
                subjects.node_heartbeat(node_id), subjects.node_kv_events(node_id),
                # Tokens go to whichever router sent the work (its reply subject); the
                # request keys in these subjects are ids this node was given, unguessable.
                subjects.router_stream("*", "*"),
                subjects.audit("node", node_id),  # its own records only
                *_kv_read(subjects.REGISTRY_BUCKET), *_answers(ADMIN, SUPERVISOR, AUTOSCALER), *own,
            ),
            subscribe=(
                subjects.node_generate(node_id), subjects.prefill_run(node_id), subjects.node_cancel(node_id),
                subjects.node_control(node_id), subjects.node_kv_sync(node_id), subjects.ROUTER_PRESENCE, *_micro("decode-node", "prefill-node"), *own,
            ),
            responses=True,
        )  # fmt: skip
    if role == SUPERVISOR:
        return Permissions(
            publish=(subjects.SERVICE_INFO, *_answers(AUTOSCALER, ADMIN), *own),
            subscribe=(subjects.SUPERVISOR_CONTROL, *own),
            responses=True,
        )
    if role == OBSERVER:
        return Permissions(publish=(), subscribe=EVENT_SUBJECTS)
    # ADMIN
    return Permissions(
        publish=(
            subjects.SERVICE_API, subjects.node_control(any_node), subjects.SUPERVISOR_CONTROL,
            subjects.node_generate(any_node), subjects.prefill_run(any_node), subjects.node_cancel(any_node),
            "$JS.API.>", "$JS.FC.>", "$JS.ACK.>", *own,
        ),
        subscribe=(*EVENT_SUBJECTS, subjects.ROUTER_GOSSIP, subjects.router_streams(ADMIN_STREAM_ID), *own),
    )  # fmt: skip


# --------------------------------------------------------------------------- server config


def authorization_block(users: Iterable[tuple[Identity, str]]) -> str:
    """The nats-server `authorization` block for these (identity, public nkey) pairs.

    No `no_auth_user`: a connection without a valid signature is refused. Strings are JSON
    quoted, which the server's config parser reads as is (and never as `$variables`).
    """
    q = json.dumps
    lines = ["authorization {", "  users = ["]
    for identity, nkey in sorted(users):
        perms = permissions(identity).server_block()
        lines.append(f"    # {identity.name}")
        lines.append(f"    {{nkey: {q(nkey)}, permissions: {_conf(perms)}}}")
    lines += ["  ]", "}"]
    return "\n".join(lines) + "\n"


def _conf(value: Any) -> str:
    """A value in the server's config syntax (JSON-like maps, lists, quoted strings)."""
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}: {_conf(v)}" for k, v in value.items()) + "}"
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_conf(v) for v in value) + "]"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    return json.dumps(value)


# --------------------------------------------------------------------------- keys and files


def new_seed() -> str:
    """A fresh user nkey seed (`SU...`)."""
    import nkeys  # nats-py's optional dependency, a tierflow one; imported when used

    return nkeys.encode_seed(secrets.token_bytes(32), nkeys.PREFIX_BYTE_USER).decode()


def public_key(seed: str) -> str:
    """The public nkey (`U...`) of a user seed: what the server config lists."""
    import nkeys

    pair = nkeys.from_seed(bytearray(seed.encode()))
    try:
        return pair.public_key.decode()
    finally:
        pair.wipe()


@dataclass(frozen=True)
class Credentials:
    """One identity's secret, as a credentials file holds it."""

    identity: Identity
    seed: str = field(repr=False)

    @property
    def public_key(self) -> str:
        return public_key(self.seed)


_HEADER: Final = "# tierflow NATS identity:"


def render_creds(creds: Credentials) -> str:
    """The text of a credentials file: comments naming the identity, then the seed alone
    on its line (what the `nats` CLI's `--nkey FILE` looks for)."""
    identity = creds.identity
    return (
        f"{_HEADER} {identity.name}\n"
        f"# role: {identity.role}   inbox prefix: {identity.inbox_prefix}\n"
        "# Secret: whoever holds this file speaks as this identity. Keep it mode 0600.\n"
        f"{creds.seed}\n"
    )


def parse_creds(text: str, *, source: str = "credentials") -> Credentials:
    """Read `render_creds`' text back (ValueError naming `source` when it is not one)."""
    name = seed = ""
    for line in text.splitlines():
        line = line.strip()
        if line.startswith(_HEADER):
            name = line[len(_HEADER):].strip()
        elif line.startswith("SU"):
            seed = line
    if not name or not seed:
        raise ValueError(f"{source} is not a tierflow NATS credentials file (it needs a '{_HEADER} NAME' line and an SU... seed line)")
    return Credentials(Identity.parse(name), seed)


def read_creds(path: str | os.PathLike[str]) -> Credentials:
    """The credentials in the file at `path` (OSError if unreadable, ValueError if not one)."""
    return parse_creds(Path(path).read_text(), source=str(path))


def identity_from_env(environ: dict[str, str] | None = None) -> Credentials | None:
    """The credentials `TIERFLOW_NATS_CREDS` names; None when it is unset or empty."""
    env = os.environ if environ is None else environ
    path = env.get(CREDS_ENV, "").strip()
    return read_creds(path) if path else None


def own_id(role: str, wanted: str = "", environ: dict[str, str] | None = None) -> str:
    """The router or node id this process speaks for: `wanted` (its flag), else the one its
    credentials name; ValueError when the two disagree (every subscription of its own would
    be refused). "" when neither says."""
    creds = identity_from_env(environ)
    have = creds.identity.instance if creds is not None and creds.identity.role == role else ""
    if wanted and have and wanted != have:
        raise ValueError(f"this {role} is {wanted!r} but its NATS credentials (${CREDS_ENV}) speak for {have!r}; drop the id flag or use {role}-{wanted}'s credentials")
    return wanted or have


def connect_options(creds: Credentials | None) -> dict[str, Any]:
    """Extra `nats.connect` keyword arguments for `creds` (none without credentials)."""
    if creds is None:
        return {}
    return {"nkeys_seed_str": creds.seed, "inbox_prefix": creds.identity.inbox_prefix}


def fabric_identities(routers: Sequence[str], nodes: Sequence[str]) -> list[Identity]:
    """Every identity of a fabric with these router ids and node ids: one per singleton
    role, one per router, one per node."""
    singletons = [Identity(role) for role in (REGISTRY, AUTOSCALER, SUPERVISOR, OBSERVER, ADMIN)]
    return [*singletons, *(Identity(ROUTER, r) for r in routers), *(Identity(NODE, n) for n in nodes)]


