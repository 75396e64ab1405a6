"""Active health checks: one probe loop per backend."""

from __future__ import annotations

import asyncio
import time

import aiohttp

from .backends import Backend, Pool, ProbeResult
from .errors import API_VERSION, API_VERSION_HEADER
from .logs import get as get_logger
from .metrics import Metrics

log = get_logger("zotlb.health")


class HealthChecker:
    def __init__(
        self, pool: Pool, metrics: Metrics, session: aiohttp.ClientSession
    ) -> None:
        self.pool = pool
        self.metrics = metrics
        self.session = session
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._watched: dict[str, Backend] = {}

    def start(self) -> None:
        for backend in self.pool.backends:
            self._tasks[backend.name] = asyncio.create_task(
                self._loop(backend), name=f"health:{backend.name}"
            )
        self._watched = dict(self.pool.by_name)

    def sync(self) -> None:
        """After a reload: probe new backends, stop probing removed ones."""
        for name, task in list(self._tasks.items()):
            if self._watched.get(name) is not self.pool.by_name.get(name):
                task.cancel()
                del self._tasks[name]
        for backend in self.pool.backends:
            if backend.name not in self._tasks:
                self._tasks[backend.name] = asyncio.create_task(
                    self._loop(backend), name=f"health:{backend.name}"
                )
        self._watched = dict(self.pool.by_name)

    async def stop(self) -> None:
        tasks = list(self._tasks.values())
        self._tasks.clear()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def _loop(self, backend: Backend) -> None:
        # Probes start every `interval` (a slow probe delays the next one
        # only by its own overrun), so a frozen backend that eats the whole
        # timeout is marked down after about `timeout x fall`.
        while True:
            started = time.monotonic()
            result = await self.probe(backend)
            self.pool.record_probe(backend, result)
            elapsed = time.monotonic() - started
            await asyncio.sleep(max(0.0, self.pool.health.interval - elapsed))

    async def probe(self, backend: Backend) -> ProbeResult:
        cfg = self.pool.health
        url = backend.url.with_path(cfg.path)
        started = time.monotonic()
        status: int | None = None
        error: str | None = None
        creds = cfg.credentials
        auth = (
            aiohttp.BasicAuth(creds.username, creds.password.get_secret_value())
            if creds is not None
            else None
        )
        try:
            async with self.session.get(
                url,
                timeout=aiohttp.ClientTimeout(total=cfg.timeout),
                allow_redirects=False,
                auth=auth,
                ssl=backend.tls,
            ) as resp:
                status = resp.status
                api_version = resp.headers.get(API_VERSION_HEADER)
                await resp.read()
            ok = status in cfg.expect_status
            if not ok:
                error = f"unexpected status {status}"
            elif cfg.require_api_header and api_version != API_VERSION:
                ok, error = False, f"no {API_VERSION_HEADER}: {API_VERSION} header"
        except TimeoutError:
            ok, error = False, f"timed out after {cfg.timeout}s"
        except (aiohttp.ClientError, OSError, ValueError) as exc:
            # Includes an answer that is not HTTP at all (a bad status line).
            ok, error = False, f"{type(exc).__name__}: {exc}"
        latency = time.monotonic() - started

        self.metrics.probes.labels(backend.name, "ok" if ok else "fail").inc()
        self.metrics.probe_duration.labels(backend.name).observe(latency)
        if not ok:
            log.info("health.probe.failed", backend=backend.name, error=error)
        return ProbeResult(ok, status, latency, error, time.time())
