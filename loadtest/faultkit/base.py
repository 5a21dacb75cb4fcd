"""What every fault takes and returns: `Ctx` in, `Injection` out (`Fault` names one)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Literal

from tierflow.harness import Fabric

from .fabric import NodeWatch

__all__ = ["ConnectionProbe", "Ctx", "Fault", "Injection", "Kind"]

Kind = Literal["kill", "stall", "outage"]


@dataclass
class Ctx:
    fabric: Fabric
    watch: NodeWatch
    say: Callable[[str], None]
    back_timeout: float = 60.0


@dataclass
class ConnectionProbe:
    """One keep-alive connection asking a router for a model's context after the outage:
    (sent, max_model_len) per answer, and the request id that names its router."""

    samples: list[tuple[float, int]] = field(default_factory=list)
    request_id: str = ""


@dataclass
class Injection:
    victim: str
    how: str  # "SIGKILL", "SIGSTOP 3s", ...
    at: float  # wall clock when it struck (for an outage: when it ended, SIGCONT)
    back_s: float | None = None  # until the victim ran (and a node beat) again
    facts: dict[str, Any] = field(default_factory=dict)
    probes: list[ConnectionProbe] = field(default_factory=list)
    change_acked: float | None = None  # wall clock: the outage's registry change acknowledged


@dataclass(frozen=True)
class Fault:
    name: str
    title: str
    kind: Kind
    inject: Callable[[Ctx], Awaitable[Injection]]
