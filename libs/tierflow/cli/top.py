"""`tierflow top`: a live terminal view of nodes, models, tiers, queues and rates.

What it shows comes from the same places the router and autoscaler look: nodes from
their NATS heartbeats, services from nats.micro discovery, and rates from the
router's own Prometheus counters (the difference between two scrapes). Nothing is
kept between runs, so what it shows is what the fabric says right now.

`--once` prints a single frame (after one heartbeat interval, so every node has
spoken and two scrapes give a rate) and exits: that is what scripts and tests use.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Annotated
from urllib.parse import urlsplit

import msgspec
import typer
from nats.aio.client import Client as NATS
from prometheus_client.parser import text_string_to_metric_families
from rich.console import Console, Group, RenderableType
from rich.live import Live
from rich.table import Table
from rich.text import Text

from tierflow.cli.client_tls import cli_tls
from tierflow.cli.nats_connect import connect_once
from tierflow.contracts import messages, subjects
from tierflow.runtime.clock import Clock, WallClock
from tierflow.runtime.discovery import ServiceInfo, discover
from tierflow.runtime.nats_server import http_get
from tierflow.runtime.tls import TlsFiles, client_ssl_context

__all__ = ["top", "RouterTotals", "Rates", "FabricView", "parse_router_totals", "rates_between", "render", "run_top"]

REFRESH_S = 1.0
DISCOVER_EVERY_S = 5.0
LISTEN_ONCE_S = 1.2  # a little over one heartbeat interval: every node is heard once
LOST_AFTER_BEATS = 3  # the router's rule: silent for 3 intervals means out of rotation
HOT_TIERS = ("sram", "hbm")
TIER_STYLE = {"sram": "bold green", "hbm": "green", "ddr": "yellow", "loading": "magenta", "cold": "red"}


# --------------------------------------------------------------------------- rates


@dataclass(frozen=True)
class ModelTotals:
    """Counter values of one model at one scrape (monotonic since the router started)."""

    requests: float = 0.0
    errors: float = 0.0
    prompt_tokens: float = 0.0
    generation_tokens: float = 0.0


@dataclass(frozen=True)
class RouterTotals:
    """One scrape of the router's /metrics, reduced to what the rates need."""

    at: float
    models: dict[str, ModelTotals]
    in_flight: float = 0.0


@dataclass(frozen=True)
class Rates:
    """Per-second rates between two scrapes, per model and summed."""

    window_s: float
    models: dict[str, ModelTotals]  # same fields, now per second
    in_flight: float = 0.0

    @property
    def total(self) -> ModelTotals:
        ms = self.models.values()
        return ModelTotals(
            requests=sum(m.requests for m in ms),
            errors=sum(m.errors for m in ms),
            prompt_tokens=sum(m.prompt_tokens for m in ms),
            generation_tokens=sum(m.generation_tokens for m in ms),
        )


def parse_router_totals(text: str, at: float) -> RouterTotals:
    """Sum the router's request and token counters by model (over versions, tenants, outcomes)."""
    acc: dict[str, dict[str, float]] = {}
    in_flight = 0.0
    fields = {
        "tierflow_router_prompt_tokens_total": "prompt_tokens",
        "tierflow_router_generation_tokens_total": "generation_tokens",
    }
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "tierflow_router_requests_in_flight":
                in_flight += sample.value
                continue
            model = sample.labels.get("model")
            if model is None:
                continue
            slot = acc.setdefault(model, {})
            if sample.name == "tierflow_requests_total":
                slot["requests"] = slot.get("requests", 0.0) + sample.value
                if sample.labels.get("outcome") not in ("ok", "cancelled"):
                    slot["errors"] = slot.get("errors", 0.0) + sample.value
            elif sample.name in fields:
                key = fields[sample.name]
                slot[key] = slot.get(key, 0.0) + sample.value
    return RouterTotals(at=at, models={m: ModelTotals(**v) for m, v in acc.items()}, in_flight=in_flight)


def rates_between(before: RouterTotals, after: RouterTotals) -> Rates:
    """Per-second deltas; a counter that went down means the router restarted (count from 0)."""
    window = max(after.at - before.at, 1e-9)

    def delta(new: float, old: float) -> float:
        return (new - old if new >= old else new) / window

    models = {}
    for name, now in after.models.items():
        was = before.models.get(name, ModelTotals())
        models[name] = ModelTotals(
            requests=delta(now.requests, was.requests),
            errors=delta(now.errors, was.errors),
            prompt_tokens=delta(now.prompt_tokens, was.prompt_tokens),
            generation_tokens=delta(now.generation_tokens, was.generation_tokens),
        )
    return Rates(window_s=window, models=models, in_flight=after.in_flight)


async def scrape_router(router_url: str, at: float, timeout: float = 1.0) -> RouterTotals:
    """GET <router>/metrics; every failure is an OSError (unreachable, non-200, garbage)."""
    url = urlsplit(router_url)
    if not url.hostname:
        raise OSError(f"router URL {router_url!r} has no host")
    ssl = client_ssl_context(cli_tls() or TlsFiles()) if url.scheme == "https" else None  # the CA of `tierflow up --tls`, or the system's
    reply = await http_get(url.hostname, url.port or (443 if ssl else 80), url.path.rstrip("/") + "/metrics", timeout=timeout, ssl=ssl)
    if reply.status != 200:
        raise OSError(f"HTTP {reply.status} from {router_url}/metrics")
    try:
        return parse_router_totals(reply.body.decode("utf-8", "replace"), at)
    except ValueError as exc:
        raise OSError(f"unreadable metrics from {router_url}/metrics: {exc}") from None


# --------------------------------------------------------------------------- state


@dataclass
class FabricView:
    """Everything one frame shows; fed by heartbeats, discovery and router scrapes."""

    nats_url: str
    router_url: str
    beats: dict[str, tuple[float, messages.NodeHeartbeat]] = field(default_factory=dict)
    services: list[ServiceInfo] = field(default_factory=list)
    last_scrape: RouterTotals | None = None
    rates: Rates | None = None
    router_problem: str = "not scraped yet"

    def on_heartbeat(self, hb: messages.NodeHeartbeat, now: float) -> None:
        self.beats[hb.node_id] = (now, hb)

    def on_scrape(self, totals: RouterTotals) -> None:
        if self.last_scrape is not None:
            self.rates = rates_between(self.last_scrape, totals)
        self.last_scrape = totals
        self.router_problem = ""

    def nodes(self, now: float) -> list[tuple[messages.NodeHeartbeat, bool]]:
        """(heartbeat, lost) for every node heard, sorted by role then id."""
        out = [(hb, now - seen > LOST_AFTER_BEATS * hb.interval_s) for seen, hb in self.beats.values()]
        return sorted(out, key=lambda item: (item[0].role != "decode", item[0].node_id))


# --------------------------------------------------------------------------- rendering


def _tier(tier: str) -> Text:
    return Text(tier, style=TIER_STYLE.get(tier, ""))


def _node_state(hb: messages.NodeHeartbeat, lost: bool) -> Text:
    if lost:
        return Text("lost", style="bold red")
    if hb.draining:
        return Text("draining", style="yellow")
    if hb.cordoned:
        return Text("cordoned", style="yellow")
    return Text("ready", style="green")


def _nodes_table(nodes: Iterable[tuple[messages.NodeHeartbeat, bool]]) -> Table:
    t = Table(title="nodes", expand=True)
    for col in ("node", "role", "deployment", "region", "models (tier)", "queue", "running/batch", "kv", "state"):
        t.add_column(col, no_wrap=col != "models (tier)")
    for hb, lost in nodes:
        models = Text(", ").join(Text.assemble(f"{m.name} (", _tier(m.tier), ")") for m in hb.models)
        t.add_row(hb.node_id, hb.role, hb.deployment, hb.region, models, str(hb.queue_depth), f"{hb.running}/{hb.max_batch}", f"{hb.kv_usage:.0%}", _node_state(hb, lost))
    return t


def _models_table(nodes: list[tuple[messages.NodeHeartbeat, bool]], rates: Rates | None) -> Table:
    t = Table(title="models", expand=True)
    for col in ("model", "hot on (hbm)", "warm (ddr)", "cold / loading", "in flight", "req/s", "tok/s in", "tok/s out", "err/s"):
        t.add_column(col, justify="right" if col in ("in flight", "req/s", "tok/s in", "tok/s out", "err/s") else "left")
    where: dict[str, dict[str, list[str]]] = {}
    in_flight: dict[str, int] = {}
    for hb, lost in nodes:
        if lost:
            continue
        for m in hb.models:
            bucket = "hot" if m.tier in HOT_TIERS else "warm" if m.tier == "ddr" else "cold"
            where.setdefault(m.name, {"hot": [], "warm": [], "cold": []})[bucket].append(hb.node_id)
            in_flight[m.name] = in_flight.get(m.name, 0) + m.in_flight
    names = sorted(set(where) | set(rates.models if rates else ()))
    for name in names:
        spots = where.get(name, {"hot": [], "warm": [], "cold": []})
        r = rates.models.get(name) if rates else None
        figures = [f"{r.requests:.1f}", f"{r.prompt_tokens:.0f}", f"{r.generation_tokens:.0f}", f"{r.errors:.1f}"] if r else ["-"] * 4
        t.add_row(
            name, Text(" ".join(spots["hot"]) or "-", style="green"), Text(" ".join(spots["warm"]) or "-", style="yellow"),
            Text(" ".join(spots["cold"]) or "-", style="red"), str(in_flight.get(name, 0)), *figures,
        )
    return t


def _summary(view: FabricView, nodes: list[tuple[messages.NodeHeartbeat, bool]]) -> Text:
    live = [hb for hb, lost in nodes if not lost]
    decode = sum(hb.role == "decode" for hb in live)
    services = sorted({s.name.removeprefix("tierflow-") for s in view.services})
    head = Text.assemble(
        ("tierflow top", "bold"), f"  NATS {view.nats_url}  router {view.router_url}\n",
        f"services: {', '.join(services) or '(none answered)'}   ",
        f"nodes: {len(live)} live ({decode} decode), {len(nodes) - len(live)} lost   ",
        f"queued: {sum(hb.queue_depth for hb in live)}  running: {sum(hb.running for hb in live)}\n",
    )
    if view.router_problem:
        head.append(f"rates: router metrics unavailable ({view.router_problem})", style="yellow")
    elif view.rates is None:
        head.append("rates: waiting for a second scrape")
    else:
        total = view.rates.total
        head.append(
            f"rates over {view.rates.window_s:.1f}s: {total.requests:.1f} req/s  {total.prompt_tokens:.0f} tok/s in  "
            f"{total.generation_tokens:.0f} tok/s out  {total.errors:.1f} err/s  in flight {view.rates.in_flight:.0f}"
        )
    return head


def render(view: FabricView, now: float) -> RenderableType:
    """One frame: a summary, the nodes (tiers, queues, load, state) and the models (where hot, rates)."""
    nodes = view.nodes(now)
    return Group(_summary(view, nodes), _nodes_table(nodes), _models_table(nodes, view.rates))


# --------------------------------------------------------------------------- the loop


async def connect(nats_url: str) -> NATS:
    """Connect once (a comma list of cluster members too), or raise ConnectionError with a
    message a person can act on (see `tierflow.cli.nats_connect`)."""
    return await connect_once(nats_url, name="tierflow-top")


async def run_top(nats_url: str, router_url: str, *, once: bool, console: Console, clock: Clock | None = None, refresh: float = REFRESH_S) -> None:
    """Print one frame (`once`) or keep a live view until cancelled. Raises ConnectionError if NATS is unreachable."""
    clock = clock or WallClock()
    nc = await connect(nats_url)
    view = FabricView(nats_url=nats_url, router_url=router_url)

    async def on_beat(msg: object) -> None:
        try:
            view.on_heartbeat(messages.heartbeat_decoder.decode(msg.data), clock.monotonic())  # type: ignore[attr-defined]
        except msgspec.DecodeError:
            pass

    async def scrape() -> None:
        try:
            view.on_scrape(await scrape_router(router_url, clock.monotonic()))
        except OSError as exc:
            view.router_problem = str(exc) or type(exc).__name__

    sub = None
    try:
        sub = await nc.subscribe(subjects.NODE_HEARTBEATS, cb=on_beat)
        if once:
            await scrape()
            view.services = await discover(nc, timeout=0.5)
            await clock.sleep(max(0.0, LISTEN_ONCE_S - 0.5))
            await scrape()
            console.print(render(view, clock.monotonic()))
            return
        next_discovery = 0.0
        with Live(render(view, clock.monotonic()), console=console, refresh_per_second=4, screen=False) as live:
            while True:
                now = clock.monotonic()
                if now >= next_discovery:
                    view.services = await discover(nc, timeout=0.3)
                    next_discovery = now + DISCOVER_EVERY_S
                await scrape()
                live.update(render(view, clock.monotonic()))
                await clock.sleep(refresh)
    finally:
        if sub is not None:
            with contextlib.suppress(Exception):  # the connection may already be gone
                await sub.unsubscribe()
        await nc.close()


DEFAULT_ROUTER = "http://127.0.0.1:8000"


def top(
    nats_url: Annotated[str, typer.Option(envvar="TIERFLOW_NATS_URL", help="NATS server of the fabric")] = "nats://127.0.0.1:4222",
    router: Annotated[str, typer.Option(envvar="TIERFLOW_ROUTER_URL", help="Router HTTP base URL; rates come from its /metrics")] = DEFAULT_ROUTER,
    once: Annotated[bool, typer.Option("--once", help="Print one frame and exit (for scripts)")] = False,
) -> None:
    """A live view of nodes, models, tiers, queues and rates; Ctrl-C leaves."""
    console = Console()
    if router == DEFAULT_ROUTER and cli_tls() is not None:  # a `tierflow up --tls` fabric serves HTTPS
        router = "https" + router.removeprefix("http")
    try:
        asyncio.run(run_top(nats_url, router, once=once, console=console))
    except ConnectionError as exc:
        console.print(f"[red]tierflow is not running:[/red] {exc}")
        raise typer.Exit(2) from None
    except KeyboardInterrupt:
        pass
