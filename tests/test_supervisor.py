"""The process supervisor behind `tierflow up`, with small real child processes.

Children are `python -c` scripts. Ones that must handle SIGTERM write a marker file once
their handler is installed, and the test waits for it, so a signal never races the
handler. Nothing here sleeps a fixed time except to prove that something does NOT happen.
"""

from __future__ import annotations

import asyncio
import io
import json
import os
import signal
import socket
import sys
import textwrap
from pathlib import Path

import pytest

from tierflow.cli.supervisor import ProcessSpec, Supervisor, read_log_tail
from tierflow.cli.up import UpConfig, preflight, run_up, service_specs
from tierflow.runtime.nats_server import free_port, http_get

PY = sys.executable


def script(body: str) -> list[str]:
    """argv running `body` (dedented) in a fresh interpreter."""
    return [PY, "-c", textwrap.dedent(body)]


def spec(tmp_path: Path, name: str, body: str, env: dict[str, str] | None = None) -> ProcessSpec:
    """A ProcessSpec logging to tmp_path/<name>.log."""
    return ProcessSpec(name, script(body), env, tmp_path / f"{name}.log")


async def wait_for_file(path: Path, timeout: float = 5.0) -> None:
    """Poll until `path` exists (children write it when ready)."""
    async with asyncio.timeout(timeout):
        while not path.exists():
            await asyncio.sleep(0.01)


def alive(pid: int) -> bool:
    """True if `pid` exists and is not a zombie (an un-reaped corpse counts as gone)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    except OSError:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        return True
    return stat.rsplit(")", 1)[1].split()[0] not in ("Z", "X")


# A child that records "<name>:term" on SIGTERM, lingers 0.15 s, records "<name>:exit", exits 0.
RECORDING_CHILD = """
    import os, signal, sys, threading
    events, ready = sys.argv[1], sys.argv[2]
    name = os.environ["CHILD_NAME"]
    def record(what):
        with open(events, "a") as f:
            f.write(f"{name}:{what}\\n")
    def on_term(signum, frame):
        record("term")
        threading.Event().wait(0.15)
        record("exit")
        sys.exit(0)
    signal.signal(signal.SIGTERM, on_term)
    open(ready, "w").close()
    while True:
        signal.pause()
"""


async def test_stop_all_stops_one_at_a_time_in_reverse_start_order(tmp_path: Path) -> None:
    """c is fully gone before b is signalled, and b before a (dependencies outlive dependants)."""
    events = tmp_path / "events.txt"
    sup = Supervisor()
    for name in ("a", "b", "c"):
        argv = [*script(RECORDING_CHILD), str(events), str(tmp_path / f"{name}.ready")]
        await sup.start(ProcessSpec(name, argv, {"CHILD_NAME": name}, tmp_path / f"{name}.log"))
    for name in ("a", "b", "c"):
        await wait_for_file(tmp_path / f"{name}.ready")
    children = sup.children
    assert [c.name for c in children] == ["a", "b", "c"]

    await sup.stop_all(grace=5.0)

    assert events.read_text().split() == ["c:term", "c:exit", "b:term", "b:exit", "a:term", "a:exit"]
    assert [c.returncode for c in children] == [0, 0, 0]
    assert sup.children == []


async def test_sigterm_then_sigkill_for_a_child_that_ignores_sigterm(tmp_path: Path) -> None:
    """A child ignoring SIGTERM is SIGKILLed after `grace`; a polite one is not waited for."""
    ready = tmp_path / "stubborn.ready"
    sup = Supervisor()
    stubborn = await sup.start(spec(tmp_path, "stubborn", f"""
        import signal
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        open({str(ready)!r}, "w").close()
        while True:
            signal.pause()
    """))  # fmt: skip
    polite = await sup.start(spec(tmp_path, "polite", "import signal; signal.pause()"))
    await wait_for_file(ready)
    loop = asyncio.get_running_loop()

    began = loop.time()
    await sup.stop("polite", grace=5.0)
    assert polite.returncode == -signal.SIGTERM
    assert loop.time() - began < 2.0  # not held for the grace period

    began = loop.time()
    await asyncio.wait_for(sup.stop_all(grace=0.5), 5)
    elapsed = loop.time() - began
    assert stubborn.returncode == -signal.SIGKILL
    assert 0.5 <= elapsed < 3.0


async def test_unexpected_exit_is_reported_with_name_code_and_log_tail(tmp_path: Path) -> None:
    """A child dying on its own shows up in next_exit() and on_exit with its last 20 lines."""
    seen = []
    sup = Supervisor(on_exit=seen.append)
    await sup.start(spec(tmp_path, "decode-0", """
        import sys
        for i in range(30):
            print(f"line {i}", flush=True)
        print("fatal: out of HBM", file=sys.stderr, flush=True)
        sys.exit(3)
    """))  # fmt: skip
    event = await asyncio.wait_for(sup.next_exit(), 5)

    assert (event.name, event.returncode) == ("decode-0", 3)
    assert event.log_tail == [f"line {i}" for i in range(11, 30)] + ["fatal: out of HBM"]
    text = event.describe()
    assert "decode-0" in text and "exited with code 3" in text and "fatal: out of HBM" in text
    assert seen == [event]
    await sup.stop_all()


async def test_requested_stop_is_not_reported_as_an_exit(tmp_path: Path) -> None:
    """Children we stop ourselves never appear in next_exit(); a later real death still does."""
    sup = Supervisor()
    await sup.start(spec(tmp_path, "router", "import signal; signal.pause()"))
    await sup.stop("router", grace=2.0)
    await sup.start(spec(tmp_path, "autoscaler", "raise SystemExit(7)"))
    event = await asyncio.wait_for(sup.next_exit(), 5)
    assert (event.name, event.returncode) == ("autoscaler", 7)
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(sup.next_exit(), 0.3)
    await sup.stop_all()


async def test_log_is_appended_with_stdout_stderr_and_env(tmp_path: Path) -> None:
    """stdout+stderr go to the log, earlier content stays, env adds to (not replaces) ours."""
    log = tmp_path / "svc.log"
    log.write_text("from an earlier run\n")
    sup = Supervisor()
    child = await sup.start(ProcessSpec("svc", script("""
        import os, sys
        print("to stdout", os.environ["EXTRA"], "PATH" in os.environ, flush=True)
        print("to stderr", file=sys.stderr, flush=True)
    """), {"EXTRA": "yes"}, log))  # fmt: skip
    await asyncio.wait_for(sup.next_exit(), 5)
    text = log.read_text()
    assert text.startswith("from an earlier run\n")
    assert "to stdout yes True" in text and "to stderr" in text
    assert "from an earlier run" not in "\n".join(child.log_tail())  # tail covers this run only
    with pytest.raises(ValueError):
        await sup.start(ProcessSpec("svc2", [], None, log))
    await sup.stop_all()


async def test_duplicate_live_name_is_refused(tmp_path: Path) -> None:
    """Two live children may not share a name (the actuator addresses them by it)."""
    sup = Supervisor()
    await sup.start(spec(tmp_path, "n", "import signal; signal.pause()"))
    with pytest.raises(ValueError, match="already running"):
        await sup.start(spec(tmp_path, "n", "import signal; signal.pause()"))
    await sup.stop_all(grace=2.0)


def test_read_log_tail_skips_a_cut_first_line(tmp_path: Path) -> None:
    """Reading only the last bytes must not return half a line."""
    log = tmp_path / "x.log"
    log.write_text("".join(f"{i:04d}-{'x' * 20}\n" for i in range(100)))
    tail = read_log_tail(log, 500, max_bytes=100)
    assert tail and all(len(line) == 25 for line in tail)
    assert tail[-1].startswith("0099-")


# The supervisor in a subprocess: starts one child, prints its pid, waits forever.
SUPERVISOR_PROCESS = """
    import asyncio, sys
    from pathlib import Path
    from tierflow.cli.supervisor import ProcessSpec, Supervisor

    async def main():
        sup = Supervisor()
        child = await sup.start(ProcessSpec(
            "orphan-candidate", [sys.executable, "-c", "import signal; signal.pause()"],
            None, Path(sys.argv[1])))
        print(child.pid, flush=True)
        await asyncio.Event().wait()

    asyncio.run(main())
"""


async def test_no_orphan_when_the_supervisor_is_sigkilled(tmp_path: Path) -> None:
    """kill -9 of the supervisor takes its children with it (PR_SET_PDEATHSIG)."""
    proc = await asyncio.create_subprocess_exec(
        *script(SUPERVISOR_PROCESS), str(tmp_path / "child.log"), stdout=asyncio.subprocess.PIPE
    )
    child_pid = 0
    try:
        child_pid = int(await asyncio.wait_for(proc.stdout.readline(), 10))  # type: ignore[union-attr]
        assert alive(child_pid)
        proc.kill()
        await proc.wait()
        async with asyncio.timeout(3):
            while alive(child_pid):
                await asyncio.sleep(0.02)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
        if child_pid and alive(child_pid):
            os.kill(child_pid, signal.SIGKILL)


# --------------------------------------------------------------------------- tierflow up


def test_service_argv_contract(tmp_path: Path) -> None:
    """Each service gets exactly the agreed flags; metrics ports count up, router's is 0."""
    fleet = tmp_path / "fleet.yaml"
    config = UpConfig(host="127.0.0.1", http_port=8000, grpc_port=50051, registry_grpc_port=50052, nats_port=4222,
                      data_dir=tmp_path / "data", fleet=fleet, decode_nodes=2, prefill_nodes=1,
                      deployment="bundle-a", metrics_base_port=9100)  # fmt: skip
    url = "nats://127.0.0.1:4222"
    got = {s.name: s.argv[3:] for s in service_specs(config, python="PY")}
    assert all(s.argv[:3] == ["PY", "-m", "tierflow"] for s in service_specs(config, python="PY"))
    assert got == {
        "model-registry": ["model-registry", "--nats-url", url, "--grpc-port", "50052", "--fleet", str(fleet),
                           "--metrics-port", "9100"],
        "router": ["router", "--nats-url", url, "--http-host", "127.0.0.1", "--http-port", "8000",
                   "--grpc-port", "50051", "--metrics-port", "0"],
        "autoscaler": ["autoscaler", "--nats-url", url, "--metrics-port", "9101"],
        "prefill-0": ["prefill-node", "--nats-url", url, "--node-id", "prefill-0", "--metrics-port", "9102"],
        "decode-0": ["decode-node", "--nats-url", url, "--node-id", "decode-0", "--deployment", "bundle-a",
                     "--metrics-port", "9103"],
        "decode-1": ["decode-node", "--nats-url", url, "--node-id", "decode-1", "--deployment", "bundle-a",
                     "--metrics-port", "9104"],
    }  # fmt: skip
    assert all(s.log_path == tmp_path / "data" / "logs" / f"{s.name}.log" for s in service_specs(config))


def test_preflight_names_a_port_in_use_and_a_missing_fleet(tmp_path: Path) -> None:
    """Clear messages before anything starts."""
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        config = UpConfig(http_port=port, grpc_port=free_port(), registry_grpc_port=free_port(),
                          nats_port=free_port(), nats_monitor_port=free_port(), metrics_base_port=free_port(),
                          fleet=tmp_path / "missing.yaml", decode_nodes=1, prefill_nodes=0)  # fmt: skip
        problems = preflight(config)
    assert any(f"port {port}" in p and "--http-port" in p and "in use" in p for p in problems), problems
    assert any("missing.yaml" in p for p in problems), problems


def up_config(tmp_path: Path, *, ready_timeout: float = 10.0) -> UpConfig:
    """Free ports, a temp data dir; services are replaced by fakes in these tests."""
    return UpConfig(http_port=free_port(), grpc_port=free_port(), registry_grpc_port=free_port(),
                    nats_port=free_port(), nats_monitor_port=free_port(), data_dir=tmp_path / "data",
                    decode_nodes=2, prefill_nodes=0, ready_timeout=ready_timeout)  # fmt: skip


FAKE_ROUTER = """
    import asyncio, json, sys
    port, nodes = int(sys.argv[1]), int(sys.argv[2])
    async def handle(reader, writer):
        await reader.readuntil(b"\\r\\n\\r\\n")
        body = json.dumps({"status": "ok", "nodes": nodes, "models": 1}).encode()
        writer.write(b"HTTP/1.1 200 OK\\r\\nContent-Type: application/json\\r\\nContent-Length: "
                     + str(len(body)).encode() + b"\\r\\n\\r\\n" + body)
        await writer.drain()
        writer.close()
    async def main():
        server = await asyncio.start_server(handle, "127.0.0.1", port)
        print("fake router listening", flush=True)
        await server.serve_forever()
    asyncio.run(main())
"""


async def test_up_prints_ready_line_then_stops_everything(tmp_path: Path) -> None:
    """Ready when /health says so; after stop, NATS and every service are gone, exit 0."""
    config = up_config(tmp_path)
    logs = config.logs_dir
    fakes = [
        ProcessSpec("router", [*script(FAKE_ROUTER), str(config.http_port), "2"], None, logs / "router.log"),
        ProcessSpec("decode-0", script("import signal; signal.pause()"), None, logs / "decode-0.log"),
    ]
    sup = Supervisor()
    stop = asyncio.Event()
    out = io.StringIO()
    task = asyncio.ensure_future(run_up(config, stop, specs=fakes, supervisor=sup, out=out, err=io.StringIO()))
    async with asyncio.timeout(10):
        while "tierflow is up" not in out.getvalue():
            assert not task.done(), task.result()
            await asyncio.sleep(0.02)
    assert out.getvalue() == config.ready_line() + "\n"
    pids = [c.pid for c in sup.children]
    assert [c.name for c in sup.children] == ["nats", "router", "decode-0"]

    stop.set()
    assert await asyncio.wait_for(task, 10) == 0
    assert not any(alive(pid) for pid in pids)
    assert "Server Exiting" in (logs / "nats.log").read_text()  # NATS got a clean SIGTERM


async def test_up_reports_a_service_dying_before_ready_and_exits_1(tmp_path: Path) -> None:
    """A dead service is named with its exit code and log tail; NATS is stopped too."""
    config = up_config(tmp_path)
    logs = config.logs_dir
    fakes = [
        ProcessSpec("model-registry", script("import sys; print('fleet.yaml: no models', file=sys.stderr); sys.exit(2)"),
                    None, logs / "model-registry.log"),
        ProcessSpec("decode-0", script("import signal; signal.pause()"), None, logs / "decode-0.log"),
    ]  # fmt: skip
    sup = Supervisor()
    err = io.StringIO()
    code = await asyncio.wait_for(run_up(config, asyncio.Event(), specs=fakes, supervisor=sup, err=err), 10)
    assert code == 1
    assert "model-registry" in err.getvalue() and "exited with code 2" in err.getvalue()
    assert "fleet.yaml: no models" in err.getvalue()
    assert sup.children == []
    assert "Server Exiting" in (logs / "nats.log").read_text()


async def test_up_times_out_when_health_never_reports_enough_nodes(tmp_path: Path) -> None:
    """/health answering with too few nodes is a timeout naming the last answer."""
    config = up_config(tmp_path, ready_timeout=1.5)
    fakes = [ProcessSpec("router", [*script(FAKE_ROUTER), str(config.http_port), "1"], None,
                         config.logs_dir / "router.log")]  # fmt: skip
    err = io.StringIO()
    code = await asyncio.wait_for(run_up(config, asyncio.Event(), specs=fakes, err=err), 10)
    assert code == 1
    message = err.getvalue()
    assert "not ready after 1.5s" in message and "nodes >= 2" in message
    assert json.dumps({"status": "ok", "nodes": 1, "models": 1}) in message
    assert "fake router listening" in message


# --------------------------------------------------------------------------- restarts after ready


async def _until_ready(task: asyncio.Task[int], out: io.StringIO) -> None:
    async with asyncio.timeout(15):
        while "tierflow is up" not in out.getvalue():
            assert not task.done(), task.result()
            await asyncio.sleep(0.02)


async def _until(condition, timeout: float = 15.0) -> None:  # type: ignore[no-untyped-def]
    async with asyncio.timeout(timeout):
        while not condition():
            await asyncio.sleep(0.02)


async def test_up_restarts_a_killed_router_and_lists_it_in_children_json(tmp_path: Path) -> None:
    """After ready, a SIGKILLed router comes back (same name, spec, port); children.json says so."""
    from tierflow.cli.children_file import read_children
    from tierflow.cli.restarts import RestartPolicy

    config = up_config(tmp_path)
    logs = config.logs_dir
    fakes = [ProcessSpec("router", [*script(FAKE_ROUTER), str(config.http_port), "2"], None, logs / "router.log")]
    sup, stop, out, err = Supervisor(), asyncio.Event(), io.StringIO(), io.StringIO()
    task = asyncio.ensure_future(run_up(config, stop, specs=fakes, supervisor=sup, out=out, err=err,
                                        policy=RestartPolicy(initial=0.05, maximum=0.05)))  # fmt: skip
    await _until_ready(task, out)
    children = config.data_dir / "children.json"
    before = {r.name: r for r in read_children(children)}
    assert set(before) == {"nats", "router"} and before["router"].pid == sup.get("router").pid
    assert before["nats"].role == "nats" and all(r.state == "running" and r.restarts == 0 for r in before.values())

    os.kill(before["router"].pid, signal.SIGKILL)

    def restarted() -> bool:
        router = next(r for r in read_children(children) if r.name == "router")
        return router.restarts == 1 and router.state == "running"

    await _until(restarted)
    assert not task.done()
    assert "router (pid" in err.getvalue() and "was killed by SIGKILL; restarting it in 0.05s" in err.getvalue()
    assert f"restarted router (pid {sup.get('router').pid}, restart 1)" in err.getvalue()
    async def answers() -> bool:
        try:
            return (await http_get("127.0.0.1", config.http_port, "/health")).status == 200
        except OSError:
            return False

    async with asyncio.timeout(15):  # the new one listens on the same port
        while not await answers():
            await asyncio.sleep(0.05)

    stop.set()
    assert await asyncio.wait_for(task, 15) == 0
    assert read_children(children) == []


async def test_up_gives_up_on_a_registry_that_keeps_dying_and_exits_1(tmp_path: Path) -> None:
    """Past the policy's limit an essential child ends the fabric, with the reason."""
    from tierflow.cli.restarts import RestartPolicy

    config = up_config(tmp_path)
    logs = config.logs_dir
    fakes = [
        ProcessSpec("model-registry", script("import signal; signal.pause()"), None, logs / "model-registry.log"),
        ProcessSpec("router", [*script(FAKE_ROUTER), str(config.http_port), "2"], None, logs / "router.log"),
    ]
    sup, out, err = Supervisor(), io.StringIO(), io.StringIO()
    task = asyncio.ensure_future(run_up(config, asyncio.Event(), specs=fakes, supervisor=sup, out=out, err=err,
                                        policy=RestartPolicy(initial=0.05, maximum=0.05, max_exits=0)))  # fmt: skip
    await _until_ready(task, out)
    pids = [c.pid for c in sup.children]
    os.kill(sup.get("model-registry").pid, signal.SIGKILL)
    assert await asyncio.wait_for(task, 15) == 1
    message = err.getvalue()
    assert "giving up on model-registry: it exited 1 times in 60s" in message and "was killed by SIGKILL" in message
    assert "0 model-registry process(es) left, the fabric needs 1" in message and "stopping everything" in message
    assert not any(alive(pid) for pid in pids)


async def test_up_without_restarts_reports_a_lost_router_as_fatal(tmp_path: Path) -> None:
    """--no-restart keeps the old rule: losing the only router ends the fabric."""
    import dataclasses

    config = dataclasses.replace(up_config(tmp_path), restart=False)
    fakes = [ProcessSpec("router", [*script(FAKE_ROUTER), str(config.http_port), "2"], None, config.logs_dir / "router.log")]
    sup, out, err = Supervisor(), io.StringIO(), io.StringIO()
    task = asyncio.ensure_future(run_up(config, asyncio.Event(), specs=fakes, supervisor=sup, out=out, err=err))
    await _until_ready(task, out)
    os.kill(sup.get("router").pid, signal.SIGKILL)
    assert await asyncio.wait_for(task, 15) == 1
    assert "router (pid" in err.getvalue() and "stopping everything" in err.getvalue()


def test_cluster_and_router_flags_give_ports_names_and_argv(tmp_path: Path) -> None:
    """--nats-cluster 3 --routers 2: three NATS members on counted-up ports, a comma URL
    list for every service, two routers sharing the HTTP port with their own metrics ports."""
    from tierflow.cli.up import nats_specs

    config = UpConfig(data_dir=tmp_path / "data", fleet=tmp_path / "fleet.yaml", nats_port=4222, nats_monitor_port=8222,
                      nats_cluster=3, nats_cluster_port=6222, routers=2, decode_nodes=2, prefill_nodes=1,
                      metrics_base_port=9100)  # fmt: skip
    url = "nats://127.0.0.1:4222,nats://127.0.0.1:4223,nats://127.0.0.1:4224"
    assert config.nats_url == url
    servers = nats_specs(config)
    assert [(s.name, s.role) for s in servers] == [("nats-0", "nats"), ("nats-1", "nats"), ("nats-2", "nats")]
    assert servers[1].argv[1:] == ["-c", str(tmp_path / "data" / "nats" / "nats-1.conf")]
    member = config.nats_members()[1]
    text = member.config_text()
    assert 'server_name: "nats-1"' in text and "port: 4223" in text and '"127.0.0.1:8223"' in text
    assert '"127.0.0.1:6223"' in text and "nats-route://127.0.0.1:6222" in text and "nats-route://127.0.0.1:6224" in text
    assert "nats-route://127.0.0.1:6223" not in text  # no route to itself
    assert member.store_dir == tmp_path / "data" / "nats" / "nats-1"

    specs = {s.name: s for s in service_specs(config, python="PY")}
    assert all(s.argv[s.argv.index("--nats-url") + 1] == url for s in specs.values())
    for i, name in enumerate(("router-0", "router-1")):
        argv = specs[name].argv
        assert "--reuse-port" in argv and argv[argv.index("--http-port") + 1] == "8000"
        assert argv[argv.index("--metrics-port") + 1] == str(9105 + i)  # after registry, autoscaler, 3 nodes
        assert specs[name].log_path.name == f"{name}.log" and specs[name].role == "router"
    assert "router" not in specs and config.static_metrics_ports == 7
    assert config.quorum() == {"nats": 2, "router": 1, "model-registry": 1}
    assert "(2 routers)" in config.ready_line() and url in config.ready_line()


def test_preflight_checks_every_cluster_port(tmp_path: Path) -> None:
    """A port taken anywhere in a member's range is named with its flag and offset."""
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        fleet = tmp_path / "fleet.yaml"
        fleet.write_text("models: []\n")
        config = UpConfig(http_port=free_port(), grpc_port=free_port(), registry_grpc_port=free_port(),
                          nats_port=free_port(), nats_monitor_port=free_port(), nats_cluster_port=port - 2,
                          metrics_base_port=free_port(), fleet=fleet, nats_cluster=3, decode_nodes=1, prefill_nodes=0)  # fmt: skip
        problems = preflight(config)
    assert any(f"port {port}" in p and "--nats-cluster-port +2" in p and "in use" in p for p in problems), problems
    with pytest.raises(ValueError, match="at least one router"):
        UpConfig(routers=0)
