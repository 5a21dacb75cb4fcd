"""Who may change the registry: the admin credential, checked before an admin call runs.

A call proves itself one of two ways:

- a token, as gRPC metadata `authorization: Bearer <token>`, matched (constant time)
  against the registry's salted hashes of its admin tokens: identity `token:admin`.
  The registry is given the token as `--admin-token-file FILE` (what `tierflow up` passes:
  DATA/auth/admin.token, made on its first run), `TIERFLOW_ADMIN_TOKEN`, or only its
  salted hash(es), `--admin-token-hash` (comma separated: old and new during a rotation);
- a client certificate, when the port speaks TLS and the client presented one the CA
  verified: identity `cert:<CN>`, admitted when the CN is one of `--admin-cert-names`.
  (The TLS side, asking clients for certificates, is the TLS setup's; this reads what
  gRPC's auth context says about the peer.)

Which calls need it: every call of `tierflow.v1.ModelRegistry` except the reads in
`READS` (ListModels, GetModel, ListDeployments, ListBundles), which stay open unless
`--protect-reads`: they show the fleet, which every router and node reads from NATS
anyway, and `tierflow status` style tools should not need a secret. A method added to
the service later is protected until it is listed as a read (fail closed). Health and
reflection are never protected.

A registry with no credential configured refuses every protected call, naming the flags
that would configure one; `--allow-unauthenticated-admin` turns the check off (a trusted
test box), and then every caller is `unauthenticated`.

What the check found travels to the servicer in `CALLER` (a contextvar set around the
call), so its log record and audit record name the identity. The claimed user
(`x-tierflow-user` metadata: the CLI sends `user@host`) is carried for the record only;
it proves nothing.
"""

from __future__ import annotations

import logging
import os
import stat
from collections.abc import Awaitable, Callable, Mapping, Sequence
from contextvars import ContextVar
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import grpc

from tierflow.contracts.audit import ANONYMOUS
from tierflow.runtime.admin_token import USER_METADATA
from tierflow.runtime.secret_hash import SaltedHash, salted_hash

__all__ = ["AdminAuth", "AdminAuthInterceptor", "Caller", "CALLER", "READS", "USER_METADATA", "UNAUTHENTICATED_ADMIN"]

log = logging.getLogger(__name__)

READS: Final = frozenset({"ListModels", "GetModel", "ListDeployments", "ListBundles"})
UNAUTHENTICATED_ADMIN: Final = "unauthenticated"  # the identity when the check is turned off
_CN: Final = "x509_common_name"


@dataclass(frozen=True)
class Caller:
    """Who is calling, as far as the credential check could tell."""

    identity: str  # token:admin | cert:<CN> | anonymous | unauthenticated (check off)
    authenticated: bool
    user: str = ""  # claimed by the client (x-tierflow-user), for the record only
    peer: str = ""
    problem: str = ""  # why not authenticated (for the refusal), never containing a secret


CALLER: ContextVar[Caller | None] = ContextVar("tierflow_registry_caller", default=None)


def _bearer(value: str | None) -> str:
    if not value:
        return ""
    scheme, _, token = value.partition(" ")
    return token.strip() if scheme.lower() == "bearer" else ""


class AdminAuth:
    """The registry's admin credentials and the rule of which calls need one."""

    def __init__(
        self, tokens: Sequence[SaltedHash] = (), *, cert_names: Sequence[str] = (), protect_reads: bool = False, enforce: bool = True
    ) -> None:
        self._tokens = tuple(tokens)
        self._cert_names = frozenset(n for n in cert_names if n)
        self.protect_reads = protect_reads
        self.enforce = enforce

    @classmethod
    def from_settings(cls, *, token: str = "", token_file: str = "", token_hash: str = "", cert_names: str = "",
                      protect_reads: bool = False, allow_unauthenticated: bool = False) -> AdminAuth:  # fmt: skip
        """From the registry's flags; ValueError naming the flag when one cannot be used."""
        tokens: list[SaltedHash] = []
        if token_file:
            tokens.append(SaltedHash.parse(salted_hash(read_token_file(token_file))))
        if token:
            tokens.append(SaltedHash.parse(salted_hash(token)))
        for i, text in enumerate(t.strip() for t in token_hash.split(",") if t.strip()):
            try:
                tokens.append(SaltedHash.parse(text))
            except ValueError as exc:
                raise ValueError(f"--admin-token-hash entry {i}: {exc} (`tierflow keys hash` prints one)") from None
        auth = cls(tokens, cert_names=[n.strip() for n in cert_names.split(",")], protect_reads=protect_reads, enforce=not allow_unauthenticated)
        if not auth.enforce:
            log.warning("admin calls are not authenticated (--allow-unauthenticated-admin): anyone who reaches the registry's port may change the fleet")
        elif not auth.configured:
            log.warning("no admin credential configured: every admin write is refused (UNAUTHENTICATED). %s", _HOW_TO_CONFIGURE)
        return auth

    @property
    def configured(self) -> bool:
        return bool(self._tokens or self._cert_names)

    def protects(self, method: str) -> bool:
        """Does `method` (a ModelRegistry method name) need the credential?"""
        return self.enforce and (self.protect_reads or method not in READS)

    def caller(self, metadata: Mapping[str, str], auth_context: Mapping[str, Sequence[bytes]], peer: str = "") -> Caller:
        user = metadata.get(USER_METADATA, "")[:200]
        if not self.enforce:
            return Caller(UNAUTHENTICATED_ADMIN, True, user, peer)
        cn = next(iter(auth_context.get(_CN) or ()), b"").decode(errors="replace")
        # mTLS hook: gRPC Python either verifies a client certificate against the CA
        # (`require_client_auth=True`) or does not ask for one, so a CN here was verified.
        if cn and cn in self._cert_names:
            return Caller(f"cert:{cn}", True, user, peer)
        token = _bearer(metadata.get("authorization"))
        if token and any(t.matches(token) for t in self._tokens):
            return Caller("token:admin", True, user, peer)
        if not self.configured:
            problem = f"this registry has no admin credential configured, so it refuses every admin write. {_HOW_TO_CONFIGURE}"
        elif token:
            problem = "the admin token sent is not valid for this registry"
        elif cn:
            problem = f"the client certificate's CN {cn!r} is not one of the registry's --admin-cert-names, and no admin token was sent"
        else:
            problem = ("this call needs the admin credential: send gRPC metadata `authorization: Bearer <token>` (the tierflow "
                       "CLI reads --admin-token, TIERFLOW_ADMIN_TOKEN or DATA/auth/admin.token of `tierflow up`)")  # fmt: skip
        return Caller(ANONYMOUS, False, user, peer, problem)


_HOW_TO_CONFIGURE: Final = (
    "Give the registry --admin-token-file FILE, TIERFLOW_ADMIN_TOKEN or --admin-token-hash "
    "(or --allow-unauthenticated-admin on a trusted machine)"
)


def read_token_file(path: str) -> str:
    """The token in `path` (surrounding whitespace dropped); ValueError with what to do.
    A file others may read is used, with a warning: the token is a password."""
    try:
        text = Path(path).read_text().strip()
        mode = os.stat(path).st_mode
    except OSError as exc:
        raise ValueError(f"--admin-token-file {path}: cannot read it ({exc.strerror})") from None
    if not text:
        raise ValueError(f"--admin-token-file {path} is empty")
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        log.warning("admin token file %s may be read by other users (mode %o); chmod 600 it", path, stat.S_IMODE(mode))
    return text


Refused = Callable[[str, Caller, Any], None]  # method, caller, the request (decoded)


class AdminAuthInterceptor(grpc.aio.ServerInterceptor):
    """Checks the credential of every call to `service` (a full name) before it runs.

    A protected call without it is answered UNAUTHENTICATED and reported to `on_refused`
    (method, caller, request); every call that goes ahead runs with `CALLER` set.
    """

    def __init__(self, auth: AdminAuth, service: str, on_refused: Refused) -> None:
        self._auth = auth
        self._prefix = f"/{service}/"
        self._on_refused = on_refused

    async def intercept_service(
        self, continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]], details: grpc.HandlerCallDetails
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(details)
        if handler is None or not details.method.startswith(self._prefix):  # type: ignore[attr-defined]
            return handler
        method = details.method[len(self._prefix) :]  # type: ignore[attr-defined]
        inner = handler.unary_unary
        auth, on_refused = self._auth, self._on_refused
        if inner is None:  # every ModelRegistry method is unary: another kind is not waved through (UNIMPLEMENTED)
            return None if auth.protects(method) else handler  # type: ignore[return-value]

        async def behavior(request: Any, context: grpc.aio.ServicerContext) -> Any:
            caller = auth.caller(dict(context.invocation_metadata() or ()), context.auth_context() or {}, context.peer())
            if auth.protects(method) and not caller.authenticated:
                on_refused(method, caller, request)
                await context.abort(grpc.StatusCode.UNAUTHENTICATED, f"{method}: {caller.problem}")
            token = CALLER.set(caller)
            try:
                return await inner(request, context)
            finally:
                CALLER.reset(token)

        return grpc.unary_unary_rpc_method_handler(
            behavior, request_deserializer=handler.request_deserializer, response_serializer=handler.response_serializer
        )
