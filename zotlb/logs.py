"""structlog set-up: JSON off a terminal, readable console output on one."""

from __future__ import annotations

import logging
import sys

import structlog

_LEVELS = {"debug": 10, "info": 20, "warning": 30, "error": 40}


def configure(level: str = "info", fmt: str = "auto") -> None:
    use_console = fmt == "console" or (fmt == "auto" and sys.stderr.isatty())
    renderer: structlog.typing.Processor
    if use_console:
        renderer = structlog.dev.ConsoleRenderer()
    else:
        renderer = structlog.processors.JSONRenderer()
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(_LEVELS[level]),
        # One write per line (print() writes the newline apart): the lines of
        # several workers on one stderr never run into each other.
        logger_factory=structlog.WriteLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=True,
    )
    # aiohttp's own loggers: keep their warnings, drop their access log.
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    server_log = logging.getLogger("aiohttp.server")
    if not any(isinstance(f, _MalformedRequestFilter) for f in server_log.filters):
        server_log.addFilter(_MalformedRequestFilter())


class _MalformedRequestFilter(logging.Filter):
    """A request aiohttp's parser rejects is the client's fault, not ours.

    aiohttp logs each one as an ERROR with a traceback; any client could fill
    the log with them. Keep one line at info instead.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        from aiohttp.http_exceptions import HttpProcessingError

        exc = record.exc_info[1] if record.exc_info else None
        if not isinstance(exc, HttpProcessingError):
            return True
        reason = (exc.message or type(exc).__name__).strip().splitlines()
        args = record.args
        client = args[0] if isinstance(args, tuple) and args else None
        get("zotlb.access").info(
            "request.malformed",
            status=exc.code,
            reason=(reason[0] if reason else type(exc).__name__)[:200],
            client=client,
        )
        return False


def get(name: str) -> structlog.typing.FilteringBoundLogger:
    return structlog.get_logger(name)
