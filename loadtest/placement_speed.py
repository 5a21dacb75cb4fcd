"""How fast placement decides over a 1,000-node fleet: decisions per second, per policy.

Builds `--nodes` node views (from heartbeats, as the router does) in four regions, each
node a bundle of 3 of `--models` models in mixed tiers, at mixed load, each with a few
hundred recently cached prefix blocks drawn from `--prompts` shared system prompts. Then
times `policy.rank(...)` for a stream of requests: a system prompt + a unique user turn
(~40 blocks of 64 tokens), a session with a last node, half of them bounded to a region.

Two ways in: the whole fleet (every decision walks all nodes) and `FleetIndex.serving`
(only the nodes serving the model). Then the router's own path, with the table changing
between decisions as it does live (a heartbeat and the previous decision's dispatch
before each one): a `FleetIndex` rebuilt after each change and ranked, against the
`CandidateIndex` the router and the simulator use (rows kept current per change, scored
column-wise), with their ratio from the same run. It prints, it does not assert: the
figures are for comparing changes on one machine.

`HotnessAware.rank` over a one-off list (the first table's hotness rows) fills score
columns it then uses once: ~3x the per-node loop it replaced. Only the router path
matters for speed (the router and the simulator rank through `CandidateIndex`; `rank`
itself serves the choice among a disaggregated deployment's few prefill nodes).

    python loadtest/placement_speed.py [--nodes 1000] [--models 12] [--decisions 5000] [--seed 1]
"""

from __future__ import annotations

import argparse
import random
import time
from collections.abc import Callable, Sequence

from tierflow.contracts import messages
from tierflow.placement import (
    Boundary,
    FleetIndex,
    NodeView,
    PlacementRequest,
    PlacementPolicy,
    make_policy,
)
from tierflow.placement.candidates import CandidateIndex
from tierflow.placement.tables import NodeTable
from tierflow.rdu import block_hashes

BLOCK = 64
REGIONS = ("us-east", "us-west", "eu-west", "ap-south")
TIERS = ("hbm", "hbm", "ddr", "ddr", "loading", "cold")


def build_heartbeats(n_nodes: int, n_models: int, n_prompts: int, rng: random.Random) -> tuple[list[messages.NodeHeartbeat], list[list[int]]]:
    systems = [[rng.randrange(1 << 17) for _ in range(rng.randrange(1000, 3000))] for _ in range(n_prompts)]
    system_hashes = [block_hashes(s, BLOCK) for s in systems]
    models = [f"model-{i}" for i in range(n_models)]
    beats = []
    for i in range(n_nodes):
        bundle = rng.sample(models, 3)
        cached: list[int] = []
        for k in rng.sample(range(n_prompts), 4):
            cached.extend(system_hashes[k][: rng.randrange(len(system_hashes[k]) + 1)])
        cached.extend(rng.getrandbits(64) for _ in range(200))
        hb = messages.NodeHeartbeat(
            node_id=f"node-{i:04d}",
            region=REGIONS[i % len(REGIONS)],
            residency="eu" if REGIONS[i % len(REGIONS)].startswith("eu") else "",
            models=[messages.ModelState(name=m, version="v1", tier=rng.choice(TIERS)) for m in bundle],
            queue_depth=rng.randrange(0, 20),
            running=rng.randrange(0, 64),
            max_batch=64,
            kv_usage=rng.random(),
            recent_prefix_hashes=cached,
            interval_s=1.0,
        )
        beats.append(hb)
    return beats, systems


def build_requests(n: int, n_models: int, systems: Sequence[list[int]], n_nodes: int, rng: random.Random) -> list[PlacementRequest]:
    eu = Boundary(regions=frozenset({"eu-west"}), residency="eu")
    out = []
    for i in range(n):
        prompt = rng.choice(systems) + [rng.randrange(1 << 17) for _ in range(rng.randrange(50, 600))]
        out.append(
            PlacementRequest(
                model=f"model-{rng.randrange(n_models)}",
                version="v1",
                prompt_hashes=block_hashes(prompt, BLOCK),
                session_id=f"s{i % 500}",
                affinity_node=f"node-{rng.randrange(n_nodes):04d}",
                boundary=eu if i % 2 else Boundary(),
                workload=rng.choice((None, "interactive", "batch")),
            )
        )
    return out


def time_policy(
    policy: PlacementPolicy,
    requests: Sequence[PlacementRequest],
    pick: Callable[[PlacementRequest], Sequence[NodeView]],
    limit: int | None,
) -> float:
    start = time.perf_counter()
    for req in requests:
        policy.rank(pick(req), req, 1.0, limit=limit)
    return len(requests) / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--nodes", type=int, default=1000)
    parser.add_argument("--models", type=int, default=12)
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--decisions", type=int, default=5000)
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()

    rng = random.Random(args.seed)
    beats, systems = build_heartbeats(args.nodes, args.models, args.prompts, rng)
    workloads = ("bundle", "high-interactivity", "high-throughput")
    t0 = time.perf_counter()
    nodes = [NodeView.from_heartbeat(hb, 0.0, workload=workloads[i % 3]) for i, hb in enumerate(beats)]
    t1 = time.perf_counter()
    index = FleetIndex.build(nodes)
    t2 = time.perf_counter()
    requests = build_requests(args.decisions, args.models, systems, args.nodes, rng)
    per_model = sum(len(index.serving(f"model-{i}")) for i in range(args.models)) / args.models
    print(f"fleet: {args.nodes} nodes, {args.models} models (~{per_model:.0f} nodes serve each), "
          f"views from heartbeats {1e6 * (t1 - t0) / args.nodes:.0f} us/node, index {1e3 * (t2 - t1):.1f} ms")
    print(f"requests: {args.decisions}, ~{sum(len(r.prompt_hashes) for r in requests) / len(requests):.0f} prompt blocks each, "
          "half bounded to eu-west/eu")
    print(f"{'policy':<14}{'nodes passed':<16}{'limit':<8}{'decisions/s':>12}{'us/decision':>13}")
    def whole(r: PlacementRequest) -> Sequence[NodeView]:
        return nodes

    def by_model(r: PlacementRequest) -> Sequence[NodeView]:
        return index.serving(r.model)

    for name in ("hotness", "least-loaded", "round-robin", "random"):
        for label, pick in (("whole fleet", whole), ("index.serving", by_model)):
            for limit in (3, None):
                rate = time_policy(make_policy(name, seed=args.seed), requests, pick, limit)
                print(f"{name:<14}{label:<16}{str(limit):<8}{rate:>12,.0f}{1e6 / rate:>13.1f}")
    router_path(beats, requests, workloads)


def router_path(beats: Sequence[messages.NodeHeartbeat], requests: Sequence[PlacementRequest], workloads: Sequence[str]) -> None:
    """Decisions with a heartbeat and a dispatch between each two (module docstring)."""
    rates = {}
    for way in ("FleetIndex rebuilt per change", "CandidateIndex"):
        table = NodeTable()
        for i, hb in enumerate(beats):
            table.apply(hb, 0.0, workload=workloads[i % 3])
        policy = make_policy("hotness")
        index = CandidateIndex(table) if way == "CandidateIndex" else None
        start = time.perf_counter()
        for i, req in enumerate(requests):
            table.apply(beats[i % len(beats)], 0.5, workload=workloads[i % len(beats) % 3])
            if index is not None:
                best = index.rank(policy, req, 1.0).best
            else:
                best = policy.rank(table.index().serving(req.model), req, 1.0, limit=1).best
            table.note_dispatch(best.node_id, req.model)
        rates[way] = len(requests) / (time.perf_counter() - start)
    old, new = rates.values()
    print("router path, hotness, a heartbeat and a dispatch between decisions (limit 1):")
    for way, rate in rates.items():
        print(f"  {way:<32}{rate:>10,.0f} decisions/s {1e6 / rate:>8.1f} us/decision")
    print(f"  CandidateIndex / FleetIndex: {new / old:.1f}x")


if __name__ == "__main__":
    main()
