"""User-declared hardware profiles for nodes."""

from __future__ import annotations

import pathlib

import pytest

from tierflow.nodehost.profiles import resolve_profile


def test_builtin_and_user_profiles(tmp_path: pathlib.Path) -> None:
    assert resolve_profile("sn40l-16").sockets == 16
    f = tmp_path / "profiles.yaml"
    f.write_text("slow-storage:\n  base: sn40l-16\n  storage_bw: 5.0e+9\n")
    custom = resolve_profile("slow-storage", str(f))
    assert custom.storage_bw == 5.0e9 and custom.sockets == 16


def test_unknown_profile_and_bad_file_are_clear(tmp_path: pathlib.Path) -> None:
    with pytest.raises(LookupError, match="known: .*sn40l-16"):
        resolve_profile("nope")
    with pytest.raises(ValueError, match="cannot read"):
        resolve_profile("x", str(tmp_path / "missing.yaml"))
    bad = tmp_path / "bad.yaml"
    bad.write_text("p:\n  base: sn40l-16\n  sockets: many\n")
    with pytest.raises((LookupError, ValueError), match="sockets"):
        resolve_profile("p", str(bad))
