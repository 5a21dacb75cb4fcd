"""Fair admission at the router: which way of sharing a model's limit keeps a steady tenant's
time to first token beside a flood (issue 21), on a discrete-event model that drives the
real `tierflow.placement.admission.Admission`.

The model: one model with `--slots` batch slots over the fleet (placement spreads the
requests, so the slots act as one pool), a queue in front of them, service times uniform
in [1, 3] s (the chat deployment's ~2 s answers), and a TTFT that is the time from the
client's first send (Retry-Afters included) to a slot, plus 20 ms of prefill. Clients are
closed loops: the steady tenant runs `--steady` concurrent callers with 0.5 s of think
time, the flood 24x as many with none; a 429 is retried after its Retry-After, as the
openai client does.

The routers compared:

- `fcfs`: today, one limit per model, first come first served;
- `share`: the limit shared by class (strict priority) and weight, a flow over its share
  refused at the limit, one under it admitted (the issue's rule, no headroom);
- `share+wait`: as `share`, but a refused request waits at the router up to `--wait` s
  and is granted, in order of class then least weighted in-flight, when one leaves;
  `share+wait@slots` the same with no node queue allowed (the limit is the batch slots,
  the queue is the router's);
- `reserve` (classes only): batch may not take the last 10% of the limit;
- `share+headroom`: as `share`, plus 1/8 of the slots kept free while a flow under its
  share (or of a class above) is active: a flow over its share stops below them;
- `default`: `share+headroom` with flows counted active for 5 s after their last request
  left (`idle_grace_s`), so a client between two calls keeps its headroom: the defaults
  of `AdmissionConfig`.

and the node's queue: `fifo` (today's engine) or `fair` (class, then the tenant with the
fewest running per weight: what node-side fair queuing does).

Scenarios: a standard steady tenant beside a standard flood; an interactive one beside a
batch flood; two floods of weights 1 and 3 (each 24 callers), where the headroom must
cost nothing (neither is under its share) and the weights must split the slots. Rows:
the steady tenant's TTFT p50/p95 (and p95 over its value alone), its goodput over its
value alone, its refusals, the flood's goodput and the slots' utilisation.

    .venv/bin/python loadtest/fair_admission.py              # 600 virtual s per row, ~15 s

Figures (2026-12, --slots 16 --steady 2, 600 s):

    router            node   p50 ms  p95 ms x alone goodput refused flood/s  util
    -- standard beside a standard flood
    (alone)           fifo       20      20    1.00    1.00       0
    fcfs              fifo    30048  300411 15020.53    0.03    1161    7.96  1.00
    share             fifo      571    1036   51.82    0.80       0    7.34  1.00
    share+wait        fifo      603    1076   53.81    0.81       0    7.34  1.00
    share+wait@slots  fifo      121     409   20.46    0.94       0    7.24  1.00
    share+headroom    fifo       20    1242   62.11    0.91       0    6.39  0.89
    default           fifo       20      20    1.00    0.99       0    6.22  0.88
    (alone)           fair       20      20    1.00    1.00       0
    fcfs              fair    38174  182307 9115.36    0.03    1165    7.96  1.00
    share             fair      119     413   20.64    0.94       0    7.24  1.00
    share+wait        fair      121     409   20.46    0.94       0    7.24  1.00
    share+wait@slots  fair      121     409   20.46    0.94       0    7.24  1.00
    share+headroom    fair       20     407   20.35    0.97       0    6.38  0.90
    default           fair       20      20    1.00    0.99       0    6.22  0.88
    -- interactive beside a batch flood
    (alone)           fifo       20      20    1.00    1.00       0
    fcfs              fifo    30048  300411 15020.53    0.03    1161    7.96  1.00
    share             fifo      571    1036   51.82    0.80       0    7.34  1.00
    share+wait        fifo      603    1076   53.81    0.81       0    7.34  1.00
    share+wait@slots  fifo      121     409   20.46    0.94       0    7.24  1.00
    reserve           fifo      235     704   35.18    0.91       0    7.25  1.00
    share+headroom    fifo       20    1242   62.11    0.91       0    6.39  0.89
    default           fifo       20      20    1.00    0.99       0    6.22  0.88
    (alone)           fair       20      20    1.00    1.00       0
    fcfs              fair    38174  182307 9115.36    0.03    1165    7.96  1.00
    share             fair      119     413   20.64    0.94       0    7.24  1.00
    share+wait        fair      121     409   20.46    0.94       0    7.24  1.00
    share+wait@slots  fair      121     409   20.46    0.94       0    7.24  1.00
    reserve           fair      112     418   20.89    0.94       0    7.22  1.00
    share+headroom    fair       20     407   20.35    0.97       0    6.38  0.90
    default           fair       20      20    1.00    0.99       0    6.22  0.88
    -- two floods, weights 1 and 3: the slots each holds on average (fair: 1/4 and 3/4), utilisation
    fcfs              fifo  w1   7.7 slots, w3   8.3 slots, util 1.00
    share             fifo  w1   4.1 slots, w3  11.9 slots, util 1.00
    default           fifo  w1   4.1 slots, w3  11.9 slots, util 1.00

Read: `fcfs` starves the steady tenant (its requests are refused behind the flood's
retries); `share` admits it but its requests wait for a slot; the wait queue helps only
where it replaces a FIFO node queue; `default` keeps its TTFT at its value alone on
either node queue, for 12% of the slots while it shares; weights split the slots 1:3
and two floods lose nothing to the headroom.
"""

from __future__ import annotations

import argparse
import heapq
import itertools
import random
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from tierflow.placement.admission import Admission, AdmissionConfig, Ticket
from tierflow.placement.classes import CLASS_RANK
from tierflow.runtime.errors import RateLimited

M = "chat"
PREFILL_S = 0.02
WITHOUT = {"headroom": 0.0, "idle_grace_s": 0.0}
ROUTERS: dict[str, dict[str, Any]] = {
    "fcfs": WITHOUT,
    "share": WITHOUT,
    "share+wait": WITHOUT,
    "share+wait@slots": {**WITHOUT, "max_queue_factor": 0.0, "initial_queue_factor": 0.0},
    "reserve": WITHOUT,
    "share+headroom": {"idle_grace_s": 0.0},
    "default": {},
}


@dataclass(frozen=True)
class TenantLoad:
    name: str
    request_class: str
    concurrency: int
    think_s: float
    weight: float = 1.0


@dataclass
class Request:
    tenant: TenantLoad
    seq: int
    sent: float  # the client's first send
    ticket: Ticket | None = None
    admitted: float = 0.0
    deadline: float = 0.0  # of its wait at the router


@dataclass
class Tally:
    ttft: list[float] = field(default_factory=list)
    done: int = 0
    refused: int = 0


@dataclass
class Result:
    by_tenant: dict[str, Tally]
    busy_s: float
    duration: float
    slots: int

    def utilisation(self) -> float:
        return self.busy_s / (self.duration * self.slots)


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else float("nan")


def run(loads: list[TenantLoad], *, router: str, node: str, slots: int, duration: float, wait_s: float = 0.5, seed: int = 1, **config: Any) -> Result:
    """One run; `config`: AdmissionConfig fields over the router's own."""
    rng = random.Random(seed)
    admission = Admission(AdmissionConfig(**{**ROUTERS[router], **config}))
    admission.set_capacity(M, slots)
    tally = {t.name: Tally() for t in loads}
    events: list[tuple[float, int, str, Any]] = []
    seq = itertools.count()
    free = slots
    node_queue: list[Request] = []
    running: dict[str, int] = {t.name: 0 for t in loads}
    waiting: deque[Request] = deque()  # the router's wait queue (share+wait)
    busy = 0.0
    tenants = router != "fcfs"
    classes = tenants and router != "reserve"

    def attempt(t: float, request: Request) -> None:
        load = request.tenant
        try:
            if router == "reserve" and load.request_class == "batch":
                stats = admission.stats(M)
                if stats.limit and stats.in_flight >= stats.limit - max(1, round(0.1 * stats.limit)):
                    raise RateLimited("reserved for interactive", retry_after=1.0)
            ticket = admission.admit(M, t, tenant=load.name if tenants else "", weight=load.weight, request_class=load.request_class if classes else "standard")
        except RateLimited as exc:
            if router.startswith("share+wait") and request.deadline == 0.0:
                request.deadline = t + wait_s
                waiting.append(request)
                heapq.heappush(events, (request.deadline, next(seq), "expire", request))
                return
            tally[load.name].refused += 1
            heapq.heappush(events, (t + exc.retry_after, next(seq), "retry", Request(load, next(seq), request.sent)))
            return
        request.ticket, request.admitted = ticket, t
        enqueue(t, request)

    def enqueue(t: float, request: Request) -> None:
        nonlocal free
        node_queue.append(request)
        while free and node_queue:
            free -= 1
            start(t, take())

    def order(r: Request) -> tuple[int, float, int]:
        return CLASS_RANK[r.tenant.request_class], running[r.tenant.name] / r.tenant.weight, r.seq

    def take() -> Request:
        if node == "fifo":
            return node_queue.pop(0)
        best = min(node_queue, key=order)
        node_queue.remove(best)
        return best

    def start(t: float, request: Request) -> None:
        nonlocal busy
        assert request.ticket is not None
        request.ticket.started(t - request.admitted, t)
        running[request.tenant.name] += 1
        tally[request.tenant.name].ttft.append(t + PREFILL_S - request.sent)
        service = rng.uniform(1.0, 3.0)
        busy += service
        heapq.heappush(events, (t + service, next(seq), "done", request))

    def grant(t: float) -> None:
        while waiting:
            best = min(waiting, key=order)
            try:
                ticket = admission.admit(M, t, tenant=best.tenant.name, weight=best.tenant.weight, request_class=best.tenant.request_class)
            except RateLimited:
                return
            waiting.remove(best)
            best.ticket, best.admitted = ticket, t
            enqueue(t, best)

    for load in loads:
        for _ in range(load.concurrency):
            heapq.heappush(events, (rng.uniform(0, 1.0), next(seq), "send", load))
    while events:
        t, _, kind, item = heapq.heappop(events)
        if t > duration:
            break
        if kind == "send":
            attempt(t, Request(item, next(seq), t))
        elif kind == "retry":
            attempt(t, item)
        elif kind == "expire":
            if item in waiting:  # still waiting: refused now, the client retries after 1 s
                waiting.remove(item)
                tally[item.tenant.name].refused += 1
                heapq.heappush(events, (t + 1.0, next(seq), "retry", Request(item.tenant, next(seq), item.sent)))
        else:  # done
            item.ticket.release(t)
            running[item.tenant.name] -= 1
            tally[item.tenant.name].done += 1
            free += 1
            if node_queue:
                free -= 1
                start(t, take())
            grant(t)
            heapq.heappush(events, (t + item.tenant.think_s, next(seq), "send", item.tenant))
    return Result(tally, busy, duration, slots)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--slots", type=int, default=16)
    parser.add_argument("--steady", type=int, default=2, help="the steady tenant's concurrency (the flood's is 24x)")
    parser.add_argument("--duration", type=float, default=600.0)
    parser.add_argument("--wait", type=float, default=0.5, help="the longest a request waits at the router (share+wait)")
    args = parser.parse_args()
    common = {"slots": args.slots, "duration": args.duration, "wait_s": args.wait}
    flows = ["fcfs", "share", "share+wait", "share+wait@slots", "share+headroom", "default"]
    scenarios = {
        "standard beside a standard flood": ("standard", "standard", flows),
        "interactive beside a batch flood": ("interactive", "batch", [*flows[:4], "reserve", *flows[4:]]),
    }
    print(f"{'router':<17} {'node':<5} {'p50 ms':>7} {'p95 ms':>7} {'x alone':>7} {'goodput':>7} {'refused':>7} {'flood/s':>7} {'util':>5}")
    for title, (steady_class, flood_class, routers) in scenarios.items():
        steady = TenantLoad("steady", steady_class, args.steady, 0.5)
        flood = TenantLoad("flood", flood_class, 24 * args.steady, 0.0)
        print(f"-- {title}")
        for node in ("fifo", "fair"):
            alone = run([steady], router="default", node=node, **common).by_tenant["steady"]
            alone_p95 = pct(alone.ttft, 0.95)
            print(f"{'(alone)':<17} {node:<5} {pct(alone.ttft, 0.5) * 1e3:>7.0f} {alone_p95 * 1e3:>7.0f} {1.0:>7.2f} {1.0:>7.2f} {alone.refused:>7}")
            for router in routers:
                result = run([steady, flood], router=router, node=node, **common)
                s, f = result.by_tenant["steady"], result.by_tenant["flood"]
                p95 = pct(s.ttft, 0.95)
                print(f"{router:<17} {node:<5} {pct(s.ttft, 0.5) * 1e3:>7.0f} {p95 * 1e3:>7.0f} {p95 / alone_p95:>7.2f} {s.done / alone.done:>7.2f} "
                      f"{s.refused:>7} {f.done / args.duration:>7.2f} {result.utilisation():>5.2f}")  # fmt: skip
    print("-- two floods, weights 1 and 3: the slots each holds on average (fair: 1/4 and 3/4), utilisation")
    light, heavy = TenantLoad("w1", "standard", 12 * args.steady, 0.0, 1.0), TenantLoad("w3", "standard", 12 * args.steady, 0.0, 3.0)
    for router in ("fcfs", "share", "default"):
        result = run([light, heavy], router=router, node="fifo", **common)
        held = {name: tally.done * 2.0 / args.duration for name, tally in result.by_tenant.items()}  # mean service 2 s
        print(f"{router:<17} fifo  w1 {held['w1']:>5.1f} slots, w3 {held['w3']:>5.1f} slots, util {result.utilisation():.2f}")


if __name__ == "__main__":
    main()
