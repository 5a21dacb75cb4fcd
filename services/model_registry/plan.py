"""The diff between two registry states, as the changes that turn one into the other.

Pure. Each record is created, updated (with field-level changes a person can read),
unchanged, or deleted. `plan` orders the changes so readers never see a dangling
reference: models, then bundles, then deployments are written; deletes come last and in
the reverse order.
"""

from __future__ import annotations

from typing import Any, Literal

import msgspec
from msgspec import Struct

from tierflow.services.model_registry.state import KINDS, Kind, Record, State

__all__ = ["Op", "FieldChange", "Change", "plan", "field_changes", "summary"]

Op = Literal["create", "update", "unchanged", "delete"]

# Bookkeeping that changes with every write; showing it would bury the real change.
_HIDDEN = frozenset({"created_at", "updated_at"})
# Lists of named things are compared by name, not by position.
_LIST_KEYS = ("version", "model", "name")
_MISSING: Any = msgspec.UNSET


class FieldChange(Struct, frozen=True):
    """`field` like `traffic.v2`, `versions[v2].configs` or `replicas`; old/new as builtins
    (UNSET when the field appears or disappears)."""

    field: str
    old: Any = _MISSING
    new: Any = _MISSING


class Change(Struct, frozen=True, kw_only=True):
    kind: Kind
    name: str
    op: Op
    fields: tuple[FieldChange, ...] = ()
    record: Record | None = None  # what to write (None for delete and unchanged)
    revision: int = 0  # the key's revision after the change, once the shell has made it


def plan(current: State, desired: State) -> list[Change]:
    """Every record of both states, with what happens to it; deletes last, in reverse order."""
    puts: list[Change] = []
    deletes: list[Change] = []
    for kind in KINDS:
        now, want = current.of(kind), desired.of(kind)
        for name, record in want.items():
            old = now.get(name)
            if old is None:
                puts.append(Change(kind=kind, name=name, op="create", record=record))
            elif old == record:
                puts.append(Change(kind=kind, name=name, op="unchanged"))
            else:
                puts.append(Change(kind=kind, name=name, op="update", fields=tuple(field_changes(old, record)), record=record))
        deletes += [Change(kind=kind, name=name, op="delete") for name in now if name not in want]
    deletes.sort(key=lambda c: -KINDS.index(c.kind))
    return puts + deletes


def summary(changes: list[Change]) -> dict[str, int]:
    return {op: sum(c.op == op for c in changes) for op in ("create", "update", "delete", "unchanged")}


def field_changes(old: Record, new: Record) -> list[FieldChange]:
    out: list[FieldChange] = []
    _diff("", msgspec.to_builtins(old), msgspec.to_builtins(new), out)
    return out


def _join(prefix: str, key: str) -> str:
    return f"{prefix}.{key}" if prefix else key


def _keyed(items: list[Any]) -> tuple[str, dict[str, Any]] | None:
    """A list of dicts that all carry the same unique naming key, indexed by it."""
    if not items or not all(isinstance(i, dict) for i in items):
        return None
    for key in _LIST_KEYS:
        names = [i.get(key) for i in items]
        if all(isinstance(n, str) for n in names) and len(set(names)) == len(names):
            return key, {n: i for n, i in zip(names, items, strict=True)}
    return None


def _visible(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _visible(v) for k, v in value.items() if k not in _HIDDEN}
    if isinstance(value, list):
        return [_visible(v) for v in value]
    return value


def _diff(path: str, old: Any, new: Any, out: list[FieldChange]) -> None:
    if _visible(old) == _visible(new):
        return
    if isinstance(old, dict) and isinstance(new, dict):
        for key in [*old, *(k for k in new if k not in old)]:
            if key in _HIDDEN:
                continue
            if key not in new:
                out.append(FieldChange(_join(path, key), old=_visible(old[key])))
            elif key not in old:
                out.append(FieldChange(_join(path, key), new=_visible(new[key])))
            else:
                _diff(_join(path, key), old[key], new[key], out)
        return
    if isinstance(old, list) and isinstance(new, list):
        a, b = _keyed(old), _keyed(new)
        if a is not None and b is not None and a[0] == b[0]:
            for name in [*a[1], *(n for n in b[1] if n not in a[1])]:
                at = f"{path}[{name}]"
                if name not in b[1]:
                    out.append(FieldChange(at, old=_visible(a[1][name])))
                elif name not in a[1]:
                    out.append(FieldChange(at, new=_visible(b[1][name])))
                else:
                    _diff(at, a[1][name], b[1][name], out)
            kept_old, kept_new = [n for n in a[1] if n in b[1]], [n for n in b[1] if n in a[1]]
            if kept_old != kept_new:
                out.append(FieldChange(f"{path} (order)", old=kept_old, new=kept_new))
            return
    out.append(FieldChange(path, old=_visible(old), new=_visible(new)))
