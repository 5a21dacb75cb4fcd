"""DATA/children.json: which processes `tierflow up` runs right now, for tools outside it.

Why a file: fault tests and benchmarks must find the process to kill (a router, one NATS
member, the registry) and see that it came back, without asking a fabric that may be
half down. `tierflow up` rewrites the file on every start, exit, restart and stop;
the write is atomic (a temporary file renamed over the old one), so a reader sees the
previous version or the next one, never half of one.

Format (JSON): `{"pid": <tierflow up's pid>, "children": [ChildRecord, ...]}` in start
order. A child's `state` is `running`, `restarting` (died, waiting out its backoff),
`given-up` (died too often, not restarted) or `exited` (died, not handled yet).
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Collection
from pathlib import Path
from typing import Literal

import msgspec

from tierflow.cli.supervisor import Supervisor

__all__ = ["ChildRecord", "ChildrenFile", "read_children", "snapshot", "write_children"]

FILE_NAME = "children.json"
State = Literal["running", "restarting", "given-up", "exited"]


class ChildRecord(msgspec.Struct, kw_only=True):
    """One child: its name (unique), role (`nats`, `router`, `decode-node`, ...), current
    pid, how often it was restarted, its state, its exit status if dead, and its log."""

    name: str
    role: str
    pid: int
    restarts: int = 0
    state: State = "running"
    returncode: int | None = None
    log: str = ""


class ChildrenFile(msgspec.Struct, kw_only=True):
    pid: int
    children: list[ChildRecord] = []


_encode = msgspec.json.Encoder().encode
_decode = msgspec.json.Decoder(ChildrenFile).decode


def snapshot(supervisor: Supervisor, *, restarting: Collection[str] = (), given_up: Collection[str] = ()) -> list[ChildRecord]:
    """The supervisor's children as records; `restarting` / `given_up` name dead ones' fate."""
    records = []
    for child in supervisor.children:
        state: State = "running"
        if child.returncode is not None:
            state = "restarting" if child.name in restarting else "given-up" if child.name in given_up else "exited"
        records.append(ChildRecord(name=child.name, role=child.role, pid=child.pid, restarts=child.restarts, state=state,
                                   returncode=child.returncode, log=str(child.spec.log_path)))  # fmt: skip
    return records


def write_children(path: Path, records: list[ChildRecord], *, pid: int | None = None) -> None:
    """Replace `path` atomically with `records` (the directory is created if needed)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    data = _encode(ChildrenFile(pid=os.getpid() if pid is None else pid, children=records))
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as file:
            file.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)  # no stray temporary files beside the real one
        raise


def read_children(path: Path) -> list[ChildRecord]:
    """The records in `path`; FileNotFoundError if `tierflow up` has not written it yet,
    ValueError (naming the file) if it is not a children file."""
    try:
        return _decode(path.read_bytes()).children
    except msgspec.DecodeError as exc:
        raise ValueError(f"{path} is not a tierflow children file: {exc}") from None
