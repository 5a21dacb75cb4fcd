"""Children that die are started again with backoff, given up on when they keep dying,
and never restarted once stopped on purpose or once shutdown began.

The policy's numbers are checked as pure functions; the restarter runs real (tiny) child
processes under a real `Supervisor`. Waits are on conditions, with generous timeouts.
"""

from __future__ import annotations

import asyncio
import sys
import textwrap
from pathlib import Path

import pytest

from tierflow.cli.children_file import ChildRecord, read_children, snapshot, write_children
from tierflow.cli.restarts import Restarter, RestartPolicy
from tierflow.cli.supervisor import ProcessSpec, Supervisor


def spec(tmp_path: Path, name: str, body: str, role: str = "") -> ProcessSpec:
    return ProcessSpec(name, [sys.executable, "-c", textwrap.dedent(body)], None, tmp_path / f"{name}.log", role=role)


CRASHES = "import sys; print('boom', flush=True); sys.exit(3)"
SLEEPS = "import signal; signal.pause()"


async def until(condition, timeout: float = 10.0) -> None:  # type: ignore[no-untyped-def]
    async with asyncio.timeout(timeout):
        while not condition():
            await asyncio.sleep(0.01)


# --------------------------------------------------------------------------- policy (pure)


def test_backoff_doubles_to_the_maximum_then_gives_up_after_max_exits_in_the_window() -> None:
    policy = RestartPolicy(initial=0.5, maximum=5.0, max_exits=5, window=60.0)
    exits: list[float] = []
    delays = []
    for t in range(6):
        exits.append(float(t))
        delays.append(policy.delay(exits, float(t)))
    assert delays == [0.5, 1.0, 2.0, 4.0, 5.0, None]  # the sixth exit within 60 s: give up


def test_exits_older_than_the_window_are_forgotten() -> None:
    policy = RestartPolicy(initial=0.5, maximum=5.0, max_exits=2, window=10.0)
    assert policy.delay([0.0, 1.0, 2.0], 2.0) is None
    assert policy.delay([0.0, 1.0, 12.5], 12.5) == 0.5  # the first two no longer count
    assert policy.recent([0.0, 1.0, 12.5], 12.5) == [12.5]


def test_policy_refuses_nonsense() -> None:
    with pytest.raises(ValueError):
        RestartPolicy(initial=0.0)
    with pytest.raises(ValueError):
        RestartPolicy(initial=2.0, maximum=1.0)
    with pytest.raises(ValueError):
        RestartPolicy(window=0)


# --------------------------------------------------------------------------- restarter


async def drive(sup: Supervisor, restarter: Restarter, until_done) -> None:  # type: ignore[no-untyped-def]
    """Feed every unexpected exit to the restarter until `until_done()` holds."""
    async with asyncio.timeout(20):
        while not until_done():
            try:
                event = await asyncio.wait_for(sup.next_exit(), 0.05)
            except TimeoutError:
                continue
            restarter.handle(event)


async def test_a_crashing_child_is_restarted_with_growing_backoff_then_given_up(tmp_path: Path) -> None:
    lines: list[str] = []
    sup = Supervisor()
    restarter = Restarter(sup, RestartPolicy(initial=0.02, maximum=0.04, max_exits=3, window=60), quorum={}, report=lines.append)
    first = await sup.start(spec(tmp_path, "flaky", CRASHES))
    await drive(sup, restarter, lambda: "flaky" in restarter.given_up)

    child = sup.get("flaky")
    assert child.restarts == 3 and child.pid != first.pid and child.returncode == 3
    scheduled = [line for line in lines if "restarting it in" in line]
    assert [line.split("restarting it in ")[1].split("s ")[0] for line in scheduled] == ["0.02", "0.04", "0.04"]
    assert all("flaky (pid" in line and "exited with code 3" in line for line in scheduled)
    assert sum("tierflow up: restarted flaky" in line for line in lines) == 3
    assert "giving up on flaky: it exited 4 times in 60s" in lines[-1] and "the rest keeps running" in lines[-1]
    assert "boom" in lines[-1]  # the last exit's log tail goes with the give-up
    assert not restarter.fatal.done()
    log = (tmp_path / "flaky.log").read_text()
    assert log.count("tierflow supervisor restarts flaky (restart") == 3 and "(restart 3, after it exited with code 3)" in log
    await restarter.close()
    await sup.stop_all()


async def test_giving_up_below_the_roles_quorum_is_fatal(tmp_path: Path) -> None:
    """Losing one of two routers is reported; losing the last one ends the fabric."""
    lines: list[str] = []
    sup = Supervisor()
    restarter = Restarter(sup, RestartPolicy(initial=0.01, maximum=0.01, max_exits=0, window=60),
                          quorum={"router": 1}, report=lines.append)  # fmt: skip
    await sup.start(spec(tmp_path, "router-0", CRASHES, role="router"))
    await sup.start(spec(tmp_path, "router-1", SLEEPS, role="router"))
    await drive(sup, restarter, lambda: "router-0" in restarter.given_up)
    assert not restarter.fatal.done()  # router-1 still serves
    assert "1 router process(es) left; the rest keeps running" in lines[-1]

    sup.get("router-1").process.kill()
    await drive(sup, restarter, lambda: restarter.fatal.done())
    assert restarter.fatal.result().startswith("giving up on router-1")
    assert "0 router process(es) left, the fabric needs 1" in restarter.fatal.result()
    await restarter.close()
    await sup.stop_all()


async def test_a_fatal_give_up_names_the_child_and_what_is_left(tmp_path: Path) -> None:
    sup = Supervisor()
    restarter = Restarter(sup, RestartPolicy(initial=0.01, maximum=0.01, max_exits=0, window=60),
                          quorum={"model-registry": 1}, report=lambda line: None)  # fmt: skip
    await sup.start(spec(tmp_path, "model-registry", CRASHES))
    await drive(sup, restarter, lambda: restarter.fatal.done())
    reason = restarter.fatal.result()
    assert reason.startswith("giving up on model-registry: it exited 1 times in 60s")
    assert "0 model-registry process(es) left, the fabric needs 1" in reason
    await sup.stop_all()


async def test_a_child_stopped_on_purpose_during_its_backoff_is_not_restarted(tmp_path: Path) -> None:
    sup = Supervisor()
    restarter = Restarter(sup, RestartPolicy(initial=0.3, maximum=0.3), quorum={}, report=lambda line: None)
    await sup.start(spec(tmp_path, "decode-3", CRASHES))
    restarter.handle(await asyncio.wait_for(sup.next_exit(), 10))
    assert restarter.pending == {"decode-3"}
    await sup.stop("decode-3")  # what NodeLauncher.stop does for the autoscaler's scale-down
    await until(lambda: not restarter.pending)
    assert [c.name for c in sup.children] == []
    assert "restarts decode-3" not in (tmp_path / "decode-3.log").read_text()
    await restarter.close()


async def test_nothing_is_restarted_once_shutdown_began(tmp_path: Path) -> None:
    sup = Supervisor()
    restarter = Restarter(sup, RestartPolicy(initial=30.0, maximum=30.0), quorum={}, report=lambda line: None)
    await sup.start(spec(tmp_path, "autoscaler", CRASHES))
    restarter.handle(await asyncio.wait_for(sup.next_exit(), 10))
    sup.close()
    await asyncio.wait_for(restarter.close(), 5)  # the 30 s backoff is cut short, nothing started
    assert sup.get("autoscaler").restarts == 0 and sup.get("autoscaler").returncode == 3
    with pytest.raises(RuntimeError, match="shutting down"):
        await sup.restart("autoscaler")
    with pytest.raises(RuntimeError, match="shutting down"):
        await sup.start(spec(tmp_path, "late", SLEEPS))
    await sup.stop_all()


async def test_restart_refuses_a_running_or_unknown_child(tmp_path: Path) -> None:
    sup = Supervisor()
    await sup.start(spec(tmp_path, "router", SLEEPS))
    with pytest.raises(ValueError, match="still running"):
        await sup.restart("router")
    with pytest.raises(KeyError):
        await sup.restart("nobody")
    await sup.stop_all(grace=2)


# --------------------------------------------------------------------------- children.json


async def test_children_file_lists_every_child_with_its_state_and_restarts(tmp_path: Path) -> None:
    path = tmp_path / "children.json"
    sup = Supervisor()
    sup.add_listener(lambda: write_children(path, snapshot(sup)))
    await sup.start(spec(tmp_path, "nats-0", SLEEPS, role="nats"))
    crash = await sup.start(spec(tmp_path, "registry", CRASHES, role="model-registry"))
    await until(lambda: read_children(path)[-1].state == "exited")
    records = read_children(path)
    assert [(r.name, r.role, r.state) for r in records] == [("nats-0", "nats", "running"), ("registry", "model-registry", "exited")]
    assert records[1].pid == crash.pid and records[1].returncode == 3 and records[1].log.endswith("registry.log")

    restarted = await sup.restart("registry")
    await until(lambda: read_children(path)[-1].restarts == 1)
    assert read_children(path)[-1].pid == restarted.pid
    assert snapshot(sup, restarting={"registry"})[-1].state in ("running", "restarting")
    await sup.stop_all(grace=2)
    assert read_children(path) == []  # everything stopped: nothing listed
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".children")] == []  # no temp file left


def test_children_file_reader_names_a_bad_file(tmp_path: Path) -> None:
    bad = tmp_path / "children.json"
    bad.write_text("[1, 2]")
    with pytest.raises(ValueError, match="not a tierflow children file"):
        read_children(bad)
    write_children(bad, [ChildRecord(name="router", role="router", pid=1)], pid=7)
    assert read_children(bad) == [ChildRecord(name="router", role="router", pid=1)]
