"""Child processes that cannot outlive their parent.

`tierflow up`, the test fixtures and (later) the local actuator start processes; if the
parent is killed hard (SIGKILL, OOM), those children must not linger holding ports.
On Linux, PR_SET_PDEATHSIG asks the kernel to signal the child when its parent dies.
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys
from collections.abc import Callable

__all__ = ["die_with_parent_preexec"]

_PR_SET_PDEATHSIG = 1


def die_with_parent_preexec(sig: signal.Signals = signal.SIGTERM) -> Callable[[], None] | None:
    """A `preexec_fn` that makes the child receive `sig` when its parent dies (Linux only).

    libc is loaded now, in the parent, so the forked child only makes the call. If the
    parent already died between fork() and prctl(), the child signals itself, closing
    the race. Returns None where prctl does not exist.
    """
    if not sys.platform.startswith("linux"):
        return None
    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None
    parent = os.getpid()
    signum = int(sig)

    def preexec() -> None:
        if prctl(_PR_SET_PDEATHSIG, signum, 0, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG) failed")
        if os.getppid() != parent:
            os.kill(os.getpid(), signum)

    return preexec
