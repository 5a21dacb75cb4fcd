"""API keys as clients send them: `Authorization: Bearer <key>` (HTTP header or gRPC metadata)."""

from __future__ import annotations

__all__ = ["bearer_token"]


def bearer_token(value: str | None) -> str | None:
    """The key in an Authorization value; a bare key is accepted too (some clients omit the scheme)."""
    if not value:
        return None
    scheme, _, key = value.partition(" ")
    return key.strip() if scheme.lower() == "bearer" else value.strip()
