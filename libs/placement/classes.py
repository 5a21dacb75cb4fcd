"""Request classes: which work goes first where queues form.

Three classes, in strict priority: `interactive` (a person is waiting), `standard` (the
default), `batch` (throughput work that may wait). A tenant has a default class and the
highest class it may ask for (`TenantPolicy.request_class`, `max_class`); a request asks
with OpenAI's `service_tier` field or the `x-tierflow-class` header, and asking above the
tenant's allowance is a 403 that names both, never a silent downgrade (a client that
believes it is interactive and is not would misread its own latencies).

Within a class, tenants share by weight (`TenantPolicy.weight`): the router's admission
and the node's batch admission both pick the tenant that has received the least
weighted service, as virtual-time fair queuing (VTC, llm-d's flow control) does.
"""

from __future__ import annotations

from typing import Final, get_args

from tierflow.contracts.messages import RequestClass
from tierflow.runtime.errors import InvalidRequest, PermissionDenied

__all__ = ["RequestClass", "CLASSES", "CLASS_RANK", "OPENAI_SERVICE_TIERS", "resolve_class"]

CLASSES: Final[tuple[RequestClass, ...]] = get_args(RequestClass)
CLASS_RANK: Final[dict[str, int]] = {name: rank for rank, name in enumerate(CLASSES)}
"""0 is served first: a lower rank always goes before a higher one where both wait."""

OPENAI_SERVICE_TIERS: Final[dict[str, RequestClass | None]] = {
    "auto": None,  # the tenant's default class
    "default": "standard",
    "priority": "interactive",
    "flex": "batch",
    "scale": "interactive",
}
"""OpenAI's `service_tier` values and the class each asks for (None: the tenant's default),
so a client written for OpenAI's tiers ports unchanged."""


def resolve_class(asked: str | None, default: RequestClass, highest: RequestClass, *, tenant: str = "", param: str = "service_tier") -> RequestClass:
    """The class a request runs in: `asked` (a class name or an OpenAI `service_tier`),
    else `default`. A name that is neither is a 400; a class above `highest` a 403."""
    if asked is None or asked == "":
        return default
    if asked in CLASS_RANK:
        wanted: RequestClass = asked  # type: ignore[assignment]
    elif asked in OPENAI_SERVICE_TIERS:
        tier = OPENAI_SERVICE_TIERS[asked]
        wanted = default if tier is None else tier
    else:
        names = ", ".join([*CLASSES, *OPENAI_SERVICE_TIERS])
        raise InvalidRequest(f"Unknown request class {asked!r}; use one of: {names}.", param=param, code="invalid_request_class")
    if CLASS_RANK[wanted] < CLASS_RANK[highest]:
        who = f"tenant {tenant!r}" if tenant else "this tenant"
        raise PermissionDenied(
            f"Request class {wanted!r} is above what {who} may use (at most {highest!r}); ask for {highest!r} or lower.",
            param=param, code="request_class_not_allowed",
        )
    return wanted
