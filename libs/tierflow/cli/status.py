"""`tierflow status`: what runs in the fabric, asked of the fabric itself over NATS.

Services answer nats.micro discovery, nodes are heard on their heartbeats, models are
read from the registry's KV bucket. Nothing is cached locally, so what it prints is
what the router and autoscaler see too.
"""

from __future__ import annotations

import asyncio
import time
from typing import Annotated

import msgspec
import typer
from rich.console import Console
from rich.table import Table

from tierflow.cli.nats_connect import connect_once
from tierflow.contracts import messages, registry, subjects
from tierflow.runtime.discovery import ServiceInfo, discover
from tierflow.runtime.kv import snapshot

__all__ = ["status", "collect_status", "render_nodes", "FabricStatus"]

ESSENTIAL = ("router", "model-registry")


class FabricStatus(msgspec.Struct):
    services: list[ServiceInfo]
    nodes: list[messages.NodeHeartbeat]
    models: list[registry.ModelRecord]
    deployments: list[registry.DeploymentRecord]

    def missing(self) -> list[str]:
        names = {s.name for s in self.services}
        return [svc for svc in ESSENTIAL if subjects.SERVICE_NAMES[svc] not in names]


async def collect_status(nats_url: str, *, listen: float = 1.2) -> FabricStatus:
    nc = await connect_once(nats_url, name="tierflow-status")  # a comma list (a cluster) too
    try:
        beats: dict[str, messages.NodeHeartbeat] = {}

        async def on_beat(msg: object) -> None:
            try:
                hb = messages.heartbeat_decoder.decode(msg.data)  # type: ignore[attr-defined]
            except msgspec.DecodeError:
                return
            beats[hb.node_id] = hb

        sub = await nc.subscribe(subjects.NODE_HEARTBEATS, cb=on_beat)
        services_task = asyncio.create_task(discover(nc, timeout=0.5))
        models: list[registry.ModelRecord] = []
        deployments: list[registry.DeploymentRecord] = []
        try:
            js = nc.jetstream()
            entries = [e for e in await snapshot(js, subjects.REGISTRY_BUCKET) if e.value]  # one read: never half an apply
            models = [registry.model_decoder.decode(e.value) for e in entries if e.key.startswith(subjects.model_key(""))]
            deployments = [registry.deployment_decoder.decode(e.value) for e in entries if e.key.startswith(subjects.deployment_key(""))]
        except Exception:  # no bucket / no keys yet: the registry has not applied a fleet
            pass
        services = await services_task
        await asyncio.sleep(max(0.0, listen - 0.5))
        await sub.unsubscribe()
        return FabricStatus(services=services, nodes=sorted(beats.values(), key=lambda h: h.node_id), models=models, deployments=deployments)
    finally:
        await nc.close()


def render_nodes(st: FabricStatus, console: Console) -> None:
    t = Table(title="nodes")
    for col in ("node", "role", "deployment", "region", "profile", "models (tier)", "queue", "running", "kv", "state"):
        t.add_column(col)
    for n in st.nodes:
        models = ", ".join(f"{m.name} ({m.tier})" for m in n.models)
        state = "draining" if n.draining else "cordoned" if n.cordoned else "ready"
        if n.cordoned and n.cordon_owner:
            state += f" by {n.cordon_owner}"
        if n.bundle_outdated:
            state += ", bundle outdated"
        t.add_row(n.node_id, n.role, n.deployment, n.region, n.profile, models, str(n.queue_depth), f"{n.running}/{n.max_batch}", f"{n.kv_usage:.0%}", state)
    console.print(t)


def _render(st: FabricStatus, console: Console) -> None:
    now = time.time()
    t = Table(title="services")
    for col in ("service", "instance", "pid", "up for", "endpoints"):
        t.add_column(col)
    for s in st.services:
        started = float(s.metadata.get("started_at", now))
        endpoints = " ".join(v for k, v in sorted(s.metadata.items()) if k in ("http", "grpc"))
        mode = s.metadata.get("mode", "")  # the autoscaler: active or standby
        t.add_row(s.name.removeprefix("tierflow-") + (f" ({mode})" if mode else ""), s.metadata.get("instance", s.id), s.metadata.get("pid", ""), f"{now - started:.0f}s", endpoints)
    console.print(t)
    render_nodes(st, console)
    t = Table(title="models")
    for col in ("model", "versions", "default", "traffic", "deployments"):
        t.add_column(col)
    for m in st.models:
        where = [d.name for d in st.deployments if any(e.model == m.name for e in d.models)]
        traffic = ", ".join(f"{v}:{w:g}" for v, w in sorted(m.traffic.items())) or f"{m.default_version}:100%"
        t.add_row(m.name, ", ".join(v.version for v in m.versions), m.default_version, traffic, ", ".join(where) or "(not deployed)")
    console.print(t)


def status(
    nats_url: Annotated[str, typer.Option(envvar="TIERFLOW_NATS_URL", help="NATS server of the fabric")] = "nats://127.0.0.1:4222",
    json_out: Annotated[bool, typer.Option("--json", help="Print JSON instead of tables")] = False,
) -> None:
    console = Console()
    try:
        st = asyncio.run(collect_status(nats_url))
    except ConnectionError as exc:
        console.print(f"[red]tierflow is not running:[/red] {exc}")
        raise typer.Exit(2) from None
    if json_out:
        print(msgspec.json.encode(st).decode())
    else:
        _render(st, console)
    missing = st.missing()
    if missing:
        console.print(f"[red]not healthy:[/red] no {', '.join(missing)} answered on NATS; check `.tierflow/logs/`")
        raise typer.Exit(1)
    if not any(n.role == "decode" for n in st.nodes):
        console.print("[red]not healthy:[/red] no decode node is heartbeating; nothing can serve requests")
        raise typer.Exit(1)
