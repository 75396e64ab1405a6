"""`workers: N`: N processes serving one port together (SO_REUSEPORT).

The parent is worker 0: it serves the proxy port like every worker and alone
runs the admin listener, the drift watch and the durable replication queue of
`replication.state_dir` (worker i keeps its own in `state_dir/worker-i`). The
kernel spreads new client connections over the workers' listening sockets.
Each worker has its own backend pool, health probes and passive failure
detection; /metrics and /status on the admin port are the parent's alone.

Signals go to the parent: SIGTERM and SIGINT stop every worker (each drains
its own connections within `shutdown_grace`), SIGHUP or POST /reload re-reads
lb.yaml in every worker. A worker that dies stops them all (exit 1), so a
supervisor restarts a whole, consistent set; the workers die with the parent.
"""

from __future__ import annotations

import asyncio
import ctypes
import os
import select
import signal
import time
from collections.abc import Callable
from typing import Any

import structlog

from . import tls
from .config import LBConfig
from .logs import get as get_logger
from .server import Server

log = get_logger("zotlb.workers")

_PR_SET_PDEATHSIG = 1
_READY_TIMEOUT = 30.0


def for_worker(cfg: LBConfig, index: int) -> LBConfig:
    """A worker's view of the config: no admin listener, no drift watch, own queue."""
    replication = cfg.replication
    state_dir = replication.state_dir
    if state_dir is not None:
        state_dir = os.path.join(state_dir, f"worker-{index}")
    return cfg.model_copy(
        update={
            "admin": cfg.admin.model_copy(update={"listen": None}),
            "replication": replication.model_copy(
                update={"state_dir": state_dir, "drift_interval": 0.0}
            ),
        }
    )


class _Worker(Server):
    """A forked worker: serves the port, tells the parent when it listens."""

    def __init__(
        self, cfg: LBConfig, config_path: str | None, index: int, ready_fd: int
    ) -> None:
        super().__init__(for_worker(cfg, index), config_path)
        self.reuse_port = True
        self._index = index
        self._ready_fd = ready_fd

    def _apply(self, new: LBConfig, contexts: dict[str, tls.BackendSSL]) -> None:
        super()._apply(for_worker(new, self._index), contexts)

    async def start(self) -> None:
        await super().start()
        # Ctrl+C reaches the whole process group; the parent turns it into
        # one SIGTERM here, so a single Ctrl+C never counts twice.
        asyncio.get_running_loop().remove_signal_handler(signal.SIGINT)
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        os.write(self._ready_fd, b"1")
        os.close(self._ready_fd)


class _Parent(Server):
    """Worker 0: also supervises the forked workers."""

    def __init__(
        self, cfg: LBConfig, config_path: str | None, children: list[int]
    ) -> None:
        super().__init__(cfg, config_path)
        self.reuse_port = True
        self.children = children
        self.exit_code = 0
        self._pidfds: dict[int, int] = {}
        self._child_gone = asyncio.Event()

    async def start(self) -> None:
        # A pidfd turns readable when its process exits (uvloop keeps SIGCHLD).
        loop = asyncio.get_running_loop()
        for pid in self.children:
            fd = os.pidfd_open(pid)
            self._pidfds[pid] = fd
            loop.add_reader(fd, self._on_child_exit, pid)
        await super().start()

    async def reload(self) -> list[str]:
        problems = await super().reload()
        if not problems:
            self._signal_children(signal.SIGHUP)
        return problems

    # A drain is per process and the workers cannot be told: the admin API
    # refuses it rather than drain one worker of N.
    drain_refused = (
        "drain and enable act on one process; not available with workers > 1"
    )

    async def stop(self) -> None:
        self._signal_children(signal.SIGTERM)
        await super().stop()
        # Each worker drains its own connections within the same grace.
        deadline = time.monotonic() + self.cfg.timeouts.shutdown_grace + 5
        while self.children:
            self._child_gone.clear()
            left = deadline - time.monotonic()
            try:
                await asyncio.wait_for(self._child_gone.wait(), max(left, 0.001))
            except TimeoutError:
                break
        if self.children:
            log.error("workers.killed", pids=self.children)
            self._signal_children(signal.SIGKILL)
            self.exit_code = 1
        for pid in list(self.children):
            self._forget(pid, block=True)

    def _signal_children(self, signum: int) -> None:
        for pid in self.children:
            try:
                os.kill(pid, signum)
            except ProcessLookupError:
                pass

    def _forget(self, pid: int, block: bool = False) -> int | None:
        """Reap one worker: its exit code, or None while it still runs."""
        try:
            done, status = os.waitpid(pid, 0 if block else os.WNOHANG)
        except ChildProcessError:
            done, status = pid, 0
        if not done:
            return None
        self.children.remove(pid)
        fd = self._pidfds.pop(pid, None)
        if fd is not None:
            asyncio.get_running_loop().remove_reader(fd)
            os.close(fd)
        code = os.waitstatus_to_exitcode(status)
        if code != 0:
            self.exit_code = 1
        return code

    def _on_child_exit(self, pid: int) -> None:
        code = self._forget(pid)
        if code is None:
            return
        self._child_gone.set()
        if not self.stopping.is_set():
            log.error("worker.exited", pid=pid, exit_code=code)
            self.exit_code = 1
            self.stopping.set()


def run_workers(
    cfg: LBConfig, config_path: str | None, loop_factory: Callable[[], Any] | None
) -> int:
    """Fork the workers, wait until each listens, then serve as worker 0."""
    count = cfg.worker_count
    # Bad certificates stop the start here, once, with the config exit code.
    tls.build(cfg, config_path or "<config>")
    ready_r, ready_w = os.pipe()
    children = []
    for index in range(1, count):
        pid = os.fork()
        if pid == 0:
            os.close(ready_r)
            os._exit(_run_child(cfg, config_path, loop_factory, index, ready_w))
        children.append(pid)
    os.close(ready_w)
    ready = _wait_ready(ready_r, len(children))
    os.close(ready_r)
    if not ready:
        log.error("server.failed", error="a worker did not start", workers=count)
        for pid in children:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
        return 1

    server = _Parent(cfg, config_path, children)
    try:
        with asyncio.Runner(loop_factory=loop_factory) as runner:
            runner.run(server.run_until_signalled())
    except OSError as exc:
        log.error("server.failed", error=str(exc))
        server.exit_code = 1
    finally:
        for pid in server.children:
            try:
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
            except (ProcessLookupError, ChildProcessError):
                pass
    return server.exit_code


def _run_child(
    cfg: LBConfig,
    config_path: str | None,
    loop_factory: Callable[[], Any] | None,
    index: int,
    ready_fd: int,
) -> int:
    try:
        _die_with_parent()
        structlog.contextvars.bind_contextvars(worker=index)
        server = _Worker(cfg, config_path, index, ready_fd)
        with asyncio.Runner(loop_factory=loop_factory) as runner:
            runner.run(server.run_until_signalled())
    except OSError as exc:
        log.error("server.failed", error=str(exc))
        return 1
    except SystemExit as exc:
        return int(exc.code or 0)
    except BaseException as exc:  # a worker must never unwind into the parent's code
        log.error("worker.crashed", error=f"{type(exc).__name__}: {exc}")
        return 1
    return 0


def _die_with_parent() -> None:
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    except (
        OSError,
        AttributeError,
    ):  # not Linux: the parent's SIGTERM still reaches us
        pass


def _wait_ready(fd: int, count: int) -> bool:
    """One byte per worker once it listens; EOF means one died first."""
    deadline = time.monotonic() + _READY_TIMEOUT
    got = 0
    while got < count:
        left = deadline - time.monotonic()
        if left <= 0 or not select.select([fd], [], [], left)[0]:
            return False
        data = os.read(fd, count - got)
        if not data:
            return False
        got += len(data)
    return True
