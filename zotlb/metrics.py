"""Prometheus metrics, all under `zotlb_`, labels kept low-cardinality."""

from __future__ import annotations

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    PlatformCollector,
    ProcessCollector,
)

_DURATION_BUCKETS = (
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1,
    2.5,
    5,
    10,
    30,
    60,
    300,
)


class Metrics:
    def __init__(self) -> None:
        self.registry = r = CollectorRegistry(auto_describe=True)
        ProcessCollector(registry=r)
        PlatformCollector(registry=r)
        self.requests = Counter(
            "zotlb_requests_total",
            "Client requests answered, by backend (or 'none'), method, status class "
            "and route kind.",
            ["backend", "method", "status_class", "route"],
            registry=r,
        )
        self.duration = Histogram(
            "zotlb_request_duration_seconds",
            "Time from request received to response fully sent.",
            ["method", "route"],
            buckets=_DURATION_BUCKETS,
            registry=r,
        )
        self.request_bytes = Counter(
            "zotlb_request_bytes_total",
            "Request body bytes sent to backends.",
            ["backend"],
            registry=r,
        )
        self.response_bytes = Counter(
            "zotlb_response_bytes_total",
            "Response body bytes sent to clients.",
            ["backend"],
            registry=r,
        )
        self.in_flight = Gauge(
            "zotlb_backend_in_flight_requests",
            "Requests currently being served by each backend.",
            ["backend"],
            registry=r,
        )
        self.up = Gauge(
            "zotlb_backend_up",
            "1 when the backend is up, 0 when down.",
            ["backend"],
            registry=r,
        )
        self.state_changes = Counter(
            "zotlb_backend_state_changes_total",
            "Backend transitions, by the state entered.",
            ["backend", "state"],
            registry=r,
        )
        self.probes = Counter(
            "zotlb_health_checks_total",
            "Active health probes, by result (ok/fail).",
            ["backend", "result"],
            registry=r,
        )
        self.probe_duration = Histogram(
            "zotlb_health_check_duration_seconds",
            "Duration of active health probes.",
            ["backend"],
            buckets=_DURATION_BUCKETS,
            registry=r,
        )
        self.retries = Counter(
            "zotlb_retries_total",
            "Requests sent again to another backend, by the backend that failed "
            "and the cause.",
            ["backend", "cause"],
            registry=r,
        )
        self.fallbacks = Counter(
            "zotlb_fallback_reads_total",
            "Reads that missed (404) and were tried on another backend, by "
            "route and whether another backend had it.",
            ["route", "result"],
            registry=r,
        )
        self.uploads = Counter(
            "zotlb_upload_sessions_total",
            "Blob upload sessions, by event (opened/completed/failed).",
            ["backend", "event"],
            registry=r,
        )
        self.failovers = Counter(
            "zotlb_failovers_total",
            "Active-passive switches of the active backend, by kind "
            "(failover/failback).",
            ["kind"],
            registry=r,
        )
        self.uploads_open = Gauge(
            "zotlb_upload_sessions_open",
            "Upload sessions opened and not yet closed, failed or idle 15 minutes.",
            ["backend"],
            registry=r,
        )
        self.home_moves = Counter(
            "zotlb_home_moves_total",
            "Repositories whose writes landed on another backend than last time "
            "(their home moved), by previous and new home.",
            ["from_backend", "to_backend"],
            registry=r,
        )
        self.drained = Gauge(
            "zotlb_backend_drained",
            "1 while an operator has drained the backend.",
            ["backend"],
            registry=r,
        )
        self.reloads = Counter(
            "zotlb_config_reloads_total",
            "Configuration reloads, by result (ok/failed).",
            ["result"],
            registry=r,
        )
        self.client_connections = Gauge(
            "zotlb_client_connections",
            "Open client connections on the proxy listener.",
            registry=r,
        )
        self.client_limits = Counter(
            "zotlb_client_limit_hits_total",
            "Clients turned away by a limit: max_connections, "
            "request_header_timeout, header_too_large.",
            ["reason"],
            registry=r,
        )
        self.backend_connections = Gauge(
            "zotlb_backend_connections",
            "Connections to backends, by use (active/idle).",
            ["use"],
            registry=r,
        )
        self.info = Gauge(
            "zotlb_info",
            "Always 1; labels carry the version and the mode.",
            ["version", "mode"],
            registry=r,
        )

    def forget_backend(self, name: str, idle: bool = True) -> None:
        """Drop the per-backend series of a backend removed by a reload.

        The in-flight gauge stays while requests still run there: they
        decrement it when they finish, which would otherwise recreate it at -1.
        """
        metrics = [self.up, self.drained] + ([self.in_flight] if idle else [])
        for metric in metrics:
            try:
                metric.remove(name)
            except KeyError:
                pass
