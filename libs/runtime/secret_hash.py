"""Secrets (API keys, admin tokens) as configuration may hold them: salted hashes.

    new_secret("sk-tf")        'sk-tf-<43 url-safe characters>' (256 random bits)
    salted_hash(secret)        'sha256:<salt hex>:<digest hex>', digest = SHA-256(salt || secret)
    SaltedHash.parse(text)     the stored form, checked; `.matches(secret)` in constant time

Why SHA-256 and not scrypt or PBKDF2: the secrets hashed here are generated, 256 random
bits each, so no dictionary or brute force reaches them and a slow hash would protect
nothing; it would only make every request (and every wrong key an attacker sends) cost
milliseconds of CPU. The salt keeps two installations' hashes of the same secret apart
and defeats precomputed tables. Comparison is `hmac.compare_digest`.

Nothing here logs, and no message it raises contains a secret.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from dataclasses import dataclass
from typing import Final

__all__ = ["PREFIX", "SaltedHash", "new_secret", "salted_hash", "is_salted_hash"]

PREFIX: Final = "sha256:"
_SALT_BYTES: Final = 16


def new_secret(prefix: str) -> str:
    """A fresh secret: `prefix-` and 256 random bits, URL-safe (fits a header, a YAML line)."""
    return f"{prefix}-{secrets.token_urlsafe(32)}"


def _digest(salt: bytes, secret: str) -> bytes:
    return hashlib.sha256(salt + secret.encode()).digest()


def salted_hash(secret: str, *, salt: bytes | None = None) -> str:
    """The stored form of `secret`: 'sha256:<salt hex>:<digest hex>' with a fresh salt."""
    salt = salt if salt is not None else secrets.token_bytes(_SALT_BYTES)
    return f"{PREFIX}{salt.hex()}:{_digest(salt, secret).hex()}"


def is_salted_hash(text: str) -> bool:
    """Does `text` have the salted form's shape ('sha256:<hex>:<hex>')? (Not checked further.)"""
    return text.startswith(PREFIX) and text.count(":") == 2


@dataclass(frozen=True)
class SaltedHash:
    salt: bytes
    digest: bytes

    @classmethod
    def parse(cls, text: str) -> SaltedHash:
        """The stored form; ValueError (naming what is wrong, never echoing `text`) otherwise."""
        if not is_salted_hash(text):
            raise ValueError("a salted hash is written 'sha256:<salt hex>:<64 hex digits>'")
        salt_hex, digest_hex = text[len(PREFIX) :].split(":")
        try:
            salt, digest = bytes.fromhex(salt_hex), bytes.fromhex(digest_hex)
        except ValueError:
            raise ValueError("a salted hash's salt and digest must be hex digits") from None
        if not salt or len(digest) != 32:
            raise ValueError("a salted hash needs a non-empty salt and a 64-hex-digit SHA-256 digest")
        return cls(salt, digest)

    def matches(self, secret: str) -> bool:
        """Is `secret` the one hashed? Constant time in the comparison."""
        return hmac.compare_digest(self.digest, _digest(self.salt, secret))
