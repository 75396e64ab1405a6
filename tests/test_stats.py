"""The rolling figures behind /status, and the pool's in-place reload."""

from __future__ import annotations

from zotlb.backends import Pool, State
from zotlb.config import BackendConfig, HealthConfig
from zotlb.stats import (
    UPLOAD_IDLE_SECONDS,
    WINDOW_SECONDS,
    HomeTracker,
    Stats,
    UploadTracker,
    Window,
)


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_window_counts_the_last_minute_and_forgets_older_seconds():
    clock = Clock()
    window = Window(clock)
    window.add(1, 0, 100)
    clock.now += 30
    window.add(2, 1, 50)
    assert window.totals() == (3, 1, 150)
    # The rate leaves out the current second.
    assert window.totals(5, current=False) == (0, 0, 0)
    clock.now += 1
    assert window.totals(5, current=False) == (2, 1, 50)
    # The first second drops out once a minute has passed since it.
    clock.now = 1000.0 + WINDOW_SECONDS
    assert window.totals() == (2, 1, 50)
    # A bucket reused a full lap later starts from zero.
    clock.now = 1030.0 + WINDOW_SECONDS
    window.add(1)
    assert window.totals() == (1, 0, 0)


def test_summary_shares_and_error_rates():
    clock = Clock()
    stats = Stats(clock)
    for _ in range(3):
        stats.record("a", 200, 10)
    stats.record("a", 503, 0)
    stats.record_error("b")
    summary = stats.summary(["a", "b", "c"])
    assert summary["a"]["traffic_share"] == 0.8
    assert summary["a"]["error_rate"] == 0.25
    assert summary["b"]["error_rate"] == 1.0
    assert summary["c"] == {
        "requests_last_minute": 0,
        "errors_last_minute": 0,
        "traffic_share": 0.0,
        "error_rate": 0.0,
        "requests_per_second": 0.0,
        "bytes_per_second": 0.0,
        "uploads_in_progress": 0,
    }
    clock.now += 1
    assert stats.summary(["a"])["a"]["requests_per_second"] == 0.8
    assert stats.summary(["a"])["a"]["bytes_per_second"] == 6.0


def test_home_tracker_reports_moves_and_stays_bounded():
    homes = HomeTracker(limit=2)
    assert homes.observe("r1", "a") is None
    assert homes.observe("r1", "a") is None
    assert homes.observe("r1", "b") == "a"
    homes.observe("r2", "a")
    homes.observe("r3", "a")
    # r1 was least recently written and is forgotten: no move is reported.
    assert homes.observe("r1", "a") is None
    assert homes.counts() == {"a": 2}


def _configs(*names: str) -> list[BackendConfig]:
    return [
        BackendConfig(name=n, url=f"http://127.0.0.1:{5000 + ord(n)}") for n in names
    ]


def test_pool_reconfigure_keeps_unchanged_backends_in_place():
    pool = Pool(_configs("a", "b"), HealthConfig())
    a, b = pool.backends
    pool.set_drained(a, True)
    a.in_flight = 3

    added, removed = pool.reconfigure(
        _configs("a", "b", "c"), HealthConfig(rise=5), "active-active", "auto"
    )
    assert [x.name for x in added] == ["c"] and removed == []
    assert pool.backends[0] is a and pool.backends[1] is b
    assert a.drained and a.in_flight == 3
    # New backends wait for their probes before taking traffic.
    assert pool.by_name["c"].state is State.DOWN
    assert pool.available() == [b]
    assert pool.health.rise == 5

    # A changed URL is a new backend under an old name.
    moved = [BackendConfig(name="b", url="http://127.0.0.1:6000")]
    added, removed = pool.reconfigure(moved, HealthConfig(), "active-active", "auto")
    assert [x.name for x in added] == ["b"] and pool.by_name["b"] is not b
    assert {x.name for x in removed} == {"a", "b", "c"}


def test_pool_reconfigure_elects_a_new_active_when_the_old_one_goes():
    pool = Pool(_configs("a", "b"), HealthConfig(), mode="active-passive")
    assert pool.active is pool.by_name["a"]
    pool.reconfigure(_configs("b"), HealthConfig(), "active-passive", "auto")
    assert pool.active is pool.by_name["b"]
    assert pool.passive_order() == [pool.by_name["b"]]


def test_draining_the_active_backend_fails_over_and_enable_fails_back():
    pool = Pool(_configs("a", "b"), HealthConfig(), mode="active-passive")
    events: list[str] = []
    pool.on_state_change(lambda backend, state, reason: events.append(reason))
    a, b = pool.backends
    pool.set_drained(a, True)
    assert pool.active is b and pool.passive_order() == [b]
    pool.set_drained(a, False)
    assert pool.active is a and pool.passive_order() == [a, b]
    assert events == ["failover", "failback"]


def test_upload_tracker_counts_open_sessions_and_expires_idle_ones():
    clock = Clock()
    changes: list[tuple[str, int]] = []
    uploads = UploadTracker(clock, lambda backend, d: changes.append((backend, d)))
    uploads.opened("s1", "a")
    uploads.opened("s2", "a")
    uploads.opened("s3", "b")
    assert uploads.counts() == {"a": 2, "b": 1}
    uploads.closed("s1")
    uploads.closed("s1")  # a second close (a retried PUT) changes nothing
    assert uploads.counts() == {"a": 1, "b": 1}

    # s3 keeps being used; s2 goes quiet and is given up on.
    clock.now += UPLOAD_IDLE_SECONDS - 1
    uploads.touched("s3")
    clock.now += 2
    assert uploads.counts() == {"b": 1}
    assert changes == [("a", 1), ("a", 1), ("b", 1), ("a", -1), ("a", -1)]
