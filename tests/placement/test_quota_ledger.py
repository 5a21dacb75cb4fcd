"""Token quotas reserved at admission and settled at the end, rebuilt from the usage ledger.

What must hold (issue 21): no request overshoots a quota, whatever the sizes, outcomes and
interleaving (a hypothesis state machine drives reservations, settlements, refusals and
windows rolling); a restarted router neither forgets nor double-counts (`restore` from
ledger records: its own, the fleet's, the ones it wrote itself, repeats); a client without
max_tokens is clamped to what remains; N routers' shares never add up to more than the whole.
"""

from __future__ import annotations

import random

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from tierflow.contracts.usage import UsageRecord
from tierflow.placement import RateLimiter, TenantDirectory, TokenQuota
from tierflow.placement.tenants import Reservation, go_duration
from tierflow.runtime.errors import NoCapacity, RateLimited

WINDOW = 3600.0


def _directory(**policy: object) -> TenantDirectory:
    return TenantDirectory.from_config({"tenants": [{"name": "acme", "api_keys": ["k"], **policy}]})


def _record(request_id: str, tokens: int, *, router: str = "r0", at: float = 10.0, tenant: str = "acme") -> UsageRecord:
    return UsageRecord(request_id=request_id, tenant=tenant, model="m", prompt_tokens=tokens // 2, completion_tokens=tokens - tokens // 2,
                       outcome="ok", status=200, router=router, admitted_at=at, at=at + 1)  # fmt: skip


# --------------------------------------------------------------------------- reserve / settle


class QuotaMachine(RuleBasedStateMachine):
    """Random requests against one tenant's quota: each reserves prompt + max_tokens (or is
    clamped, or refused), runs, and settles to what it used (a failure: anything up to its
    reservation, or nothing). Time moves forward, across windows too. Never, in any window,
    may the tokens settled exceed the limit, nor settled + held."""

    def __init__(self) -> None:
        super().__init__()
        self.limit = 5000
        self.tenant = _directory(token_quota=self.limit, quota_window_s=WINDOW).tenants["acme"]
        self.quota = self.tenant.quota
        assert self.quota is not None
        self.now = 0.0
        self.running: list[tuple[Reservation, int]] = []  # (reservation, tokens it will really use)
        self.settled: dict[int, int] = {}  # window -> tokens settled in it

    @rule(prompt=st.integers(0, 3000), max_tokens=st.integers(0, 3000), clamp=st.booleans(), use=st.floats(0.0, 1.0))
    def admit(self, prompt: int, max_tokens: int, clamp: bool, use: float) -> None:
        before = self.quota.remaining(self.now)
        try:
            res = self.tenant.admit(self.now, prompt, max_tokens, clamp=clamp)
        except RateLimited as refused:
            assert refused.code == "insufficient_quota" and refused.retry_after > 0
            assert prompt + max_tokens > before or before == 0
            assert not (clamp and before > prompt)  # a clamp refuses only when not even one completion token fits
            assert self.quota.remaining(self.now) == before  # nothing taken
            return
        assert res is not None
        if clamp and prompt + max_tokens > before:
            assert res.max_tokens == before - prompt and res.tokens == before  # clamped to what remains
        else:
            assert res.max_tokens == max_tokens and res.tokens == prompt + max_tokens
        # What it will really use: its prompt and up to its max_tokens (a node never sends more).
        self.running.append((res, prompt + int(res.max_tokens * use)))

    @precondition(lambda self: self.running)
    @rule(i=st.integers(0, 1000), outcome=st.sampled_from(["ok", "failed_before_output", "failed_after_output"]))
    def settle(self, i: int, outcome: str) -> None:
        res, used = self.running.pop(i % len(self.running))
        charged = {"ok": used, "failed_before_output": 0, "failed_after_output": used // 2}[outcome]
        window = int(res.window)
        res.settle(charged)
        res.settle(charged)  # a second settle counts nothing
        if window == int(self.quota._window):
            self.settled[window] = self.settled.get(window, 0) + charged

    @rule(dt=st.sampled_from([0.0, 1.0, 600.0, WINDOW]))
    def wait(self, dt: float) -> None:
        self.now += dt

    @invariant()
    def never_overshoots(self) -> None:
        q = self.quota
        window = int(q._window) if q._window > -1e18 else None
        if window is None:
            return
        assert q.used(self.now) + q.held(self.now) <= self.limit
        assert all(total <= self.limit for total in self.settled.values())
        assert q.remaining(self.now) >= 0

    def teardown(self) -> None:
        for res, used in self.running:
            res.settle(used)
        if self.quota._window == int(self.now // WINDOW):
            assert self.quota.held(self.now) == 0  # every reservation released


TestQuotaMachine = QuotaMachine.TestCase
TestQuotaMachine.settings = settings(max_examples=100, stateful_step_count=50, deadline=None)


def test_random_request_sizes_never_overshoot_and_use_the_quota_up() -> None:
    """A plain seeded run beside the state machine: thousands of requests of random sizes,
    settled in random order, in one window: the settled total never passes the limit, and
    requests keep being admitted until what is left is smaller than they ask for."""
    rng = random.Random(21)
    tenant = _directory(token_quota=100_000, quota_window_s=WINDOW).tenants["acme"]
    quota = tenant.quota
    assert quota is not None
    running: list[tuple[Reservation, int]] = []
    refused = 0
    for step in range(5000):
        prompt, max_tokens = rng.randint(1, 800), rng.randint(1, 800)
        try:
            res = tenant.admit(1.0, prompt, max_tokens)
        except RateLimited:
            refused += 1
            assert quota.remaining(1.0) < prompt + max_tokens
        else:
            assert res is not None
            running.append((res, prompt + rng.randint(0, max_tokens)))
        while running and (len(running) > 20 or rng.random() < 0.3):
            res, used = running.pop(rng.randrange(len(running)))
            res.settle(used)
        assert quota.used(1.0) + quota.held(1.0) <= 100_000
    for res, used in running:
        res.settle(used)
    assert quota.held(1.0) == 0 and 100_000 - 1600 < quota.used(1.0) <= 100_000 and refused > 0


def test_a_reservation_counts_in_the_window_it_was_taken_in() -> None:
    quota = TokenQuota(limit=100, window_s=60.0)
    res = quota.reserve(59.0, 80)
    assert res is not None and quota.remaining(59.0) == 20
    assert quota.remaining(61.0) == 100  # a new window: the old one's reservation is not in it
    res.settle(70)
    assert quota.used(61.0) == 0 and quota.remaining(61.0) == 100
    assert quota.reserve(61.0, 101) is None and quota.held(61.0) == 0


def test_over_quota_refusals_say_what_remains_and_when_it_renews() -> None:
    tenant = _directory(token_quota=1000, quota_window_s=WINDOW).tenants["acme"]
    res = tenant.admit(3000.0, 100, 800)
    assert res is not None
    with pytest.raises(RateLimited) as err:
        tenant.admit(3000.0, 50, 200)  # 100 left
    assert err.value.code == "insufficient_quota" and err.value.http_status == 429
    assert "100 of 1000 tokens remain" in err.value.message and "needs 250 (50 prompt + 200 max_tokens)" in err.value.message
    assert "renews in 10m0s" in err.value.message and err.value.retry_after == pytest.approx(600.0)
    with pytest.raises(RateLimited, match="more than the whole quota of 1000"):
        tenant.admit(3000.0, 900, 900)
    clamped = tenant.admit(3000.0, 40, 2000, clamp=True)  # no max_tokens sent: what the quota can cover
    assert clamped is not None and clamped.max_tokens == 60 and tenant.quota is not None and tenant.quota.remaining(3000.0) == 0
    with pytest.raises(RateLimited, match="all 1000 tokens of this window are spent or reserved"):
        tenant.admit(3000.0, 1, 0, clamp=True)
    res.settle(300)  # it used 300 of its 900: the rest comes back
    assert tenant.quota.remaining(3000.0) == 600


def test_a_quota_refusal_takes_no_request_from_the_rate_limit() -> None:
    tenant = _directory(token_quota=100, rate_limit_rps=1.0, burst=2).tenants["acme"]
    assert tenant.limiter is not None
    with pytest.raises(RateLimited, match="insufficient_quota|needs"):
        tenant.admit(5.0, 90, 20)
    assert tenant.limiter.available(5.0) == 2.0


def test_n_routers_shares_never_add_up_to_more_than_the_whole() -> None:
    for limit in (1000, 999, 7, 1_000_003):
        for routers in range(1, 9):
            quota = TokenQuota(limit, 60.0)
            quota.share(1 / routers)
            assert quota.limit * routers <= limit and quota.limit >= limit // routers


# --------------------------------------------------------------------------- restore


def test_restore_counts_own_records_against_the_share_and_caps_by_what_the_fleet_has_left() -> None:
    directory = _directory(token_quota=10_000, quota_window_s=WINDOW)
    quota = directory.tenants["acme"].quota
    assert quota is not None
    directory.expect_restore()
    with pytest.raises(NoCapacity, match="still reading its usage"):
        directory.tenants["acme"].admit(100.0, 1, 1)
    records = [
        _record("a", 3000, router="r0", at=10.0),
        _record("a", 3000, router="r0", at=10.0),  # the same request stored twice (a retry past the duplicate window)
        _record("b", 2000, router="r1", at=20.0),
        _record("c", 500, router="r0", at=-5.0),  # the previous window
        _record("d", 700, router="r0", at=95.0),  # written by this very process (started at 90): it counted it itself
        _record("e", 100, tenant="someone-else", router="r0"),
    ]
    assert directory.restore(records, router="r0", now=100.0, started_at=90.0) == {"acme": (3000, 2000)}
    assert quota.ready and quota.used(100.0) == 3000
    assert quota.remaining(100.0) == 5000  # its whole limit minus its own ... and the fleet has 5000 left too
    directory.share(2)  # a second router is heard: 5000 each, 3000 of it used
    assert quota.remaining(100.0) == 2000
    assert quota.remaining(WINDOW + 1) == 5000  # the next window starts afresh


def test_a_lone_router_with_a_new_id_still_restores_exactly() -> None:
    """No NATS identity, no --router-id: the restarted router has a fresh id, so none of the
    records are its own; the fleet's total against the whole limit makes it exact anyway."""
    directory = _directory(token_quota=10_000, quota_window_s=WINDOW)
    directory.restore([_record("a", 4000, router="r-old"), _record("b", 1500, router="r-old")], router="r-new", now=100.0, started_at=90.0)
    quota = directory.tenants["acme"].quota
    assert quota is not None and quota.remaining(100.0) == 4500 and quota.effective_limit(100.0) == 4500


def test_restore_empties_the_rate_bucket_by_the_last_seconds_admissions() -> None:
    directory = _directory(rate_limit_rps=1.0, burst=4)
    limiter = directory.tenants["acme"].limiter
    assert limiter is not None
    assert directory.restore_since(100.0) == pytest.approx(96.0)  # a full refill's worth
    records = [_record(f"q{i}", 1, router="r0", at=at) for i, at in enumerate((50.0, 99.0, 99.5, 99.9))]
    directory.restore(records, router="r0", now=100.0, started_at=99.95)
    # full 4 s before now; three admissions in the last second, refilled 1 s' worth meanwhile: 2 left
    assert limiter.available(100.0) == pytest.approx(2.0)
    assert limiter.acquire(100.0) == 0.0 and limiter.acquire(100.0) == 0.0 and limiter.acquire(100.0) > 0


def test_replaying_nothing_leaves_a_bucket_as_it_is() -> None:
    limiter = RateLimiter(rate=2.0, burst=5.0)
    assert limiter.acquire(0.0) == 0.0
    limiter.restore(0.0, [], [])
    assert limiter.available(0.0) == 4.0


# --------------------------------------------------------------------------- headers


@pytest.mark.parametrize(("seconds", "text"), [(0, "0s"), (0.02, "20ms"), (0.9994, "999ms"), (1, "1s"), (1.5, "1.5s"), (59.25, "59.25s"),
                                               (360, "6m0s"), (61.5, "1m1.5s"), (86400, "24h0m0s"), (3725, "1h2m5s")])  # fmt: skip
def test_durations_are_written_as_openai_writes_them(seconds: float, text: str) -> None:
    assert go_duration(seconds) == text


def test_ratelimit_headers_only_for_tenants_with_limits() -> None:
    directory = TenantDirectory.from_config({"tenants": [
        {"name": "acme", "api_keys": ["k1"], "token_quota": 1000, "quota_window_s": 60, "rate_limit_rps": 2, "burst": 4},
        {"name": "open", "api_keys": ["k2"]},
    ]})  # fmt: skip
    acme = directory.tenants["acme"]
    res = acme.admit(30.0, 10, 90)
    assert dict(acme.ratelimit_headers(30.0)) == {
        "x-ratelimit-limit-requests": "4", "x-ratelimit-remaining-requests": "3", "x-ratelimit-reset-requests": "500ms",
        "x-ratelimit-limit-tokens": "1000", "x-ratelimit-remaining-tokens": "900", "x-ratelimit-reset-tokens": "30s",
    }  # fmt: skip
    assert res is not None
    res.settle(40)
    assert dict(acme.ratelimit_headers(30.0))["x-ratelimit-remaining-tokens"] == "960"
    assert directory.tenants["open"].ratelimit_headers(30.0) == ()
