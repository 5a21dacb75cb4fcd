"""Which hardware a node emulates: a built-in profile, or one the user declares in a file.

The file is YAML mapping profile names to `tierflow.rdu.HardwareProfile` fields; a
profile may start from a built-in one with `base:` and override only what differs:

    sn40l-16-slow-storage:
      base: sn40l-16
      storage_bw: 5.0e+9   # YAML 1.1 wants the sign in an exponent
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import msgspec

from tierflow.rdu import HardwareProfile, load_profiles

__all__ = ["read_profiles_file", "resolve_profile"]


def read_profiles_file(path: str) -> dict[str, dict[str, Any]] | None:
    """The file's profiles (name -> fields), None without a file; ValueError names the problem."""
    if not path:
        return None
    try:
        return msgspec.yaml.decode(Path(path).read_bytes(), type=dict[str, dict[str, Any]])
    except OSError as exc:
        raise ValueError(f"cannot read hardware profiles file {path}: {exc.strerror}") from None
    except msgspec.MsgspecError as exc:
        raise ValueError(f"hardware profiles file {path}: {exc}") from None


def resolve_profile(name: str, profiles_file: str = "") -> HardwareProfile:
    profiles = load_profiles(read_profiles_file(profiles_file))
    if name not in profiles:
        raise LookupError(f"hardware profile {name!r} is unknown; known: {', '.join(sorted(profiles))}")
    return profiles[name]
