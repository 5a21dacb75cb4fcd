"""The router's configuration file: tenants and placement, validated as a whole at start.

A router that cannot understand its configuration refuses to start, with the problem
named; it never serves with a half-read tenant list (that would open or close the wrong
doors).

Who may call when no tenant is configured is an explicit choice: with `allow_anonymous`
(`tierflow router --allow-anonymous`, which `tierflow up` passes for local runs) every
caller, with any key or none, is the open tenant "anonymous"; without it every request is
refused with 401 (how compose and the Kubernetes manifests start: give them a tenants
file). With tenants configured, `anonymous_tenant:` in the file is what lets keyless
callers in.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgspec

from tierflow.placement import BatchTurn, PlacementConfig, PlacementPolicy, PrefillRate, SwitchCost, Tenant, TenantDirectory, TenantPolicy

__all__ = ["RouterConfig", "load_router_config", "read_router_config"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RouterConfig:
    tenants: TenantDirectory
    policy: PlacementPolicy


class _OpenDirectory(TenantDirectory):
    """No tenants configured: everyone, with any key or none, is the open tenant
    "anonymous" (so OpenAI clients that insist on an api_key work unchanged)."""

    def authenticate(self, api_key: str | None) -> Tenant | None:
        return self.anonymous


def _open_directory() -> TenantDirectory:
    anonymous = Tenant.from_policy(TenantPolicy(name="anonymous"))
    return _OpenDirectory([anonymous], anonymous="anonymous")


def read_router_config(path: str | Path) -> dict[str, Any]:
    """The file's sections (tenants, anonymous_tenant, placement), unparsed; ValueError names
    the file and what is wrong. The simulator reads router configurations through this too."""
    try:
        raw = msgspec.yaml.decode(Path(path).read_bytes(), type=dict[str, Any]) or {}
    except OSError as exc:
        raise ValueError(f"cannot read router config {path}: {exc.strerror}") from None
    except msgspec.MsgspecError as exc:
        raise ValueError(f"router config {path}: {exc}") from None
    unknown = set(raw) - {"tenants", "anonymous_tenant", "placement"}
    if unknown:
        raise ValueError(f"router config {path}: unknown section(s) {', '.join(sorted(unknown))}; expected tenants, anonymous_tenant, placement")
    return raw


def _tenants(section: dict[str, Any], path: str, allow_anonymous: bool) -> TenantDirectory:
    if section.get("tenants"):
        if allow_anonymous:
            log.info("tenants are configured in %s: --allow-anonymous has no effect (`anonymous_tenant:` lets keyless callers in)", path)
        return TenantDirectory.from_config(section)
    if allow_anonymous:
        log.info("no tenants configured and --allow-anonymous: every caller is the open tenant 'anonymous'")
        return _open_directory()
    log.warning(
        "no tenants configured%s: every request is refused with 401. Give the router a tenants file (--config; "
        "`tierflow keys new --tenant NAME` prints a key and its line), or --allow-anonymous for an open local router",
        f" in {path}" if path else " (no --config)",
    )
    return TenantDirectory([])


def load_router_config(
    path: str, *, policy_override: str = "", switch_cost: SwitchCost | None = None, batch_turn: BatchTurn | None = None,
    prefill_rate: PrefillRate | None = None, allow_anonymous: bool = False,
) -> RouterConfig:
    raw = read_router_config(path) if path else {}
    tenant_section = {k: raw[k] for k in ("tenants", "anonymous_tenant") if k in raw}
    tenants = _tenants(tenant_section, path, allow_anonymous)
    placement = dict(raw.get("placement") or {})
    if policy_override:
        placement["policy"] = policy_override
    return RouterConfig(tenants=tenants, policy=PlacementConfig.from_config(placement).build(switch_cost=switch_cost, batch_turn=batch_turn, prefill_rate=prefill_rate))
