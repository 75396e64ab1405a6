"""Lifecycle: start the listeners and probes, wait for a signal, drain, stop."""

from __future__ import annotations

import asyncio
import resource
import signal
import time
from typing import Any

import aiohttp
from aiohttp import web

from . import __version__, tls
from .admin import create_admin_app
from .backends import Pool, State
from .config import ConfigError, LBConfig, load_config, parse_hostport
from .drift import DriftWatch
from .health import HealthChecker
from .listener import Listener, ListenerSite
from .logs import configure as configure_logging
from .logs import get as get_logger
from .metrics import Metrics
from .proxy import Proxy
from .replication import Replicator
from .stats import Stats

log = get_logger("zotlb.server")


def _new_session(cfg: LBConfig, limit: int = 0) -> aiohttp.ClientSession:
    connector = aiohttp.TCPConnector(
        limit=limit,
        limit_per_host=0,
        keepalive_timeout=30,
        enable_cleanup_closed=False,
        ttl_dns_cache=60,
    )
    return aiohttp.ClientSession(
        connector=connector,
        auto_decompress=False,
        cookie_jar=aiohttp.DummyCookieJar(),
        timeout=aiohttp.ClientTimeout(total=None, connect=cfg.timeouts.connect),
        read_bufsize=256 * 1024,
    )


class Server:
    """One zotlb instance: the proxy listener, the admin listener, the probes."""

    def __init__(self, cfg: LBConfig, config_path: str | None = None) -> None:
        self.cfg = cfg
        # What the listeners and logging were started with: a reload cannot
        # change it, so later reloads are compared with this, not the last file.
        self._boot_cfg = cfg
        self.needs_restart: list[str] = []
        self.config_path = config_path
        self.metrics = Metrics()
        self.stats = Stats(on_upload_change=self._on_uploads_change)
        self.proxy: Proxy | None = None
        self._reload_lock = asyncio.Lock()
        self.metrics.info.labels(__version__, cfg.mode).set(1)
        self.pool = Pool(cfg.backends, cfg.health, cfg.mode, cfg.failback)
        # Certificates are read once, here: a bad one stops the start (exit 2).
        self.tls = tls.build(cfg, config_path or "<config>")
        self._set_backend_tls(self.tls.backends)
        self.pool.on_state_change(self._on_state_change)
        self.started_at = time.time()
        self.stopping = asyncio.Event()
        # workers > 1: every worker binds the proxy port with SO_REUSEPORT.
        self.reuse_port = False
        # Client requests being handled; set when there are none.
        self._busy = 0
        self._idle = asyncio.Event()
        self._idle.set()
        self._runners: list[web.BaseRunner] = []
        self._handler: Listener | None = None
        self._session: aiohttp.ClientSession | None = None
        self._health_session: aiohttp.ClientSession | None = None
        self._health: HealthChecker | None = None
        self._repl_session: aiohttp.ClientSession | None = None
        self.replicator: Replicator | None = None
        self.drift: DriftWatch | None = None
        for backend in self.pool.backends:
            self.metrics.up.labels(backend.name).set(1)
            self.metrics.drained.labels(backend.name).set(0)

    def _on_uploads_change(self, backend: str, delta: int) -> None:
        self.metrics.uploads_open.labels(backend).inc(delta)

    def _on_state_change(self, backend: object, state: State, reason: str) -> None:
        name = getattr(backend, "name", "?")
        if reason in ("failover", "failback"):
            self.metrics.failovers.labels(reason).inc()
            return
        self.metrics.up.labels(name).set(1 if state is State.UP else 0)
        self.metrics.state_changes.labels(name, state.value).inc()

    async def start(self) -> None:
        cfg = self.cfg
        self._session = _new_session(cfg)
        # Room for backends a reload may add.
        self._health_session = _new_session(cfg, limit=max(16, len(cfg.backends) * 2))
        self._start_replication()
        self.proxy = Proxy(
            cfg,
            self.pool,
            self.metrics,
            self._session,
            stats=self.stats,
            replicator=self.replicator,
        )

        self._handler = handler = _listener(cfg, self._handle, self.metrics)
        runner = web.ServerRunner(
            handler, handle_signals=False, shutdown_timeout=cfg.timeouts.shutdown_grace
        )
        await runner.setup()
        self._runners.append(runner)
        host, port = cfg.listen_address
        await ListenerSite(
            runner,
            host,
            port,
            backlog=1024,
            ssl_context=self.tls.listener,
            handshake_timeout=cfg.timeouts.request_header,
            reuse_port=self.reuse_port,
        ).start()
        watch_connections(self.metrics, handler, self._session)

        if cfg.admin.listen:
            admin = web.AppRunner(
                create_admin_app(
                    self.pool,
                    self.metrics,
                    self.started_at,
                    stats=self.stats,
                    controls=self,
                    admin_cfg=cfg.admin,
                    extra_status=self._extra_status,
                ),
                handle_signals=False,
                access_log=None,
                shutdown_timeout=1.0,
            )
            await admin.setup()
            self._runners.append(admin)
            admin_host, admin_port = parse_hostport(cfg.admin.listen)
            await web.TCPSite(admin, admin_host, admin_port).start()

        self._health = HealthChecker(self.pool, self.metrics, self._health_session)
        self._health.start()
        log.info(
            "server.started",
            version=__version__,
            listen=cfg.listen.address,
            tls=self.tls.listener is not None,
            admin=cfg.admin.listen,
            mode=cfg.mode,
            backends=[b.name for b in self.pool.backends],
        )

    async def _handle(self, request: web.BaseRequest) -> web.StreamResponse:
        assert self.proxy is not None
        self._busy += 1
        self._idle.clear()
        try:
            return await self.proxy.handle(request)  # type: ignore[arg-type]
        finally:
            self._busy -= 1
            if not self._busy:
                self._idle.set()

    async def _drain(self, deadline: float) -> None:
        """Close the proxy listener, then let requests in flight finish.

        aiohttp's own shutdown stops reading from every connection at once,
        which would stall an upload whose body is still arriving until the
        grace period runs out: so wait for those first, and hand aiohttp
        only what is left at the deadline.
        """
        runner = self._runners[0]
        for site in list(runner.sites):
            await site.stop()
        try:
            remaining = max(0.0, deadline - time.monotonic())
            await asyncio.wait_for(self._idle.wait(), remaining)
        except TimeoutError:
            log.warning("server.grace_expired", requests=self._busy)
        if self._handler is not None:
            # Now close every connection (idle keep-alives end at once). aiohttp
            # reads a timeout of 0 as "none": past the deadline, give it a
            # token one so what is left is cancelled instead of awaited.
            self._handler.pre_shutdown()
            await self._handler.shutdown(max(0.01, deadline - time.monotonic()))

    # --- runtime controls (the admin API calls these) --------------------------

    def set_drained(self, name: str, drained: bool) -> bool:
        backend = self.pool.by_name.get(name)
        if backend is None:
            return False
        self.pool.set_drained(backend, drained)
        self.metrics.drained.labels(name).set(1 if drained else 0)
        return True

    async def reload(self) -> list[str]:
        """Re-read lb.yaml and apply it; return the problems (empty when applied).

        An invalid file changes nothing: the old configuration stays in force.
        """
        async with self._reload_lock:
            if self.config_path is None:
                problems = ["zotlb was started without a configuration file"]
            else:
                try:
                    new = load_config(self.config_path)
                    contexts = tls.backend_contexts(new.backends, self.config_path)
                except ConfigError as exc:
                    problems = exc.problems
                else:
                    problems = []
                    self._apply(new, contexts)
            if problems:
                self.metrics.reloads.labels("failed").inc()
                log.error(
                    "config.reload.failed", path=self.config_path, problems=problems
                )
            else:
                self.metrics.reloads.labels("ok").inc()
            return problems

    def _set_backend_tls(self, contexts: dict[str, tls.BackendSSL]) -> None:
        for backend in self.pool.backends:
            backend.tls = contexts.get(backend.name, True)

    def _apply(self, new: LBConfig, contexts: dict[str, tls.BackendSSL]) -> None:
        old = self.cfg
        boot = self._boot_cfg
        # Listeners stay open across a reload: their addresses and the log
        # set-up need a restart to change.
        ignored = [
            key
            for key, before, after in (
                ("listen", boot.listen, new.listen),
                ("workers", boot.workers, new.workers),
                ("limits", boot.limits, new.limits),
                ("timeouts.idle", boot.timeouts.idle, new.timeouts.idle),
                (
                    "timeouts.request_header",
                    boot.timeouts.request_header,
                    new.timeouts.request_header,
                ),
                ("admin", boot.admin, new.admin),
                ("log.level", boot.log.level, new.log.level),
                ("log.format", boot.log.format, new.log.format),
            )
            if before != after
        ]
        added, removed = self.pool.reconfigure(
            new.backends, new.health, new.mode, new.failback
        )
        self._set_backend_tls(contexts)
        for backend in removed:
            self.metrics.forget_backend(backend.name, idle=backend.in_flight == 0)
        for backend in added:
            self.metrics.up.labels(backend.name).set(0)
            self.metrics.drained.labels(backend.name).set(0)
        if old.mode != new.mode:
            self.metrics.info.remove(__version__, old.mode)
            self.metrics.info.labels(__version__, new.mode).set(1)
        if self._health is not None:
            self._health.sync()
        if self.proxy is not None:
            self.proxy.apply_config(new)
        self.cfg = new
        self.needs_restart = ignored
        log.info(
            "config.reloaded",
            path=self.config_path,
            added=[b.name for b in added],
            removed=[b.name for b in removed],
            backends=[b.name for b in self.pool.backends],
            needs_restart=ignored,
        )

    def _start_replication(self) -> None:
        rcfg = self.cfg.replication
        if rcfg.mode == "off" and not rcfg.drift_interval:
            return
        # Its own session: copies never queue behind client traffic.
        self._repl_session = _new_session(self.cfg)
        if rcfg.mode != "off":
            self.replicator = Replicator(
                rcfg,
                self.pool,
                self._repl_session,
                self.metrics.registry,
                self.cfg.timeouts.read,
                self.cfg.timeouts.connect,
            )
            self.replicator.start()
        if rcfg.drift_interval:
            self.drift = DriftWatch(
                self.pool,
                self._repl_session,
                self.metrics.registry,
                rcfg.drift_interval,
                rcfg.basic_auth,
            )
            self.drift.start()

    def _extra_status(self) -> dict[str, object]:
        extra: dict[str, object] = {
            "replication": None if self.replicator is None else self.replicator.status()
        }
        if self.drift is not None:
            extra["drift"] = self.drift.status()
        return extra

    async def stop(self) -> None:
        log.info("server.stopping", grace_seconds=self.cfg.timeouts.shutdown_grace)
        # The proxy listener first: it closes, then in-flight requests get the
        # grace period to finish; the admin listener stays up until then.
        deadline = time.monotonic() + self.cfg.timeouts.shutdown_grace
        transports = [
            c.transport for c in (self._handler.connections if self._handler else [])
        ]
        if self._runners:
            await self._drain(deadline)
        for runner in self._runners:
            await runner.cleanup()
        await _flushed([t for t in transports if t is not None], deadline)
        if self._health is not None:
            await self._health.stop()
        if self.drift is not None:
            await self.drift.stop()
        if self.replicator is not None:
            # Unfinished jobs stay queued on disk and resume on the next start.
            await self.replicator.stop()
        for session in (self._session, self._health_session, self._repl_session):
            if session is not None:
                await session.close()
        log.info("server.stopped")

    async def run_until_signalled(self) -> None:
        loop = asyncio.get_running_loop()
        signals = 0

        def on_signal(signum: int) -> None:
            nonlocal signals
            signals += 1
            if signals > 1:
                log.warning("server.forced_exit", signal=signal.Signals(signum).name)
                raise SystemExit(1)
            log.info("server.signal", signal=signal.Signals(signum).name)
            self.stopping.set()

        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, on_signal, signum)
        reloads: set[asyncio.Task[list[str]]] = set()

        def on_hangup() -> None:
            task = loop.create_task(self.reload())
            reloads.add(task)
            task.add_done_callback(reloads.discard)

        loop.add_signal_handler(signal.SIGHUP, on_hangup)
        try:
            await self.start()
        except BaseException:
            await self._abort()
            raise
        try:
            await self.stopping.wait()
        finally:
            await self.stop()

    async def _abort(self) -> None:
        """Undo a start that failed half-way (a port in use, a bad state_dir)."""
        for runner in self._runners:
            await runner.cleanup()
        for part in (self._health, self.drift, self.replicator):
            if part is not None:
                await part.stop()
        for session in (self._session, self._health_session, self._repl_session):
            if session is not None:
                await session.close()


async def _flushed(transports: list[asyncio.BaseTransport], deadline: float) -> None:
    """Wait until closed client connections have sent what they still buffer.

    A finished response may still sit in a transport's buffer when the
    listener shuts down; exiting before it is flushed would cut the tail off
    a response the client believes whole.
    """
    # uvloop's transports are not asyncio.WriteTransport subclasses: test for
    # the method, or the wait is skipped under uvloop and the tail is lost.
    pending = [t for t in transports if hasattr(t, "get_write_buffer_size")]
    while pending and time.monotonic() < deadline:
        pending = [t for t in pending if _buffered(t)]
        if pending:
            await asyncio.sleep(0.01)


def _buffered(transport: asyncio.WriteTransport) -> bool:
    try:
        return transport.get_write_buffer_size() > 0
    except (RuntimeError, AttributeError):
        return False


def _listener(cfg: LBConfig, handler: Any, metrics: Metrics) -> Listener:
    """The proxy listener's HTTP server, with the timeouts and limits of cfg."""
    limits = cfg.limits

    def on_limit(reason: str) -> None:
        metrics.client_limits.labels(reason).inc()

    return Listener(
        handler,
        header_timeout=cfg.timeouts.request_header,
        max_connections=limits.max_connections,
        on_limit=on_limit,
        auto_decompress=False,
        access_log=None,
        keepalive_timeout=cfg.timeouts.idle,
        max_line_size=limits.max_header_size,
        max_field_size=limits.max_header_size,
        max_headers=limits.max_headers,
    )


def _raise_fd_limit(cfg: LBConfig) -> None:
    """Lift the open-files limit to its ceiling; warn when it stays too low.

    Every client connection may hold a backend connection too, so
    max_connections needs about twice as many descriptors.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and soft < hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        except (ValueError, OSError) as exc:
            log.warning("server.nofile", soft=soft, hard=hard, error=str(exc))
        else:
            log.info("server.nofile", previous=soft, soft=hard)
            soft = hard
    wanted = 2 * cfg.limits.max_connections + 256
    if soft != resource.RLIM_INFINITY and soft < wanted:
        log.warning(
            "server.fd_limit_low",
            open_files=soft,
            wanted=wanted,
            max_connections=cfg.limits.max_connections,
        )


def run(cfg: LBConfig, config_path: str | None = None) -> int:
    configure_logging(cfg.log.level, cfg.log.format)
    _raise_fd_limit(cfg)
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency on Linux
        loop_factory = None
    else:
        loop_factory = uvloop.new_event_loop
    if cfg.worker_count > 1:
        from .workers import run_workers

        return run_workers(cfg, config_path, loop_factory)
    try:
        with asyncio.Runner(loop_factory=loop_factory) as runner:
            runner.run(Server(cfg, config_path).run_until_signalled())
    except OSError as exc:
        log.error("server.failed", error=str(exc))
        return 1
    return 0


def watch_connections(
    metrics: Metrics, handler: web.Server, session: aiohttp.ClientSession
) -> None:
    """Connection gauges, read when Prometheus scrapes rather than counted."""
    metrics.client_connections.set_function(lambda: len(handler.connections))
    connector = session.connector
    # aiohttp keeps these private; read them defensively so an aiohttp change
    # turns the gauges to zero instead of breaking /metrics.
    metrics.backend_connections.labels("active").set_function(
        lambda: len(getattr(connector, "_acquired", ()))
    )
    metrics.backend_connections.labels("idle").set_function(
        lambda: sum(len(c) for c in getattr(connector, "_conns", {}).values())
    )
