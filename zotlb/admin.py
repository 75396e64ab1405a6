"""The admin listener: /metrics for Prometheus and /status as JSON."""

from __future__ import annotations

import time
from collections.abc import Callable

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from . import __version__
from .backends import Backend, Pool
from .metrics import Metrics


def backend_status(backend: Backend, pool: Pool) -> dict[str, object]:
    probe = backend.last_probe
    now = time.monotonic()
    return {
        "name": backend.name,
        "url": backend.origin,
        "state": backend.state.value,
        "reason": backend.reason,
        "drained": backend.drained,
        "seconds_in_state": round(now - backend.state_since, 3),
        "in_flight": backend.in_flight,
        "active": pool.mode == "active-passive" and pool.active is backend,
        "last_probe": None
        if probe is None
        else {
            "ok": probe.ok,
            "status": probe.status,
            "latency_ms": round(probe.latency * 1000, 2),
            "error": probe.error,
            "at": probe.at,
        },
    }


def create_admin_app(
    pool: Pool,
    metrics: Metrics,
    started_at: float,
    extra_status: Callable[[], dict[str, object]] | None = None,
) -> web.Application:
    async def status(request: web.Request) -> web.Response:
        body: dict[str, object] = {
            "version": __version__,
            "mode": pool.mode,
            "uptime_seconds": round(time.time() - started_at, 3),
            "backends": [backend_status(b, pool) for b in pool.backends],
        }
        if extra_status is not None:
            body.update(extra_status())
        return web.json_response(body)

    async def prometheus(request: web.Request) -> web.Response:
        body = generate_latest(metrics.registry)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    app = web.Application()
    app.router.add_get("/status", status)
    app.router.add_get("/metrics", prometheus)
    return app
