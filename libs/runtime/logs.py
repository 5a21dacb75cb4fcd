"""Structured logging: one JSON object per line on stderr, from every service.

Per-request records (the router's `request` record, the node's `served` record) carry
their fields under `extra={"fields": {...}}`; they land at the top level of the JSON so a
log pipeline can index them without parsing a message string.
"""

from __future__ import annotations

import logging
import sys
import time
from typing import Any

import msgspec

__all__ = ["configure_logging", "JsonFormatter"]

_encode = msgspec.json.Encoder().encode


class JsonFormatter(logging.Formatter):
    def __init__(self, service: str) -> None:
        super().__init__()
        self._service = service

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "ts": round(record.created, 6),
            "level": record.levelname.lower(),
            "service": self._service,
            "logger": record.name,
            "msg": record.getMessage(),
        }
        fields = getattr(record, "fields", None)
        if fields:
            out.update(fields)
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        try:
            return _encode(out).decode()
        except TypeError:
            return _encode({k: (v if isinstance(v, (int, float, str, bool, type(None))) else repr(v)) for k, v in out.items()}).decode()


def configure_logging(service: str, level: str = "info") -> None:
    """Called once by each service's entry point, never at import."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter(service))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    logging.Formatter.converter = time.gmtime
    # nats-py logs every reconnect attempt at error level with a traceback; keep one line.
    logging.getLogger("nats").setLevel(logging.WARNING)
