"""The replication-lag bench runs end to end (figures only; targets live in bench)."""

from __future__ import annotations

from conftest import needs_registry

from bench.replication_lag import measure

pytestmark = [needs_registry]


def test_lag_bench_measures_every_push(registries, zotlb_factory):
    a, b = registries
    lb = zotlb_factory([a, b], replication={"mode": "async"})
    result = measure(lb, pushes=20, concurrency=2)
    print(
        f"replication lag, 20 pushes: p50 {result['p50_ms']} ms, "
        f"p99 {result['p99_ms']} ms"
    )
    assert result["pushes"] == 20
    assert 0 < result["p50_ms"] <= result["p99_ms"] <= result["max_ms"]
