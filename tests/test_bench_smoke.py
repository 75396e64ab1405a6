"""`python -m bench --quick` runs end to end: every workload, every target, the chart.

A smoke test of the suite only: the targets themselves are checked by a full
run (`python -m bench`), never by timed unit tests.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from bench.procs import missing_tools

REPO = Path(__file__).resolve().parent.parent
WORKLOADS = ("download.", "upload.", "small.", "memory.", "flow.", "latency.")


@pytest.mark.timeout(180)
def test_quick_bench_writes_every_figure(tmp_path):
    missing = missing_tools()
    if missing:
        pytest.skip(f"bench tools not installed: {', '.join(missing)}")
    result = subprocess.run(
        [sys.executable, "-m", "bench", "--quick", "--out", str(tmp_path)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=170,
    )
    assert result.returncode == 0, result.stdout + result.stderr

    data = json.loads((tmp_path / "bench-quick.json").read_text())
    figures = data["figures"]
    for prefix in WORKLOADS:
        assert any(key.startswith(prefix) for key in figures), prefix
    for key, fig in figures.items():
        if key.startswith("memory."):
            columns = {"haproxy", "zotlb"}
        elif key.startswith("latency.nginx.half_peak.p99_added"):
            columns = {"haproxy", "zotlb"}
        else:
            columns = {"direct", "haproxy", "zotlb"}
        assert columns <= set(fig["results"]), key
        for column in columns:
            summary = fig["results"][column]
            assert summary["min"] <= summary["median"] <= summary["max"], key
    assert "haproxy_source" in figures["flow.skopeo"]["results"]
    assert figures["download.registry.1"]["results"]["zotlb"]["median"] > 0

    targets = data["targets"]
    assert len(targets) == 14
    for target in targets:
        assert isinstance(target["value"], float | int), target
        assert target["met"] in (True, False)

    png = (tmp_path / "bench-quick.png").read_bytes()
    assert png.startswith(b"\x89PNG\r\n\x1a\n")
    table = (tmp_path / "bench-quick.md").read_text()
    assert "zotlb/HAProxy" in table and "| target |" in table
    assert "zotlb/HAProxy" in result.stdout


def test_missing_tool_is_named_with_its_package(tmp_path):
    env = {**os.environ, "PATH": str(tmp_path)}
    result = subprocess.run(
        [sys.executable, "-m", "bench", "--quick", "--out", str(tmp_path)],
        cwd=REPO,
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )
    assert result.returncode == 3
    assert "apt-get install" in result.stderr
    assert "wrk" in result.stderr
    assert not (tmp_path / "bench-quick.json").exists()
