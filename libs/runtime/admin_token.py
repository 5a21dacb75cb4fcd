"""The registry's admin token on disk, and how a client sends it.

`tierflow up` keeps one token per data dir, DATA/auth/admin.token (mode 0600 in a 0700
directory, made on the first run and reused after, so restarts and a second `up` keep
it), and gives the registry the file (`--admin-token-file`). Clients on the same machine
find it there; elsewhere they are given it (`--admin-token`, TIERFLOW_ADMIN_TOKEN).

    ensure_admin_token(data_dir)             the file, made if missing
    find_admin_token(explicit, data_dir)     the token a client should send, or None
    admin_metadata(token)                    gRPC metadata: authorization + who is asking
    with_admin_metadata(channel, token)      a sync channel that sends it with every call

(DATA/auth also holds the NATS credentials `tierflow up` makes: `*.creds`, another
helper's files; this module touches only `admin.token`.)
"""

from __future__ import annotations

import contextlib
import getpass
import os
import socket
from pathlib import Path
from typing import Any, Final

from tierflow.runtime.secret_hash import new_secret

__all__ = ["TOKEN_ENV", "TOKEN_FILE", "admin_token_path", "ensure_admin_token", "find_admin_token", "admin_metadata", "who_am_i", "with_admin_metadata"]

TOKEN_ENV: Final = "TIERFLOW_ADMIN_TOKEN"
TOKEN_FILE: Final = Path("auth") / "admin.token"
USER_METADATA: Final = "x-tierflow-user"  # the registry records it beside the identity (claimed, not proof)


def admin_token_path(data_dir: Path) -> Path:
    return data_dir / TOKEN_FILE


def ensure_admin_token(data_dir: Path) -> Path:
    """DATA/auth/admin.token, made (0600, 256 random bits) if it is not there yet."""
    path = admin_token_path(data_dir)
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    if path.exists() and path.read_text().strip():
        return path
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with contextlib.suppress(FileNotFoundError):
        tmp.unlink()
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as out:
        out.write(new_secret("tfa") + "\n")
    try:
        os.link(tmp, path)  # never replaces a token another `up` wrote meanwhile
    except FileExistsError:
        if not path.read_text().strip():  # an empty file left behind: ours replaces it
            os.replace(tmp, path)
            return path
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
    return path


def find_admin_token(explicit: str, data_dir: Path) -> str | None:
    """`explicit` (a flag or TIERFLOW_ADMIN_TOKEN), else the token of a `tierflow up` on
    `data_dir`, else None (the registry will say what it wants)."""
    if explicit:
        return explicit.strip()
    try:
        text = admin_token_path(data_dir).read_text().strip()
    except OSError:
        return None
    return text or None


def who_am_i() -> str:
    """`user@host`, for the audit record (claimed by the client, not proof of anything)."""
    try:
        user = getpass.getuser()
    except (KeyError, OSError):
        user = str(os.getuid())
    return f"{user}@{socket.gethostname()}"


def admin_metadata(token: str | None) -> tuple[tuple[str, str], ...]:
    """gRPC metadata for an admin call: the token (when there is one) and who asks."""
    who = ((USER_METADATA, who_am_i()),)
    return ((("authorization", f"Bearer {token}"),) + who) if token else who


def with_admin_metadata(channel: Any, token: str | None) -> Any:
    """A (synchronous) gRPC channel that sends `admin_metadata(token)` with every call."""
    import grpc

    metadata = admin_metadata(token)

    class _Details(grpc.ClientCallDetails):  # type: ignore[misc]
        def __init__(self, base: Any) -> None:
            self.method, self.timeout, self.credentials = base.method, base.timeout, base.credentials
            self.wait_for_ready, self.compression = base.wait_for_ready, base.compression
            self.metadata = [*(base.metadata or ()), *metadata]

    class _AddMetadata(grpc.UnaryUnaryClientInterceptor):  # type: ignore[misc]
        def intercept_unary_unary(self, continuation: Any, details: Any, request: Any) -> Any:
            return continuation(_Details(details), request)

    return grpc.intercept_channel(channel, _AddMetadata())
