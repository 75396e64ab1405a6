"""Active health checks: one probe loop per backend."""

from __future__ import annotations

import asyncio
import time

import aiohttp

from .backends import Backend, Pool, ProbeResult
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
        while True:
            result = await self.probe(backend)
            self.pool.record_probe(backend, result)
            await asyncio.sleep(self.pool.health.interval)

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
                await resp.read()
            ok = status in cfg.expect_status
            if not ok:
                error = f"unexpected status {status}"
        except TimeoutError:
            ok, error = False, f"timed out after {cfg.timeout}s"
        except aiohttp.ClientError as exc:
            ok, error = False, f"{type(exc).__name__}: {exc}"
        latency = time.monotonic() - started

        self.metrics.probes.labels(backend.name, "ok" if ok else "fail").inc()
        self.metrics.probe_duration.labels(backend.name).observe(latency)
        if not ok:
            log.info("health.probe.failed", backend=backend.name, error=error)
        return ProbeResult(ok, status, latency, error, time.time())
