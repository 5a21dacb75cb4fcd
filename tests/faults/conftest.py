"""The fault suite's code lives in loadtest/faultkit (a benchmark's package, not part of
the installed `tierflow`): these tests import it from there."""

from __future__ import annotations

import sys
from pathlib import Path

LOADTEST = Path(__file__).resolve().parents[2] / "loadtest"
if str(LOADTEST) not in sys.path:
    sys.path.insert(0, str(LOADTEST))
