"""The failure window: kill -9 the home backend 100 ms after a push returns.

Twenty trials per mode, against two real registries, with the image read back
through zotlb from the survivor. `sync` must keep every image, `async` nearly
every one (it loses only a copy still in flight), and `off` (the reference)
loses them all.
"""

from __future__ import annotations

import statistics
import time

import pytest
from conftest import needs_registry, wait_until
from replhelp import pull_small, push_small, repo_homed_on, small_image

pytestmark = [needs_registry, pytest.mark.slow]

TRIALS = 20
WINDOW = 0.1  # the acceptance test's "100 ms after the push returns"


@pytest.mark.parametrize(
    ("mode", "need"), [("sync", TRIALS), ("async", TRIALS - 1), ("off", 0)]
)
def test_kill_home_100ms_after_push(registries, zotlb_factory, mode, need):
    a, b = registries
    lb = zotlb_factory(
        [a, b],
        replication={"mode": mode, "retry_initial": "50ms", "retry_max": "200ms"},
        health={"interval": "100ms", "rise": 1, "fall": 1},
    )
    kept, index = 0, 0
    for trial in range(TRIALS):
        # Every trial's repository lives on a, so a is the one killed.
        repo = repo_homed_on("a", ["a", "b"], "window/r", index)
        index = int(repo.rsplit("r", 1)[1]) + 1
        image = small_image(f"{mode}-{trial}")
        push_small(lb.url, repo, "t", image)
        time.sleep(WINDOW)
        a.kill()
        kept += pull_small(lb.url, repo, "t") == image["digest"]
        a.start()
        wait_until(lambda: lb.backend_state("a") == "up", 10, "a back up")

    lags = [e["lag_ms"] for e in lb.events("replication.copied")]
    lag_text = (
        f", lag p50 {statistics.median(lags):.1f} ms, max {max(lags):.1f} ms"
        if lags
        else ""
    )
    print(f"replication {mode}: {kept} of {TRIALS} images survived{lag_text}")
    if mode == "off":
        assert kept == 0
    else:
        assert kept >= need
