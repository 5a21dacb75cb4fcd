"""The TLS files of the CLI's own connections (NATS for `status`, `nodes`, `top`; gRPC for
`apply`, `models`, `rollout`, ...).

In order: `--tls-ca/--tls-cert/--tls-key` given before the command (`tierflow --tls-ca
ca.pem status`) or TIERFLOW_TLS_CA / TIERFLOW_TLS_CERT / TIERFLOW_TLS_KEY; else the client
certificate of a `tierflow up --tls` running on the data dir (`.tierflow`, or
TIERFLOW_DATA_DIR); else none, and the CLI speaks plain. Read when a command connects,
never at import.
"""

from __future__ import annotations

import os
from pathlib import Path

from tierflow.runtime.tls import TlsFiles, cli_client_files

__all__ = ["DATA_DIR_ENV", "cli_tls"]

DATA_DIR_ENV = "TIERFLOW_DATA_DIR"
DEFAULT_DATA_DIR = ".tierflow"  # `tierflow up --data-dir`'s default


def cli_tls() -> TlsFiles | None:
    """The files to connect with, or None for a plain connection."""
    return cli_client_files(os.environ, Path(os.environ.get(DATA_DIR_ENV) or DEFAULT_DATA_DIR))
