"""`tierflow sim` (being built)."""

from __future__ import annotations


def sim() -> None:
    raise SystemExit("not built yet")
