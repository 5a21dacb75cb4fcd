"""The registry's durable state: records in a JetStream KV bucket (file storage).

Every write is compare-and-set on the key's revision, so two writers never lose an
update silently; a conflict is an error the caller retries with fresh state.
"""

from __future__ import annotations

import logging
from typing import Literal

import msgspec
from nats.js.errors import KeyNotFoundError, KeyWrongLastSequenceError
from nats.js.kv import KeyValue

from tierflow.contracts import registry, subjects
from tierflow.runtime.kv import snapshot

__all__ = ["RegistryStore", "Change", "Conflict"]

log = logging.getLogger(__name__)
_encode = msgspec.json.Encoder().encode


class Conflict(Exception):
    """Someone else changed the key since it was read."""


class Change(msgspec.Struct):
    kind: Literal["model", "deployment"]
    name: str
    op: Literal["create", "update", "unchanged"]
    revision: int


class RegistryStore:
    def __init__(self, kv: KeyValue) -> None:
        self._kv = kv

    async def _get(self, key: str) -> tuple[bytes | None, int]:
        try:
            entry = await self._kv.get(key)
        except KeyNotFoundError:
            return None, 0
        return entry.value, entry.revision or 0

    async def _put(self, kind: Literal["model", "deployment"], name: str, key: str, value: bytes) -> Change:
        current, revision = await self._get(key)
        if current == value:
            return Change(kind, name, "unchanged", revision)
        try:
            if current is None:
                new_revision = await self._kv.create(key, value)
            else:
                new_revision = await self._kv.update(key, value, last=revision)
        except KeyWrongLastSequenceError as exc:
            raise Conflict(f"{kind} {name!r} changed concurrently; re-read and retry") from exc
        return Change(kind, name, "create" if current is None else "update", new_revision)

    async def put_model(self, record: registry.ModelRecord) -> Change:
        return await self._put("model", record.name, subjects.model_key(record.name), _encode(record))

    async def put_deployment(self, record: registry.DeploymentRecord) -> Change:
        return await self._put("deployment", record.name, subjects.deployment_key(record.name), _encode(record))

    async def _list(self, pattern: str) -> list[tuple[bytes, int]]:
        entries = sorted(await snapshot(self._kv, pattern), key=lambda e: e.key)
        return [(e.value, e.revision or 0) for e in entries if e.value]

    async def models(self) -> list[tuple[registry.ModelRecord, int]]:
        return [(registry.model_decoder.decode(v), r) for v, r in await self._list(subjects.MODEL_KEYS)]

    async def deployments(self) -> list[tuple[registry.DeploymentRecord, int]]:
        return [(registry.deployment_decoder.decode(v), r) for v, r in await self._list(subjects.DEPLOYMENT_KEYS)]

    async def model(self, name: str) -> tuple[registry.ModelRecord, int] | None:
        value, revision = await self._get(subjects.model_key(name))
        return (registry.model_decoder.decode(value), revision) if value is not None else None
