"""Live traffic figures for /status and the status page.

Prometheus counters only grow; an operator's page wants "now": requests, errors
and bytes over the last seconds and the last minute. Each backend keeps a ring
of one-second buckets, so recording is a few integer additions on the hot path.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable

WINDOW_SECONDS = 60
# The "live" rate on the page: short enough to react, long enough to be smooth.
RATE_SECONDS = 5


class Window:
    """Per-second buckets of requests, errors and bytes over the last minute."""

    __slots__ = ("_bytes", "_clock", "_errors", "_requests", "_seconds")

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._seconds = [-1] * WINDOW_SECONDS
        self._requests = [0] * WINDOW_SECONDS
        self._errors = [0] * WINDOW_SECONDS
        self._bytes = [0] * WINDOW_SECONDS

    def _slot(self) -> int:
        now = int(self._clock())
        slot = now % WINDOW_SECONDS
        if self._seconds[slot] != now:
            # The bucket holds a second that has left the window: reuse it.
            self._seconds[slot] = now
            self._requests[slot] = self._errors[slot] = self._bytes[slot] = 0
        return slot

    def add(self, requests: int = 0, errors: int = 0, nbytes: int = 0) -> None:
        slot = self._slot()
        self._requests[slot] += requests
        self._errors[slot] += errors
        self._bytes[slot] += nbytes

    def totals(
        self, seconds: int = WINDOW_SECONDS, current: bool = True
    ) -> tuple[int, int, int]:
        """(requests, errors, bytes) over the last `seconds` seconds.

        A rate leaves the current, still-filling second out (current=False) so
        it does not dip at the start of every second.
        """
        now = int(self._clock())
        newest = now if current else now - 1
        oldest = newest - seconds + 1
        requests = errors = nbytes = 0
        for i, second in enumerate(self._seconds):
            if oldest <= second <= newest:
                requests += self._requests[i]
                errors += self._errors[i]
                nbytes += self._bytes[i]
        return requests, errors, nbytes


class HomeTracker:
    """Remembers where each recently written repository lived, to count moves.

    A repository's home is a pure function of the available backends, so a move
    is only visible when a write lands somewhere other than last time. The
    memory is bounded: the least recently written repositories are forgotten.
    """

    def __init__(self, limit: int = 10_000) -> None:
        self._limit = limit
        self._homes: OrderedDict[str, str] = OrderedDict()

    def observe(self, repository: str, backend: str) -> str | None:
        """Record a write; return the previous home when the repository moved."""
        previous = self._homes.get(repository)
        self._homes[repository] = backend
        self._homes.move_to_end(repository)
        if len(self._homes) > self._limit:
            self._homes.popitem(last=False)
        if previous is not None and previous != backend:
            return previous
        return None

    def counts(self) -> dict[str, int]:
        """How many remembered repositories each backend is home to."""
        out: dict[str, int] = {}
        for backend in self._homes.values():
            out[backend] = out.get(backend, 0) + 1
        return out


# An upload session idle this long is taken as abandoned: clients give up on
# sessions without closing them, and registries expire them too.
UPLOAD_IDLE_SECONDS = 900.0


class UploadTracker:
    """Upload sessions open now, per backend.

    A session spans many requests, so "in flight" requests fall to zero
    between a push's PATCHes; this is what tells an operator that a drained
    backend still has pushes to finish.
    """

    def __init__(
        self,
        clock: Callable[[], float] = time.monotonic,
        on_change: Callable[[str, int], None] | None = None,
        limit: int = 100_000,
    ) -> None:
        self._clock = clock
        self._on_change = on_change
        self._limit = limit
        # Session id -> (backend, last seen), least recently seen first.
        self._sessions: OrderedDict[str, tuple[str, float]] = OrderedDict()

    def opened(self, session: str, backend: str) -> None:
        self._expire()
        if session not in self._sessions:
            self._changed(backend, 1)
        self._sessions[session] = (backend, self._clock())
        self._sessions.move_to_end(session)
        if len(self._sessions) > self._limit:
            _, (old_backend, _) = self._sessions.popitem(last=False)
            self._changed(old_backend, -1)

    def touched(self, session: str) -> None:
        entry = self._sessions.get(session)
        if entry is not None:
            self._sessions[session] = (entry[0], self._clock())
            self._sessions.move_to_end(session)

    def closed(self, session: str) -> None:
        entry = self._sessions.pop(session, None)
        if entry is not None:
            self._changed(entry[0], -1)

    def counts(self) -> dict[str, int]:
        self._expire()
        out: dict[str, int] = {}
        for backend, _ in self._sessions.values():
            out[backend] = out.get(backend, 0) + 1
        return out

    def _expire(self) -> None:
        oldest = self._clock() - UPLOAD_IDLE_SECONDS
        while self._sessions:
            session, (backend, seen) = next(iter(self._sessions.items()))
            if seen >= oldest:
                return
            del self._sessions[session]
            self._changed(backend, -1)

    def _changed(self, backend: str, delta: int) -> None:
        if self._on_change is not None:
            self._on_change(backend, delta)


class Stats:
    """Rolling traffic figures per backend."""

    def __init__(
        self,
        clock: Callable[[], float] = time.monotonic,
        on_upload_change: Callable[[str, int], None] | None = None,
    ) -> None:
        self._clock = clock
        self.windows: dict[str, Window] = {}
        self.homes = HomeTracker()
        self.uploads = UploadTracker(clock, on_upload_change)

    def window(self, backend: str) -> Window:
        window = self.windows.get(backend)
        if window is None:
            window = self.windows[backend] = Window(self._clock)
        return window

    def record(self, backend: str, status: int, nbytes: int) -> None:
        self.window(backend).add(1, 1 if status >= 500 or status == 0 else 0, nbytes)

    def record_error(self, backend: str) -> None:
        """A failure that moved the request on (connect refused, reset, 5xx)."""
        self.window(backend).add(1, 1, 0)

    def summary(self, backends: list[str]) -> dict[str, dict[str, float]]:
        minute = {name: self.window(name).totals() for name in backends}
        uploads = self.uploads.counts()
        total = sum(requests for requests, _, _ in minute.values())
        out = {}
        for name in backends:
            requests, errors, _ = minute[name]
            recent, _, recent_bytes = self.window(name).totals(RATE_SECONDS, False)
            out[name] = {
                "requests_last_minute": requests,
                "errors_last_minute": errors,
                "traffic_share": round(requests / total, 4) if total else 0.0,
                "error_rate": round(errors / requests, 4) if requests else 0.0,
                "requests_per_second": round(recent / RATE_SECONDS, 2),
                "bytes_per_second": round(recent_bytes / RATE_SECONDS, 1),
                "uploads_in_progress": uploads.get(name, 0),
            }
        return out
