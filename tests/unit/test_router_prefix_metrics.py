"""The router's prefix index in Prometheus: what it knows per node, and the feed's troubles."""

from __future__ import annotations

from types import SimpleNamespace

from prometheus_client import CollectorRegistry

from tierflow.contracts import messages
from tierflow.placement.prefix_index import PrefixIndex
from tierflow.services.router.metrics import PrefixIndexCollector


def test_the_index_is_scraped_per_node_with_gaps_requests_and_rejects() -> None:
    index = PrefixIndex()
    snapshot = messages.KvEvents(node_id="n1", seq=1, snapshot=True, models=[messages.ModelKvEvents(name="m", stored=[1, 2, 3], spilled=[4])])
    assert not index.apply(snapshot, 0.0)
    assert index.apply(messages.KvEvents(node_id="n1", seq=3, models=[messages.ModelKvEvents(name="m", stored=[5])]), 1.0)  # seq 2 lost
    registry = CollectorRegistry()
    registry.register(PrefixIndexCollector(SimpleNamespace(index=index, asked=1, rejected=2)))
    value = registry.get_sample_value
    assert value("tierflow_router_prefix_index_blocks", {"node": "n1"}) == 4  # as of the snapshot: the gap stops changes
    assert value("tierflow_router_prefix_index_known", {"node": "n1"}) == 0  # until the node's next snapshot
    assert value("tierflow_router_prefix_index_gaps_total") == 1
    assert value("tierflow_router_prefix_snapshot_requests_total") == 1
    assert value("tierflow_router_prefix_events_rejected_total") == 2
