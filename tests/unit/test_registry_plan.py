"""The registry's pure core: the diff between two states, and the traffic mutations."""

from __future__ import annotations

import msgspec
import pytest
from msgspec import structs

from tierflow.contracts import registry
from tierflow.services.model_registry import mutations
from tierflow.services.model_registry.errors import AlreadyExists, InvalidArgument, NotFound
from tierflow.services.model_registry.plan import FieldChange, field_changes, plan, summary
from tierflow.services.model_registry.state import State

V = registry.ModelVersionRecord


def model(**kw: object) -> registry.ModelRecord:
    fields: dict[str, object] = {"name": "chat", "versions": [V(version="v1", catalog="llama-3.1-8b"), V(version="v2", catalog="llama-3.1-8b")], "default_version": "v1"}
    fields.update(kw)
    return registry.ModelRecord(**fields)  # type: ignore[arg-type]


def deployment(name: str, **kw: object) -> registry.DeploymentRecord:
    return registry.DeploymentRecord(name=name, bundle="b", models=[registry.BundleEntry(model="chat", version="v1")], **kw)  # type: ignore[arg-type]


# ---------------------------------------------------------------------------- plan


def test_plan_says_create_update_unchanged_and_delete_in_a_safe_order() -> None:
    bundle = registry.BundleRecord(name="b", models=[registry.BundleEntry(model="chat", version="v1")])
    current = State(models={"chat": model()}, bundles={"b": bundle}, deployments={"old": deployment("old"), "keep": deployment("keep")})
    desired = State(
        models={"chat": model(), "coder": model(name="coder")},
        bundles={"b": bundle},
        deployments={"keep": deployment("keep", replicas=3, max_replicas=4), "new": deployment("new")},
    )
    changes = plan(current, desired)
    assert [(c.kind, c.name, c.op) for c in changes] == [
        ("model", "chat", "unchanged"), ("model", "coder", "create"), ("bundle", "b", "unchanged"),
        ("deployment", "keep", "update"), ("deployment", "new", "create"), ("deployment", "old", "delete"),
    ]  # fmt: skip
    update = changes[3]
    assert update.fields == (FieldChange("replicas", 1, 3), FieldChange("max_replicas", 1, 4)) and update.record == desired.deployments["keep"]
    assert summary(changes) == {"create": 2, "update": 1, "delete": 1, "unchanged": 2}
    assert all(c.op == "unchanged" for c in plan(desired, desired))


def test_deletes_go_last_and_deployments_before_what_they_reference() -> None:
    bundle = registry.BundleRecord(name="b", models=[])
    current = State(models={"chat": model()}, bundles={"b": bundle}, deployments={"d": deployment("d")})
    assert [(c.kind, c.op) for c in plan(current, State())] == [("deployment", "delete"), ("bundle", "delete"), ("model", "delete")]


def test_field_changes_name_versions_and_traffic_by_key_and_hide_timestamps() -> None:
    old = model(traffic={"v1": 90.0, "v2": 10.0}, updated_at=1.0)
    new = structs.replace(
        old,
        versions=[old.versions[0], structs.replace(old.versions[1], configs=["ss8192-bs4"]), V(version="v3", catalog="x", created_at=5.0)],
        traffic={"v1": 50.0, "v2": 50.0},
        updated_at=2.0,
    )
    changes = field_changes(old, new)
    assert FieldChange("versions[v2].configs", [], ["ss8192-bs4"]) in changes
    assert FieldChange("traffic.v1", 90.0, 50.0) in changes and FieldChange("traffic.v2", 10.0, 50.0) in changes
    added = next(c for c in changes if c.field == "versions[v3]")
    assert added.old is msgspec.UNSET and "created_at" not in added.new and added.new["catalog"] == "x"
    assert not any("updated_at" in c.field for c in changes)
    gone = field_changes(new, structs.replace(new, traffic={}))
    assert FieldChange("traffic.v1", old=50.0) in gone


# ---------------------------------------------------------------------------- mutations


def test_rollout_is_a_canary_then_a_cut_over() -> None:
    canary = mutations.rollout(model(), "v2", 10, now=7.0)
    assert canary.traffic == {"v1": 90.0, "v2": 10.0} and canary.updated_at == 7.0 and canary.default_version == "v1"
    assert mutations.rollout(canary, "v2", 100, now=8.0).traffic == {"v2": 100.0}  # blue-green: the default stays
    assert mutations.rollout(canary, "v2", 0, now=8.0).traffic == {}
    assert mutations.rollout(canary, "v2", 10, now=9.0) is canary  # nothing to do: nothing to write


@pytest.mark.parametrize("weight", [-1.0, 100.5, float("nan"), float("inf")])
def test_rollout_refuses_a_weight_outside_0_to_100(weight: float) -> None:
    with pytest.raises(InvalidArgument, match="between 0 and 100"):
        mutations.rollout(model(), "v2", weight, now=0.0)


def test_rollout_of_an_unknown_or_the_default_version_is_refused() -> None:
    with pytest.raises(NotFound, match=r"no version 'v9' \(versions: v1, v2\)"):
        mutations.rollout(model(), "v9", 10, now=0.0)
    with pytest.raises(InvalidArgument, match="already the default"):
        mutations.rollout(model(), "v1", 10, now=0.0)


def test_promote_makes_the_default_and_clears_the_split() -> None:
    promoted = mutations.promote(model(traffic={"v1": 90.0, "v2": 10.0}), "v2", now=3.0)
    assert promoted.default_version == "v2" and promoted.traffic == {} and promoted.updated_at == 3.0
    with pytest.raises(NotFound):
        mutations.promote(model(), "v7", now=0.0)


def test_rollback_clears_the_split_and_is_a_no_op_without_one() -> None:
    assert mutations.rollback(model(traffic={"v2": 100.0}), now=1.0).traffic == {}
    plain = model()
    assert mutations.rollback(plain, now=1.0) is plain


def test_set_traffic_checks_versions_and_weights() -> None:
    assert mutations.set_traffic(model(), {"v1": 3, "v2": 1}, now=0.0).traffic == {"v1": 3, "v2": 1}
    with pytest.raises(InvalidArgument, match="all be zero"):
        mutations.set_traffic(model(), {"v1": 0}, now=0.0)
    with pytest.raises(InvalidArgument, match=">= 0"):
        mutations.set_traffic(model(), {"v1": -1}, now=0.0)
    with pytest.raises(NotFound):
        mutations.set_traffic(model(), {"v3": 1}, now=0.0)


def test_add_version_is_retry_safe_and_versions_are_immutable() -> None:
    added = mutations.add_version(model(), V(version="v3", configs=["ss8192-bs4"]), now=4.0)
    assert added.versions[-1] == V(version="v3", catalog="chat", configs=["ss8192-bs4"], created_at=4.0)
    assert mutations.add_version(added, V(version="v3", configs=["ss8192-bs4"]), now=5.0) is added
    with pytest.raises(AlreadyExists, match="immutable"):
        mutations.add_version(added, V(version="v3", catalog="other"), now=5.0)
    with pytest.raises(InvalidArgument):
        mutations.add_version(added, V(version=""), now=5.0)
