"""Backends and their health state, and the pool that orders them."""

from __future__ import annotations

import enum
import hashlib
import itertools
import ssl
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from yarl import URL

from .config import BackendConfig, HealthConfig
from .logs import get as get_logger

log = get_logger("zotlb.backends")


class State(enum.Enum):
    UP = "up"
    DOWN = "down"


@dataclass
class ProbeResult:
    ok: bool
    status: int | None
    latency: float
    error: str | None
    at: float


@dataclass(eq=False)
class Backend:
    name: str
    url: URL
    state: State = State.UP
    state_since: float = field(default_factory=time.monotonic)
    reason: str = "initial"
    drained: bool = False
    in_flight: int = 0
    ok_streak: int = 0
    fail_streak: int = 0
    last_probe: ProbeResult | None = None
    # aiohttp's `ssl=` for this backend; the server sets it from backends[].tls.
    tls: ssl.SSLContext | bool = True
    origin: str = field(init=False)

    @classmethod
    def from_config(cls, cfg: BackendConfig) -> Backend:
        return cls(name=cfg.name, url=URL(cfg.url))

    def __post_init__(self) -> None:
        self.origin = str(self.url.origin())

    @property
    def netloc(self) -> str:
        return f"{self.url.host}:{self.url.port}"

    def is_up(self) -> bool:
        return self.state is State.UP

    def is_available(self) -> bool:
        return self.state is State.UP and not self.drained

    def __repr__(self) -> str:
        drained = " drained" if self.drained else ""
        return (
            f"<Backend {self.name} {self.state.value}{drained} "
            f"in_flight={self.in_flight}>"
        )


def _score(backend_name: str, key: str) -> int:
    digest = hashlib.blake2b(
        f"{backend_name}\x00{key}".encode(), digest_size=8
    ).digest()
    return int.from_bytes(digest, "big")


def rendezvous_order(names: Iterable[str], key: str) -> list[str]:
    """Backend names in the order `Pool.home_order` ranks them for key."""
    return sorted(names, key=lambda name: _score(name, key), reverse=True)


StateListener = Callable[[Backend, State, str], None]


class Pool:
    """The configured backends, their state, and the orders traffic tries them in.

    Every order is derived from the request and the pool's health view, never
    from per-client memory, so restarts and several zotlb replicas agree.
    """

    def __init__(
        self,
        backends: Iterable[BackendConfig],
        health: HealthConfig,
        mode: str = "active-active",
        failback: str = "auto",
    ) -> None:
        self.backends = [Backend.from_config(b) for b in backends]
        self.by_name = {b.name: b for b in self.backends}
        self.health = health
        self.mode = mode
        self.failback = failback
        self._rr = itertools.count()
        self._active: Backend | None = self.backends[0]
        self._listeners: list[StateListener] = []

    def __repr__(self) -> str:
        return f"<Pool {self.mode} {self.backends!r}>"

    def on_state_change(self, listener: StateListener) -> None:
        self._listeners.append(listener)

    def available(self) -> list[Backend]:
        return [b for b in self.backends if b.is_available()]

    def origins(self) -> dict[str, Backend]:
        return {b.origin: b for b in self.backends}

    # --- state ---------------------------------------------------------------

    def _set_state(self, backend: Backend, state: State, reason: str) -> None:
        if backend.state is state:
            return
        backend.state = state
        backend.state_since = time.monotonic()
        backend.reason = reason
        backend.ok_streak = backend.fail_streak = 0
        log.warning(f"backend.{state.value}", backend=backend.name, reason=reason)
        for listener in self._listeners:
            listener(backend, state, reason)
        if self.mode == "active-passive":
            self._elect_active()

    def mark_down(self, backend: Backend, reason: str) -> None:
        """Passive detection: live traffic failed, take it out at once."""
        self._set_state(backend, State.DOWN, reason)

    def record_probe(self, backend: Backend, result: ProbeResult) -> None:
        backend.last_probe = result
        if result.ok:
            backend.ok_streak += 1
            backend.fail_streak = 0
            if backend.state is State.DOWN and backend.ok_streak >= self.health.rise:
                self._set_state(backend, State.UP, f"{backend.ok_streak} probes passed")
        else:
            backend.fail_streak += 1
            backend.ok_streak = 0
            if backend.state is State.UP and backend.fail_streak >= self.health.fall:
                self._set_state(
                    backend,
                    State.DOWN,
                    f"{backend.fail_streak} probes failed, last: {result.error}",
                )

    def set_drained(self, backend: Backend, drained: bool) -> None:
        backend.drained = drained
        log.warning(
            "backend.drained" if drained else "backend.enabled", backend=backend.name
        )
        if self.mode == "active-passive":
            self._elect_active()

    # --- orders ----------------------------------------------------------------

    def home_order(self, key: str) -> list[Backend]:
        """Rendezvous (highest random weight) order of available backends for key.

        A backend that goes down takes only its own keys elsewhere; they come
        back when it returns.
        """
        return sorted(self.available(), key=lambda b: _score(b.name, key), reverse=True)

    def round_robin(self) -> list[Backend]:
        live = self.available()
        if not live:
            return live
        start = next(self._rr) % len(live)
        return live[start:] + live[:start]

    @property
    def active(self) -> Backend | None:
        """Active-passive: the backend that takes all traffic now."""
        if self._active is None or not self._active.is_available():
            self._elect_active()
        return self._active

    def _elect_active(self) -> None:
        live = self.available()
        current = self._active
        if current is not None and current.is_available() and self.failback == "manual":
            return
        new = live[0] if live else None
        if new is current:
            return
        self._active = new
        if current is not None and new is not None:
            kind = (
                "failback"
                if self.backends.index(new) < self.backends.index(current)
                else "failover"
            )
            log.warning(f"backend.{kind}", previous=current.name, active=new.name)
            for listener in self._listeners:
                listener(new, State.UP, kind)

    def passive_order(self) -> list[Backend]:
        """Active-passive: the active backend, then the standbys in list order."""
        active = self.active
        if active is None:
            return []
        return [active] + [b for b in self.available() if b is not active]

    def reconfigure(
        self,
        backends: Iterable[BackendConfig],
        health: HealthConfig,
        mode: str,
        failback: str,
    ) -> tuple[list[Backend], list[Backend]]:
        """Hot reload: adopt a new backend list in place; return (added, removed).

        Backends whose name and URL are unchanged keep their object, so state,
        drain flag and in-flight counters survive. New ones start down and come
        up after `rise` good probes, so no traffic meets an unchecked backend.
        Requests already holding a removed backend finish on it.
        """
        kept = self.by_name
        new: list[Backend] = []
        added: list[Backend] = []
        for cfg in backends:
            backend = kept.get(cfg.name)
            if backend is None or backend.url != URL(cfg.url):
                backend = Backend.from_config(cfg)
                backend.state = State.DOWN
                backend.reason = "added by reload, awaiting probes"
                added.append(backend)
            new.append(backend)
        removed = [b for b in self.backends if b not in new]
        self.backends = new
        self.by_name = {b.name: b for b in new}
        self.health = health
        self.mode = mode
        self.failback = failback
        if self._active not in new:
            self._active = None
        if mode == "active-passive":
            self._elect_active()
        return added, removed

    def promote(self, backend: Backend) -> None:
        """Manual failback: make backend the active one (if it is available)."""
        if backend.is_available():
            self._active = backend
