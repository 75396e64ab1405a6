"""Lifecycle: start the listeners and probes, wait for a signal, drain, stop."""

from __future__ import annotations

import asyncio
import signal
import time

import aiohttp
from aiohttp import web

from . import __version__
from .admin import create_admin_app
from .backends import Pool, State
from .config import LBConfig, parse_hostport
from .drift import DriftWatch
from .health import HealthChecker
from .logs import configure as configure_logging
from .logs import get as get_logger
from .metrics import Metrics
from .proxy import Proxy
from .replication import Replicator

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

    def __init__(self, cfg: LBConfig) -> None:
        self.cfg = cfg
        self.metrics = Metrics()
        self.pool = Pool(cfg.backends, cfg.health, cfg.mode, cfg.failback)
        self.pool.on_state_change(self._on_state_change)
        self.started_at = time.time()
        self.stopping = asyncio.Event()
        self._runners: list[web.BaseRunner] = []
        self._session: aiohttp.ClientSession | None = None
        self._health_session: aiohttp.ClientSession | None = None
        self._health: HealthChecker | None = None
        self._repl_session: aiohttp.ClientSession | None = None
        self.replicator: Replicator | None = None
        self.drift: DriftWatch | None = None
        for backend in self.pool.backends:
            self.metrics.up.labels(backend.name).set(1)

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
        self._health_session = _new_session(cfg, limit=len(cfg.backends) * 2)
        self._start_replication()
        proxy = Proxy(cfg, self.pool, self.metrics, self._session, self.replicator)

        handler = web.Server(
            proxy.handle,
            auto_decompress=False,
            access_log=None,
            keepalive_timeout=75.0,
        )
        runner = web.ServerRunner(
            handler, handle_signals=False, shutdown_timeout=cfg.timeouts.shutdown_grace
        )
        await runner.setup()
        self._runners.append(runner)
        host, port = cfg.listen_address
        await web.TCPSite(runner, host, port, backlog=1024).start()

        if cfg.admin.listen:
            admin = web.AppRunner(
                create_admin_app(
                    self.pool, self.metrics, self.started_at, self._extra_status
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
            listen=cfg.listen,
            admin=cfg.admin.listen,
            mode=cfg.mode,
            backends=[b.name for b in self.pool.backends],
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
        for runner in self._runners:
            await runner.cleanup()
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
        await self.start()
        try:
            await self.stopping.wait()
        finally:
            await self.stop()


def run(cfg: LBConfig, config_path: str | None = None) -> int:
    configure_logging(cfg.log.level, cfg.log.format)
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency on Linux
        loop_factory = None
    else:
        loop_factory = uvloop.new_event_loop
    try:
        with asyncio.Runner(loop_factory=loop_factory) as runner:
            runner.run(Server(cfg).run_until_signalled())
    except OSError as exc:
        log.error("server.failed", error=str(exc))
        return 1
    return 0
