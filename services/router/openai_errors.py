"""OpenAI's error shape and request-body rules, shared by every route of the HTTP API.

Chat/completions (`openai_api`) and embeddings/rerank (`encoders_api`) answer failures
alike: one error document (`error_response`, or `sse_error` once a stream has begun), one
rendering of msgspec's decode errors into a 400 naming the field (`invalid_body`), one
reading of the client's own timeout headers (`client_timeout`).
"""

from __future__ import annotations

import math
import re
from typing import Any, TypeVar

import msgspec

from tierflow.runtime.errors import InvalidRequest, RateLimited, TierflowError
from tierflow.services.router.http_server import Request, Response

__all__ = ["client_timeout", "decode_body", "error_response", "invalid_body", "sse_error"]

T = TypeVar("T")
_encode = msgspec.json.encode
_PATH_IN_ERROR = re.compile(r"at `\$\.?([^`]*)`")
_MISSING_FIELD = re.compile(r"missing required field `([^`]+)`")


def _error_body(exc: TierflowError) -> bytes:
    return _encode({"error": {"message": exc.message, "type": exc.error_type, "param": exc.param, "code": exc.code}})


def sse_error(exc: TierflowError) -> bytes:
    """A failure after the 200: an SSE event the official clients raise as an APIError."""
    return b"data: " + _error_body(exc) + b"\n\n"


def error_response(exc: TierflowError) -> Response:
    body = _error_body(exc)
    headers: tuple[tuple[str, str], ...] = ()
    if isinstance(exc, RateLimited) or exc.http_status in (429, 503):
        headers = (("retry-after", str(max(1, round(getattr(exc, "retry_after", 1.0))))),)
    return Response(exc.http_status, body, headers=headers)


def invalid_body(exc: msgspec.MsgspecError) -> InvalidRequest:
    """msgspec's decode error as a 400 naming the field, in OpenAI's words where it has them."""
    text = str(exc)
    if isinstance(exc, msgspec.ValidationError):
        missing = _MISSING_FIELD.search(text)
        where = _PATH_IN_ERROR.search(text)
        if missing:
            parent = where.group(1) if where else ""
            param = f"{parent}.{missing.group(1)}" if parent else missing.group(1)
            return InvalidRequest(f"'{param}' is a required property: {text}", param=param)
        param = where.group(1) if where else None
        return InvalidRequest(f"Invalid value for '{param}': {text}" if param else text, param=param)
    return InvalidRequest(f"The request body is not valid JSON: {text}")


def decode_body(raw: bytes, decoder: msgspec.json.Decoder[T], invalid: Any = invalid_body) -> T:
    """The request body as the route's type, or a 400 a person can act on (`invalid` renders
    a decode error: a route may refuse unknown fields by name first)."""
    if not raw:
        raise InvalidRequest("The request body is empty; send a JSON object")
    try:
        return decoder.decode(raw)
    except msgspec.MsgspecError as exc:
        raise invalid(exc) from None
    except RecursionError:  # msgspec's own guard, anywhere in the body (unknown fields too)
        raise InvalidRequest("The request body nests JSON too deeply") from None


def client_timeout(request: Request, stream: bool) -> float | None:
    """How long the client will wait, when it says so: `x-tierflow-timeout` (seconds, the
    whole request), or for a non-streamed request the OpenAI SDKs' `x-stainless-read-timeout`
    (they give up reading after it, so work past it is wasted)."""
    raw = request.headers.get("x-tierflow-timeout")
    if raw is not None:
        try:
            seconds = float(raw)
        except ValueError:
            seconds = math.nan
        if not (math.isfinite(seconds) and seconds > 0):
            raise InvalidRequest(f"x-tierflow-timeout must be a positive number of seconds, got {raw[:40]!r}", param="x-tierflow-timeout")
        return seconds
    raw = request.headers.get("x-stainless-read-timeout")
    if raw is not None and not stream:
        try:
            seconds = float(raw)
        except ValueError:
            return None
        return seconds if math.isfinite(seconds) and seconds > 0 else None
    return None
