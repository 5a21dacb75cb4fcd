"""Fixtures for whole-fabric tests: `tierflow up` run as a user would run it."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tierflow.harness import Fabric, start_fabric

REPO = Path(__file__).resolve().parents[2]

@pytest.fixture(scope="session")
def fabric(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fabric]:
    """The README's fabric (`tierflow up` with the example fleet), shared by the session."""
    # --actuator none: the shared fabric keeps its two nodes for the whole session (the
    # autoscaler would give one back when idle); autoscaling has its own fabric tests.
    running = start_fabric(tmp_path_factory.mktemp("fabric"), "--actuator", "none", cwd=REPO)
    try:
        yield running
    finally:
        running.stop()

@pytest.fixture(scope="session")
def fabric_factory() -> Callable[..., Fabric]:
    """`start_fabric` for tests that need a fabric of their own (they kill parts of it)."""
    return lambda *args, **kw: start_fabric(*args, cwd=REPO, **kw)

@pytest.fixture(scope="session")
def repo_root() -> Path:
    return REPO
