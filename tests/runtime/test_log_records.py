"""Per-request records written by the buffered sink are the lines `logging` would write.

The router's request record skips `logging` in a service process (`log_record`): these
tests run such a process and compare its stderr with `JsonFormatter`'s line for the same
record, and check that `logging` still carries the records wherever a handler listens.
"""

from __future__ import annotations

import json
import logging
import subprocess
import sys
import textwrap

import pytest
from tierflow.runtime.logs import log_record
from tierflow.services.router.dispatch import RequestRecord

_SCRIPT = textwrap.dedent(
    """
    import asyncio, logging, sys
    from tierflow.runtime.logs import JsonFormatter, configure_logging
    from tierflow.services.router.dispatch import RequestRecord

    configure_logging("router")
    expected = []

    def formatted(record):
        # The line logging would have written for `record` (JsonFormatter, its real fields).
        captured = []
        handler = logging.Handler()
        handler.emit = captured.append
        logger = logging.getLogger("tierflow.request")
        logger.addHandler(handler)  # a handler of its own: this emit goes through logging
        logger.propagate = False  # ... and only to it
        try:
            record.emit()
        finally:
            logger.removeHandler(handler)
            logger.propagate = True
        return JsonFormatter("router").format(captured[0])

    async def main():
        a = RequestRecord(request_id="r1", api="chat", model="m", nodes_tried=["n1"], hash_ids=[1, 2], completion_tokens=3, e2e=1.5)
        b = RequestRecord(request_id="r2", api="completions", outcome="error", status=429, error="overloaded")
        for record in (a, b):
            expected.append(formatted(record))
            record.emit()
        logging.getLogger("tierflow.router").info("after both")
        await asyncio.sleep(0)  # one loop iteration: the buffer is written
        print("\\n".join(expected), flush=True)
        RequestRecord(request_id="r3", api="chat").emit()  # buffered at the loop's end: written at exit

    asyncio.run(main())
    """
)


def test_buffered_request_records_equal_the_logging_lines() -> None:
    done = subprocess.run([sys.executable, "-c", _SCRIPT], capture_output=True, text=True, timeout=60, check=True)
    expected = [json.loads(line) for line in done.stdout.splitlines()]
    lines = [json.loads(line) for line in done.stderr.splitlines()]
    records = [line for line in lines if line.get("msg") == "request"]
    assert [r["request_id"] for r in records] == ["r1", "r2", "r3"]
    for got, want in zip(records, expected, strict=False):
        assert got.pop("ts") == pytest.approx(want.pop("ts"), abs=5.0)
        assert list(got.items()) == list(want.items())  # same fields, values and order
    assert any(line.get("msg") == "after both" for line in lines)


def test_records_go_through_logging_where_a_handler_listens(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    RequestRecord(request_id="r9", api="chat", model="m").emit()
    log_record(logging.getLogger("tierflow.request"), "request", {"request_id": "r10"})
    got = [getattr(r, "fields", {}).get("request_id") for r in caplog.records if r.getMessage() == "request"]
    assert got == ["r9", "r10"]
