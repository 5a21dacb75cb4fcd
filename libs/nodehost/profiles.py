"""Which hardware a node emulates: a built-in profile, or one the user declares in a file.

The file is YAML mapping profile names to `tierflow.rdu.HardwareProfile` fields; a
profile may start from a built-in one with `base:` and override only what differs:

    sn40l-16-slow-storage:
      base: sn40l-16
      storage_bw: 5.0e+9   # YAML 1.1 wants the sign in an exponent
"""

from __future__ import annotations

from pathlib import Path

import msgspec

from tierflow.rdu import HardwareProfile, load_profiles

__all__ = ["resolve_profile"]


def resolve_profile(name: str, profiles_file: str = "") -> HardwareProfile:
    extra = None
    if profiles_file:
        try:
            extra = msgspec.yaml.decode(Path(profiles_file).read_bytes(), type=dict[str, dict])
        except OSError as exc:
            raise LookupError(f"cannot read hardware profiles file {profiles_file}: {exc.strerror}") from None
        except msgspec.MsgspecError as exc:
            raise LookupError(f"hardware profiles file {profiles_file}: {exc}") from None
    profiles = load_profiles(extra)
    if name not in profiles:
        raise LookupError(f"hardware profile {name!r} is unknown; known: {', '.join(sorted(profiles))}")
    return profiles[name]
