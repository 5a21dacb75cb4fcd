"""The faults, by name: what `loadtest/faults.py --faults` takes, in the order it runs them.

The kills and the stall are in `kills`, the NATS outage in `outage`, the types they
share (`Ctx` in, `Injection` out) in `base`.
"""

from __future__ import annotations

from .base import ConnectionProbe, Ctx, Fault, Injection
from .kills import kill_autoscaler, kill_decode, kill_nats_member, kill_prefill, kill_registry, kill_router, stall_decode
from .outage import WATCH_TO, nats_outage

__all__ = ["FAULTS", "WATCH_TO", "ConnectionProbe", "Ctx", "Fault", "Injection"]

FAULTS: dict[str, Fault] = {f.name: f for f in (
    Fault("decode", "kill -9 a decode node", "kill", kill_decode),
    Fault("prefill", "kill -9 a prefill node", "kill", kill_prefill),
    Fault("router", "kill -9 a router", "kill", kill_router),
    Fault("registry", "kill -9 the registry", "kill", kill_registry),
    Fault("autoscaler", "kill -9 the autoscaler", "kill", kill_autoscaler),
    Fault("nats-member", "kill -9 one NATS member", "kill", kill_nats_member),
    Fault("stall-decode", "SIGSTOP a decode node 3 s", "stall", stall_decode),
    Fault("nats-outage", "SIGSTOP all NATS 5 s", "outage", nats_outage),
)}  # fmt: skip
