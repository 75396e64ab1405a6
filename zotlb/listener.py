"""The client-facing HTTP server: aiohttp's, with zotlb's limits around it.

aiohttp limits header sizes and closes idle keep-alive connections itself.
Two limits are added here:

- request_header: once the first byte of a request has arrived, its headers
  must be complete within this time, or the connection is closed (a client
  trickling header bytes, slowloris, no longer holds a connection forever).
  The timer runs only between requests, never while a body streams.
- max_connections: a connection beyond the limit is not handed to aiohttp;
  it gets one 503 in OCI error form and is closed.

With TLS, the handshake has the request header timeout as its deadline.
"""

from __future__ import annotations

import asyncio
import json
import ssl
from collections.abc import Callable
from typing import Any, cast

from aiohttp import web
from aiohttp.http_exceptions import BadHttpMessage, LineTooLong
from aiohttp.web_protocol import RequestHandler

from .errors import API_VERSION, API_VERSION_HEADER, oci_error
from .logs import get as get_logger

access_log = get_logger("zotlb.access")

# Called with the reason whenever a limit turns a client away.
LimitListener = Callable[[str], None]

_REFUSAL_LINGER = 2.0
_REFUSAL_HEAD_LIMIT = 64 * 1024


def _canned(status: str, code: str, message: str) -> bytes:
    body = json.dumps({"errors": [{"code": code, "message": message}]}).encode()
    head = (
        f"HTTP/1.1 {status}\r\n"
        "Content-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n"
        f"{API_VERSION_HEADER}: {API_VERSION}\r\n"
        "Connection: close\r\n\r\n"
    )
    return head.encode() + body


_BUSY = _canned("503 Service Unavailable", "UNAVAILABLE", "too many connections")
_SLOW = _canned("408 Request Timeout", "UNAVAILABLE", "request headers took too long")


class _Handler(RequestHandler):
    """aiohttp's per-connection protocol, plus the request header timer."""

    __slots__ = ("_header_timeout", "_header_timer", "_on_limit")

    def __init__(
        self,
        manager: web.Server,
        *,
        header_timeout: float,
        on_limit: LimitListener,
        **kwargs: Any,
    ) -> None:
        super().__init__(manager, **kwargs)
        self._header_timeout = header_timeout
        self._header_timer: asyncio.TimerHandle | None = None
        self._on_limit = on_limit

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        # `_waiter` is pending exactly while aiohttp waits for a request head
        # it has not got whole yet; it is None while a request is handled.
        # A head that arrives in one piece never starts the timer.
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            if self._header_timer is None:
                self._header_timer = self._loop.call_later(
                    self._header_timeout, self._on_header_timeout
                )
        elif self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _on_header_timeout(self) -> None:
        self._header_timer = None
        waiter = self._waiter
        if waiter is None or waiter.done() or self.transport is None:
            return
        self._on_limit("request_header_timeout")
        self.transport.write(_SLOW)
        self.force_close()

    def connection_lost(self, exc: BaseException | None) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None
        super().connection_lost(exc)

    def handle_error(
        self,
        request: Any,
        status: int = 500,
        exc: BaseException | None = None,
        message: str | None = None,
    ) -> web.StreamResponse:
        # Requests aiohttp cannot parse: answer as a registry would, without
        # aiohttp's traceback in the log for what is the client's mistake.
        if status >= 500:
            return super().handle_error(request, status, exc, message)
        too_big = isinstance(exc, LineTooLong) or (
            isinstance(exc, BadHttpMessage) and "Too many headers" in str(exc)
        )
        if too_big:
            status = 431
            self._on_limit("header_too_large")
        reason = _reason(exc, message)
        peer = self.transport.get_extra_info("peername") if self.transport else None
        # One line at info: the client's mistake, never a traceback.
        access_log.info(
            "request.malformed",
            status=status,
            reason=reason,
            client=peer[0] if isinstance(peer, tuple) else None,
        )
        response = oci_error(status, "UNSUPPORTED", reason)
        response.force_close()
        return response


def _reason(exc: BaseException | None, message: str | None) -> str:
    if isinstance(exc, BadHttpMessage) and exc.message:
        text = str(exc.message)
    else:
        text = message or "bad request"
    # The parser quotes the offending bytes after a colon: they may hold a
    # credential (an oversized Authorization header), so neither the answer
    # nor the log line repeats them.
    first = text.splitlines()[0] if text.strip() else "bad request"
    return first.partition(":")[0].strip()[:200] or "bad request"


class _Refusal(asyncio.Protocol):
    """A connection beyond max_connections: read the request head, answer 503.

    Waiting for the head (instead of writing at once) and then reading to the
    end before closing keeps the kernel from resetting the connection under
    a client that is still sending, which would lose the 503.
    """

    def __init__(self, linger: float) -> None:
        self._linger = linger
        self._transport: asyncio.Transport | None = None
        self._head = b""
        self._answered = False
        self._timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.Transport, transport)
        self._timer = asyncio.get_running_loop().call_later(self._linger, self._close)

    def data_received(self, data: bytes) -> None:
        if self._answered or self._transport is None:
            return
        self._head = (self._head + data)[-_REFUSAL_HEAD_LIMIT:]
        if b"\r\n\r\n" in self._head or len(self._head) >= _REFUSAL_HEAD_LIMIT:
            self._answered = True
            self._transport.write(_BUSY)
            if self._transport.can_write_eof():
                self._transport.write_eof()

    def eof_received(self) -> bool:
        self._close()
        return False

    def _close(self) -> None:
        if self._transport is not None:
            self._transport.close()
            self._transport = None

    def connection_lost(self, exc: BaseException | None) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._transport = None


class Listener(web.Server):
    """web.Server whose connections carry zotlb's limits."""

    def __init__(
        self,
        handler: Any,
        *,
        header_timeout: float,
        max_connections: int,
        on_limit: LimitListener,
        **kwargs: Any,
    ) -> None:
        super().__init__(handler, **kwargs)
        self.header_timeout = header_timeout
        self.max_connections = max_connections
        self.on_limit = on_limit
        self.open_connections = 0

    def __call__(self) -> Any:
        if self.open_connections >= self.max_connections:
            self.on_limit("max_connections")
            return _Refusal(min(_REFUSAL_LINGER, self.header_timeout))
        return _Handler(
            self,
            loop=self._loop,
            header_timeout=self.header_timeout,
            on_limit=self.on_limit,
            **self._kwargs,
        )

    def connection_made(self, handler: RequestHandler, transport: Any) -> None:
        self.open_connections += 1
        super().connection_made(handler, transport)

    def connection_lost(
        self, handler: RequestHandler, exc: BaseException | None = None
    ) -> None:
        self.open_connections -= 1
        super().connection_lost(handler, exc)


class ListenerSite(web.BaseSite):
    """aiohttp's TCP site, with a deadline on TLS handshakes as well.

    A client that opens a TLS connection and never finishes the handshake
    is a slowloris one step earlier; it gets the request header timeout
    instead of asyncio's default of a minute.
    """

    __slots__ = ("_handshake_timeout", "_host", "_port", "_reuse_port")

    def __init__(
        self,
        runner: web.BaseRunner,
        host: str,
        port: int,
        *,
        ssl_context: ssl.SSLContext | None,
        handshake_timeout: float,
        backlog: int,
        reuse_port: bool = False,
    ) -> None:
        super().__init__(runner, ssl_context=ssl_context, backlog=backlog)
        self._host = host
        self._port = port
        self._handshake_timeout = handshake_timeout
        # workers > 1: each worker binds the same port (SO_REUSEPORT).
        self._reuse_port = reuse_port

    @property
    def name(self) -> str:
        scheme = "https" if self._ssl_context else "http"
        return f"{scheme}://{self._host}:{self._port}"

    async def start(self) -> None:
        await super().start()
        server = self._runner.server
        assert server is not None
        tls: dict[str, Any] = {}
        if self._ssl_context is not None:
            tls = {
                "ssl": self._ssl_context,
                "ssl_handshake_timeout": self._handshake_timeout,
            }
        self._server = await asyncio.get_running_loop().create_server(
            server,
            self._host,
            self._port,
            backlog=self._backlog,
            reuse_port=self._reuse_port or None,
            **tls,
        )
