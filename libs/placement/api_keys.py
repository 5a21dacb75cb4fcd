"""API keys: from the forms configuration may hold them in to "whose key is this, now?".

An entry of a tenant's `api_keys:` is a string, or a mapping with an expiry for rotation:

    api_keys:
      - sha256:5be1c0...:7c18d5...      # salted hash (`tierflow keys new` prints the whole line)
      - {key: "sha256:0d9e4a...:9a6881...", not_after: 2027-01-31T00:00:00Z}   # the old key, until then

Three string forms are read, only the first is recommended:

- `sha256:<salt hex>:<digest hex>`: salted SHA-256 (`tierflow.runtime.secret_hash`);
- `sha256:<64 hex>`: the key's unsalted SHA-256 (older configurations);
- anything else: the key itself, in plain text. Still accepted so existing files keep
  working; `plain` lists where they are, for one deprecation warning (never the key).

Rotation: list the new key beside the old one and give the old one a `not_after`; both
work during the overlap, the old one stops at that instant (the clock is passed in).

Lookup cost: unsalted forms are found by their digest in a dict; salted ones each need
their own hash, so a key is checked against all of them once, and the answer (the entry,
or "no entry") is kept in an LRU keyed by a keyed BLAKE2b of the presented key (a
per-process secret key, so the cache holds neither keys nor their plain hashes). A
cached answer still has its `not_after` checked at every use. Comparisons of digests are
`hmac.compare_digest`. Nothing here logs or raises a key.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from collections import OrderedDict
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Annotated, Final, Generic, TypeVar

import msgspec
from msgspec import Meta

from tierflow.runtime.secret_hash import PREFIX, SaltedHash, is_salted_hash

__all__ = ["ApiKeyEntry", "KeyRing", "DuplicateKey", "BadKeyEntry", "expiry_of"]

T = TypeVar("T")
_CACHE_SIZE: Final = 4096
_MISS: Final = object()


class ApiKeyEntry(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """A key with an expiry (rotation): `key` in any of the string forms, `not_after` an
    ISO 8601 instant (no zone: UTC) after which it no longer authenticates."""

    key: Annotated[str, Meta(min_length=1)]
    not_after: datetime | None = None


def expiry_of(entry: str | ApiKeyEntry) -> float | None:
    """`not_after` as epoch seconds (a zone-less instant is UTC); None: never expires."""
    if isinstance(entry, str) or entry.not_after is None:
        return None
    at = entry.not_after
    return (at if at.tzinfo is not None else at.replace(tzinfo=UTC)).timestamp()


class DuplicateKey(ValueError):
    """The same key is configured twice; `holder` is the owner it already belongs to."""

    def __init__(self, holder: object) -> None:
        super().__init__("duplicate key")
        self.holder = holder


class BadKeyEntry(ValueError):
    """An entry that starts like a hash but is not a valid one (the message says why)."""


@dataclass(frozen=True)
class _Entry(Generic[T]):
    owner: T
    not_after: float | None
    salted: SaltedHash | None = None
    digest: bytes = b""


class KeyRing(Generic[T]):
    """Keys -> their owners (tenants), built once, read per request."""

    def __init__(self) -> None:
        self._by_digest: dict[bytes, _Entry[T]] = {}
        self._salted: list[_Entry[T]] = []
        self._salted_text: dict[str, _Entry[T]] = {}
        self._plain_keys: list[tuple[str, _Entry[T]]] = []  # for the duplicate check only
        self.plain: list[str] = []  # where plain-text keys are configured (for a warning)
        self._cache: OrderedDict[bytes, _Entry[T] | None] = OrderedDict()
        self._cache_key = secrets.token_bytes(32)

    def __len__(self) -> int:
        return len(self._by_digest) + len(self._salted)

    def add(self, text: str, owner: T, *, not_after: float | None = None, where: str = "") -> None:
        """One configured entry. Raises BadKeyEntry for a malformed hash, DuplicateKey when
        the key is already someone's (as far as can be told: a key hashed twice with two
        salts cannot be recognised, and then the first entry wins)."""
        if is_salted_hash(text):
            try:
                salted = SaltedHash.parse(text)
            except ValueError as exc:
                raise BadKeyEntry(str(exc)) from None
            if text in self._salted_text:
                raise DuplicateKey(self._salted_text[text].owner)
            entry = _Entry(owner, not_after, salted=salted)
            for plain, held in self._plain_keys:
                if salted.matches(plain):
                    raise DuplicateKey(held.owner)
            self._salted.append(entry)
            self._salted_text[text] = entry
            return
        if text.startswith(PREFIX):
            try:
                digest = bytes.fromhex(text[len(PREFIX) :])
            except ValueError:
                digest = b""
            if len(digest) != 32:
                raise BadKeyEntry("a 'sha256:' key must be followed by 64 hex digits (or be a salted hash 'sha256:<salt>:<digest>')")
        else:
            digest = hashlib.sha256(text.encode()).digest()
            if where:
                self.plain.append(where)
        held = self._by_digest.get(digest)
        if held is not None:
            raise DuplicateKey(held.owner)
        entry = _Entry(owner, not_after, digest=digest)
        if not text.startswith(PREFIX):
            for other in self._salted:
                if other.salted is not None and other.salted.matches(text):
                    raise DuplicateKey(other.owner)
            self._plain_keys.append((text, entry))
        self._by_digest[digest] = entry

    def done(self) -> None:
        """Construction is over: forget the plain keys kept for the duplicate check."""
        self._plain_keys.clear()

    def lookup(self, key: str, now: float) -> T | None:
        """The owner of `key` at `now` (epoch seconds), or None."""
        tag = hashlib.blake2b(key.encode(), digest_size=16, key=self._cache_key).digest()
        found = self._cache.get(tag, _MISS)
        if found is _MISS:
            found = self._find(key)
            self._cache[tag] = found
            if len(self._cache) > _CACHE_SIZE:
                self._cache.popitem(last=False)
        else:
            self._cache.move_to_end(tag)
        if found is None or (found.not_after is not None and now > found.not_after):  # type: ignore[union-attr]
            return None
        return found.owner  # type: ignore[union-attr]

    def _find(self, key: str) -> _Entry[T] | None:
        digest = hashlib.sha256(key.encode()).digest()
        held = self._by_digest.get(digest)
        if held is not None and hmac.compare_digest(held.digest, digest):
            return held
        for entry in self._salted:
            if entry.salted is not None and entry.salted.matches(key):
                return entry
        return None

    def expired(self, now: float) -> int:
        """How many entries no longer authenticate at `now` (for a note at load)."""
        return sum(1 for e in (*self._by_digest.values(), *self._salted) if e.not_after is not None and now > e.not_after)
