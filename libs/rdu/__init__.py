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
from .catalog import BUILTIN_MODELS, ModelSpec, load_catalog, model_from_dict
from .deployment import DeploymentConfig
from .engine import NodeEngine
from .events import (
    BundleModel,
    EngineEvent,
    EngineRequest,
    EngineSnapshot,
    ModelState,
    RequestFinished,
    RequestRejected,
    RequestStarted,
    TierCounts,
    TokenGenerated,
)
from .hardware import BUILTIN_PROFILES, HardwareProfile, load_profiles, profile_from_dict
from .kvcache import DEFAULT_BLOCK_SIZE, block_hashes
from .memory import TransferLedger, WeightTiers
from .timing import (
    cold_load_time,
    decode_step_time,
    decode_tokens_per_second,
    forward_time,
    kv_transfer_time,
    prefill_time,
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
    "model_from_dict",
    "load_catalog",
    # deployment
    "DeploymentConfig",
    # timing
    "forward_time",
    "prefill_time",
    "decode_step_time",
    "decode_tokens_per_second",
    "switch_time",
    "cold_load_time",
    "kv_transfer_time",
    # memory and KV
    "TransferLedger",
    "WeightTiers",
    "DEFAULT_BLOCK_SIZE",
    "block_hashes",
    # engine
    "NodeEngine",
    "BundleModel",
    "EngineRequest",
    "RequestRejected",
    "EngineEvent",
    "RequestStarted",
    "TokenGenerated",
    "RequestFinished",
    "EngineSnapshot",
    "ModelState",
    "TierCounts",
    # calibration
    "CalibrationRow",
    "calibration_rows",
    "fit_parameters",
]
