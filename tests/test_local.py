"""`zotlb local`, the quickstart: registries started for the config, zotlb in front."""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

import yaml
from conftest import (
    free_port,
    http,
    needs_registry,
    needs_skopeo,
    pull,
    push,
    wait_until,
)

from zotlb.local import default_config_text

ROOT = Path(__file__).parent.parent


def test_embedded_default_is_the_shipped_conf():
    assert default_config_text() == (ROOT / "conf" / "lb.yaml").read_text()


@needs_registry
@needs_skopeo
def test_local_starts_registries_and_serves(tmp_path, image_factory):
    ports = [free_port() for _ in range(3)]
    cfg = yaml.safe_load(default_config_text())
    cfg["listen"] = f"127.0.0.1:{ports[0]}"
    cfg["backends"][0]["url"] = f"http://127.0.0.1:{ports[1]}"
    cfg["backends"][1]["url"] = f"http://127.0.0.1:{ports[2]}"
    cfg["admin"]["listen"] = f"127.0.0.1:{free_port()}"
    path = tmp_path / "lb.yaml"
    path.write_text(yaml.safe_dump(cfg))
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "zotlb",
            "local",
            "-c",
            str(path),
            "--state-dir",
            str(tmp_path / "state"),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    try:
        assert proc.stdout is not None
        for line in proc.stdout:
            if "serving on" in line:
                break
        wait_until(lambda: _answers(f"http://127.0.0.1:{ports[0]}/v2/"), 10, "zotlb")
        img = image_factory("demo")
        assert push(img, f"127.0.0.1:{ports[0]}/demo/hello:demo").returncode == 0
        got = pull(f"127.0.0.1:{ports[0]}/demo/hello:demo", tmp_path / "out", "demo")
        assert got == img.manifest_digest
        assert sorted(p.name for p in (tmp_path / "state").iterdir()) == ["a", "b"]
    finally:
        proc.send_signal(signal.SIGINT)
        assert proc.wait(20) == 0
        proc.stdout.close()
    # The registries went with it.
    for port in ports[1:]:
        assert not _answers(f"http://127.0.0.1:{port}/v2/")


def _answers(url: str) -> bool:
    try:
        return http("GET", url, timeout=1)[0] == 200
    except OSError:
        return False


def test_local_zot_config_is_valid_and_local(tmp_path):
    import json

    from zotlb import zotkeys
    from zotlb.config import config_from_mapping
    from zotlb.local import _zot_config

    cfg = config_from_mapping(yaml.safe_load(default_config_text()))
    written = json.loads(_zot_config(cfg, "b", 6123, tmp_path).read_text())
    assert written["http"]["port"] == "6123"
    assert written["storage"]["rootDirectory"] == str(tmp_path / "data")
    assert written["extensions"]["sync"]["registries"][0]["urls"] == [
        "http://127.0.0.1:5001"
    ]
    errors = [
        f
        for f in zotkeys.check_config(written, cfg.zot.version)
        if f.severity == "error"
    ]
    assert errors == []
