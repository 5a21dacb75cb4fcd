"""The session table: last node, nodes touched, bounded memory."""

from __future__ import annotations

import pytest

from tierflow.placement import SessionTable, session_key


def test_touch_counts_distinct_nodes_and_remembers_the_last() -> None:
    table = SessionTable()
    assert table.touch("s", "a") == 1
    assert table.touch("s", "a") == 1
    assert table.touch("s", "b") == 2
    assert table.last_node("s") == "b" and table.nodes_touched("s") == 2
    info = table.get("s")
    assert info is not None and info.nodes == frozenset({"a", "b"}) and info.requests == 3
    assert table.last_node("unknown") is None and table.nodes_touched("unknown") == 0 and table.get("unknown") is None


def test_no_session_records_nothing() -> None:
    table = SessionTable()
    assert table.touch("", "a") == 0
    assert len(table) == 0 and table.last_node("") is None


def test_capacity_evicts_the_least_recently_used_session() -> None:
    table = SessionTable(capacity=2)
    table.touch("old", "a")
    table.touch("mid", "a")
    table.touch("old", "b")  # refreshes "old"
    table.touch("new", "c")
    assert len(table) == 2 and "mid" not in table and "old" in table and "new" in table
    table.forget("old")
    assert "old" not in table


def test_nodes_per_session_are_capped() -> None:
    table = SessionTable(max_nodes=3)
    counts = [table.touch("s", f"n{i}") for i in range(6)]
    assert counts == [1, 2, 3, 3, 3, 3] and table.last_node("s") == "n5"
    with pytest.raises(ValueError):
        SessionTable(capacity=0)


def test_session_keys_are_scoped_by_tenant_and_bounded() -> None:
    assert session_key("acme", "h", "u") == "acme/h"
    assert session_key("acme", None, "u") == "acme/u"
    assert session_key("acme") == ""
    assert session_key("acme", "x") != session_key("other", "x")
    long = session_key("acme", "x" * 10_000)
    assert long.startswith("acme/sha256:") and len(long) < 100


def test_each_model_of_a_session_keeps_its_own_node() -> None:
    """An agent's planner and coder steps have their KV on different nodes: each step's
    affinity is the node that served that model last, else the session's last node."""
    table = SessionTable()
    table.touch("t/s", "n1", "planner")
    table.touch("t/s", "n2", "coder")
    assert table.last_node("t/s", "planner") == "n1"
    assert table.last_node("t/s", "coder") == "n2"
    assert table.last_node("t/s", "summarizer") == "n2"  # never seen: the session's last node
    assert table.last_node("t/s") == "n2"
    table.learn("t/s", "n3")  # another router's gossip names no model
    assert table.last_node("t/s", "planner") == "n1" and table.last_node("t/s", "summarizer") == "n3"
    for i in range(40):  # a session cannot grow its entry without bound by naming models
        table.touch("t/s", "n4", f"m{i}")
    assert len(table._entries["t/s"].by_model) == SessionTable.MAX_MODELS
