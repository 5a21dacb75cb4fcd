"""Driving Debian's `wrk` (a C load generator) and reading its report.

One thread, `connections` keep-alive connections, a Lua script that sets the POST body.
For streaming, the script also looks into each response (which makes wrk buffer bodies,
so it is used only there): responses that ended with `data: [DONE]` and
tokens from the final usage chunk (`stream_options.include_usage`), summed over threads
in `done()` and printed as one `FRONTDOOR ...` line this module parses. wrk's own CPU
comes from RUSAGE_CHILDREN around the run, so the load generator's share of the machine shows too.
"""

from __future__ import annotations

import json
import os
import re
import resource
import shutil
import subprocess
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

__all__ = ["WRK", "WrkResult", "lua_script", "parse_duration", "parse_wrk", "run_wrk"]

WRK = (
    "/usr/bin/wrk"
    if os.path.exists("/usr/bin/wrk")
    else (shutil.which("wrk") or "/usr/bin/wrk")
)

_COUNT_LUA = """
local threads = {}
function setup(thread) table.insert(threads, thread) end
function init(args) responses = 0; complete = 0; tokens = 0; failed = 0 end
function response(status, headers, body)
  responses = responses + 1
  if status ~= 200 then failed = failed + 1; return end
  local tail = body:sub(-400)
  if tail:find("data: [DONE]", 1, true) then complete = complete + 1 end
  local usage = tail:match('"completion_tokens":(%d+)')
  if usage then tokens = tokens + tonumber(usage) end
end
function done(summary, latency, requests)
  local t = {responses = 0, complete = 0, tokens = 0, failed = 0}
  for _, thread in ipairs(threads) do
    for k, _ in pairs(t) do t[k] = t[k] + thread:get(k) end
  end
  io.write(string.format("FRONTDOOR responses=%d complete=%d tokens=%d failed=%d\\n",
    t.responses, t.complete, t.tokens, t.failed))
end
"""


def lua_script(body: bytes | str, *, count_stream: bool = False) -> str:
    """A wrk script POSTing `body` as JSON; `count_stream` adds the SSE counting."""
    text = body.decode() if isinstance(body, bytes) else body
    head = f'wrk.method = "POST"\nwrk.headers["Content-Type"] = "application/json"\nwrk.body = {json.dumps(text)}\n'
    return head + (_COUNT_LUA if count_stream else "")


@dataclass
class WrkResult:
    """One wrk run. Latencies in seconds; `counts` is the FRONTDOOR line (streaming only)."""

    requests: int
    seconds: float
    rps: float
    p50: float
    p90: float
    p99: float
    non2xx: int = 0
    socket_errors: int = 0
    counts: dict[str, int] = field(default_factory=dict)
    wrk_cpu: float = 0.0  # wrk's own utime + stime, seconds

    @property
    def ok(self) -> bool:
        return self.requests > 0 and self.non2xx == 0 and self.socket_errors == 0


_UNITS = {"us": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}


def parse_duration(text: str) -> float:
    """wrk's `1.23ms`, `850.00us`, `2.01s`, `1.5m` in seconds."""
    found = re.fullmatch(r"([\d.]+)(us|ms|s|m|h)", text.strip())
    if found is None:
        raise ValueError(f"not a wrk duration: {text!r}")
    return float(found.group(1)) * _UNITS[found.group(2)]


def parse_wrk(output: str) -> WrkResult:
    """wrk's report (with --latency) as numbers; ValueError if a figure is missing."""
    total = re.search(r"(\d+) requests in ([\d.]+)(us|ms|s|m|h)", output)
    rps = re.search(r"Requests/sec:\s+([\d.]+)", output)
    pct = {
        q: re.search(rf"^\s*{q}%\s+(\S+)", output, re.MULTILINE) for q in (50, 90, 99)
    }
    if total is None or rps is None or any(m is None for m in pct.values()):
        raise ValueError(f"not a wrk --latency report:\n{output}")
    non2xx = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", output)
    errors = re.search(
        r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", output
    )
    counts_line = re.search(r"^FRONTDOOR (.*)$", output, re.MULTILINE)
    counts = (
        {k: int(v) for k, v in (kv.split("=") for kv in counts_line.group(1).split())}
        if counts_line
        else {}
    )
    return WrkResult(
        requests=int(total.group(1)), seconds=parse_duration(total.group(2) + total.group(3)), rps=float(rps.group(1)),
        p50=parse_duration(pct[50].group(1)), p90=parse_duration(pct[90].group(1)), p99=parse_duration(pct[99].group(1)),  # type: ignore[union-attr]
        non2xx=int(non2xx.group(1)) if non2xx else 0, socket_errors=sum(int(g) for g in errors.groups()) if errors else 0, counts=counts,
    )  # fmt: skip


def run_wrk(
    url: str,
    script: str,
    *,
    seconds: int,
    connections: int,
    on_start=None,
    on_stop=None,
) -> WrkResult:
    """wrk -t1 -c`connections` -d`seconds`s --latency against `url`; `on_start`/`on_stop`
    are called right before wrk starts and right after it exits (the CPU window)."""
    with tempfile.NamedTemporaryFile("w", suffix=".lua", delete=False) as file:
        file.write(script)
    try:
        argv = [
            WRK,
            "-t1",
            f"-c{connections}",
            f"-d{seconds}s",
            "--timeout",
            "10s",
            "--latency",
            "-s",
            file.name,
            url,
        ]
        before = _children_cpu()
        if on_start is not None:
            on_start()
        output = subprocess.run(
            argv,
            check=False,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            timeout=seconds + 60,
        ).stdout
        if on_stop is not None:
            on_stop()
        wrk_cpu = (
            _children_cpu() - before
        )  # wrk was reaped by subprocess: its rusage is in RUSAGE_CHILDREN
    finally:
        Path(file.name).unlink(missing_ok=True)
    result = parse_wrk(output)
    result.wrk_cpu = wrk_cpu
    return result


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime
