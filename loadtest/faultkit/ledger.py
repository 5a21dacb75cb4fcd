"""Registry writes through the faults: every acknowledged one must survive.

A writer changes one model's traffic split through the registry's gRPC admin API
(`ModelRegistry.SetTraffic`, what `tierflow rollout` does underneath), a few times a
second, for the whole run. Write n sets the split to {v1: n, v2: 1}, so the weight of v1
*is* the write's sequence number and any later read says which write it shows. The
model (`fault-ledger` in the suite's fleet) is never deployed, so no request depends on
it and the registry accepts any split.

The rule (the issue's): every acknowledged write is what the registry holds or is
superseded by a later one. With one writer that means a read may never show a sequence
number below the last write acknowledged before the read began. A reader checks that
twice a second (`GetModel`), and `verify` checks it once more at the end; every
acknowledged write above what such a read returned is *lost*. Writes that failed
(UNAVAILABLE while the registry or NATS is down, DEADLINE_EXCEEDED) were never promised:
they are counted, not judged, and a timed-out write that did land simply shows up as a
higher number.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field

import grpc

from tierflow.runtime.admin_token import admin_metadata
from tierflow.v1 import registry_pb2 as pb
from tierflow.v1.registry_pb2_grpc import ModelRegistryStub

__all__ = ["LEDGER_MODEL", "Ledger", "Write"]

LEDGER_MODEL = "fault-ledger"


@dataclass(slots=True)
class Write:
    seq: int
    sent: float  # wall clock
    acked: float | None = None
    error: str = ""  # the gRPC status code's name when not acknowledged


@dataclass
class Ledger:
    """The writer, the reader and what they saw."""

    target: str  # host:port of the registry's gRPC admin API
    interval: float = 0.25
    timeout: float = 3.0
    admin_token: str | None = None  # the registry's (writes need it): tierflow up's DATA/auth/admin.token
    writes: list[Write] = field(default_factory=list)
    lost: set[int] = field(default_factory=set)  # acknowledged writes a later read did not show
    reads: int = 0
    read_errors: int = 0
    _acked_max: int = 0

    async def run(self, stop: asyncio.Event) -> None:
        async with grpc.aio.insecure_channel(self.target) as channel:
            stub = ModelRegistryStub(channel)
            await asyncio.gather(self._write_loop(stub, stop), self._read_loop(stub, stop))

    async def _write_loop(self, stub: ModelRegistryStub, stop: asyncio.Event) -> None:
        seq = 0
        while not stop.is_set():
            seq += 1
            write = Write(seq, time.time())
            self.writes.append(write)
            request = pb.SetTrafficRequest(model=LEDGER_MODEL, traffic=[pb.TrafficWeight(version="v1", weight=seq), pb.TrafficWeight(version="v2", weight=1)])
            try:
                await stub.SetTraffic(request, timeout=self.timeout, metadata=admin_metadata(self.admin_token))
                write.acked = time.time()
                self._acked_max = max(self._acked_max, seq)
            except grpc.aio.AioRpcError as exc:
                write.error = exc.code().name
            await asyncio.sleep(self.interval)

    async def held(self, stub: ModelRegistryStub) -> int:
        """The sequence number the registry holds now (its v1 weight)."""
        model = await stub.GetModel(pb.GetModelRequest(name=LEDGER_MODEL), timeout=self.timeout)
        return int(next((t.weight for t in model.traffic if t.version == "v1"), 0))

    async def _read_loop(self, stub: ModelRegistryStub, stop: asyncio.Event) -> None:
        while not stop.is_set():
            await self.check(stub)
            await asyncio.sleep(0.5)

    async def check(self, stub: ModelRegistryStub) -> bool:
        """One read judged against the writes acknowledged before it began; False if it failed."""
        floor = self._acked_max
        try:
            held = await self.held(stub)
        except grpc.aio.AioRpcError:
            self.read_errors += 1
            return False
        self.reads += 1
        if held < floor:
            self.lost.update(w.seq for w in self.writes if w.acked is not None and held < w.seq <= floor)
        return True

    async def verify(self, attempts: int = 20) -> bool:
        """The final read (retried while the registry answers nothing); False if none succeeded."""
        async with grpc.aio.insecure_channel(self.target) as channel:
            stub = ModelRegistryStub(channel)
            for _ in range(attempts):
                if await self.check(stub):
                    return True
                await asyncio.sleep(0.5)
        return False

    def summary(self, start: float, end: float) -> dict[str, int]:
        """Writes sent in [start, end): acknowledged, failed (by code), and lost."""
        inside = [w for w in self.writes if start <= w.sent < end]
        out: dict[str, int] = {"sent": len(inside), "acked": sum(w.acked is not None for w in inside), "lost": sum(w.seq in self.lost for w in inside)}
        for w in inside:
            if w.error:
                out[f"failed {w.error}"] = out.get(f"failed {w.error}", 0) + 1
        return out
