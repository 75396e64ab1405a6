"""Replication lag under a stream of small pushes: push acknowledged -> on the peer.

Run: PYTHONPATH=. python bench/replication_lag.py [--pushes 200] [--mode async]
Starts two distribution registries and zotlb on loopback, pushes small images
through zotlb with raw HTTP, and reads each copy's lag from zotlb's
`replication.copied` events. Prints p50/p95/p99/max.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from conftest import lb_config, make_registry, start_zotlb
from replhelp import push_small, small_image


def percentile(values: list[float], p: float) -> float:
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(p / 100 * len(ordered)) - 1))
    return ordered[index]


def measure(lb: Any, pushes: int = 200, concurrency: int = 4) -> dict[str, float]:
    """Push `pushes` small images through a running zotlb; lag figures in ms."""
    before = len(lb.events("replication.copied"))
    images = [
        (f"lag/repo{i % 20}", f"t{i}", small_image(f"lag{i}")) for i in range(pushes)
    ]
    started = time.monotonic()
    with concurrent.futures.ThreadPoolExecutor(concurrency) as pool:
        list(pool.map(lambda job: push_small(lb.url, *job), images))
    elapsed = time.monotonic() - started
    deadline = time.monotonic() + 60
    while len(lb.events("replication.copied")) - before < pushes:
        if time.monotonic() > deadline:
            raise AssertionError("not every push was replicated within 60 s")
        time.sleep(0.05)
    lags = [e["lag_ms"] for e in lb.events("replication.copied")[before:]]
    return {
        "pushes": pushes,
        "push_rate_per_s": round(pushes / elapsed, 1),
        "p50_ms": percentile(lags, 50),
        "p95_ms": percentile(lags, 95),
        "p99_ms": percentile(lags, 99),
        "max_ms": max(lags),
        "mean_ms": round(statistics.fmean(lags), 2),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pushes", type=int, default=200)
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--mode", choices=["async", "sync"], default="async")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        regs = [make_registry(root / n, n).start() for n in ("a", "b")]
        lb = start_zotlb(root, lb_config(regs, replication={"mode": args.mode}))
        try:
            result = measure(lb, args.pushes, args.concurrency)
        finally:
            lb.stop()
            for reg in regs:
                reg.stop()
    print(
        f"replication lag ({args.mode}, {result['pushes']} pushes, "
        f"{result['push_rate_per_s']}/s): p50 {result['p50_ms']:.1f} ms, "
        f"p95 {result['p95_ms']:.1f} ms, p99 {result['p99_ms']:.1f} ms, "
        f"max {result['max_ms']:.1f} ms"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
