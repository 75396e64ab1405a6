"""The HTML status page, driven in a real headless Chromium."""

from __future__ import annotations

import os
import shutil
import threading
from pathlib import Path

import pytest
from cdp import CHROMIUM, Browser
from conftest import http, needs_registry

pytestmark = [
    needs_registry,
    pytest.mark.skipif(
        CHROMIUM is None,
        reason="chromium is not installed (apt-get install -y chromium)",
    ),
]


def _row(name: str, field: str) -> str:
    return (
        f"(document.querySelector('tr[data-backend=\"{name}\"]') || "
        f"{{dataset: {{}}}}).dataset.{field}"
    )


async def test_status_page_shows_backends_and_a_killed_one_turning_down(
    registries, zotlb_factory, tmp_path
):
    a, b = registries
    lb = zotlb_factory([a, b], health={"interval": "200ms", "fall": 2})
    stop = threading.Event()

    def traffic() -> None:
        # Steady reads, so the page has live rates to show.
        while not stop.wait(0.05):
            http("GET", lb.url + "/v2/")

    sender = threading.Thread(target=traffic, daemon=True)
    sender.start()
    try:
        await _drive(lb, b, tmp_path)
    finally:
        stop.set()
        sender.join(5)


async def _drive(lb, b, tmp_path) -> None:
    async with Browser() as browser:
        await browser.goto(lb.admin + "/")
        await browser.wait_for(
            f"{_row('a', 'state')} === 'up' && {_row('b', 'state')} === 'up'",
            10,
            "both backends shown up",
        )
        rate = "document.querySelector('tr[data-backend=\"a\"] .rate').textContent"
        await browser.wait_for(f"parseFloat({rate}) > 0", 10, "a live request rate")
        meta = await browser.evaluate(
            "[mode.textContent, version.textContent, uptime.textContent]"
        )
        assert meta[0] == "active-active"
        assert meta[1] == lb.status()["version"]
        shown = await browser.evaluate(rate)
        print(f"page before the kill: mode={meta[0]} uptime={meta[2]} a req/s={shown}")

        # A drain shows as a flag on the row, and goes again on enable.
        assert http("POST", lb.admin + "/backends/a/drain")[0] == 200
        await browser.wait_for(f"{_row('a', 'drained')} === 'true'", 10, "a drained")
        assert http("POST", lb.admin + "/backends/a/enable")[0] == 200
        await browser.wait_for(f"{_row('a', 'drained')} === 'false'", 10, "a enabled")

        b.kill()
        # Refreshed in place: the same document, no navigation, shows the change.
        await browser.evaluate("window.zotlbMarker = 1")
        await browser.wait_for(f"{_row('b', 'state')} === 'down'", 10, "b shown down")
        assert await browser.evaluate("window.zotlbMarker") == 1
        assert await browser.evaluate(_row("a", "state")) == "up"
        reason = await browser.evaluate(
            "document.querySelector('tr[data-backend=\"b\"] .reason').textContent"
        )
        print(f"page after kill -9 of b: b down, reason: {reason}")

        shot = tmp_path / "status-page.png"
        png = await browser.screenshot()
        shot.write_bytes(png)
        assert png.startswith(b"\x89PNG\r\n\x1a\n") and len(png) > 5000
        print(f"screenshot: {shot} ({len(png)} bytes)")
        # ZOTLB_SCREENSHOT=docs/status-page.png refreshes the README's picture.
        if os.environ.get("ZOTLB_SCREENSHOT"):
            shutil.copy(shot, Path(os.environ["ZOTLB_SCREENSHOT"]))
        assert browser.console == []
