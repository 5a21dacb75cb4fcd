"""Placement on a node whose HBM is full: the switch-in's full price, and what it puts at risk.

The agentic benchmark's tail came from switch ping-pong: a model brought into a full node
waited for a busy victim to drain, and requests for the model the engine then evicted were
still sent there as if it were hot. These pin the three fixes: the switch cost counts the
victim's drain and reload, every idle hot model is at risk until the next heartbeat, and
queueing is priced per model batch (continuous batching is per model).
"""

from __future__ import annotations

import msgspec

from tierflow.contracts import messages, registry
from tierflow.nodehost.preload import node_ordinal, preload_models
from tierflow.placement import HotnessAware, PlacementRequest, PlacementWeights
from tierflow.placement.tables import ModelTable, NodeTable
from tierflow.rdu import BUILTIN_MODELS, BUILTIN_PROFILES, BundleModel, DeploymentConfig

MODELS = ("planner", "coder", "reasoner", "summarizer")  # four 70B models: three fit in sn40l-8 HBM


def _models() -> ModelTable:
    table = ModelTable(drain_seconds=2.0)
    for name in MODELS:
        table.put_model(registry.ModelRecord(name=name, versions=[registry.ModelVersionRecord(version="v1", catalog="llama-3.1-70b")], default_version="v1"))
    table.put_deployment(registry.DeploymentRecord(
        name="agents", bundle="agents", profile="sn40l-8",
        models=[registry.BundleEntry(model=m, version="v1", config="ss16384-bs4") for m in MODELS],
    ))
    return table


def _beat(node: str, busy: dict[str, int], cold: str = "summarizer") -> messages.NodeHeartbeat:
    return messages.NodeHeartbeat(
        node_id=node, deployment="agents", block_size=64, max_batch=16, running=sum(busy.values()),
        models=[
            messages.ModelState(name=m, version="v1", tier="ddr" if m == cold else "hbm", in_flight=busy.get(m, 0), max_batch=4)
            for m in MODELS
        ],
    )


def test_a_switch_into_a_full_node_pays_the_victims_drain_and_reload() -> None:
    models, nodes = _models(), NodeTable()
    nodes.apply(_beat("idle-victim", {"planner": 2, "coder": 2}), now=0.0)  # reasoner idle: evicted at once
    nodes.apply(_beat("busy-victims", {"planner": 2, "coder": 2, "reasoner": 4}), now=0.0)
    idle, busy = nodes.get("idle-victim"), nodes.get("busy-victims")
    assert idle is not None and busy is not None
    switch = models.switch_cost(idle, idle.slots["summarizer"])
    assert switch > 0
    # The busy node's idlest victim has 2 requests of a 4-batch: half a batch of drain, 1 s.
    assert abs(models.switch_cost(busy, busy.slots["summarizer"]) - (switch + 1.0)) < 1e-9
    assert models.switch_cost(idle, idle.slots["planner"]) == 0.0  # hot already


def test_every_idle_hot_model_is_at_risk_until_the_next_heartbeat() -> None:
    models, nodes = _models(), NodeTable()
    nodes.apply(_beat("n", {"planner": 1}), now=0.0)
    view = nodes.get("n")
    assert view is not None
    assert models.at_risk(view, "summarizer") == ("coder", "reasoner")  # either may be the engine's victim
    assert models.at_risk(view, "planner") == ()  # hot: nothing moves
    nodes.note_dispatch("n", "summarizer", evicts=models.at_risk(view, "summarizer"))
    after = nodes.get("n")
    assert after is not None
    assert {m: s.tier for m, s in after.slots.items()} == {"planner": "hbm", "coder": "ddr", "reasoner": "ddr", "summarizer": "hbm"}


def test_queueing_is_priced_per_model_batch() -> None:
    """A node busy with other models' batches has room for this model's; a node whose
    batch of this model is full makes the request wait a batch turn."""
    nodes = NodeTable()
    nodes.apply(_beat("others-busy", {"coder": 4, "reasoner": 4}), now=0.0)
    nodes.apply(_beat("planner-full", {"planner": 4}), now=0.0)
    policy = HotnessAware(PlacementWeights(contention=0.0, occupancy=0.0, batch_turn_seconds=2.0))
    ranked = policy.rank(nodes.index().serving("planner"), PlacementRequest(model="planner"), 1.0)
    assert ranked.node_ids == ["others-busy", "planner-full"]
    assert abs(ranked.choices[1].score - ranked.choices[0].score - 2.0 / 4) < 1e-9  # one request beyond a 4-batch


def test_nodes_start_with_different_models_hot() -> None:
    profile = BUILTIN_PROFILES["sn40l-8"]
    base = BUILTIN_MODELS["llama-3.1-70b"]
    bundle = [BundleModel(spec=msgspec.structs.replace(base, name=m), config=DeploymentConfig.parse("ss16384-bs4")) for m in MODELS]
    assert node_ordinal("decode-3") == 3 and node_ordinal("decode-x") == node_ordinal("decode-x")
    preloads = [preload_models(profile, bundle, f"decode-{i}") for i in range(4)]
    # Two 70B models fit beside the KV pool; each node starts the fit at its own model.
    assert preloads == [["planner", "coder"], ["coder", "reasoner"], ["reasoner", "summarizer"], ["summarizer", "planner"]]
    assert {m for p in preloads for m in p} == set(MODELS)  # every model starts hot somewhere


def test_queue_and_drain_are_priced_by_the_measured_decode_time() -> None:
    """Short answers make a queue cheap and a switch dear: the estimates follow what the
    model's finished requests took, not the 2 s default sized for long answers."""
    models, nodes = _models(), NodeTable()
    nodes.apply(_beat("n", {"planner": 2, "coder": 2, "reasoner": 4}), now=0.0)
    view = nodes.get("n")
    assert view is not None and models.batch_turn("coder") is None
    before = models.switch_cost(view, view.slots["summarizer"])
    for seconds in (0.4, 0.4, 0.4):
        models.observe_decode("planner", seconds)
        models.observe_decode("coder", seconds)
    assert models.batch_turn("planner") == 0.4
    # The idlest victim (planner or coder: 2 of a 4-batch) now drains in 0.2 s, not 1 s.
    assert abs(before - models.switch_cost(view, view.slots["summarizer"]) - 0.8) < 1e-9
    policy = HotnessAware(PlacementWeights(contention=0.0, occupancy=0.0), batch_turn=models.batch_turn)
    nodes.apply(_beat("full", {"planner": 4}), now=0.0)
    nodes.apply(_beat("free", {}), now=0.0)
    ranked = policy.rank([nodes.get("full"), nodes.get("free")], PlacementRequest(model="planner"), 1.0)  # type: ignore[list-item]
    assert abs(ranked.choices[1].score - ranked.choices[0].score - 0.4 / 4) < 1e-9


def test_prefill_rate_comes_from_the_emulators_timing_model() -> None:
    """Seconds per prompt token for a model on a deployment's hardware: the emulator's
    prefill time of a 4,096-token prompt over 4,096; unknown deployments have none."""
    from tierflow.rdu.timing import prefill_time

    models, nodes = _models(), NodeTable()
    nodes.apply(_beat("n", {}), now=0.0)
    view = nodes.get("n")
    assert view is not None
    rate = models.prefill_rate(view, view.slots["planner"])
    expected = prefill_time(BUILTIN_MODELS["llama-3.1-70b"], BUILTIN_PROFILES["sn40l-8"], ((4096, 0),)) / 4096
    assert rate == expected and 5e-5 < rate < 1e-3  # a 70B model on 8 sockets: ~0.1-0.3 ms a token
    stranger = msgspec.structs.replace(_beat("m", {}), deployment="unknown")
    nodes.apply(stranger, now=0.0)
    other = nodes.get("m")
    assert other is not None and models.prefill_rate(other, other.slots["planner"]) is None


def test_a_switch_on_a_busy_node_waits_the_engines_switch_patience() -> None:
    """The engine switches a model in while others have work only after its request waited
    `DEFAULT_SWITCH_PATIENCE`: that wait is part of the price, and absent on an idle node."""
    from tierflow.rdu.engine import DEFAULT_SWITCH_PATIENCE

    models, nodes = _models(), NodeTable()
    nodes.apply(_beat("idle", {}), now=0.0)
    nodes.apply(_beat("busy", {"planner": 1}), now=0.0)
    idle, busy = nodes.get("idle"), nodes.get("busy")
    assert idle is not None and busy is not None
    at_idle = models.switch_cost(idle, idle.slots["summarizer"])
    assert models.switch_cost(busy, busy.slots["summarizer"]) == at_idle + DEFAULT_SWITCH_PATIENCE
    assert models.switch_cost(busy, busy.slots["planner"]) == 0.0  # hot: no switch, no patience
