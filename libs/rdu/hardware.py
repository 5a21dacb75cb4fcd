"""Hardware profiles: what one node of accelerators can hold, move and compute.

A profile is plain data. Capacities, bandwidths and peak FLOP/s are per socket (one chip)
because that is how vendors publish them; the timing model multiplies by `sockets`. Link
rates that belong to the node as a whole (host storage, the host link, the inter-node
link) are node aggregates.

The last block of fields holds the *fitted* parameters: the few numbers the published
figures cannot give directly (how much of peak HBM bandwidth a decode step reaches, what
one layer's collectives cost, ...). For the SN40L profiles they come from
`tierflow.rdu.calibrate.fit_parameters`; see `tierflow.rdu.timing` for the physics and
the count of parameters against figures. Other profiles carry stated assumptions.

Weights reach HBM by one of two paths (`weights_path`):

* ``"ddr"``: an RDU socket copies from its own DDR into its own HBM by DMA, so the node
  rate is ``sockets × min(ddr_bw, ddr_hbm_bw)``: each socket's DDR read or its DMA
  engine, whichever is slower, with every socket copying its own shard in parallel.
* ``"host_link"``: a GPU node keeps off-HBM weights in host DRAM and copies them over
  PCIe; the whole node loads at ``host_link_bw`` (~64 GB/s on a DGX H100).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from types import MappingProxyType
from typing import Annotated, Any, Final, Literal

import msgspec

__all__ = [
    "GiB",
    "TiB",
    "HardwareProfile",
    "BUILTIN_PROFILES",
    "profile_from_dict",
    "load_profiles",
]

GiB: Final = 1 << 30
TiB: Final = 1 << 40
_GB: Final = 1e9
_TB: Final = 1e12

_PosInt = Annotated[int, msgspec.Meta(gt=0)]
_PosFloat = Annotated[float, msgspec.Meta(gt=0)]
_NonNeg = Annotated[float, msgspec.Meta(ge=0)]
_Fraction = Annotated[float, msgspec.Meta(gt=0, le=1)]


class HardwareProfile(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """One node type. Per-socket unless the field says node."""

    name: str
    sockets: _PosInt
    sram_bytes: _PosInt  # on-chip SRAM per socket (informational; weights stream from HBM)
    hbm_bytes: _PosInt  # HBM per socket
    ddr_bytes: _PosInt  # DDR per socket (GPU: this socket's share of host DRAM)
    hbm_bw: _PosFloat  # HBM bandwidth per socket, bytes/s
    ddr_bw: _PosFloat  # DDR streaming bandwidth per socket, bytes/s
    flops: _PosFloat  # dense BF16 FLOP/s per socket
    ddr_hbm_bw: _PosFloat  # DDR -> HBM DMA ceiling per socket, bytes/s ("ddr" path)
    storage_bw: _PosFloat  # node: host storage -> DDR (cold loads), bytes/s
    host_link_bw: _PosFloat  # node: host <-> accelerator link, per direction, bytes/s
    internode_bw: _PosFloat  # node: to another node (KV transfer, disaggregation), bytes/s
    weights_path: Literal["ddr", "host_link"] = "ddr"
    # -- fitted or assumed efficiency parameters (see module docstring) --
    hbm_efficiency: _Fraction = 0.8  # fraction of peak HBM bandwidth a decode pass reaches
    compute_efficiency: _Fraction = 0.5  # fraction of peak FLOP/s a compute-bound pass reaches
    step_overhead_s: _NonNeg = 0.0  # per forward pass: launch, sampling, host round trip
    layer_overhead_s: _NonNeg = 0.0  # per layer per forward pass: collectives + sync
    moe_dispatch_s: _NonNeg = 0.0  # extra per MoE layer per pass: token dispatch + combine
    spec_acceptance: Annotated[float, msgspec.Meta(gt=0, lt=1)] | None = (
        None  # None: no spec decode
    )
    spec_max_draft: Annotated[int, msgspec.Meta(ge=1, le=64)] = 8  # longest draft chain considered

    # -- node aggregates the timing model uses --
    @property
    def hbm_capacity(self) -> int:
        return self.sockets * self.hbm_bytes

    @property
    def ddr_capacity(self) -> int:
        return self.sockets * self.ddr_bytes

    @property
    def node_hbm_bw(self) -> float:
        return self.sockets * self.hbm_bw

    @property
    def node_flops(self) -> float:
        return self.sockets * self.flops

    @property
    def switch_bw(self) -> float:
        """Node rate at which weights (and spilled KV) move between DDR and HBM."""
        if self.weights_path == "host_link":
            return self.host_link_bw
        return self.sockets * min(self.ddr_bw, self.ddr_hbm_bw)


_INF: Final = math.inf

# Fitted (tierflow.rdu.calibrate.fit_parameters); tests check these are the fit.
FIT_HBM: Final = 0.976
FIT_COMPUTE: Final = 0.0997
FIT_LAYER: Final = 13.83e-6
FIT_MOE: Final = 4.85e-6
FIT_SPEC: Final = 0.781

# SN40L, per socket (Prabhakar et al., "SambaNova SN40L", arXiv 2405.07518, MICRO'24, §I and
# Tab. II): 520 MiB SRAM, 64 GiB HBM at 1.8 TB/s, 1.5 TiB DDR at 200 GB/s, 638 BF16 TFLOP/s.
# DDR -> HBM: the paper's 8-socket node copies at ">1 TB/s" (§I, §VI-C), i.e. a DMA ceiling of
# 125 GB/s per socket. The 16-socket SambaRack's DDR is 1,600 GB/s in total (Hot Chips 2024,
# R. Prabhakar, slide 3), 100 GB/s a socket: there the DDR read, not the DMA, bounds a switch.
# Storage and inter-node rates are not published: NVMe RAID at ~25 GB/s and 800 Gb/s of
# NICs are estimates. The efficiency block is the fit from
# tierflow.rdu.calibrate.fit_parameters() against tierflow.rdu.figures (shared by both
# socket counts and every model); see tierflow.rdu.timing for what each one means.
_SN40L_SOCKET: Final[dict[str, Any]] = {
    "sram_bytes": 520 * (1 << 20),
    "hbm_bytes": 64 * GiB,
    "ddr_bytes": 1536 * GiB,
    "hbm_bw": 1.8 * _TB,
    "ddr_bw": 200 * _GB,
    "flops": 638e12,
    "ddr_hbm_bw": 125 * _GB,
    "storage_bw": 25 * _GB,
    "host_link_bw": 64 * _GB,
    "internode_bw": 100 * _GB,
    "weights_path": "ddr",
    "hbm_efficiency": FIT_HBM,
    "compute_efficiency": FIT_COMPUTE,
    "step_overhead_s": 0.0,  # fitting it too drives it to 0: the per-layer term covers it
    "layer_overhead_s": FIT_LAYER,
    "moe_dispatch_s": FIT_MOE,
    "spec_acceptance": FIT_SPEC,
}
_SN40L_16: Final[dict[str, Any]] = {**_SN40L_SOCKET, "ddr_bw": 100 * _GB}  # Hot Chips 2024

BUILTIN_PROFILES: Final[Mapping[str, HardwareProfile]] = MappingProxyType(
    {
        "sn40l-8": HardwareProfile(name="sn40l-8", sockets=8, **_SN40L_SOCKET),
        "sn40l-16": HardwareProfile(name="sn40l-16", sockets=16, **_SN40L_16),
        # SN50: ESTIMATES, not published specifications. Assumed one generation on from
        # SN40L: same SRAM, HBM3E (96 GiB at ~3.2 TB/s), 2 TiB DDR at ~300 GB/s, ~1.1 PFLOP/s
        # BF16, a faster DDR->HBM DMA; SN40L's fitted efficiencies carried over unchanged.
        "sn50-16": HardwareProfile(
            name="sn50-16",
            sockets=16,
            **{
                **_SN40L_16,
                "hbm_bytes": 96 * GiB,
                "hbm_bw": 3.2 * _TB,
                "ddr_bytes": 2048 * GiB,
                "ddr_bw": 300 * _GB,
                "flops": 1100e12,
                "ddr_hbm_bw": 96 * _GB,
                "internode_bw": 200 * _GB,
            },
        ),
        # DGX H100: 8 x (80 GB HBM3 at 3.35 TB/s, 989 dense BF16 TFLOP/s). 2 TB host DRAM is
        # the "DDR" tier; weights come over the host link (~64 GB/s per direction), which is
        # the path the published 15x switching comparison measures. Efficiencies here are
        # assumptions typical of TP=8 serving (about 80% of HBM peak, ~50 us of sampling
        # and scheduling per step, ~15 us of NCCL all-reduce + launch per layer), not
        # fitted: no H100 figure is a calibration target.
        "h100-8x": HardwareProfile(
            name="h100-8x",
            sockets=8,
            sram_bytes=50 * (1 << 20),
            hbm_bytes=80 * 10**9,
            ddr_bytes=250 * 10**9,
            hbm_bw=3.35 * _TB,
            ddr_bw=100 * _GB,
            flops=989e12,
            ddr_hbm_bw=8 * _GB,
            storage_bw=25 * _GB,
            host_link_bw=64 * _GB,
            internode_bw=400 * _GB,
            weights_path="host_link",
            hbm_efficiency=0.8,
            compute_efficiency=0.6,
            step_overhead_s=50e-6,
            layer_overhead_s=15e-6,
            moe_dispatch_s=30e-6,
            spec_acceptance=None,
        ),
        # DGX A100 (80 GB): 8 x (80 GB HBM2e at 2,039 GB/s, 312 dense BF16 TFLOP/s), 2 TB host
        # DRAM; host-to-GPU at 32 GB/s, the figure the SN40L paper assumes for its 31x
        # switching comparison (§VI-C). Efficiencies: the h100-8x assumptions, not fitted.
        "a100-8x": HardwareProfile(
            name="a100-8x",
            sockets=8,
            sram_bytes=40 * (1 << 20),
            hbm_bytes=80 * 10**9,
            ddr_bytes=250 * 10**9,
            hbm_bw=2.039 * _TB,
            ddr_bw=100 * _GB,
            flops=312e12,
            ddr_hbm_bw=8 * _GB,
            storage_bw=25 * _GB,
            host_link_bw=32 * _GB,
            internode_bw=200 * _GB,
            weights_path="host_link",
            hbm_efficiency=0.8,
            compute_efficiency=0.6,
            step_overhead_s=50e-6,
            layer_overhead_s=15e-6,
            moe_dispatch_s=30e-6,
            spec_acceptance=None,
        ),
        # Zero time everywhere, SN40L-16 capacities: measures the fabric's own overhead.
        "zero": HardwareProfile(
            name="zero",
            sockets=16,
            sram_bytes=520 * (1 << 20),
            hbm_bytes=64 * GiB,
            ddr_bytes=1536 * GiB,
            hbm_bw=_INF,
            ddr_bw=_INF,
            flops=_INF,
            ddr_hbm_bw=_INF,
            storage_bw=_INF,
            host_link_bw=_INF,
            internode_bw=_INF,
            hbm_efficiency=1.0,
            compute_efficiency=1.0,
            step_overhead_s=0.0,
            layer_overhead_s=0.0,
            moe_dispatch_s=0.0,
            spec_acceptance=None,
        ),
    }
)


def _validation_error(kind: str, key: str, err: msgspec.ValidationError) -> ValueError:
    # msgspec says e.g. "Expected `int` >= 1, got `0` - at `$.sockets`": keep the field path.
    return ValueError(f"{kind} {key!r}: {err}")


def profile_from_dict(d: Mapping[str, Any], *, name: str | None = None) -> HardwareProfile:
    """Build a profile from config data; a ValueError names the offending field.

    `base` (optional) names a built-in or earlier profile to start from, so a config can
    say ``{"base": "sn40l-16", "sockets": 8}``. Only ``base`` from BUILTIN_PROFILES is
    available here; `load_profiles` also resolves earlier user profiles.
    """
    return _profile_from_dict(d, name=name, known=BUILTIN_PROFILES)


def _profile_from_dict(
    d: Mapping[str, Any], *, name: str | None, known: Mapping[str, HardwareProfile]
) -> HardwareProfile:
    if not isinstance(d, Mapping):
        raise ValueError(f"hardware profile {name!r}: expected a mapping, got {type(d).__name__}")
    data = dict(d)
    label = name or str(data.get("name", "<unnamed>"))
    if name is not None and data.setdefault("name", name) != name:
        raise ValueError(
            f"hardware profile {name!r}: field 'name' is {data['name']!r}; it must match the key"
        )
    base_name = data.pop("base", None)
    if base_name is not None:
        base = known.get(base_name)
        if base is None:
            raise ValueError(
                f"hardware profile {label!r}: field 'base' names unknown profile {base_name!r}"
                f" (known: {', '.join(sorted(known))})"
            )
        data = {**msgspec.structs.asdict(base), **data}
    try:
        return msgspec.convert(data, HardwareProfile)
    except msgspec.ValidationError as err:
        raise _validation_error("hardware profile", label, err) from None


def load_profiles(
    extra: Mapping[str, Mapping[str, Any]] | None = None,
) -> dict[str, HardwareProfile]:
    """Built-in profiles plus `extra` (name -> fields), later entries may `base` on earlier."""
    profiles: dict[str, HardwareProfile] = dict(BUILTIN_PROFILES)
    for key, fields in (extra or {}).items():
        profiles[key] = _profile_from_dict(fields, name=key, known=profiles)
    return profiles
