"""Tenants: configuration and its errors, API keys, token-bucket rate limits, token quotas."""

from __future__ import annotations

from typing import Any

import pytest

from tierflow.placement import ANYWHERE, RateLimiter, TenantConfigError, TenantDirectory, TokenQuota, hash_api_key

CONFIG: dict[str, Any] = {
    "tenants": [
        {
            "name": "acme",
            "api_keys": [hash_api_key("sk-acme-1"), "sk-acme-2"],
            "allowed_models": ["llama-3.1-8b"],
            "regions": ["eu-west", "eu-central"],
            "residency": "eu",
            "rate_limit_rps": 2,
            "burst": 4,
            "token_quota": 1000,
            "quota_window_s": 60,
            "workload": "interactive",
        },
        {"name": "research", "api_keys": ["sk-research"], "workload": "batch"},
        {"name": "public"},
    ],
    "anonymous_tenant": "public",
}


def _with(index: int, **changes: Any) -> dict[str, Any]:
    tenants = [dict(t) for t in CONFIG["tenants"]]
    tenants[index].update(changes)
    return {"tenants": tenants}


def test_configuration_builds_tenants_ready_for_the_request_path() -> None:
    directory = TenantDirectory.from_config(CONFIG)
    acme = directory.authenticate("sk-acme-1")
    assert acme is not None and acme.name == "acme" and directory.authenticate("sk-acme-2") is acme
    assert acme.boundary.regions == frozenset({"eu-west", "eu-central"}) and acme.boundary.residency == "eu"
    assert acme.allows_model("llama-3.1-8b") and not acme.allows_model("llama-3.1-70b")
    assert acme.workload == "interactive" and acme.limiter is not None and acme.quota is not None
    research = directory.authenticate("sk-research")
    assert research is not None and research.boundary is ANYWHERE and research.allows_model("anything")
    assert research.limiter is None and research.quota is None


def test_authentication() -> None:
    directory = TenantDirectory.from_config(CONFIG)
    assert directory.authenticate("sk-wrong") is None
    assert directory.authenticate(hash_api_key("sk-acme-1")) is None  # the digest is not the key
    assert directory.authenticate(None) is directory.get("public")
    assert directory.authenticate("") is directory.get("public")
    assert TenantDirectory.from_config({"tenants": []}).authenticate(None) is None


@pytest.mark.parametrize(
    ("config", "message"),
    [
        (_with(0, rate_limit_rps=-1), r"tenants\[0\] \('acme'\): Expected `float` > 0.0 - at `\$.rate_limit_rps`"),
        (_with(1, regions="eu"), r"tenants\[1\] \('research'\): Expected `array`, got `str` - at `\$.regions`"),
        (_with(1, quota=5), r"tenants\[1\] \('research'\): Object contains unknown field `quota`"),
        (_with(1, workload="realtime"), r"tenants\[1\].*workload"),
        (_with(1, name="bad name"), r"tenants\[1\] \('bad name'\).*\$.name"),
        (_with(1, burst=3), r"tenants\[1\] \('research'\): 'burst' needs 'rate_limit_rps'"),
        (_with(1, name="acme"), r"tenants\[1\] \('acme'\): duplicate tenant name"),
        (_with(1, api_keys=["sk-acme-2"]), r"tenants\[1\] \('research'\)\.api_keys\[0\]: the same key is already a key of tenant 'acme'"),
        (_with(1, api_keys=[hash_api_key("sk-acme-1")]), r"already a key of tenant 'acme'"),
        (_with(1, api_keys=["sha256:abc"]), r"api_keys\[0\]: a 'sha256:' key must be followed by 64 hex digits"),
        (_with(1, api_keys=[""]), r"tenants\[1\].*api_keys"),
        ({"tenants": [{"api_keys": ["k"]}]}, r"tenants\[0\]: Object missing required field `name`"),
        ({"tenants": {"acme": {}}}, r"'tenants' must be a list"),
        ({"tenants": [], "anonymous_tenant": "ghost"}, r"anonymous_tenant: no tenant is named 'ghost'"),
        ({"tenant": []}, r"unknown key\(s\) beside 'tenants': tenant"),
    ],
)
def test_configuration_errors_name_the_entry_and_field(config: dict[str, Any], message: str) -> None:
    with pytest.raises(TenantConfigError, match=message):
        TenantDirectory.from_config(config)


def test_configuration_errors_never_echo_a_key() -> None:
    with pytest.raises(TenantConfigError) as err:
        TenantDirectory.from_config(_with(1, api_keys=["sk-acme-2"]))
    assert "sk-acme-2" not in str(err.value)


def test_rate_limiter_bucket() -> None:
    limiter = RateLimiter(rate=2.0, burst=3.0)
    assert [limiter.acquire(10.0) for _ in range(3)] == [0.0, 0.0, 0.0]  # starts full
    assert limiter.acquire(10.0) == pytest.approx(0.5)  # one token every 0.5 s
    assert limiter.acquire(10.25) == pytest.approx(0.25)  # a refused request takes nothing
    assert limiter.acquire(10.5) == 0.0
    assert limiter.available(100.0) == 3.0  # refills up to the burst, no further
    assert limiter.acquire(99.0) == 0.0  # time running backwards refills nothing, and does not raise
    assert limiter.available(99.0) == 2.0
    with pytest.raises(ValueError):
        limiter.acquire(100.0, cost=4.0)
    with pytest.raises(ValueError):
        RateLimiter(rate=0.0)
    assert RateLimiter(rate=0.5).burst == 1.0


def test_token_quota_per_window() -> None:
    quota = TokenQuota(limit=100, window_s=60.0)
    assert quota.retry_after(0.0) == 0.0 and quota.remaining(0.0) == 100
    quota.charge(1.0, 70)
    assert quota.remaining(2.0) == 30 and quota.retry_after(2.0) == 0.0
    quota.charge(3.0, 50)  # charged without a reservation (a tool, a test): the count may pass the limit ...
    assert quota.used(4.0) == 120 and quota.remaining(4.0) == 0
    assert quota.retry_after(45.0) == pytest.approx(15.0)  # ... the next waits for the window
    assert quota.retry_after(60.0) == 0.0 and quota.used(60.0) == 0
    with pytest.raises(ValueError):
        quota.charge(61.0, -1)


def test_limits_split_over_routers_and_back() -> None:
    """Three routers keep a third each (burst at least one request, quota rounded down); back to one, the whole."""
    directory = TenantDirectory.from_config(CONFIG)
    acme = directory.tenants["acme"]
    assert acme.limiter is not None and acme.quota is not None
    directory.share(3)
    assert (acme.limiter.rate, acme.limiter.burst, acme.quota.limit) == (pytest.approx(2 / 3), pytest.approx(4 / 3), 333)  # rounded down: 3 x 333 <= 1000
    assert acme.limiter.available(0.0) == pytest.approx(4 / 3)  # saved tokens above the new burst are dropped
    assert acme.limiter.acquire(0.0) == 0.0 and acme.limiter.acquire(0.0) > 0  # one request, then wait
    directory.share(5)
    assert acme.limiter.burst == 1.0  # never below one request
    directory.share(1)
    assert (acme.limiter.rate, acme.limiter.burst, acme.quota.limit) == (2.0, 4.0, 1000)
    assert directory.tenants["research"].limiter is None  # unlimited stays unlimited
    with pytest.raises(ValueError, match="at least 1"):
        directory.share(0)
