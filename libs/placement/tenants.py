"""Tenants: who is calling (API key), what they may use, where their requests may run, how fast.

Configuration (the router's YAML; `TenantDirectory.from_config` takes the parsed mapping):

    tenants:
      - name: acme                    # a metric label: letters, digits, '.', '_', '-'
        api_keys:                     # salted hashes of keys (`tierflow keys new` prints one)
          - sha256:5be1c0d3a2f1e4b7c6d9a8f0e1d2c3b4:7c18d54c6f8023a0ed8da23df50272b2cb6bda407c5f484d4e6ac359ae9dded3
          # rotation: the old key keeps working until its not_after, beside the new one
          - {key: "sha256:0d9e4a6b1c2f3e4d5a6b7c8d9e0f1a2b:9a6881e66c68e894feabd7e4ef19274df9899e6d2bb406169f6e8fbaccb5017e", not_after: 2027-01-31T00:00:00Z}
        allowed_models: [llama-3.1-8b, llama-3.1-70b]   # empty or absent: every model
        regions: [eu-west, eu-central]                  # empty or absent: any region
        residency: eu                 # only nodes tagged with exactly this residency
        rate_limit_rps: 20            # requests per second (token bucket) ...
        burst: 40                     # ... with this bucket size (default: max(1, rate))
        token_quota: 5000000          # prompt + completion tokens per window ...
        quota_window_s: 86400         # ... of this length (default: one day)
        workload: interactive         # default workload class: interactive | batch
        timeout_s: 120                # deadline of its requests unless the client asks for less
        request_class: standard       # default class: interactive | standard | batch (tierflow.placement.classes)
        max_class: interactive        # the highest class its requests may ask for (default: request_class)
        weight: 3                     # its share beside other tenants of the same class (default 1)
        agent_loops: {max_steps: 50, max_session_tokens: 2000000, action: reject}   # tierflow.placement.agent_loops
      - name: research
        api_keys: [sk-research-local]
        workload: batch
    anonymous_tenant: null            # a tenant name for requests without an API key

Residency and regions become a `Boundary`, which placement enforces fail-closed.
Rate limits and quotas are counted per router process, and split: each router counts
its peers (NATS service discovery) and keeps 1/N of every limit (`TenantDirectory.share`),
so N routers together admit what was configured. Reloading the configuration starts
every bucket and quota afresh.

Keys: `tierflow.placement.api_keys` says which forms are read (salted hashes; unsalted
"sha256:<hex>" digests and plain keys of older files still work, plain ones with one
deprecation warning naming where, never the key) and how a lookup stays cheap and
constant-time. `salted_key_hash(key)` gives the recommended form, `hash_api_key(key)` the
older unsalted one. No key is ever logged or put in an error message.
"""

from __future__ import annotations

import hashlib
import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Annotated, Any, Final

import msgspec
from msgspec import Meta

from tierflow.placement.agent_loops import AgentLoopPolicy
from tierflow.placement.api_keys import ApiKeyEntry, BadKeyEntry, DuplicateKey, KeyRing, expiry_of
from tierflow.placement.classes import CLASS_RANK, RequestClass, resolve_class
from tierflow.placement.request import ANYWHERE, Boundary, RequestWorkload
from tierflow.runtime.clock import Clock, WallClock
from tierflow.runtime.errors import RateLimited
from tierflow.runtime.secret_hash import salted_hash

__all__ = [
    "TenantPolicy",
    "Tenant",
    "TenantDirectory",
    "TenantConfigError",
    "RateLimiter",
    "TokenQuota",
    "hash_api_key",
    "salted_key_hash",
    "ApiKeyEntry",
]

log = logging.getLogger(__name__)

_DIGEST_PREFIX: Final = "sha256:"
_NAME_PATTERN: Final = r"^[A-Za-z0-9][A-Za-z0-9_.-]*$"


class TenantConfigError(ValueError):
    """The `tenants:` configuration is invalid; the message names the entry and the field."""


class TenantPolicy(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """One tenant's configuration entry, as written (see the module docstring)."""

    name: Annotated[str, Meta(min_length=1, max_length=64, pattern=_NAME_PATTERN)]
    api_keys: list[Annotated[str, Meta(min_length=1)] | ApiKeyEntry] = []
    allowed_models: list[Annotated[str, Meta(min_length=1)]] = []
    regions: list[Annotated[str, Meta(min_length=1)]] = []
    residency: Annotated[str, Meta(min_length=1)] | None = None
    rate_limit_rps: Annotated[float, Meta(gt=0.0)] | None = None
    burst: Annotated[float, Meta(ge=1.0)] | None = None
    token_quota: Annotated[int, Meta(gt=0)] | None = None
    quota_window_s: Annotated[float, Meta(gt=0.0)] = 86400.0
    workload: RequestWorkload | None = None
    timeout_s: Annotated[float, Meta(gt=0.0)] | None = None
    request_class: RequestClass = "standard"
    max_class: RequestClass | None = None
    weight: Annotated[float, Meta(gt=0.0, le=1e6)] = 1.0
    agent_loops: AgentLoopPolicy | None = None


def hash_api_key(key: str) -> str:
    """The older unsalted "sha256:<hex>" form of an API key (still read); prefer `salted_key_hash`."""
    return _DIGEST_PREFIX + hashlib.sha256(key.encode()).hexdigest()


def salted_key_hash(key: str) -> str:
    """The "sha256:<salt>:<digest>" form of an API key, for configuration files."""
    return salted_hash(key)


class RateLimiter:
    """A token bucket: `rate` tokens a second, at most `burst` saved up. Pure: `now` is passed in.

    Starts full, so a tenant's first `burst` requests pass at once. Time running
    backwards (a caller mixing clocks) refills nothing rather than raising.
    """

    __slots__ = ("rate", "burst", "_full_rate", "_full_burst", "_tokens", "_at")

    def __init__(self, rate: float, burst: float | None = None) -> None:
        if not rate > 0:
            raise ValueError(f"rate must be positive, got {rate}")
        self.rate = self._full_rate = float(rate)
        self.burst = self._full_burst = float(burst) if burst is not None else max(1.0, self.rate)
        if self.burst < 1.0:
            raise ValueError(f"burst must be at least 1, got {burst}")
        self._tokens = self.burst
        self._at: float | None = None

    def share(self, fraction: float) -> None:
        """Keep `fraction` of the configured rate and burst (one of several routers); the
        burst never drops below one request, and saved tokens above it are dropped."""
        if not 0 < fraction <= 1:
            raise ValueError(f"fraction must be in (0, 1], got {fraction}")
        self.rate = self._full_rate * fraction
        self.burst = max(1.0, self._full_burst * fraction)
        self._tokens = min(self._tokens, self.burst)

    def _refill(self, now: float) -> None:
        if self._at is None:
            self._at = now
        elif now > self._at:
            self._tokens = min(self.burst, self._tokens + (now - self._at) * self.rate)
            self._at = now

    def acquire(self, now: float, cost: float = 1.0) -> float:
        """Take `cost` tokens if there are enough: returns 0.0 (admitted), else the seconds
        until there would be (the request is not admitted and nothing is taken)."""
        if cost > self.burst:
            raise ValueError(f"cost {cost} exceeds the bucket size {self.burst}: it could never pass")
        self._refill(now)
        if self._tokens >= cost:
            self._tokens -= cost
            return 0.0
        return (cost - self._tokens) / self.rate

    def available(self, now: float) -> float:
        """Tokens in the bucket at `now` (for status pages and tests)."""
        self._refill(now)
        return self._tokens


class TokenQuota:
    """Tokens per fixed window (window k covers [k*window_s, (k+1)*window_s)). Pure: `now` is passed in.

    The router checks `retry_after` before a request and `charge`s the request's real
    prompt + completion tokens after it, so the request that crosses the limit completes
    and the next one is refused: a quota is a budget, not a hard cap per token. Pass wall
    time (`Clock.now()`) for windows aligned to the epoch, e.g. to UTC days.
    """

    __slots__ = ("limit", "window_s", "_full_limit", "_window", "_used")

    def __init__(self, limit: int, window_s: float) -> None:
        if limit <= 0 or not window_s > 0:
            raise ValueError(f"limit and window_s must be positive, got {limit} and {window_s}")
        self.limit = self._full_limit = limit
        self.window_s = float(window_s)
        self._window = -math.inf
        self._used = 0

    def share(self, fraction: float) -> None:
        """Keep `fraction` of the configured budget (one of several routers), at least 1 token."""
        if not 0 < fraction <= 1:
            raise ValueError(f"fraction must be in (0, 1], got {fraction}")
        self.limit = max(1, math.ceil(self._full_limit * fraction))

    def _roll(self, now: float) -> None:
        window = math.floor(now / self.window_s)
        if window > self._window:
            self._window, self._used = window, 0

    def used(self, now: float) -> int:
        self._roll(now)
        return self._used

    def remaining(self, now: float) -> int:
        self._roll(now)
        return max(0, self.limit - self._used)

    def retry_after(self, now: float) -> float:
        """0.0 when tokens remain in this window; otherwise the seconds until the next one."""
        self._roll(now)
        if self._used < self.limit:
            return 0.0
        return (self._window + 1) * self.window_s - now

    def charge(self, now: float, tokens: int) -> None:
        if tokens < 0:
            raise ValueError(f"tokens must not be negative, got {tokens}")
        self._roll(now)
        self._used += tokens


@dataclass(frozen=True, slots=True)
class Tenant:
    """A configured tenant, ready for the request path: its boundary and model set are built
    once here. `limiter` and `quota` are mutable counters owned by this tenant (None: no limit)."""

    policy: TenantPolicy
    boundary: Boundary
    models: frozenset[str] | None  # None: every model
    limiter: RateLimiter | None
    quota: TokenQuota | None

    @classmethod
    def from_policy(cls, policy: TenantPolicy) -> Tenant:
        boundary = (
            Boundary(regions=frozenset(policy.regions) if policy.regions else None, residency=policy.residency)
            if policy.regions or policy.residency
            else ANYWHERE
        )
        return cls(
            policy=policy,
            boundary=boundary,
            models=frozenset(policy.allowed_models) if policy.allowed_models else None,
            limiter=RateLimiter(policy.rate_limit_rps, policy.burst) if policy.rate_limit_rps else None,
            quota=TokenQuota(policy.token_quota, policy.quota_window_s) if policy.token_quota else None,
        )

    @property
    def name(self) -> str:
        return self.policy.name

    @property
    def workload(self) -> RequestWorkload | None:
        return self.policy.workload

    @property
    def timeout_s(self) -> float | None:
        return self.policy.timeout_s

    @property
    def weight(self) -> float:
        return self.policy.weight

    @property
    def highest_class(self) -> RequestClass:
        """The highest class this tenant's requests may ask for."""
        return self.policy.max_class if self.policy.max_class is not None else self.policy.request_class

    def request_class(self, asked: str | None, *, param: str = "service_tier") -> RequestClass:
        """The class a request of this tenant runs in (see `tierflow.placement.classes.resolve_class`)."""
        return resolve_class(asked, self.policy.request_class, self.highest_class, tenant=self.name, param=param)

    def allows_model(self, model: str) -> bool:
        return self.models is None or model in self.models

    def share(self, fraction: float) -> None:
        """Limit this process to `fraction` of the tenant's rate limit and token quota."""
        if self.limiter is not None:
            self.limiter.share(fraction)
        if self.quota is not None:
            self.quota.share(fraction)

    def admit(self, now: float) -> None:
        """Take one request against the rate limit, check the token quota; `RateLimited`
        (429 with Retry-After) when either says wait. The router and the simulator both
        admit through here, so a simulated tenant is limited exactly as a live one."""
        if self.limiter is not None:
            wait = self.limiter.acquire(now)
            if wait > 0:
                raise RateLimited(f"Rate limit reached for tenant {self.name!r}; retry after {wait:.2f}s.", retry_after=wait)
        if self.quota is not None:
            wait = self.quota.retry_after(now)
            if wait > 0:
                raise RateLimited(
                    f"Token quota exhausted for tenant {self.name!r}; it renews in {wait:.0f}s.", retry_after=wait, code="insufficient_quota"
                )


class TenantDirectory:
    """All tenants, looked up by API key. Built once from configuration; read per request."""

    __slots__ = ("tenants", "anonymous", "_keys", "_clock")

    def __init__(self, tenants: Sequence[Tenant], *, anonymous: str | None = None, clock: Clock | None = None) -> None:
        self.tenants: dict[str, Tenant] = {}
        self._keys: KeyRing[Tenant] = KeyRing()
        self._clock: Clock = clock if clock is not None else WallClock()  # for keys' not_after
        for i, tenant in enumerate(tenants):
            where = f"tenants[{i}] ({tenant.name!r})"
            if tenant.name in self.tenants:
                raise TenantConfigError(f"{where}: duplicate tenant name")
            self.tenants[tenant.name] = tenant
            for j, entry in enumerate(tenant.policy.api_keys):
                text = entry if isinstance(entry, str) else entry.key
                try:
                    self._keys.add(text, tenant, not_after=expiry_of(entry), where=f"{where}.api_keys[{j}]")
                except BadKeyEntry as exc:
                    raise TenantConfigError(f"{where}.api_keys[{j}]: {exc}") from None
                except DuplicateKey as dup:
                    # Never echo the key: configuration errors end up in logs.
                    holder = dup.holder.name if isinstance(dup.holder, Tenant) else "?"
                    raise TenantConfigError(f"{where}.api_keys[{j}]: the same key is already a key of tenant {holder!r}") from None
        self._keys.done()
        if anonymous is not None and anonymous not in self.tenants:
            raise TenantConfigError(f"anonymous_tenant: no tenant is named {anonymous!r}")
        self.anonymous: Tenant | None = self.tenants[anonymous] if anonymous is not None else None
        if self._keys.plain:
            log.warning(
                "%d API key(s) are written in plain text in the tenants configuration (%s); they still work, but replace "
                "each with its salted hash (`tierflow keys hash` reads a key on stdin and prints it)",
                len(self._keys.plain), ", ".join(self._keys.plain), extra={"fields": {"plain_keys": self._keys.plain}},
            )  # fmt: skip
        expired = self._keys.expired(self._clock.now())
        if expired:
            log.info("%d API key(s) of the tenants configuration are past their not_after and no longer authenticate; remove them", expired)

    def share(self, routers: int) -> None:
        """Split every tenant's limits evenly over `routers` router processes.

        Each router counts its own requests (a shared counter would cost a NATS round trip
        per request), so with N routers behind a load balancer each admits 1/N of a
        tenant's rate, burst and token quota, and together they admit what was configured.
        The split is exact when the balancer spreads a tenant's requests evenly; a client
        pinned to one router gets 1/N (the trade Envoy's local rate limits make too).
        """
        if routers < 1:
            raise ValueError(f"routers must be at least 1, got {routers}")
        for tenant in self.tenants.values():
            tenant.share(1.0 / routers)

    @classmethod
    def from_config(cls, config: Mapping[str, Any], *, clock: Clock | None = None) -> TenantDirectory:
        """From a configuration mapping with a `tenants:` list (see the module docstring).

        Every error is a `TenantConfigError` naming the entry and field, e.g.
        "tenants[1] ('acme'): Expected `float` > 0.0 - at `$.rate_limit_rps`".
        """
        unknown = set(config) - {"tenants", "anonymous_tenant"}
        if unknown:
            raise TenantConfigError(f"unknown key(s) beside 'tenants': {', '.join(sorted(map(str, unknown)))}")
        entries = config.get("tenants") or []
        if not isinstance(entries, list):
            raise TenantConfigError(f"'tenants' must be a list of tenant entries, not {type(entries).__name__}")
        tenants = []
        for i, entry in enumerate(entries):
            label = f"tenants[{i}]"
            if isinstance(entry, Mapping) and isinstance(entry.get("name"), str):
                label += f" ({entry['name']!r})"
            try:
                policy = msgspec.convert(entry, TenantPolicy)
            except msgspec.ValidationError as exc:
                raise TenantConfigError(f"{label}: {exc}") from None
            if policy.burst is not None and policy.rate_limit_rps is None:
                raise TenantConfigError(f"{label}: 'burst' needs 'rate_limit_rps'")
            if policy.max_class is not None and CLASS_RANK[policy.max_class] > CLASS_RANK[policy.request_class]:
                raise TenantConfigError(f"{label}: max_class {policy.max_class!r} is below request_class {policy.request_class!r}")
            tenants.append(Tenant.from_policy(policy))
        anonymous = config.get("anonymous_tenant")
        if anonymous is not None and not isinstance(anonymous, str):
            raise TenantConfigError(f"anonymous_tenant must be a tenant name, not {type(anonymous).__name__}")
        return cls(tenants, anonymous=anonymous, clock=clock)

    def authenticate(self, api_key: str | None) -> Tenant | None:
        """The tenant an API key belongs to now, or None; no key at all gives the anonymous tenant.

        Lookups go through `KeyRing` (see `tierflow.placement.api_keys`): digests are compared
        with `hmac.compare_digest`, so any timing difference depends on a hash, which an
        attacker cannot steer toward a valid key one character at a time; a key past its
        `not_after` is no one's.
        """
        if not api_key:
            return self.anonymous
        return self._keys.lookup(api_key, self._clock.now())

    def get(self, name: str) -> Tenant | None:
        return self.tenants.get(name)
