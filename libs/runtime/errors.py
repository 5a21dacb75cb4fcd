"""The fabric's error hierarchy, and the one place wire errors map to it.

    TierflowError               code, message, http_status, retryable
    ├── InvalidRequest          400: the caller must change the request
    ├── Unauthenticated         401
    ├── PermissionDenied        403: authenticated, but not allowed this (a class, a policy)
    ├── ModelNotFound           404
    ├── RateLimited             429 (+ retry_after)
    ├── NoCapacity              503: nothing can serve it now (no node, residency boundary)
    ├── NodeFailure             502/503: a node failed or vanished while serving
    └── DeadlineExceeded        504: the request's own deadline passed before it finished

The router turns these into OpenAI error bodies and gRPC status codes; nodes send
them as `messages.Failed` with the same `code`.

Every 5xx has OpenAI's one server-side `type`, `server_error` (what the OpenAI API
sends with its 500s, and with its 503 "model overloaded" on chat completions), so a
client branches on the status and `type` as it would against OpenAI; what went wrong
stays in `code` (`no_capacity`, `node_lost`, `deadline_exceeded`, ...), which is also
the gRPC ErrorInfo reason.
"""

from __future__ import annotations

__all__ = [
    "TierflowError",
    "InvalidRequest",
    "Unauthenticated",
    "PermissionDenied",
    "ModelNotFound",
    "RateLimited",
    "NoCapacity",
    "NodeFailure",
    "DeadlineExceeded",
    "SERVER_ERROR",
]

SERVER_ERROR = "server_error"
"""The OpenAI error `type` of every 5xx (the `code` says which failure it was)."""


class TierflowError(Exception):
    http_status = 500
    error_type = SERVER_ERROR
    default_code = "internal_error"  # the `code` of a 5xx raised without one (a 5xx always names its failure)

    def __init__(self, message: str, *, code: str | None = None, param: str | None = None, retryable: bool = False) -> None:
        super().__init__(message)
        self.message = message
        self.code = code if code is not None or self.http_status < 500 else self.default_code
        self.param = param
        self.retryable = retryable


class InvalidRequest(TierflowError):
    http_status = 400
    error_type = "invalid_request_error"


class Unauthenticated(TierflowError):
    http_status = 401
    error_type = "authentication_error"


class PermissionDenied(TierflowError):
    """The tenant is known but may not do this: ask for a request class above its own, or
    go on with an agent session its policy has stopped. Changing the request helps, retrying does not."""

    http_status = 403
    error_type = "permission_error"


class ModelNotFound(TierflowError):
    http_status = 404
    error_type = "invalid_request_error"


class RateLimited(TierflowError):
    http_status = 429
    error_type = "rate_limit_error"

    def __init__(self, message: str, *, retry_after: float = 1.0, code: str | None = "rate_limit_exceeded") -> None:
        super().__init__(message, code=code)
        self.retry_after = retry_after


class NoCapacity(TierflowError):
    http_status = 503
    error_type = SERVER_ERROR
    default_code = "no_capacity"


class NodeFailure(TierflowError):
    http_status = 502
    error_type = SERVER_ERROR
    default_code = "node_failure"


class DeadlineExceeded(TierflowError):
    """The caller's deadline (its timeout header, gRPC deadline, or the tenant's default)
    passed first: the work was dropped everywhere, retrying with the same deadline will not help."""

    http_status = 504
    error_type = SERVER_ERROR
    default_code = "deadline_exceeded"
