"""tierflow.rdu: a calibrated emulator of a tiered-memory dataflow accelerator node.

Pure library: every call takes the time (`now`, seconds) explicitly; nothing here reads a
clock, sleeps or does I/O. Modules, one job each:

- `hardware`: node profiles (capacities, bandwidths, FLOP/s, fitted efficiencies)
- `catalog`: model architectures (weight bytes, active params, KV bytes per token)
- `deployment`: ``ss8192-bs4``-style deployment configurations
- `timing`: the timing model (roofline passes, speculative decoding, switches, loads)
- `memory`: weight placement across storage, DDR and HBM; the transfer ledger
- `kvcache`: paged KV, the prefix cache and `block_hashes`
- `outputs`: deterministic completions
- `events`: requests, events and snapshots of the engine
- `engine`: `NodeEngine`, the discrete-event engine of one node
- `calibrate`: the emulator against the published figures, and the fit
"""

from .calibrate import CalibrationRow, calibration_rows, fit_parameters
from .catalog import (
    BUILTIN_MODELS,
    DTYPE_BYTES,
    ModelSpec,
    gqa_kv_bytes_per_token,
    load_catalog,
    mla_kv_bytes_per_token,
    model_from_dict,
)
from .deployment import DeploymentConfig
from .engine import NodeEngine, hbm_preload
from .events import (
    BundleModel,
    EngineEvent,
    EngineRequest,
    EngineSnapshot,
    FinishReason,
    ModelState,
    RequestFinished,
    RequestRejected,
    RequestStarted,
    TierCounts,
    TokenGenerated,
)
from .hardware import BUILTIN_PROFILES, HardwareProfile, load_profiles, profile_from_dict
from .kvcache import DEFAULT_BLOCK_SIZE, KVCache, block_hashes
from .memory import LoadPlan, TransferLedger, WeightTiers
from .timing import (
    SpecPlan,
    cold_load_time,
    decode_step_time,
    decode_tokens_per_second,
    forward_time,
    kv_transfer_time,
    kv_write_time,
    prefill_time,
    resident_bytes,
    spec_plan,
    switch_time,
)

__all__ = [
    # hardware
    "HardwareProfile",
    "BUILTIN_PROFILES",
    "profile_from_dict",
    "load_profiles",
    # catalog
    "ModelSpec",
    "BUILTIN_MODELS",
    "DTYPE_BYTES",
    "gqa_kv_bytes_per_token",
    "mla_kv_bytes_per_token",
    "model_from_dict",
    "load_catalog",
    # deployment
    "DeploymentConfig",
    # timing
    "SpecPlan",
    "spec_plan",
    "forward_time",
    "prefill_time",
    "decode_step_time",
    "decode_tokens_per_second",
    "resident_bytes",
    "switch_time",
    "cold_load_time",
    "kv_write_time",
    "kv_transfer_time",
    # memory tiers and KV cache
    "TransferLedger",
    "LoadPlan",
    "WeightTiers",
    "KVCache",
    "DEFAULT_BLOCK_SIZE",
    "block_hashes",
    # engine
    "NodeEngine",
    "hbm_preload",
    "BundleModel",
    "EngineRequest",
    "RequestRejected",
    "EngineEvent",
    "RequestStarted",
    "TokenGenerated",
    "RequestFinished",
    "FinishReason",
    "EngineSnapshot",
    "ModelState",
    "TierCounts",
    # calibration
    "CalibrationRow",
    "calibration_rows",
    "fit_parameters",
]
