"""Deployment configurations: a (sequence length, batch size) pair and its canonical name.

The SambaStack naming is ``ss<seq_len>-bs<batch>`` with an optional continuous-batching
range ``-cb<lo>-<hi>``: ``ss8192-bs4`` serves up to 4 sequences of 8,192 tokens at once;
``ss16384-bs1-cb2-128`` has a batch-1 graph plus continuous batching from 2 to 128, so up
to 128 requests run together. The model name clients use never changes with the config.
"""

from __future__ import annotations

import re
from typing import Annotated, Final

import msgspec

__all__ = ["DeploymentConfig"]

_NAME: Final = re.compile(r"ss(?P<ss>\d+)-bs(?P<bs>\d+)(?:-cb(?P<lo>\d+)-(?P<hi>\d+))?")
_EXAMPLES: Final = "e.g. 'ss8192-bs4' or 'ss16384-bs1-cb2-128'"

_PosInt = Annotated[int, msgspec.Meta(gt=0)]


class DeploymentConfig(msgspec.Struct, frozen=True):
    """`batch_size` is the most requests the model runs at once (the cb upper bound if any)."""

    seq_len: _PosInt
    batch_size: _PosInt
    static_batch: _PosInt  # the bsN part of the name
    cb_min: _PosInt | None = None  # continuous batching lower bound; None: static batching only

    def __post_init__(self) -> None:
        if self.cb_min is None:
            if self.batch_size != self.static_batch:
                raise ValueError(
                    f"without continuous batching batch_size ({self.batch_size}) must equal"
                    f" static_batch ({self.static_batch})"
                )
        elif not (self.cb_min <= self.batch_size and self.static_batch <= self.batch_size):
            raise ValueError(
                f"continuous batching range cb{self.cb_min}-{self.batch_size} must be ordered"
                f" and cover bs{self.static_batch}"
            )

    @classmethod
    def parse(cls, name: str) -> DeploymentConfig:
        """Parse a config name; a ValueError says what is wrong and shows the format."""
        if not isinstance(name, str):
            raise ValueError(
                f"deployment config must be a string ({_EXAMPLES}), got {type(name).__name__}"
            )
        m = _NAME.fullmatch(name.strip())
        if m is None:
            raise ValueError(
                f"malformed deployment config {name!r}: expected"
                f" 'ss<seq_len>-bs<batch>[-cb<min>-<max>]', {_EXAMPLES}"
            )
        ss, bs = int(m["ss"]), int(m["bs"])
        if ss <= 0 or bs <= 0:
            raise ValueError(
                f"deployment config {name!r}: sequence length and batch size must be >= 1"
            )
        if m["lo"] is None:
            return cls(seq_len=ss, batch_size=bs, static_batch=bs)
        lo, hi = int(m["lo"]), int(m["hi"])
        if not 0 < lo <= hi:
            raise ValueError(
                f"deployment config {name!r}: continuous batching range cb{lo}-{hi} must satisfy"
                " 1 <= min <= max"
            )
        if hi < bs:
            raise ValueError(
                f"deployment config {name!r}: continuous batching max {hi} is below the static"
                f" batch size {bs}; raise the cb max or lower bs"
            )
        return cls(seq_len=ss, batch_size=hi, static_batch=bs, cb_min=lo)

    @property
    def name(self) -> str:
        base = f"ss{self.seq_len}-bs{self.static_batch}"
        return base if self.cb_min is None else f"{base}-cb{self.cb_min}-{self.batch_size}"

    @property
    def continuous(self) -> bool:
        return self.cb_min is not None

    def __str__(self) -> str:
        return self.name
