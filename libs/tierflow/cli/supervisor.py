"""A small asyncio supervisor for local child processes.

Why: `tierflow up` runs NATS plus five kinds of services as separate processes, and the
autoscaler's local actuator will start and stop node processes the same way. Both need
the same few guarantees, and nothing more:

- each child's stdout+stderr is appended to its own log file (with a header per start);
- no child outlives the supervisor, even one that is SIGKILLed: on Linux each child
  asks the kernel for SIGTERM when its parent dies (`prctl(PR_SET_PDEATHSIG)`);
- children run in their own session, so a Ctrl-C in the terminal reaches only the
  supervisor, which then stops them in a defined order;
- stopping is SIGTERM, a grace period, then SIGKILL (to the child's process group);
- a child that exits without being asked to is reported (name, exit code, last log
  lines) through `next_exit()` and an optional callback, and stays listed (dead) until
  it is stopped, which forgets it, or `restart()`ed under the same name and spec;
- listeners added with `add_listener` hear of every start, restart, exit and removal
  (`tierflow up` rewrites DATA/children.json from them).

When to restart, and when to give up, is policy: see `tierflow.cli.restarts`.

Caveat: PR_SET_PDEATHSIG fires when the *thread* that forked the child exits. Start
children from the thread that runs the event loop for the life of the supervisor (the
normal case) and it is the same as the process dying.

No timing policy lives here besides `grace`; everything waits on asyncio.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import logging
import os
import shlex
import signal
import subprocess
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from tierflow.runtime.processes import die_with_parent_preexec

__all__ = ["Child", "ChildExit", "ProcessSpec", "Supervisor", "read_log_tail"]

_log = logging.getLogger(__name__)

TAIL_LINES = 20


@dataclass(frozen=True)
class ProcessSpec:
    """What to run.

    `env` is *added to* the supervisor's own environment (None: inherit it unchanged),
    because a child that loses PATH or the venv's variables fails in confusing ways.
    """

    name: str
    argv: list[str]
    env: dict[str, str] | None
    log_path: Path
    # What kind of process this is ("nats", "router", "decode-node", ...): several
    # children may share a role (a NATS cluster's members, N routers). Empty: the name.
    role: str = ""

    def __post_init__(self) -> None:
        if not self.name:
            raise ValueError("ProcessSpec.name must not be empty")
        if not self.argv:
            raise ValueError(f"ProcessSpec {self.name!r}: argv must not be empty")

    @property
    def kind(self) -> str:
        """The role, or the name when no role was given."""
        return self.role or self.name


@dataclass(frozen=True)
class ChildExit:
    """A child that exited without being asked to."""

    name: str
    pid: int
    returncode: int
    log_path: Path
    log_tail: list[str]

    @property
    def how(self) -> str:
        """`was killed by SIGKILL`, `exited with code 3`."""
        if self.returncode < 0:
            try:
                return f"was killed by {signal.Signals(-self.returncode).name}"
            except ValueError:
                return f"was killed by signal {-self.returncode}"
        return f"exited with code {self.returncode}"

    def summary(self) -> str:
        """One line: who and how (`router (pid 12) was killed by SIGKILL`)."""
        return f"{self.name} (pid {self.pid}) {self.how}"

    def describe(self) -> str:
        """Human-readable report: who, how, and what it said last."""
        head = self.summary()
        if not self.log_tail:
            return f"{head}; its log {self.log_path} is empty"
        body = "\n".join(f"  | {line}" for line in self.log_tail)
        return f"{head}; last {len(self.log_tail)} lines of {self.log_path}:\n{body}"


def read_log_tail(path: Path, lines: int = TAIL_LINES, *, start: int = 0, max_bytes: int = 64 * 1024) -> list[str]:
    """The last `lines` lines of `path` written at or after byte offset `start`.

    `start` lets a report skip what earlier runs appended to the same log.
    """
    try:
        with open(path, "rb") as file:
            size = file.seek(0, os.SEEK_END)
            begin = max(start, size - max_bytes)
            file.seek(begin)
            data = file.read()
    except OSError:
        return []
    text = data.decode("utf-8", "replace").splitlines()
    if begin > start and text:
        text = text[1:]  # the first line was cut in the middle
    return text[-lines:] if lines > 0 else []


class Child:
    """A started child, as the supervisor tracks it. Read-only for callers."""

    def __init__(self, spec: ProcessSpec, proc: asyncio.subprocess.Process, log_offset: int, restarts: int = 0) -> None:
        self.spec = spec
        self._proc = proc
        self._log_offset = log_offset
        self.restarts = restarts  # how many times this name was restarted after dying
        self.stopping = False
        self.watcher: asyncio.Task[None] | None = None

    @property
    def name(self) -> str:
        """The spec's name (unique among live children)."""
        return self.spec.name

    @property
    def role(self) -> str:
        """The spec's role (its name when it has none)."""
        return self.spec.kind

    @property
    def pid(self) -> int:
        """OS process id."""
        return self._proc.pid

    @property
    def returncode(self) -> int | None:
        """None while running; negative N means killed by signal N."""
        return self._proc.returncode

    @property
    def process(self) -> asyncio.subprocess.Process:
        """The asyncio process handle."""
        return self._proc

    def log_tail(self, lines: int = TAIL_LINES) -> list[str]:
        """Last lines this run of the child wrote to its log."""
        return read_log_tail(self.spec.log_path, lines, start=self._log_offset)

    def __repr__(self) -> str:
        return f"Child(name={self.name!r}, pid={self.pid}, returncode={self.returncode}, restarts={self.restarts})"


class Supervisor:
    """Starts, watches and stops children. Use as `async with Supervisor() as sup:`.

    `on_exit` is called (in the event loop) for every unexpected exit, in addition to
    `next_exit()` returning it; exceptions from it are logged, not raised.
    """

    def __init__(self, *, on_exit: Callable[[ChildExit], None] | None = None, tail_lines: int = TAIL_LINES) -> None:
        self._children: dict[str, Child] = {}
        self._exits: asyncio.Queue[ChildExit] = asyncio.Queue()
        self._on_exit = on_exit
        self._tail_lines = tail_lines
        self._listeners: list[Callable[[], None]] = []
        self._closing = False

    @property
    def children(self) -> list[Child]:
        """Tracked children in start order (an unexpectedly exited one stays until stopped or replaced)."""
        return list(self._children.values())

    @property
    def closing(self) -> bool:
        """True once `close()` was called: nothing starts any more."""
        return self._closing

    def get(self, name: str) -> Child:
        """The child called `name`; KeyError if none."""
        return self._children[name]

    def add_listener(self, listener: Callable[[], None]) -> None:
        """Call `listener()` after every start, restart, exit and removal of a child.

        Listeners run in the event loop and must not block; their exceptions are logged.
        """
        self._listeners.append(listener)

    def remove_listener(self, listener: Callable[[], None]) -> None:
        """Stop calling `listener` (no error if it was not added)."""
        with contextlib.suppress(ValueError):
            self._listeners.remove(listener)

    def close(self) -> None:
        """Refuse every later `start` and `restart` (shutdown has begun); stopping still works."""
        self._closing = True

    async def start(self, spec: ProcessSpec) -> Child:
        """Spawn `spec` and start watching it.

        A name may be reused once its previous holder has exited; starting a second live
        child with the same name is a ValueError. After `close()`: RuntimeError.
        """
        if self._closing:
            raise RuntimeError(f"not starting {spec.name}: the supervisor is shutting down")
        old = self._children.get(spec.name)
        if old is not None:
            if old.returncode is None:
                raise ValueError(f"a child named {spec.name!r} is already running (pid {old.pid})")
            if old.watcher is not None:
                await old.watcher
            del self._children[spec.name]
        child = await self._spawn(spec, restarts=0, verb="starts")
        self._children[spec.name] = child
        self._changed()
        return child

    async def restart(self, name: str, *, reason: str = "") -> Child:
        """Start again, with the same spec, a child that exited without being asked to.

        KeyError if there is no such child any more (it was stopped on purpose, which
        forgets it, possibly while this call was spawning: the new process is then killed
        at once); ValueError if it is still running; RuntimeError after `close()`.
        The new child's `restarts` is one more than the old one's.
        """
        if self._closing:
            raise RuntimeError(f"not restarting {name}: the supervisor is shutting down")
        old = self._children.get(name)
        if old is None or old.stopping:
            raise KeyError(f"{name!r} is not a child that died on its own (stopped on purpose?)")
        if old.returncode is None:
            raise ValueError(f"{name!r} is still running (pid {old.pid})")
        if old.watcher is not None:
            await old.watcher
        detail = f" (restart {old.restarts + 1}{', ' + reason if reason else ''})"
        child = await self._spawn(old.spec, restarts=old.restarts + 1, verb="restarts", detail=detail)
        if self._children.get(name) is not old or old.stopping or self._closing:
            # Stopped on purpose (or shutdown began) while we were spawning: honour that.
            child.stopping = True
            self._kill(child)
            await child.process.wait()
            if child.watcher is not None:
                await child.watcher
            raise KeyError(f"{name!r} was stopped while it was being restarted")
        self._children[name] = child
        self._changed()
        return child

    async def _spawn(self, spec: ProcessSpec, *, restarts: int, verb: str, detail: str = "") -> Child:
        """Open the log (with a header line saying what and why), fork, start the watcher."""
        spec.log_path.parent.mkdir(parents=True, exist_ok=True)
        env = None if spec.env is None else {**os.environ, **spec.env}
        with open(spec.log_path, "ab") as log:
            offset = log.seek(0, os.SEEK_END)
            stamp = datetime.datetime.now().astimezone().isoformat(timespec="seconds")
            log.write(f"--- {stamp} tierflow supervisor {verb} {spec.name}{detail}: {shlex.join(spec.argv)}\n".encode())
            log.flush()
            proc = await asyncio.create_subprocess_exec(
                *spec.argv,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
                start_new_session=True,
                preexec_fn=die_with_parent_preexec(),
            )
        child = Child(spec, proc, offset, restarts)
        child.watcher = asyncio.ensure_future(self._watch(child))
        _log.debug("%s %s (pid %d)", verb, spec.name, proc.pid)
        return child

    def _changed(self) -> None:
        for listener in list(self._listeners):
            try:
                listener()
            except Exception:
                _log.exception("supervisor listener failed")

    async def next_exit(self) -> ChildExit:
        """Wait for the next child that exits without being asked to (queued, none lost)."""
        return await self._exits.get()

    async def stop(self, *names: str, grace: float = 5.0) -> None:
        """Stop the named children concurrently (SIGTERM, `grace` s, SIGKILL) and forget them."""
        children = [self._children[name] for name in names if name in self._children]
        await asyncio.gather(*(self._stop_one(child, grace) for child in children))

    async def stop_all(self, grace: float = 5.0) -> None:
        """Stop every child in reverse start order, one at a time.

        Sequential on purpose: a child is never signalled while one started after it is
        still alive, so dependencies (NATS started first) outlive their dependants.
        Each child gets its own `grace` before SIGKILL.
        """
        for child in reversed(list(self._children.values())):
            await self._stop_one(child, grace)

    def kill_all(self) -> None:
        """SIGKILL every live child now (for a second Ctrl-C); `stop_all` still reaps them."""
        for child in self._children.values():
            child.stopping = True
            self._kill(child)

    async def __aenter__(self) -> Supervisor:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop_all()

    async def _stop_one(self, child: Child, grace: float) -> None:
        child.stopping = True
        proc = child.process
        if proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(proc.wait(), grace)
            except TimeoutError:
                _log.warning("%s (pid %d) ignored SIGTERM for %.1fs; sending SIGKILL", child.name, child.pid, grace)
                self._kill(child)
                await proc.wait()
        if child.watcher is not None:
            await child.watcher
        if self._children.get(child.name) is child:
            del self._children[child.name]
            self._changed()

    @staticmethod
    def _kill(child: Child) -> None:
        """SIGKILL the child's process group (its own session), so helpers it spawned go too."""
        if child.returncode is not None:
            return
        try:
            os.killpg(child.pid, signal.SIGKILL)  # unreaped, so the group id is still ours
        except (ProcessLookupError, PermissionError):
            with contextlib.suppress(ProcessLookupError):
                child.process.kill()

    async def _watch(self, child: Child) -> None:
        returncode = await child.process.wait()
        if child.stopping:
            return
        self._changed()
        event = ChildExit(
            name=child.name,
            pid=child.pid,
            returncode=returncode,
            log_path=child.spec.log_path,
            log_tail=child.log_tail(self._tail_lines),
        )
        _log.debug("unexpected exit: %s", event.describe())
        self._exits.put_nowait(event)
        if self._on_exit is not None:
            try:
                self._on_exit(event)
            except Exception:
                _log.exception("on_exit callback failed for %s", child.name)
