"""Fixtures shared by tests/deploy's modules."""

from __future__ import annotations

from pathlib import Path

import pytest
from deploy_checks import run_init_secrets


@pytest.fixture(scope="session")
def init_secrets(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """deploy/secrets as the first `docker compose up` leaves it: deploy/init-secrets.sh (what
    the one-shot service secrets-init runs), once per session. Tests must not change it."""
    secrets = tmp_path_factory.mktemp("init-secrets") / "secrets"
    first = run_init_secrets(secrets)
    assert first.returncode == 0, first.stdout + first.stderr
    return secrets


@pytest.fixture(scope="session")
def init_secrets_tls(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """deploy/secrets as `docker-compose ... -f docker-compose.tls.yml up` leaves it (TLS files too)."""
    secrets = tmp_path_factory.mktemp("init-secrets-tls") / "secrets"
    first = run_init_secrets(secrets, tls=True)
    assert first.returncode == 0, first.stdout + first.stderr
    return secrets
