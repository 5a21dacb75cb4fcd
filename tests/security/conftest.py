"""One small fabric for the security tests that need one (fuzzers, slow headers): one
decode node, no prefill node, no autoscaling, a 1 s header deadline so a slow-header
test ends in seconds. Shared by the package: the fuzzers prove it survives them, in
file order (gRPC, HTTP, NATS, slow headers), each checking it still serves."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tierflow.harness import Fabric, start_fabric

REPO = Path(__file__).resolve().parents[2]
HEADER_TIMEOUT = 1.0


@pytest.fixture(scope="package")
def header_timeout() -> float:
    """The fabric's router header deadline, seconds."""
    return HEADER_TIMEOUT


@pytest.fixture(scope="package")
def fabric(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fabric]:
    running = start_fabric(
        tmp_path_factory.mktemp("security"), "--decode-nodes", "1", "--prefill-nodes", "0", "--actuator", "none",
        cwd=REPO, env={"TIERFLOW_HEADER_TIMEOUT": str(HEADER_TIMEOUT)},
    )  # fmt: skip
    try:
        yield running
    finally:
        running.stop()
