"""The autoscaler's configuration (flags and TIERFLOW_* variables).

The policy's knobs are the fields of `tierflow.scaling.ScalingConfig` under the same
names (`--ttft-slo`, `--stable-window`, ... / `TIERFLOW_TTFT_SLO`, ...); `scaling()`
hands them to the pure policy, and a bad combination is refused when the settings are
read, naming the fields. The rest belongs to the shell: how often to tick, which
actuator carries decisions out, how long a drain or a start may take, and the lease
that lets one instance act while others stand by.
"""

from __future__ import annotations

from typing import Annotated, Literal

import msgspec
from msgspec import Meta

from tierflow.scaling import ScalingConfig

__all__ = ["Settings", "ActuatorName"]

ActuatorName = Literal["local", "kubernetes", "none"]
Seconds = Annotated[float, Meta(ge=0)]
PositiveSeconds = Annotated[float, Meta(gt=0)]

_POLICY_FIELDS = tuple(f.name for f in msgspec.structs.fields(ScalingConfig))


class Settings(ScalingConfig, frozen=True, kw_only=True):
    nats_url: str = "nats://127.0.0.1:4222"
    interval: PositiveSeconds = 5.0  # seconds between two policy ticks
    # local: ask `tierflow up` to start/stop node processes; kubernetes: scale Deployments
    # through the API; none: publish decisions only (advisory).
    actuator: ActuatorName = "none"

    # -- the policy: every field of tierflow.scaling.ScalingConfig, inherited (same
    #    names, limits and defaults; `--ttft-slo` / TIERFLOW_TTFT_SLO, ...) --

    # -- the shell --
    # Hear heartbeats this long before the first decision (None: max_signal_age, by which
    # every live node has beaten). Until then a pool whose nodes have not spoken yet looks
    # empty, and a restarted autoscaler would start min_replicas nodes beside them.
    warm_up: Seconds | None = None
    drain_timeout: PositiveSeconds = 600.0  # wait this long for a cordoned node to empty, then stop it anyway
    start_timeout: PositiveSeconds = 120.0  # a started node not heard by then no longer counts as starting
    actuation_timeout: PositiveSeconds = 30.0  # one call to the supervisor or the Kubernetes API

    # -- one active instance (services/autoscaler/lease.py) --
    # Not renewed for this long, the lease passes to a standby (None: 3 intervals, or the
    # warm-up if that is longer). A successor started after a crash warms up while it
    # waits for the lease, so with lease_ttl >= warm_up it decides (and finishes or undoes
    # its predecessor's removals) in its first tick as the active one.
    lease_ttl: PositiveSeconds | None = None
    instance_id: str = ""  # who holds the lease: unique among running instances (empty: host-pid-random)
    kv_replicas: Annotated[int, Meta(ge=1, le=5)] = 3  # copies of the autoscaler's KV bucket on a NATS cluster (1 on a single server)

    # -- the Kubernetes actuator --
    kube_api_url: str = ""  # empty: in-cluster, https://$KUBERNETES_SERVICE_HOST:$KUBERNETES_SERVICE_PORT
    kube_namespace: str = ""  # empty: the service account's namespace
    kube_token_file: str = "/var/run/secrets/kubernetes.io/serviceaccount/token"
    kube_ca_file: str = "/var/run/secrets/kubernetes.io/serviceaccount/ca.crt"
    kube_name_template: str = "tierflow-{deployment}-{pool}"

    def __post_init__(self) -> None:
        super().__post_init__()  # the policy's cross-field rules, checked when the settings are read
        if "{deployment}" not in self.kube_name_template or "{pool}" not in self.kube_name_template:
            raise ValueError("kube_name_template must contain {deployment} and {pool}")
        if self.lease_ttl_s() < 2 * self.interval:
            raise ValueError(f"lease_ttl ({self.lease_ttl_s():g}s) must be at least two intervals ({2 * self.interval:g}s): "
                             "the lease is renewed once an interval, and one late renewal must not cost it")  # fmt: skip

    def lease_ttl_s(self) -> float:
        return max(3 * self.interval, self.warm_up_s()) if self.lease_ttl is None else self.lease_ttl

    def warm_up_s(self) -> float:
        return self.max_signal_age if self.warm_up is None else self.warm_up

    def scaling(self) -> ScalingConfig:
        """The policy's share of the settings."""
        return ScalingConfig(**{name: getattr(self, name) for name in _POLICY_FIELDS})
