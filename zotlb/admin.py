"""The admin listener: /metrics for Prometheus, /status as JSON, the status page
at /, and the runtime controls (drain, enable, reload)."""

from __future__ import annotations

import hmac
import ipaddress
import time
from collections.abc import Callable
from importlib import resources
from typing import Protocol

from aiohttp import web
from aiohttp.typedefs import Handler, Middleware
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from yarl import URL

from . import __version__
from .backends import Backend, Pool
from .config import AdminConfig
from .logs import get as get_logger
from .metrics import Metrics
from .stats import Stats

log = get_logger("zotlb.admin")


class Controls(Protocol):
    """What the admin API may change at runtime (the Server implements it)."""

    def set_drained(self, name: str, drained: bool) -> bool: ...

    async def reload(self) -> list[str]: ...


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
        "probe_latency_ms": None if probe is None else round(probe.latency * 1000, 2),
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
    *,
    stats: Stats | None = None,
    controls: Controls | None = None,
    admin_cfg: AdminConfig | None = None,
    extra_status: Callable[[], dict[str, object]] | None = None,
) -> web.Application:
    async def status(request: web.Request) -> web.Response:
        backends = [backend_status(b, pool) for b in pool.backends]
        if stats is not None:
            traffic = stats.summary([b.name for b in pool.backends])
            homes = stats.homes.counts()
            for entry in backends:
                name = str(entry["name"])
                entry.update(traffic[name])
                entry["recent_home_repositories"] = homes.get(name, 0)
        body: dict[str, object] = {
            "version": __version__,
            "mode": pool.mode,
            "uptime_seconds": round(time.time() - started_at, 3),
            "backends": backends,
        }
        if extra_status is not None:
            body.update(extra_status())
        return web.json_response(body)

    async def page(request: web.Request) -> web.Response:
        return web.Response(
            text=_STATUS_PAGE, content_type="text/html", charset="utf-8"
        )

    async def drain(request: web.Request) -> web.Response:
        return _set_drained(request, True)

    async def enable(request: web.Request) -> web.Response:
        return _set_drained(request, False)

    def _set_drained(request: web.Request, drained: bool) -> web.Response:
        name = request.match_info["name"]
        refused = getattr(controls, "drain_refused", None)
        if refused:
            return web.json_response({"error": refused}, status=409)
        if controls is None or not controls.set_drained(name, drained):
            return web.json_response(
                {"error": f"no backend named {name!r}"}, status=404
            )
        return web.json_response(backend_status(pool.by_name[name], pool))

    async def reload(request: web.Request) -> web.Response:
        if controls is None:
            return web.json_response({"error": "reload is not available"}, status=501)
        problems = await controls.reload()
        pending = list(getattr(controls, "needs_restart", []))
        return web.json_response(
            {"reloaded": not problems, "problems": problems, "needs_restart": pending},
            status=422 if problems else 200,
        )

    async def prometheus(request: web.Request) -> web.Response:
        body = generate_latest(metrics.registry)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    cfg = admin_cfg or AdminConfig()
    token = cfg.resolved_token()
    app = web.Application(
        middlewares=[
            _same_origin(needs_ip_host=token is None),
            _auth(token, cfg.open_read),
        ]
    )
    app.router.add_get("/", page)
    app.router.add_get("/status", status)
    app.router.add_get("/metrics", prometheus)
    app.router.add_post("/backends/{name}/drain", drain)
    app.router.add_post("/backends/{name}/enable", enable)
    app.router.add_post("/reload", reload)
    return app


_READ_ONLY = frozenset({"GET", "HEAD"})
_SAME_SITE = frozenset({"same-origin", "none"})


def _is_ip_or_localhost(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        return False
    return True


def _same_origin(needs_ip_host: bool) -> Middleware:
    """Refuse controls that a web page in the operator's browser could send.

    A page on another site may POST to a loopback admin listener (cross-site
    request forgery), or reach it under its own name by DNS rebinding. Browsers
    name the page's origin in `Origin` and `Sec-Fetch-Site`; the CLI and
    scripts send neither. Without a token, the Host must also be an address.
    """

    @web.middleware
    async def check(request: web.Request, handler: Handler) -> web.StreamResponse:
        if request.method in _READ_ONLY:
            return await handler(request)
        origin = request.headers.get("Origin")
        site = request.headers.get("Sec-Fetch-Site")
        host = request.host
        refused = (
            (origin is not None and URL(origin).raw_authority != host)
            or (site is not None and site not in _SAME_SITE)
            or (needs_ip_host and not _is_ip_or_localhost(request.url.raw_host or ""))
        )
        if refused:
            log.warning(
                "admin.cross_site_refused",
                path=request.path,
                origin=origin,
                host=host,
                client=request.remote,
            )
            return web.json_response(
                {"error": "cross-site requests to the admin controls are refused"},
                status=403,
            )
        return await handler(request)

    return check


def _auth(token: str | None, open_read: bool) -> Middleware:
    expected = f"Bearer {token}".encode() if token else None

    @web.middleware
    async def check(request: web.Request, handler: Handler) -> web.StreamResponse:
        if expected is None or (open_read and request.method in _READ_ONLY):
            return await handler(request)
        given = request.headers.get("Authorization", "").encode()
        if not hmac.compare_digest(given, expected):
            log.warning("admin.unauthorized", path=request.path, client=request.remote)
            return web.json_response(
                {"error": "a bearer token is required"},
                status=401,
                headers={"WWW-Authenticate": 'Bearer realm="zotlb admin"'},
            )
        return await handler(request)

    return check


_STATUS_PAGE = (
    resources.files("zotlb").joinpath("data/status.html").read_text(encoding="utf-8")
)
