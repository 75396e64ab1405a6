"""Hot reload: SIGHUP and `zotlb reload` re-read lb.yaml without breaking traffic."""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import threading
from http.client import HTTPConnection
from urllib.parse import parse_qs, urlsplit

import pytest
import yaml
from conftest import http, needs_registry, wait_until

pytestmark = [needs_registry, pytest.mark.slow]

MIB = 1024 * 1024
SIZE_MIB = 256
BLOCK = os.urandom(MIB)


def write_config(lb, cfg: dict) -> None:
    # Replace atomically, as an operator's editor or config management would.
    tmp = lb.config_path.with_suffix(".tmp")
    tmp.write_text(yaml.safe_dump(cfg))
    tmp.replace(lb.config_path)


def reload_during_upload(lb, cfg: dict, c, halfway: threading.Event) -> None:
    assert halfway.wait(60), "the upload did not reach its middle"
    # Add c and change the health interval, then SIGHUP.
    cfg["backends"].append({"name": "c", "url": c.url})
    cfg["health"]["interval"] = "100ms"
    write_config(lb, cfg)
    lb.proc.send_signal(signal.SIGHUP)
    wait_until(lambda: lb.events("config.reloaded"), 10, "the reload")
    reloaded = lb.events("config.reloaded")[0]
    assert reloaded["added"] == ["c"] and reloaded["removed"] == []
    wait_until(lambda: lb.backend_state("c") == "up", 10, "c to pass its probes")


def test_upload_survives_reload_adding_a_backend_and_bad_reload_changes_nothing(
    registries, registry_factory, zotlb_factory
):
    a, b = registries
    c = registry_factory("c")
    lb = zotlb_factory([a, b])
    cfg = yaml.safe_load(lb.config_path.read_text())

    halfway = threading.Event()
    resume = threading.Event()
    result: dict[str, object] = {}

    def body():
        for i in range(SIZE_MIB):
            if i == SIZE_MIB // 2:
                halfway.set()
                # The reload happens while this upload is mid-body.
                resume.wait(60)
            yield BLOCK

    def upload() -> None:
        conn = HTTPConnection("127.0.0.1", lb.port, timeout=120)
        try:
            conn.request("POST", "/v2/reload/big/blobs/uploads/")
            resp = conn.getresponse()
            resp.read()
            location = urlsplit(resp.headers["Location"])
            result["backend"] = parse_qs(location.query)["_zlb"][0]
            digest = "sha256:" + hashlib.sha256(BLOCK * SIZE_MIB).hexdigest()
            result["digest"] = digest
            conn.request(
                "PUT",
                f"{location.path}?{location.query}&digest={digest}",
                body=body(),
                encode_chunked=True,
                headers={"Content-Type": "application/octet-stream"},
            )
            resp = conn.getresponse()
            resp.read()
            result["status"] = resp.status
        except Exception as exc:  # reported by the assertion below
            result["error"] = repr(exc)
        finally:
            conn.close()

    uploader = threading.Thread(target=upload)
    uploader.start()
    try:
        reload_during_upload(lb, cfg, c, halfway)
    finally:
        resume.set()
        uploader.join(120)

    assert result.get("status") == 201, result
    pinned = {"a": a, "b": b}[str(result["backend"])]
    assert (
        http("HEAD", f"{pinned.url}/v2/reload/big/blobs/{result['digest']}")[0] == 200
    )
    print(
        f"{SIZE_MIB} MiB upload on {result['backend']} finished across a reload "
        "that added c"
    )

    # The new backend takes its share of new repositories.
    homes = set()
    for i in range(24):
        status, headers, _ = http("POST", f"{lb.url}/v2/spread/r{i}/blobs/uploads/")
        assert status == 202
        homes.add(parse_qs(urlsplit(headers["Location"]).query)["_zlb"][0])
    assert homes == {"a", "b", "c"}

    # An invalid file: rejected with its reasons, by SIGHUP and by `zotlb reload`.
    before = lb.status()["backends"]
    bad = {**cfg, "backends": [*cfg["backends"], {"name": "d", "url": "ftp://x"}]}
    bad["health"] = {**cfg["health"], "rise": 0}
    write_config(lb, bad)
    lb.proc.send_signal(signal.SIGHUP)
    wait_until(lambda: lb.events("config.reload.failed"), 10, "the rejected reload")
    problems = lb.events("config.reload.failed")[0]["problems"]
    assert any(p.startswith("backends[3].url:") for p in problems), problems
    assert any(p.startswith("health.rise:") for p in problems), problems

    cli = subprocess.run(
        [sys.executable, "-m", "zotlb", "reload", "--admin", lb.admin],
        capture_output=True,
        text=True,
        timeout=30,
    )
    print(cli.stderr)
    assert cli.returncode == 1
    assert "the old one stays in force" in cli.stderr
    assert "backends[3].url:" in cli.stderr
    after = lb.status()["backends"]
    assert [x["name"] for x in after] == [x["name"] for x in before] == ["a", "b", "c"]
    assert all(x["state"] == "up" for x in after)
    assert len(lb.events("config.reloaded")) == 1

    # A good `zotlb reload` that removes c: it stops getting traffic.
    write_config(lb, {**cfg, "backends": cfg["backends"][:2]})
    cli = subprocess.run(
        [sys.executable, "-m", "zotlb", "reload", "--admin", lb.admin],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert cli.returncode == 0, cli.stderr
    assert [x["name"] for x in lb.status()["backends"]] == ["a", "b"]
    assert lb.events("config.reloaded")[-1]["removed"] == ["c"]
    metrics = http("GET", lb.admin + "/metrics")[2].decode()
    assert 'zotlb_config_reloads_total{result="failed"} 2.0' in metrics
    assert 'zotlb_config_reloads_total{result="ok"} 2.0' in metrics
    assert 'zotlb_backend_up{backend="c"}' not in metrics
    assert lb.proc.poll() is None
