"""Make a JetStream stream, or bring its limits to what the code asks for: one way for every
stream the fabric owns (the audit stream, the usage ledger).

Idempotent, so every process that needs the stream calls it at start. Copies are only ever
raised (an operator may have given more), and a single server, which cannot hold more than
one copy, gets one instead of an error; two processes creating the stream at once is not an
error either.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Final, Literal

from nats.js.api import StreamConfig
from nats.js.client import JetStreamContext
from nats.js.errors import NotFoundError, ServerError

__all__ = ["ensure_stream", "REPLICAS_NEED_CLUSTER"]

REPLICAS_NEED_CLUSTER: Final = 10074  # JetStream: "replicas > 1 not supported in non-clustered mode"
_NAME_IN_USE: Final = 10058  # another process made it a moment ago, with other settings


def _differs(name: str, have: Any, wanted: Any) -> bool:
    if name == "max_age":  # seconds as floats (None: no bound)
        return abs((have or 0.0) - (wanted or 0.0)) > 1e-6
    return (have if have is not None else -1) != (wanted if wanted is not None else -1)


async def ensure_stream(
    js: JetStreamContext, wanted: StreamConfig, *, limits: Sequence[str] = ("max_age",)
) -> tuple[Literal["created", "updated", "unchanged"], dict[str, Any]]:
    """Make `wanted`, or set the `limits` fields of the existing stream's configuration to
    `wanted`'s and raise its copies to `wanted.num_replicas`. Returns what happened and what
    changed (for the caller's log line)."""
    replicas = wanted.num_replicas or 1
    try:
        have = (await js.stream_info(wanted.name)).config  # type: ignore[arg-type]
    except NotFoundError:
        try:
            await js.add_stream(wanted)
        except ServerError as exc:
            if exc.err_code == _NAME_IN_USE:
                return await ensure_stream(js, wanted, limits=limits)
            if replicas <= 1 or exc.err_code != REPLICAS_NEED_CLUSTER:
                raise
            wanted.num_replicas = 1
            await js.add_stream(wanted)
        return "created", {"replicas": wanted.num_replicas}
    update: dict[str, Any] = {}
    for name in limits:
        value = getattr(wanted, name)
        if _differs(name, getattr(have, name), value):
            update[name] = value or 0.0 if name == "max_age" else value
    if (have.num_replicas or 1) < replicas:
        update["num_replicas"] = replicas
    if not update:
        return "unchanged", {}
    for name, value in update.items():
        setattr(have, name, value)
    try:
        await js.update_stream(have)
    except ServerError as exc:
        if exc.err_code != REPLICAS_NEED_CLUSTER:
            raise
        del update["num_replicas"]
        if not update:
            return "unchanged", {}  # only more copies were asked for, which a single server cannot hold
        have.num_replicas = 1
        await js.update_stream(have)
    return "updated", update
