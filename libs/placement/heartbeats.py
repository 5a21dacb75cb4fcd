"""Heartbeats off the wire: decoded, checked, and only then believed.

A heartbeat decides where traffic goes (the router) and how many nodes run (the
autoscaler), so a node that lies, or anyone who can publish on its subject, could pull
traffic, hide load or change how every prompt is hashed. What is checked, in order:

1. the message decodes, within the bounds `tierflow.contracts.messages` puts on every
   field (lengths, counts, `interval_s` <= 60 s, ...): reason `decode`;
2. the node speaks for itself: the `node_id` in the body is the id token of the subject
   it came on (NATS permissions make the subject unforgeable): reason `identity`;
3. its KV block size is the fabric's (`tierflow.rdu.DEFAULT_BLOCK_SIZE`): the router
   hashes every prompt with that one, whatever a heartbeat says: reason `block_size`;
4. against its deployment's registry record, when the reader has it and the node serves
   the record's current bundle (`bundle_outdated` false: an outdated node serves the old
   bundle until restarted, so only the bounds hold for it): the models it reports are
   the deployment's (name and version; `model`), no model's batch is larger than its
   configuration allows, nor the node's than their sum (`capacity`), and it is inside
   the deployment's residency boundary (`residency`).

`HeartbeatGate` runs these for a subscriber and tells it what to apply; a rejected
heartbeat is counted (`on_reject(reason)`, a metric with the reason as its label) and
logged at most once per `log_every` seconds per reason, so a flood cannot flood the log.
It never raises: a subscriber's loop must outlive any message.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

import msgspec

from tierflow.contracts import messages, registry, subjects
from tierflow.rdu.deployment import DeploymentConfig
from tierflow.rdu.kvcache import DEFAULT_BLOCK_SIZE
from tierflow.runtime.clock import Clock

__all__ = ["Rejected", "check_heartbeat", "HeartbeatGate", "REASONS"]

log = logging.getLogger(__name__)

REASONS = ("decode", "identity", "block_size", "model", "capacity", "residency", "error")


@dataclass(frozen=True, slots=True)
class Rejected:
    reason: str  # one of REASONS: a metric label
    detail: str  # for the log: what was wrong, with the values


def _batch_of(config: str) -> int | None:
    try:
        return DeploymentConfig.parse(config).batch_size
    except ValueError:
        return None


def check_heartbeat(
    hb: messages.NodeHeartbeat,
    *,
    subject: str | None,
    deployment: registry.DeploymentRecord | None,
    block_size: int = DEFAULT_BLOCK_SIZE,
) -> Rejected | None:
    """Checks 2-4 of the module docstring on a decoded heartbeat (None: believe it).

    `subject` None skips the identity check (a caller that got the heartbeat other than
    off its subject); `deployment` None skips the registry checks."""
    if subject is not None:
        speaker = subjects.node_of_heartbeat(subject)
        if speaker != hb.node_id:
            return Rejected("identity", f"heartbeat for node {hb.node_id!r} published on {subject!r}")
    if hb.block_size != block_size:
        return Rejected("block_size", f"node {hb.node_id} reports KV blocks of {hb.block_size} tokens; the fabric's are {block_size}")
    if deployment is None or hb.bundle_outdated:
        return None
    if hb.residency != deployment.residency:
        return Rejected("residency", f"node {hb.node_id} claims residency {hb.residency!r}; deployment {deployment.name} has {deployment.residency!r}")
    entries = {(e.model, e.version): e for e in deployment.models}
    total = 0
    for model in hb.models:
        entry = entries.get((model.name, model.version))
        if entry is None:
            return Rejected("model", f"node {hb.node_id} reports {model.name} {model.version}, not in deployment {deployment.name}")
        batch = _batch_of(entry.config)
        if batch is not None:
            total += batch
            if model.max_batch > batch:
                return Rejected("capacity", f"node {hb.node_id} reports a batch of {model.max_batch} for {model.name}; its configuration {entry.config} allows {batch}")
    if hb.models and hb.max_batch > total:
        return Rejected("capacity", f"node {hb.node_id} reports {hb.max_batch} batch slots; its models' configurations allow {total}")
    return None


class HeartbeatGate:
    """Decode and check heartbeats for one subscriber; count and log (rate-limited) the rejected."""

    def __init__(
        self,
        clock: Clock,
        *,
        deployment: Callable[[str], registry.DeploymentRecord | None],
        on_reject: Callable[[str], None],
        block_size: int = DEFAULT_BLOCK_SIZE,
        log_every: float = 10.0,
    ) -> None:
        self._clock = clock
        self._deployment = deployment
        self._on_reject = on_reject
        self._block_size = block_size
        self._log_every = log_every
        self._logged: dict[str, float] = {}  # reason -> when last logged
        self._suppressed: dict[str, int] = {}  # reason -> rejected since then, unlogged
        self.rejected = 0

    def admit(self, subject: str, data: bytes) -> messages.NodeHeartbeat | None:
        """The heartbeat to apply, or None (rejected: counted and maybe logged)."""
        try:
            hb = messages.heartbeat_decoder.decode(data)
        except msgspec.MsgspecError as exc:
            self._reject(Rejected("decode", f"on {subject[:200]!r}: {exc}"))
            return None
        try:
            verdict = check_heartbeat(hb, subject=subject, deployment=self._deployment(hb.deployment), block_size=self._block_size)
        except Exception as exc:  # a bug here must not stop the subscriber
            verdict = Rejected("error", f"checking the heartbeat of {hb.node_id} failed: {type(exc).__name__}: {exc}")
        if verdict is not None:
            self._reject(verdict)
            return None
        return hb

    def _reject(self, verdict: Rejected) -> None:
        self.rejected += 1
        try:
            self._on_reject(verdict.reason)
        except Exception:  # a metric must not stop the subscriber either
            log.exception("counting a rejected heartbeat failed")
        now = self._clock.monotonic()
        last = self._logged.get(verdict.reason)
        if last is not None and now - last < self._log_every:
            self._suppressed[verdict.reason] = self._suppressed.get(verdict.reason, 0) + 1
            return
        self._logged[verdict.reason] = now
        more = self._suppressed.pop(verdict.reason, 0)
        log.warning(
            "heartbeat rejected (%s): %s%s", verdict.reason, verdict.detail,
            f" (and {more} more for this reason in the last {self._log_every:g} s)" if more else "",
            extra={"fields": {"reason": verdict.reason, "suppressed": more}},
        )
