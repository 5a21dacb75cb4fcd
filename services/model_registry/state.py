"""The registry's whole state as plain records: what the pure core reads and returns.

`State` is the registry as readers of the KV bucket see it (one record per key); the
KV adapter turns a bucket snapshot into a `Snapshot` (state + each key's revision), and
everything between reading and writing is a pure function over these.
"""

from __future__ import annotations

from typing import Literal

from msgspec import Struct

from tierflow.contracts import registry, subjects

__all__ = ["Kind", "KINDS", "Record", "State", "Snapshot", "key_of", "parse_key", "decode_record"]

Kind = Literal["model", "bundle", "deployment"]
KINDS: tuple[Kind, ...] = ("model", "bundle", "deployment")  # write order; deletes go in reverse
Record = registry.ModelRecord | registry.BundleRecord | registry.DeploymentRecord

_KEY = {"model": subjects.model_key, "bundle": subjects.bundle_key, "deployment": subjects.deployment_key}
_DECODERS = {"model": registry.model_decoder, "bundle": registry.bundle_decoder, "deployment": registry.deployment_decoder}


class State(Struct, kw_only=True):
    models: dict[str, registry.ModelRecord] = {}
    bundles: dict[str, registry.BundleRecord] = {}
    deployments: dict[str, registry.DeploymentRecord] = {}

    def of(self, kind: Kind) -> dict[str, Record]:
        """The records of one kind, by name (the live dict: callers building a state write to it)."""
        return {"model": self.models, "bundle": self.bundles, "deployment": self.deployments}[kind]  # type: ignore[return-value]

    def copy(self) -> State:
        return State(models=dict(self.models), bundles=dict(self.bundles), deployments=dict(self.deployments))

    def serving(self, model: str) -> set[str]:
        """Versions of `model` that some deployment serves."""
        return {e.version for d in self.deployments.values() for e in d.models if e.model == model}


class Snapshot(Struct, kw_only=True):
    """A consistent-enough read of the bucket: records, and the revision of every key
    (including keys whose value could not be decoded, so a write can still replace them)."""

    state: State
    revisions: dict[str, int] = {}
    # Keys whose latest message is a delete marker, with the marker's revision: writing
    # the key again with compare-and-set must name it (0 would mean "never written").
    deleted: dict[str, int] = {}

    def revision(self, kind: Kind, name: str) -> int:
        return self.revisions.get(key_of(kind, name), 0)

    def expected(self, kind: Kind, name: str) -> int:
        """What a compare-and-set write of the key must find: its revision, its delete
        marker's, or 0 (no message at all)."""
        key = key_of(kind, name)
        return self.revisions.get(key) or self.deleted.get(key, 0)


def key_of(kind: Kind, name: str) -> str:
    return _KEY[kind](name)


def parse_key(key: str) -> tuple[Kind, str] | None:
    """(kind, name) of a registry key; None for keys that are not the registry's records."""
    kind, _, name = key.partition(".")
    return (kind, name) if kind in _KEY and name else None  # type: ignore[return-value]


def decode_record(kind: Kind, value: bytes) -> Record:
    """Raises msgspec.DecodeError / ValidationError for a record that is not what `kind` says."""
    return _DECODERS[kind].decode(value)  # type: ignore[no-any-return]
