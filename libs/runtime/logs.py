"""Structured logging: one JSON object per line on stderr, from every service.

Per-request records (the router's `request` record, the node's `served` record) carry
their fields under `extra={"fields": {...}}`; they land at the top level of the JSON so a
log pipeline can index them without parsing a message string.

A record written once per request goes through `log_record`: in a service (after
`configure_logging`) it is encoded straight to the line `JsonFormatter` would make and
buffered, and the buffer is written once per event-loop iteration (at exit too), instead
of a `logging` call, a LogRecord and a write per request (~25 us, issue 16). Anywhere
else (tests with caplog, a library caller), or when any other handler listens, it is an
ordinary `logging` call, so what a handler sees is unchanged.
"""

from __future__ import annotations

import asyncio
import atexit
import logging
import sys
import time
from typing import Any, TextIO

import msgspec

__all__ = ["configure_logging", "JsonFormatter", "log_record", "flush_records"]

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
        return _line(out)


def _line(out: dict[str, Any]) -> str:
    try:
        return _encode(out).decode()
    except TypeError:
        return _encode({k: (v if isinstance(v, (int, float, str, bool, type(None))) else repr(v)) for k, v in out.items()}).decode()


class _RecordSink:
    """Lines for the one handler `configure_logging` installed, written per loop iteration."""

    __slots__ = ("service", "handler", "root", "lines", "scheduled")

    def __init__(self, service: str, handler: logging.StreamHandler[TextIO]) -> None:
        self.service = service
        self.handler = handler
        self.root = logging.getLogger()
        self.lines: list[str] = []
        self.scheduled = False

    def owns(self, logger: logging.Logger) -> bool:
        """True while `logger`'s records would reach our handler and nothing else: no
        handler of its own or of a parent but the root's one (caplog adds one)."""
        if logger.handlers or logger.filters or self.root.handlers != [self.handler] or not logger.isEnabledFor(logging.INFO):
            return False
        parent = logger.parent
        while parent is not None and parent is not self.root:
            if parent.handlers:
                return False
            parent = parent.parent
        return logger.propagate

    def write(self, name: str, msg: str, fields: dict[str, Any]) -> None:
        out: dict[str, Any] = {"ts": round(time.time(), 6), "level": "info", "service": self.service, "logger": name, "msg": msg}
        out.update(fields)
        self.lines.append(_line(out))
        if not self.scheduled:
            try:
                asyncio.get_running_loop().call_soon(self.flush)
            except RuntimeError:  # no loop: write now
                self.flush()
                return
            self.scheduled = True

    def flush(self) -> None:
        self.scheduled = False
        lines = self.lines
        if not lines:
            return
        self.lines = []
        lines.append("")
        with self.handler.lock:  # type: ignore[union-attr]  # other threads may log meanwhile
            try:
                stream = self.handler.stream
                stream.write("\n".join(lines))
                stream.flush()
            except (OSError, ValueError):  # stderr gone (closed pipe) at shutdown
                pass


_sink: _RecordSink | None = None


def log_record(logger: logging.Logger, msg: str, fields: dict[str, Any]) -> None:
    """`logger.info(msg, extra={"fields": fields})`, buffered when only our handler listens."""
    sink = _sink
    if sink is not None and sink.owns(logger):
        sink.write(logger.name, msg, fields)
    else:
        logger.info(msg, extra={"fields": fields})


def flush_records() -> None:
    """Write the buffered records now (also done per loop iteration and at exit)."""
    if _sink is not None:
        _sink.flush()


def configure_logging(service: str, level: str = "info") -> None:
    """Called once by each service's entry point, never at import."""
    global _sink
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter(service))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    if _sink is None:
        atexit.register(flush_records)
    _sink = _RecordSink(service, handler)
    root.setLevel(level.upper())
    logging.Formatter.converter = time.gmtime
    # nats-py logs every reconnect attempt at error level with a traceback; keep one line.
    logging.getLogger("nats").setLevel(logging.WARNING)
