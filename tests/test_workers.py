"""`workers: N`: N processes on one port, started, reloaded and stopped together."""

from __future__ import annotations

import json
import os
import signal
import socket
from pathlib import Path

import pytest
import yaml
from conftest import http, lb_config, needs_registry, start_zotlb, wait_until

from zotlb.config import ConfigError, config_from_mapping

pytestmark = [needs_registry]


def _children(pid: int) -> list[int]:
    out = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        out += [int(c) for c in (task / "children").read_text().split()]
    return out


def _fd_targets(pid: int) -> list[str]:
    targets = []
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            targets.append(os.readlink(f"/proc/{pid}/fd/{fd}"))
        except FileNotFoundError:  # closed meanwhile
            continue
    return targets


def _start(tmp_path, backends, **overrides):
    lb = start_zotlb(tmp_path, lb_config(backends, workers=2, **overrides))
    # The admin listener opens in the parent once every worker listens.
    wait_until(lambda: _answers(lb.admin + "/status"), 15, "the admin listener")
    return lb


def _answers(url: str) -> bool:
    try:
        return http("GET", url, timeout=1)[0] == 200
    except OSError:
        return False


def _connect_many(lb, count: int = 64) -> None:
    """New connections: the kernel hands each to one of the workers."""
    for _ in range(count):
        with socket.create_connection(("127.0.0.1", lb.port)) as conn:
            conn.sendall(b"GET /v2/ HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            data = b""
            while chunk := conn.recv(65536):
                data += chunk
        assert data.startswith(b"HTTP/1.1 200"), data[:200]


def test_workers_share_the_port_and_stop_together(tmp_path, registries):
    lb = _start(tmp_path, list(registries))
    try:
        children = _children(lb.proc.pid)
        assert len(children) == 1
        # Both processes hold a listening socket on the proxy port.
        for pid in (lb.proc.pid, *children):
            assert any(i.startswith("socket:") for i in _fd_targets(pid))
        _connect_many(lb)
        status, _, _ = http("GET", lb.url + "/v2/")
        assert status == 200
        assert lb.status()["mode"] == "active-active"
    finally:
        code = lb.stop()
    assert code == 0
    for pid in children:
        assert (
            not Path(f"/proc/{pid}").exists()
            or "zombie" in Path(f"/proc/{pid}/status").read_text()
        )
    assert len(lb.events("server.stopped")) == 2, "".join(lb.lines[-20:])


def test_every_worker_answers(tmp_path, registries):
    lb = _start(tmp_path, list(registries), log={"access_sample": 1.0})
    try:
        _connect_many(lb)
        wait_until(
            lambda: {e.get("worker") for e in lb.events("request")} >= {None, 1},
            10,
            "requests served by both the parent and worker 1",
        )
    finally:
        lb.stop()
    # Two processes, one stderr: every line is still one whole JSON event.
    for line in lb.lines:
        json.loads(line)


def test_sighup_reloads_every_worker(tmp_path, registries):
    a, b = registries
    lb = _start(tmp_path, [a])
    try:
        cfg = yaml.safe_load(lb.config_path.read_text())
        cfg["backends"].append({"name": b.name, "url": b.url})
        lb.config_path.write_text(yaml.safe_dump(cfg))
        lb.proc.send_signal(signal.SIGHUP)
        wait_until(
            lambda: len(lb.events("config.reloaded")) == 2, 10, "both workers reloaded"
        )
        workers = {e.get("worker") for e in lb.events("config.reloaded")}
        assert workers == {None, 1}
        assert all(e["added"] == ["b"] for e in lb.events("config.reloaded"))
        # A reload never shows the worker's own admin-less view as a change.
        assert all(e["needs_restart"] == [] for e in lb.events("config.reloaded"))
    finally:
        lb.stop()


def test_admin_reload_reaches_the_workers(tmp_path, registries):
    a, b = registries
    lb = _start(tmp_path, [a])
    try:
        cfg = yaml.safe_load(lb.config_path.read_text())
        cfg["backends"].append({"name": b.name, "url": b.url})
        lb.config_path.write_text(yaml.safe_dump(cfg))
        status, _, _ = http("POST", lb.admin + "/reload")
        assert status == 200
        wait_until(
            lambda: len(lb.events("config.reloaded")) == 2, 10, "both workers reloaded"
        )
    finally:
        lb.stop()


def test_drain_is_refused_with_workers(tmp_path, registries):
    lb = _start(tmp_path, list(registries))
    try:
        status, _, body = http("POST", lb.admin + "/backends/a/drain")
        assert status == 409
        assert b"workers > 1" in body
        assert lb.backend_state("a") == "up"
    finally:
        lb.stop()


def test_a_dead_worker_stops_them_all(tmp_path, registries):
    lb = _start(tmp_path, list(registries))
    (child,) = _children(lb.proc.pid)
    os.kill(child, signal.SIGKILL)
    lb.proc.wait(20)
    assert lb.proc.returncode == 1
    assert lb.events("worker.exited")[0]["pid"] == child
    lb.stop()


def test_workers_config():
    base = {"backends": [{"name": "a", "url": "http://127.0.0.1:1"}]}
    assert config_from_mapping(base).worker_count == 1
    assert config_from_mapping({**base, "workers": 3}).worker_count == 3
    auto = config_from_mapping({**base, "workers": "auto"})
    assert auto.worker_count == (os.cpu_count() or 1)
    with pytest.raises(ConfigError) as err:
        config_from_mapping({**base, "workers": -1})
    assert err.value.problems[0].startswith("workers:")
