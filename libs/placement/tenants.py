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
its peers (NATS service discovery) and keeps 1/N of every limit (`TenantDirectory.share`,
rounded down, so N routers together never admit more than was configured).

Token quotas are reserved at admission, never overshot (`Tenant.admit`): a request takes
a `Reservation` of its prompt + max_tokens (max_tokens as the dispatcher resolves it),
and is refused (429 `insufficient_quota`, naming what remains and when the window
renews) when that does not fit in what the window has left; when it ends the reservation
settles to the tokens it was charged (prompt + completion; a failed or cancelled request
what the client received, nothing if no token came out) and the rest is released. A
client that sent no max_tokens asks for the model's whole remaining context; when that
does not fit, its max_tokens is *clamped* to what the quota has left (it may then end with
finish_reason "length"), rather than refused: most clients send no max_tokens, and a
refusal would lock them out long before their quota is spent. A client that did send
max_tokens asked for that budget, and gets a 429 when it does not fit. A request is
counted in the window it was admitted in.

Usage survives restarts (`TenantDirectory.restore`): the router records every admitted
request in the usage ledger (tierflow.contracts.usage) and, at start, rebuilds each
quota from the current window's records and each rate bucket from its last seconds
(a full refill's worth) before it opens its ports; until then a tenant with a quota is
refused with a 503 rather than admitted against an empty count. A router restores its
*own* records (by router id) against its own share, which keeps the split's invariant
(each router within its 1/N, so the fleet within the whole); and it never admits more than
the whole fleet has left (the whole limit minus every other router's records), which makes
a lone router exact even when its id changed across the restart (no NATS identity, no
--router-id). Restoring the fleet's total against the whole limit alone would let every
other router go on spending its own share beside it (up to (N-1)/N too much); restoring
only its own records would forget everything when its id changes. One of several routers
whose id changed is the one inexact case: its old records count as other routers', so its
share starts afresh (bounded only by what the fleet has left), and the fleet may pass the
limit by what its old self had used. Stable router ids (NATS identities give them) avoid
it. Rate buckets alike: the emptier of its own records' replay and the fleet's.

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
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Annotated, Any, Final, Protocol

import msgspec
from msgspec import Meta

from tierflow.placement.agent_loops import AgentLoopPolicy
from tierflow.placement.api_keys import ApiKeyEntry, BadKeyEntry, DuplicateKey, KeyRing, expiry_of
from tierflow.placement.classes import CLASS_RANK, RequestClass, resolve_class
from tierflow.placement.request import ANYWHERE, Boundary, RequestWorkload
from tierflow.runtime.clock import Clock, WallClock
from tierflow.runtime.errors import NoCapacity, RateLimited
from tierflow.runtime.secret_hash import salted_hash

__all__ = [
    "TenantPolicy",
    "Tenant",
    "TenantDirectory",
    "TenantConfigError",
    "RateLimiter",
    "TokenQuota",
    "Reservation",
    "UsageEntry",
    "UsageTally",
    "go_duration",
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

    @property
    def horizon(self) -> float:
        """Seconds of admissions that decide the bucket's level now (an empty one is full again after this)."""
        return self._full_burst / self._full_rate

    def full_in(self, now: float) -> float:
        """Seconds until the bucket is full again (OpenAI's x-ratelimit-reset-requests)."""
        self._refill(now)
        return (self.burst - self._tokens) / self.rate

    def restore(self, now: float, own: Iterable[float], fleet: Iterable[float]) -> None:
        """Rebuild the level from admissions a previous process recorded (a restart): the
        emptier of replaying this router's own admission times into its bucket and the
        whole fleet's into the whole bucket. Never fills the bucket above where it is."""
        mine = _replay(sorted(own), now, self.rate, self.burst)
        everyone = _replay(sorted(fleet), now, self._full_rate, self._full_burst)
        self._refill(now)
        self._tokens = min(self._tokens, mine, everyone)


def _replay(times: Sequence[float], now: float, rate: float, burst: float) -> float:
    """A full bucket's level at `now` after one request at each of `times` (sorted).
    Starts a full refill before `now`: earlier requests could not matter. A request that
    would not fit is counted as taking what was left (it was admitted by a router whose
    share was larger then)."""
    at = now - burst / rate
    tokens = burst
    for t in times:
        if t < at or t > now:
            continue
        tokens = max(0.0, min(burst, tokens + (t - at) * rate) - 1.0)
        at = t
    return min(burst, tokens + (now - at) * rate)


class TokenQuota:
    """Tokens per fixed window (window k covers [k*window_s, (k+1)*window_s)). Pure: `now` is passed in.

    Reserved at admission, settled at the end (`reserve` -> `Reservation.settle`): what is
    reserved and settled never exceeds what the window allows, so no request overshoots.
    A reservation counts in the window it was taken in: one settled after the window
    rolled changes nothing in the new one. Pass wall time (`Clock.now()`) for windows
    aligned to the epoch, e.g. to UTC days, and for the ledger's times to mean the same.

    `ready` is False between `expect_restore` and `restore`: a router that has not yet
    read its usage from the ledger admits nothing against this quota.
    """

    __slots__ = ("limit", "window_s", "ready", "_full_limit", "_window", "_used", "_held", "_others")

    def __init__(self, limit: int, window_s: float) -> None:
        if limit <= 0 or not window_s > 0:
            raise ValueError(f"limit and window_s must be positive, got {limit} and {window_s}")
        self.limit = self._full_limit = limit
        self.window_s = float(window_s)
        self.ready = True
        self._window = -math.inf
        self._used = 0  # settled tokens of this router in the current window
        self._held = 0  # reserved, not yet settled
        self._others = 0  # the other routers' tokens in this window, as the ledger said at restore

    def share(self, fraction: float) -> None:
        """Keep `fraction` of the configured budget (one of several routers), rounded down:
        N routers' shares never add up to more than the whole."""
        if not 0 < fraction <= 1:
            raise ValueError(f"fraction must be in (0, 1], got {fraction}")
        self.limit = math.floor(self._full_limit * fraction + 1e-9)

    def _roll(self, now: float) -> None:
        window = math.floor(now / self.window_s)
        if window > self._window:
            self._window, self._used, self._held, self._others = window, 0, 0, 0

    def window_start(self, now: float) -> float:
        return math.floor(now / self.window_s) * self.window_s

    def effective_limit(self, now: float) -> int:
        """This router's share, never more than the whole fleet has left (see `restore`)."""
        self._roll(now)
        return max(0, min(self.limit, self._full_limit - self._others))

    def used(self, now: float) -> int:
        """Tokens settled in this window (by this router)."""
        self._roll(now)
        return self._used

    def held(self, now: float) -> int:
        """Tokens reserved by requests still running."""
        self._roll(now)
        return self._held

    def remaining(self, now: float) -> int:
        """Tokens a new request may still reserve in this window."""
        return max(0, self.effective_limit(now) - self._used - self._held)

    def renews_in(self, now: float) -> float:
        """Seconds until the next window."""
        self._roll(now)
        return (self._window + 1) * self.window_s - now

    def retry_after(self, now: float) -> float:
        """0.0 when tokens remain in this window; otherwise the seconds until the next one."""
        return 0.0 if self.remaining(now) > 0 else self.renews_in(now)

    def reserve(self, now: float, tokens: int, max_tokens: int = 0) -> Reservation | None:
        """Hold `tokens` for one request; None (nothing held) when they do not fit."""
        if tokens < 0:
            raise ValueError(f"tokens must not be negative, got {tokens}")
        if tokens > self.remaining(now):
            return None
        self._held += tokens
        return Reservation(self, self._window, tokens, max_tokens)

    def _settle(self, reservation: Reservation, used: int) -> None:
        if reservation.window == self._window:  # else the request's window is over: nothing left to count in
            self._held -= reservation.tokens
            self._used += used

    def charge(self, now: float, tokens: int) -> None:
        """Count `tokens` spent without a reservation (tests, tools)."""
        if tokens < 0:
            raise ValueError(f"tokens must not be negative, got {tokens}")
        self._roll(now)
        self._used += tokens

    def expect_restore(self) -> None:
        """Admit nothing until `restore` (the router reads the ledger first)."""
        self.ready = False

    def restore(self, now: float, own: int, others: int) -> None:
        """This window's usage from the ledger: `own` tokens this router charged before it
        restarted (added to its count), `others` the other routers' (bounding what it may
        still admit by what the whole fleet has left). Called once, at start."""
        self._roll(now)
        self._used += max(0, own)
        self._others = max(0, others)
        self.ready = True


class Reservation:
    """Tokens held for one admitted request (`TokenQuota.reserve`), released once by `settle`.

    `max_tokens` is the request's completion budget as admitted: the client's, or (no
    max_tokens sent) what the quota could cover (see the module docstring)."""

    __slots__ = ("quota", "window", "tokens", "max_tokens", "settled")

    def __init__(self, quota: TokenQuota, window: float, tokens: int, max_tokens: int) -> None:
        self.quota = quota
        self.window = window
        self.tokens = tokens
        self.max_tokens = max_tokens
        self.settled = False

    def settle(self, used: int) -> None:
        """The request ended having been charged `used` tokens: count them, release the rest.
        Idempotent: only the first call counts."""
        if not self.settled:
            self.settled = True
            self.quota._settle(self, max(0, used))


class UsageEntry(Protocol):
    """What `TenantDirectory.restore` reads of one ledger record (tierflow.contracts.usage.UsageRecord is one)."""

    @property
    def request_id(self) -> str: ...
    @property
    def tenant(self) -> str: ...
    @property
    def router(self) -> str: ...
    @property
    def admitted_at(self) -> float: ...
    @property
    def prompt_tokens(self) -> int: ...
    @property
    def completion_tokens(self) -> int: ...


def go_duration(seconds: float) -> str:
    """Seconds as Go prints a duration, as OpenAI's x-ratelimit-reset-* headers do: "20ms", "1s", "1.5s", "6m0s", "24h0m0s"."""
    ms = max(0, round(seconds * 1000))
    if ms < 1000:
        return f"{ms}ms" if ms else "0s"
    hours, rest = divmod(ms, 3_600_000)
    minutes, rest = divmod(rest, 60_000)
    secs = str(rest // 1000) if rest % 1000 == 0 else f"{rest / 1000:.3f}".rstrip("0")
    if hours:
        return f"{hours}h{minutes}m{secs}s"
    if minutes:
        return f"{minutes}m{secs}s"
    return f"{secs}s"


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

    def admit(self, now: float, prompt_tokens: int = 0, max_tokens: int = 0, *, clamp: bool = False) -> Reservation | None:
        """Admit one request: reserve its prompt + `max_tokens` against the token quota and
        take one request from the rate limit; the reservation (None without a quota), which
        the caller settles when the request ends. `clamp`: the client sent no max_tokens
        (`max_tokens` is the model's whole remaining context), so when that does not fit,
        max_tokens shrinks to what the quota has left (`Reservation.max_tokens`).

        `RateLimited` (429 with Retry-After) when the rate limit says wait or the quota
        cannot cover the request (`insufficient_quota`); nothing is taken then. The router
        and the simulator both admit through here, so a simulated tenant is limited exactly
        as a live one. Pass wall time (the quota's windows and the ledger's times are wall time)."""
        quota = self.quota
        need = prompt_tokens + max_tokens
        if quota is not None:
            if not quota.ready:
                raise NoCapacity(f"Tenant {self.name!r}: this router is still reading its usage from the ledger; retry in a moment.",
                                 code="usage_not_restored")  # fmt: skip
            left = quota.remaining(now)
            if need > left or left <= 0:
                if clamp and left > prompt_tokens:
                    max_tokens, need = left - prompt_tokens, left
                else:
                    raise self._over_quota(now, prompt_tokens, max_tokens, left)
        if self.limiter is not None:
            wait = self.limiter.acquire(now)
            if wait > 0:
                raise RateLimited(f"Rate limit reached for tenant {self.name!r}; retry after {wait:.2f}s.", retry_after=wait)
        if quota is None:
            return None
        reservation = quota.reserve(now, need, max_tokens)
        assert reservation is not None  # checked above, at the same instant
        return reservation

    def _over_quota(self, now: float, prompt_tokens: int, max_tokens: int, left: int) -> RateLimited:
        assert self.quota is not None
        limit = self.quota.effective_limit(now)
        wait = self.quota.renews_in(now)
        need = prompt_tokens + max_tokens
        head = f"Token quota of tenant {self.name!r}: "
        if need > limit:
            what = (f"this request needs {need} tokens ({prompt_tokens} prompt + {max_tokens} max_tokens), more than the whole "
                    f"quota of {limit} per {self.quota.window_s:g}s window; lower max_tokens or shorten the prompt.")  # fmt: skip
        elif left <= 0:
            what = f"all {limit} tokens of this window are spent or reserved by requests still running; it renews in {go_duration(wait)}."
        else:
            what = (f"{left} of {limit} tokens remain in this window, and this request needs {need} ({prompt_tokens} prompt + "
                    f"{max_tokens} max_tokens); lower max_tokens, or wait: it renews in {go_duration(wait)}.")  # fmt: skip
        return RateLimited(head + what, retry_after=wait, code="insufficient_quota")

    def ratelimit_headers(self, now: float) -> tuple[tuple[str, str], ...]:
        """OpenAI's x-ratelimit-* headers for this tenant's limits (none without limits).
        Requests: the bucket's size (burst), the requests it would admit now, and the time
        until it is full again; tokens: the quota window's budget (this router's share), what
        a new request may still reserve, and the time until the window renews."""
        limiter, quota = self.limiter, self.quota
        if limiter is None and quota is None:
            return ()
        out: list[tuple[str, str]] = []
        if limiter is not None:
            out += [
                ("x-ratelimit-limit-requests", str(int(limiter.burst))),
                ("x-ratelimit-remaining-requests", str(int(limiter.available(now)))),
                ("x-ratelimit-reset-requests", go_duration(limiter.full_in(now))),
            ]
        if quota is not None:
            out += [
                ("x-ratelimit-limit-tokens", str(quota.effective_limit(now))),
                ("x-ratelimit-remaining-tokens", str(quota.remaining(now))),
                ("x-ratelimit-reset-tokens", go_duration(quota.renews_in(now))),
            ]
        return tuple(out)


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

    # ------------------------------------------------------------------ restart

    def expect_restore(self) -> None:
        """Admit nothing against any quota until `restore` (the router, before it reads the ledger)."""
        for tenant in self.tenants.values():
            if tenant.quota is not None:
                tenant.quota.expect_restore()

    def restore_since(self, now: float) -> float | None:
        """The earliest admission time `restore` needs records from: the start of every quota's
        current window and a rate bucket's refill before `now`; None when no tenant has a limit."""
        starts = [t.quota.window_start(now) for t in self.tenants.values() if t.quota is not None]
        starts += [now - t.limiter.horizon for t in self.tenants.values() if t.limiter is not None]
        return min(starts) if starts else None

    def restore(self, entries: Iterable[UsageEntry], *, router: str, now: float, started_at: float) -> dict[str, tuple[int, int]]:
        """Rebuild the quotas and rate buckets from the usage ledger's records (see the module
        docstring and `UsageTally`, which this feeds them to); per tenant with a quota, the
        (own, others) tokens of its current window."""
        tally = UsageTally(self, router=router, now=now, started_at=started_at)
        for entry in entries:
            tally.add(entry)
        return tally.apply()

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


class UsageTally:
    """The usage ledger's records counted for `TenantDirectory.restore`, fed one at a time
    (a restarting router streams a whole quota window through it), then applied once.

    Counted: this router's own records (`router`, admitted before this process started at
    `started_at`: later ones it counted itself) and every other router's, for tenants with
    a quota (tokens admitted in the quota's current window) or a rate limit (admission
    times within a refill of `now`). A request id seen twice counts once."""

    __slots__ = ("_directory", "_router", "_now", "_started_at", "_windows", "_horizons", "_tokens", "_admits", "_seen")

    def __init__(self, directory: TenantDirectory, *, router: str, now: float, started_at: float) -> None:
        tenants = directory.tenants
        self._directory = directory
        self._router, self._now, self._started_at = router, now, started_at
        self._windows = {name: (t.quota.window_start(now), t.quota.window_start(now) + t.quota.window_s)
                         for name, t in tenants.items() if t.quota is not None}  # fmt: skip
        self._horizons = {name: now - t.limiter.horizon for name, t in tenants.items() if t.limiter is not None}
        self._tokens: dict[str, list[int]] = {name: [0, 0] for name in self._windows}
        self._admits: dict[str, tuple[list[float], list[float]]] = {name: ([], []) for name in self._horizons}
        self._seen: set[str] = set()

    def add(self, entry: UsageEntry) -> None:
        tenant = entry.tenant
        window = self._windows.get(tenant)
        since = self._horizons.get(tenant)
        if window is None and since is None:
            return
        if entry.request_id in self._seen:
            return
        self._seen.add(entry.request_id)
        mine = entry.router == self._router
        at = entry.admitted_at
        if mine and at >= self._started_at:
            return
        if window is not None and window[0] <= at < window[1]:
            self._tokens[tenant][0 if mine else 1] += entry.prompt_tokens + entry.completion_tokens
        if since is not None and at >= since:
            own, fleet = self._admits[tenant]
            fleet.append(at)
            if mine:
                own.append(at)

    def apply(self) -> dict[str, tuple[int, int]]:
        """Set every quota and rate bucket from what was counted; (own, others) tokens per quota."""
        tenants = self._directory.tenants
        for name, (own_tokens, other_tokens) in self._tokens.items():
            quota = tenants[name].quota
            assert quota is not None
            quota.restore(self._now, own_tokens, other_tokens)
        for name, (own_times, fleet_times) in self._admits.items():
            limiter = tenants[name].limiter
            assert limiter is not None
            limiter.restore(self._now, own_times, fleet_times)
        return {name: (own, others) for name, (own, others) in self._tokens.items()}
