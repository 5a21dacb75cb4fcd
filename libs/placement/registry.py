"""Placement policies by name, so the router and the simulator pick one from configuration.

    placement:
      policy: hotness        # hotness | round-robin | least-loaded | random
      seed: 7                # random only
      weights: {affinity: 2.0}   # hotness only; see `PlacementWeights`

`PlacementConfig.from_config(section).build()` makes a fresh policy instance; build one
per router (or simulation run), never share one: policies keep per-instance state.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Protocol

import msgspec

from tierflow.placement.baselines import LeastLoaded, Random, RoundRobin
from tierflow.placement.policy import PlacementPolicy
from tierflow.placement.scoring import BatchTurn, HotnessAware, PlacementWeights, PrefillRate, SwitchCost

__all__ = ["PolicyFactory", "POLICIES", "PlacementConfig", "make_policy"]


class PolicyFactory(Protocol):
    def __call__(
        self, *, weights: PlacementWeights, seed: int | None, switch_cost: SwitchCost | None, batch_turn: BatchTurn | None = None,
        prefill_rate: PrefillRate | None = None,
    ) -> PlacementPolicy: ...


def _hotness(*, weights: PlacementWeights, seed: int | None, switch_cost: SwitchCost | None, batch_turn: BatchTurn | None = None,
             prefill_rate: PrefillRate | None = None) -> PlacementPolicy:
    return HotnessAware(weights, switch_cost=switch_cost, batch_turn=batch_turn, prefill_rate=prefill_rate)


def _round_robin(*, weights: PlacementWeights, seed: int | None, switch_cost: SwitchCost | None, batch_turn: BatchTurn | None = None,
             prefill_rate: PrefillRate | None = None) -> PlacementPolicy:
    return RoundRobin()


def _least_loaded(*, weights: PlacementWeights, seed: int | None, switch_cost: SwitchCost | None, batch_turn: BatchTurn | None = None,
             prefill_rate: PrefillRate | None = None) -> PlacementPolicy:
    return LeastLoaded()


def _random(*, weights: PlacementWeights, seed: int | None, switch_cost: SwitchCost | None, batch_turn: BatchTurn | None = None,
             prefill_rate: PrefillRate | None = None) -> PlacementPolicy:
    return Random(seed)


POLICIES: dict[str, PolicyFactory] = {
    HotnessAware.name: _hotness,
    RoundRobin.name: _round_robin,
    LeastLoaded.name: _least_loaded,
    Random.name: _random,
}


def make_policy(
    name: str,
    *,
    weights: PlacementWeights | None = None,
    seed: int | None = None,
    switch_cost: SwitchCost | None = None,
    batch_turn: BatchTurn | None = None,
    prefill_rate: PrefillRate | None = None,
) -> PlacementPolicy:
    """A new policy instance by name; an unknown name is a `ValueError` listing the known ones."""
    factory = POLICIES.get(name)
    if factory is None:
        raise ValueError(f"unknown placement policy {name!r}; choose one of {', '.join(sorted(POLICIES))}")
    return factory(weights=weights or PlacementWeights(), seed=seed, switch_cost=switch_cost, batch_turn=batch_turn, prefill_rate=prefill_rate)


class PlacementConfig(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """The `placement:` configuration section."""

    policy: str = HotnessAware.name
    seed: int | None = None
    weights: PlacementWeights = PlacementWeights()

    @classmethod
    def from_config(cls, section: Mapping[str, Any] | None) -> PlacementConfig:
        try:
            config = msgspec.convert(dict(section or {}), cls)
        except msgspec.ValidationError as exc:
            raise ValueError(f"invalid placement configuration: {exc}") from None
        if config.policy not in POLICIES:
            raise ValueError(f"unknown placement policy {config.policy!r}; choose one of {', '.join(sorted(POLICIES))}")
        return config

    def build(
        self, *, switch_cost: SwitchCost | None = None, batch_turn: BatchTurn | None = None, prefill_rate: PrefillRate | None = None
    ) -> PlacementPolicy:
        return make_policy(
            self.policy, weights=self.weights, seed=self.seed, switch_cost=switch_cost, batch_turn=batch_turn, prefill_rate=prefill_rate
        )
