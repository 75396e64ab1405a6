"""The streaming handler: one client request, relayed to the backends the plan names."""

from __future__ import annotations

import asyncio
import itertools
import random
import secrets
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

import aiohttp
import aiohttp.payload
from aiohttp import web
from aiohttp.abc import AbstractStreamWriter
from multidict import CIMultiDict, CIMultiDictProxy
from yarl import URL

from . import routing, splice
from .backends import Backend, Pool
from .config import LBConfig
from .errors import (
    BackendBroken,
    BackendTimeout,
    NoHealthyBackend,
    ProxyError,
    UploadUnknown,
)
from .logs import get as get_logger
from .metrics import Metrics
from .routing import Kind, Route
from .stats import Stats

if TYPE_CHECKING:
    from .replication import Replicator

access_log = get_logger("zotlb.access")
log = get_logger("zotlb.proxy")

# RFC 9110 section 7.6.1, plus the legacy names still seen in the wild.
HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "proxy-connection",
        "te",
        "trailer",
        "trailers",
        "transfer-encoding",
        "upgrade",
    }
)
# Dropped toward the backend: aiohttp answers 100-continue itself.
_REQUEST_DROP = HOP_BY_HOP | {"expect", "host"}
_RETRY_STATUSES = frozenset({502, 503, 504})
# A 404 kept for the client while other backends are asked is small JSON.
_MISS_BODY_LIMIT = 64 * 1024
# Manifests are small; bigger bodies are fetched back by digest to replicate.
_MANIFEST_CAPTURE_LIMIT = 4 * 1024 * 1024
_SKIP_AUTO_HEADERS = ("Accept", "Accept-Encoding", "User-Agent", "Content-Type")


class _ClientGone(Exception):
    pass


# aiohttp 3.10+ tells a connect timeout apart from a read timeout.
_ConnectTimeout: type[Exception] = getattr(
    aiohttp, "ConnectionTimeoutError", aiohttp.ClientConnectorError
)


def _connect_failure(backend: Backend, exc: Exception) -> tuple[ProxyError, str]:
    """What the client hears, and the reason logged, when no connection was made."""
    if isinstance(exc, _ConnectTimeout):
        message = f"backend {backend.name} did not accept a connection in time"
        return BackendTimeout(message), "connect timed out"
    reason = str(getattr(exc, "os_error", None) or exc)
    if isinstance(exc, aiohttp.ClientSSLError):
        # Certificate not trusted, wrong host name, or no TLS on the other end.
        return BackendBroken(f"backend {backend.name}: TLS handshake failed"), (
            f"TLS handshake failed: {reason}"
        )
    return BackendBroken(f"backend {backend.name} refused the connection"), reason


class _UploadWatch:
    """timeouts.read for request bodies: the backend must keep taking bytes.

    aiohttp's read timeout starts once the body is sent, so a backend that
    stops reading mid-upload would hold the request (and the client) forever.
    The body generator only flags each hand-over (cheap, once per chunk); a
    timer looks every half limit, and once the same chunk was still waiting
    at two looks after the one that first saw it (1 to 1.5 limits of
    silence) it aborts the backend connection. Abort, not close: a close
    waits for the unsent bytes to drain, which a deaf backend never allows.
    """

    __slots__ = (
        "_checks",
        "_handed",
        "_limit",
        "_seen",
        "_timer",
        "_waiting",
        "transport",
    )

    def __init__(self, limit: float) -> None:
        self._limit = limit
        self._handed = 0
        self._waiting = False
        self._seen = -1
        self._checks = 0
        self._timer: asyncio.TimerHandle | None = None
        self.transport: asyncio.Transport | None = None

    @property
    def expired(self) -> bool:
        return self._checks >= 2

    def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._timer = loop.call_later(self._limit / 2, self._check)

    def stop(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _check(self) -> None:
        if self._waiting and self._handed == self._seen:
            self._checks += 1
        else:
            self._checks = 0
        self._seen = self._handed
        if self.expired and self.transport is not None:
            self._timer = None
            self.transport.abort()
            return
        loop = asyncio.get_running_loop()
        self._timer = loop.call_later(self._limit / 2, self._check)

    def handed_over(self) -> None:
        self._handed += 1
        self._waiting = True

    def taken(self) -> None:
        self._waiting = False


class _NoWatch(_UploadWatch):
    __slots__ = ()

    def start(self) -> None:
        pass


class _WatchedBody(aiohttp.payload.AsyncIterablePayload):
    """A streamed request body that tells its watch which connection it is on."""

    def __init__(self, value: AsyncIterator[bytes], watch: _UploadWatch) -> None:
        super().__init__(value)
        self._watch = watch

    async def write(self, writer: AbstractStreamWriter) -> None:
        self._watch.transport = getattr(writer, "transport", None)
        await super().write(writer)

    async def write_with_length(
        self, writer: AbstractStreamWriter, content_length: int | None
    ) -> None:
        self._watch.transport = getattr(writer, "transport", None)
        await super().write_with_length(writer, content_length)


_NO_WATCH = _NoWatch(0)


@dataclass(slots=True)
class _Miss:
    backend: Backend
    status: int
    reason: str | None
    headers: CIMultiDictProxy[str]
    body: bytes


@dataclass(slots=True)
class _Outcome:
    status: int = 0
    backend: str = "none"
    retries: int = 0
    bytes_in: int = 0
    bytes_out: int = 0
    request_id: str = ""
    upload: str | None = None
    # A manifest PUT's body, kept for replication (None: not kept or too big).
    manifest: bytearray | None = None


def _connection_tokens(headers: CIMultiDictProxy[str]) -> set[str]:
    tokens: set[str] = set()
    for value in headers.getall("Connection", ()):
        tokens.update(t.strip().lower() for t in value.split(",") if t.strip())
    return tokens


class Proxy:
    def __init__(
        self,
        cfg: LBConfig,
        pool: Pool,
        metrics: Metrics,
        session: aiohttp.ClientSession,
        stats: Stats | None = None,
        replicator: Replicator | None = None,
    ) -> None:
        self.replicator = replicator
        self.pool = pool
        self.metrics = metrics
        self.session = session
        self.stats = stats
        self.apply_config(cfg)
        self._chunk = 256 * 1024
        # Request ids: a per-process prefix and a counter, unique and cheap.
        self._id_prefix = secrets.token_hex(4)
        self._ids = itertools.count(1)

    def apply_config(self, cfg: LBConfig) -> None:
        """Take the settings a reload may change; requests in flight keep theirs."""
        self.cfg = cfg
        self.timeout = aiohttp.ClientTimeout(
            total=None,
            connect=cfg.timeouts.connect,
            sock_connect=cfg.timeouts.connect,
            sock_read=cfg.timeouts.read,
        )
        self._allow_non_v2 = cfg.non_v2 == "pass"
        self._sample = cfg.log.access_sample

    # --- entry point -------------------------------------------------------------

    async def handle(self, request: web.Request) -> web.StreamResponse:
        started = time.monotonic()
        outcome = _Outcome()
        outcome.request_id = (
            request.headers.get("X-Request-ID")
            or f"{self._id_prefix}-{next(self._ids):x}"
        )
        route: Route | None = None
        try:
            route = routing.parse(request.method, request.raw_path, self._allow_non_v2)
            return await self._relay(request, route, outcome)
        except ProxyError as exc:
            outcome.status = exc.status
            if exc.status >= 500:
                log.warning(
                    "request.failed",
                    method=request.method,
                    path=request.path,
                    status=exc.status,
                    error=exc.message,
                    request_id=outcome.request_id,
                )
            response = exc.response()
            response.headers["X-Request-ID"] = outcome.request_id
            return response
        except _ClientGone:
            outcome.status = 499
            raise
        finally:
            self._account(request, route, outcome, time.monotonic() - started)

    def _account(
        self, request: web.Request, route: Route | None, out: _Outcome, elapsed: float
    ) -> None:
        kind = route.kind.value if route else "invalid"
        status_class = f"{out.status // 100}xx" if out.status else "error"
        self.metrics.requests.labels(
            out.backend, request.method, status_class, kind
        ).inc()
        self.metrics.duration.labels(request.method, kind).observe(elapsed)
        if self.stats is not None and out.backend != "none":
            self.stats.record(out.backend, out.status, out.bytes_in + out.bytes_out)
        if (
            self._sample < 1.0
            and 0 < out.status < 400
            and random.random() >= self._sample
        ):
            return
        access_log.info(
            "request",
            request_id=out.request_id,
            method=request.method,
            path=request.path,
            status=out.status,
            route=kind,
            repo=route.name if route else None,
            backend=out.backend,
            upload=out.upload
            or (route.reference if route and route.kind is Kind.UPLOAD else None),
            retries=out.retries,
            bytes_in=out.bytes_in,
            bytes_out=out.bytes_out,
            duration_ms=round(elapsed * 1000, 2),
            client=request.remote,
        )

    # --- relaying ----------------------------------------------------------------

    async def _relay(
        self, request: web.Request, route: Route, out: _Outcome
    ) -> web.StreamResponse:
        plan = routing.plan(route, self.pool)
        if not plan.backends:
            raise NoHealthyBackend("no healthy backend is available")
        headers = self._upstream_headers(request)
        # Sent on so backend logs line up with ours; a client's own id wins.
        headers.setdefault("X-Request-ID", out.request_id)
        has_body = request.body_exists
        first_miss: _Miss | None = None
        error: ProxyError | None = None
        replicator = self.replicator
        if replicator is not None and not replicator.enabled:
            replicator = None
        is_manifest_put = route.kind is Kind.MANIFEST and route.method == "PUT"
        if replicator is not None and is_manifest_put:
            out.manifest = bytearray()

        for index, backend in enumerate(plan.backends):
            has_next = index + 1 < len(plan.backends)
            if error is not None:
                if out.retries >= self.cfg.retries:
                    break
                out.retries += 1
            try:
                upstream = await self._send(
                    request, backend, route, headers, has_body, out
                )
            except (aiohttp.ClientConnectorError, _ConnectTimeout) as exc:
                # Nothing was sent: any request may go elsewhere.
                error, reason = _connect_failure(backend, exc)
                self.pool.mark_down(backend, f"connect failed: {reason}")
                if route.is_session and route.session_backend is not None:
                    # The session died with its backend: the client must start
                    # the upload again (on the new home), as after a probe.
                    error = UploadUnknown(
                        f"the upload session lives on backend {backend.name!r}, "
                        "which is not available; start the upload again"
                    )
                self._note_retry(backend, "connect", has_next, route)
                continue
            except TimeoutError:
                if not has_body:
                    self.pool.mark_down(backend, "timed out before response headers")
                error = BackendTimeout(f"backend {backend.name} did not answer in time")
                if plan.retry_idempotent and not has_body:
                    self._note_retry(backend, "timeout", has_next, route)
                    continue
                raise error from None
            except (aiohttp.ServerDisconnectedError, aiohttp.ClientOSError) as exc:
                if not has_body:
                    self.pool.mark_down(backend, f"connection broke: {exc}")
                error = BackendBroken(f"backend {backend.name} closed the connection")
                if plan.retry_idempotent and not has_body:
                    self._note_retry(backend, "reset", has_next, route)
                    continue
                raise error from None
            except aiohttp.ClientPayloadError as exc:
                # The client's request body broke off: nothing to retry.
                raise _ClientGone(str(exc)) from None

            if (
                upstream.status in _RETRY_STATUSES
                and plan.retry_idempotent
                and has_next
            ):
                upstream.release()
                error = BackendBroken(
                    f"backend {backend.name} answered {upstream.status}"
                )
                self._note_retry(backend, f"status_{upstream.status}", has_next, route)
                continue
            if upstream.status == 404 and plan.fallback_on_404 and has_next:
                miss = await self._read_miss(backend, upstream)
                first_miss = first_miss or miss
                continue

            if first_miss is not None:
                result = "found" if upstream.status < 400 else "missed"
                self.metrics.fallbacks.labels(route.kind.value, result).inc()
            if replicator is not None and replicator.wants(route, upstream.status):
                # sync mode holds the answer here until a peer has the image.
                await replicator.on_write(
                    route,
                    backend,
                    upstream.headers,
                    out.manifest,
                    request.headers.get("Content-Type"),
                )
            return await self._respond(request, route, backend, upstream, out)

        if first_miss is not None:
            self.metrics.fallbacks.labels(route.kind.value, "missed").inc()
            return self._respond_miss(request, first_miss, out)
        raise error or NoHealthyBackend("no healthy backend is available")

    def _note_retry(
        self, backend: Backend, cause: str, has_next: bool, route: Route
    ) -> None:
        if self.stats is not None:
            self.stats.record_error(backend.name)
        if has_next:
            self.metrics.retries.labels(backend.name, cause).inc()
            log.info(
                "request.retried",
                backend=backend.name,
                cause=cause,
                method=route.method,
                path=route.path,
            )

    def _upstream_headers(self, request: web.Request) -> CIMultiDict[str]:
        drop = _REQUEST_DROP | _connection_tokens(request.headers)
        headers: CIMultiDict[str] = CIMultiDict()
        for key, value in request.headers.items():
            if key.lower() not in drop:
                headers.add(key, value)
        host = request.host
        headers["Host"] = host
        peer = request.remote or ""
        prior = request.headers.get("X-Forwarded-For")
        headers["X-Forwarded-For"] = f"{prior}, {peer}" if prior else peer
        headers["X-Forwarded-Proto"] = request.scheme
        headers["X-Forwarded-Host"] = host
        return headers

    async def _send(
        self,
        request: web.Request,
        backend: Backend,
        route: Route,
        headers: CIMultiDict[str],
        has_body: bool,
        out: _Outcome,
    ) -> aiohttp.ClientResponse:
        url = URL(backend.origin + route.target, encoded=True)
        body: _WatchedBody | None = None
        watch: _UploadWatch = _NO_WATCH
        if has_body:
            watch = _UploadWatch(self.cfg.timeouts.read)
            body = _WatchedBody(self._body(request, out, watch), watch)
        backend.in_flight += 1
        self.metrics.in_flight.labels(backend.name).inc()
        watch.start()
        try:
            return await self.session.request(
                route.method,
                url,
                headers=headers,
                data=body,
                allow_redirects=False,
                timeout=self.timeout,
                skip_auto_headers=_SKIP_AUTO_HEADERS,
                compress=None,
                ssl=backend.tls,
            )
        except aiohttp.ClientError:
            if watch.expired:
                raise TimeoutError(
                    "the backend stopped taking the request body"
                ) from None
            raise
        finally:
            watch.stop()
            backend.in_flight -= 1
            self.metrics.in_flight.labels(backend.name).dec()

    async def _body(
        self, request: web.Request, out: _Outcome, watch: _UploadWatch
    ) -> AsyncIterator[bytes]:
        content = request.content
        while True:
            # Time spent waiting for the client is not the backend's.
            watch.taken()
            chunk = await content.readany()
            if not chunk:
                return
            out.bytes_in += len(chunk)
            if out.manifest is not None:
                if len(out.manifest) + len(chunk) <= _MANIFEST_CAPTURE_LIMIT:
                    out.manifest.extend(chunk)
                else:
                    out.manifest = None
            watch.handed_over()
            yield chunk

    async def _read_miss(
        self, backend: Backend, upstream: aiohttp.ClientResponse
    ) -> _Miss:
        try:
            body = await upstream.content.read(_MISS_BODY_LIMIT)
        finally:
            upstream.release()
        return _Miss(backend, upstream.status, upstream.reason, upstream.headers, body)

    # --- responses ---------------------------------------------------------------

    def _response_headers(
        self,
        request: web.Request,
        route: Route,
        backend: Backend,
        status: int,
        upstream_headers: CIMultiDictProxy[str],
    ) -> CIMultiDict[str]:
        drop = HOP_BY_HOP | _connection_tokens(upstream_headers)
        client_origin = f"{request.scheme}://{request.host}"
        origins = self.pool.origins()
        headers: CIMultiDict[str] = CIMultiDict()
        for key, value in upstream_headers.items():
            lower = key.lower()
            if lower in drop:
                continue
            if lower == "location":
                value = self._rewrite_location(value, client_origin, origins)
                if route.kind is Kind.UPLOAD and status in (202, 204):
                    sep = "&" if "?" in value else "?"
                    value = f"{value}{sep}{routing.SESSION_PARAM}={backend.name}"
            elif lower == "www-authenticate":
                for origin in origins:
                    value = value.replace(origin, client_origin)
            headers.add(key, value)
        return headers

    @staticmethod
    def _rewrite_location(
        value: str, client_origin: str, origins: dict[str, Backend]
    ) -> str:
        for origin in origins:
            if value.startswith(origin) and value[len(origin) : len(origin) + 1] in (
                "/",
                "?",
                "",
            ):
                return client_origin + value[len(origin) :]
        return value

    async def _respond(
        self,
        request: web.Request,
        route: Route,
        backend: Backend,
        upstream: aiohttp.ClientResponse,
        out: _Outcome,
    ) -> web.StreamResponse:
        out.status = upstream.status
        out.backend = backend.name
        self._count_upload(route, backend, upstream.status)
        self._note_home(route, backend, upstream.status)
        response = web.StreamResponse(status=upstream.status, reason=upstream.reason)
        response.headers.update(
            self._response_headers(
                request, route, backend, upstream.status, upstream.headers
            )
        )
        response.headers.setdefault("X-Request-ID", out.request_id)
        if route.is_upload_open and upstream.status == 202:
            out.upload = _session_id(upstream.headers.get("Location", ""))
        if self.stats is not None and route.kind is Kind.UPLOAD:
            self._track_upload(route, backend, upstream.status, out.upload)
        backend.in_flight += 1
        self.metrics.in_flight.labels(backend.name).inc()
        try:
            try:
                await response.prepare(request)
            except (ConnectionError, RuntimeError) as exc:
                upstream.close()
                raise _ClientGone(str(exc)) from None
            if request.method != "HEAD" and not await self._splice(
                request, backend, upstream, response, out
            ):
                await self._pump(request, backend, upstream, response, out)
            await response.write_eof()
        finally:
            upstream.release()
            backend.in_flight -= 1
            self.metrics.in_flight.labels(backend.name).dec()
            self.metrics.request_bytes.labels(backend.name).inc(out.bytes_in)
            self.metrics.response_bytes.labels(backend.name).inc(out.bytes_out)
        return response

    async def _pump(
        self,
        request: web.Request,
        backend: Backend,
        upstream: aiohttp.ClientResponse,
        response: web.StreamResponse,
        out: _Outcome,
    ) -> None:
        content = upstream.content
        while True:
            try:
                chunk = await content.readany()
            except (
                aiohttp.ClientError,
                TimeoutError,
                asyncio.IncompleteReadError,
            ) as exc:
                upstream.close()
                raise _truncated(request, backend, out, exc) from None
            if not chunk:
                return
            try:
                await response.write(chunk)
            except (ConnectionError, RuntimeError) as exc:
                upstream.close()
                raise _ClientGone(str(exc)) from None
            out.bytes_out += len(chunk)

    async def _splice(
        self,
        request: web.Request,
        backend: Backend,
        upstream: aiohttp.ClientResponse,
        response: web.StreamResponse,
        out: _Outcome,
    ) -> bool:
        """Relay a big plain-TCP body with os.splice; False when it does not apply."""
        length = upstream.content_length
        conn = upstream.connection
        writer = getattr(response, "_payload_writer", None)
        if (
            not splice.AVAILABLE
            or length is None
            or length < splice.MIN_BODY
            or "Transfer-Encoding" in upstream.headers
            or conn is None
            or writer is None
        ):
            return False
        src = splice.plain_socket_fd(conn.transport)
        dst = splice.plain_socket_fd(request.transport)
        if src is None or dst is None or request.transport is None:
            return False

        # Take what aiohttp has read already, and stop it reading more: from
        # here the socket belongs to the splice (no await in between).
        buffered = upstream.content.read_nowait()
        conn.protocol.pause_reading()
        client = request.transport
        try:
            writer.send_headers()
            if buffered:
                await response.write(buffered)
                out.bytes_out += len(buffered)
            # Everything queued must reach the socket before spliced bytes.
            client.set_write_buffer_limits(high=0)
            while client.get_write_buffer_size():
                await writer.drain()
            out.bytes_out += await splice.relay(
                src, dst, length - len(buffered), self.cfg.timeouts.read
            )
        except (splice.BackendEnded, TimeoutError) as exc:
            raise _truncated(request, backend, out, exc) from None
        except (splice.ClientEnded, ConnectionError, RuntimeError) as exc:
            raise _ClientGone(str(exc)) from None
        finally:
            # The backend connection's parser never saw the body: never reuse it.
            upstream.close()
            if not client.is_closing():
                client.set_write_buffer_limits()
        return True

    def _respond_miss(
        self, request: web.Request, miss: _Miss, out: _Outcome
    ) -> web.Response:
        out.status = miss.status
        out.backend = miss.backend.name
        headers = CIMultiDict(
            (k, v) for k, v in miss.headers.items() if k.lower() not in HOP_BY_HOP
        )
        headers.pop("Content-Length", None)
        return web.Response(
            status=miss.status, reason=miss.reason, body=miss.body, headers=headers
        )

    def _note_home(self, route: Route, backend: Backend, status: int) -> None:
        # Writes that open work on a repository show where its home is now;
        # requests inside a session are pinned and say nothing about homes.
        if (
            self.stats is None
            or route.name is None
            or route.is_read
            or route.is_session
            or status >= 400
            or self.pool.mode != "active-active"
        ):
            return
        previous = self.stats.homes.observe(route.name, backend.name)
        if previous is not None:
            self.metrics.home_moves.labels(previous, backend.name).inc()
            log.info(
                "repository.home_moved",
                repo=route.name,
                previous=previous,
                backend=backend.name,
            )

    def _track_upload(
        self, route: Route, backend: Backend, status: int, opened: str | None
    ) -> None:
        assert self.stats is not None
        uploads = self.stats.uploads
        if opened is not None:
            uploads.opened(opened, backend.name)
        elif route.is_session and route.reference:
            # A closing PUT, a cancelling DELETE, or an error that ends it.
            if route.method in ("PUT", "DELETE") or status >= 400:
                uploads.closed(route.reference)
            else:
                uploads.touched(route.reference)

    def _count_upload(self, route: Route, backend: Backend, status: int) -> None:
        if route.kind is not Kind.UPLOAD:
            return
        if route.is_upload_open:
            event = (
                "opened"
                if status == 202
                else ("completed" if status == 201 else "failed")
            )
            if event == "completed":
                # A monolithic POST or a mount opens and closes in one request.
                self.metrics.uploads.labels(backend.name, "opened").inc()
            self.metrics.uploads.labels(backend.name, event).inc()
        elif route.method == "PUT":
            self.metrics.uploads.labels(
                backend.name, "completed" if status == 201 else "failed"
            ).inc()
        elif status >= 400:
            self.metrics.uploads.labels(backend.name, "failed").inc()


def _truncated(
    request: web.Request, backend: Backend, out: _Outcome, exc: BaseException
) -> _ClientGone:
    """The backend broke off mid-body: log it and break the client connection.

    The headers are gone already, so the only honest signal left is a broken
    connection, never a response that looks complete.
    """
    log.warning(
        "request.truncated",
        backend=backend.name,
        path=request.path,
        bytes_out=out.bytes_out,
        error=f"{type(exc).__name__}: {exc}",
    )
    if request.transport is not None:
        request.transport.abort()
    return _ClientGone("backend broke off mid-body")


def _session_id(location: str) -> str | None:
    """The upload session id: the last path segment of the Location."""
    path = location.partition("?")[0].rstrip("/")
    return path.rpartition("/")[2] or None
