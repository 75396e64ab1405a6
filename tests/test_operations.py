"""Operating zotlb: status API, metrics, drain/enable, admin token, request ids."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import yaml
from conftest import (
    free_port,
    http,
    lb_config,
    needs_registry,
    needs_skopeo,
    push,
    start_zotlb,
    wait_until,
)

pytestmark = [needs_registry]


def zotlb_cli(*args: str, env: dict[str, str] | None = None):
    return subprocess.run(
        [sys.executable, "-m", "zotlb", *args],
        capture_output=True,
        text=True,
        timeout=30,
        env=env,
    )


def open_upload(lb, repo: str, headers: dict[str, str] | None = None):
    status, resp_headers, _ = http(
        "POST", f"{lb.url}/v2/{repo}/blobs/uploads/", headers
    )
    assert status == 202, status
    location = resp_headers["Location"]
    backend = parse_qs(urlsplit(location).query)["_zlb"][0]
    return location, backend


def finish_upload(lb, location: str, data: bytes) -> int:
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    parts = urlsplit(location)
    target = f"{lb.url}{parts.path}?{parts.query}&digest={digest}"
    return http("PUT", target, {"Content-Type": "application/octet-stream"}, data)[0]


def metric_value(lb, sample: str) -> float:
    for line in http("GET", lb.admin + "/metrics")[2].decode().splitlines():
        if line.startswith(sample + " "):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def test_status_reports_traffic_share_errors_and_probe_latency(
    registries, zotlb_factory
):
    a, b = registries
    lb = zotlb_factory([a, b])
    for _ in range(20):
        assert http("GET", lb.url + "/v2/")[0] == 200
    status = lb.status()
    backends = {b["name"]: b for b in status["backends"]}
    for entry in backends.values():
        for key in (
            "traffic_share",
            "error_rate",
            "probe_latency_ms",
            "seconds_in_state",
            "drained",
            "requests_last_minute",
            "requests_per_second",
            "bytes_per_second",
        ):
            assert key in entry, key
        assert entry["drained"] is False
        assert entry["error_rate"] == 0.0
        assert entry["probe_latency_ms"] > 0
    # Round-robin over two backends: the minute's traffic splits evenly.
    shares = [backends[n]["traffic_share"] for n in ("a", "b")]
    minute = [backends[n]["requests_last_minute"] for n in ("a", "b")]
    print(f"traffic share a/b: {shares}, requests last minute: {minute}")
    assert minute == [10, 10] and shares == [0.5, 0.5]

    # A backend that answers 5xx shows in the error rate: kill b and its reads
    # fail over (connect refused counts against b).
    b.kill()
    for _ in range(4):
        assert http("GET", lb.url + "/v2/")[0] == 200
    wait_until(
        lambda: (
            next(x for x in lb.status()["backends"] if x["name"] == "b")[
                "errors_last_minute"
            ]
            >= 1
        ),
        3,
        "b's failure in the error figures",
    )
    b_now = next(x for x in lb.status()["backends"] if x["name"] == "b")
    print(f"b after kill: error_rate={b_now['error_rate']} state={b_now['state']}")
    assert b_now["error_rate"] > 0 and b_now["state"] == "down"


def test_metrics_cover_connections_info_and_retries(registries, zotlb_factory):
    a, b = registries
    lb = zotlb_factory([a, b], health={"interval": "5s"})
    assert http("GET", lb.url + "/v2/")[0] == 200
    text = http("GET", lb.admin + "/metrics")[2].decode()
    for sample in (
        'zotlb_info{mode="active-active",version=',
        "zotlb_client_connections ",
        'zotlb_backend_connections{use="idle"}',
        'zotlb_backend_connections{use="active"}',
        'zotlb_backend_drained{backend="a"} 0.0',
        "process_cpu_seconds_total",
    ):
        assert sample in text, sample
    assert metric_value(lb, 'zotlb_backend_connections{use="idle"}') >= 1
    a.kill()
    for _ in range(4):
        assert http("GET", lb.url + "/v2/")[0] == 200
    retries = metric_value(lb, 'zotlb_retries_total{backend="a",cause="connect"}')
    print(f"retries after killing a: {retries}")
    assert retries >= 1
    assert (
        metric_value(lb, 'zotlb_backend_state_changes_total{backend="a",state="down"}')
        == 1
    )


def test_drain_moves_homes_finishes_in_flight_upload_and_enable_restores(
    registries, zotlb_factory
):
    a, b = registries
    lb = zotlb_factory([a, b])
    admin = ["--admin", lb.admin]

    # A repository whose home is a, with an upload session open there.
    repo = next(
        f"drain/r{i}" for i in range(64) if open_upload(lb, f"drain/r{i}")[1] == "a"
    )
    location, backend = open_upload(lb, repo)
    assert backend == "a"

    result = zotlb_cli("drain", "a", *admin)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "a: drained"
    entry = next(x for x in lb.status()["backends"] if x["name"] == "a")
    assert entry["drained"] is True and entry["state"] == "up"
    # What an operator waits for before stopping a: its open upload sessions
    # (the one probing for a home above and the one still to finish).
    assert entry["uploads_in_progress"] == 2
    assert metric_value(lb, 'zotlb_backend_drained{backend="a"}') == 1

    # No new sessions or reads go to a; its repositories moved to b.
    homes = {open_upload(lb, f"drain/r{i}")[1] for i in range(16)}
    assert homes == {"b"}
    assert open_upload(lb, repo)[1] == "b"
    moved = metric_value(lb, 'zotlb_home_moves_total{from_backend="a",to_backend="b"}')
    print(f"home moves a->b after drain: {moved}")
    assert moved >= 1
    before = metric_value(
        lb,
        'zotlb_requests_total{backend="a",method="GET",route="base",status_class="2xx"}',
    )
    for _ in range(6):
        assert http("GET", lb.url + "/v2/")[0] == 200
    after = metric_value(
        lb,
        'zotlb_requests_total{backend="a",method="GET",route="base",status_class="2xx"}',
    )
    assert after == before

    # The session opened before the drain finishes on a.
    data = b"drained but finishing" * 100
    assert finish_upload(lb, location, data) == 201
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    assert http("HEAD", f"{a.url}/v2/{repo}/blobs/{digest}")[0] == 200
    uploads = next(x for x in lb.status()["backends"] if x["name"] == "a")
    assert uploads["uploads_in_progress"] == 1
    assert metric_value(lb, 'zotlb_upload_sessions_open{backend="a"}') == 1
    assert http("HEAD", f"{b.url}/v2/{repo}/blobs/{digest}")[0] == 404

    result = zotlb_cli("enable", "a", *admin)
    assert result.returncode == 0 and result.stdout.strip() == "a: enabled"
    assert open_upload(lb, repo)[1] == "a"
    assert [e["backend"] for e in lb.events("backend.drained")] == ["a"]
    assert [e["backend"] for e in lb.events("backend.enabled")] == ["a"]

    result = zotlb_cli("drain", "nope", *admin)
    assert result.returncode == 1 and "no backend named 'nope'" in result.stderr


def test_status_cli_prints_a_table(registries, zotlb_factory):
    a, b = registries
    lb = zotlb_factory([a, b])
    wait_until(
        lambda: all(x["last_probe"] for x in lb.status()["backends"]), 5, "a probe each"
    )
    result = zotlb_cli("status", "--admin", lb.admin)
    assert result.returncode == 0, result.stderr
    print(result.stdout)
    lines = result.stdout.splitlines()
    assert lines[0].startswith("zotlb ") and "mode: active-active" in lines[0]
    assert lines[2].split()[:3] == ["BACKEND", "STATE", "FLAGS"]
    rows = {line.split()[0]: line.split() for line in lines[3:]}
    assert rows["a"][1] == "up" and rows["b"][1] == "up"
    assert rows["a"][9].endswith("ms") and rows["a"][4] == "0"

    as_json = json.loads(zotlb_cli("status", "--json", "--admin", lb.admin).stdout)
    assert [x["name"] for x in as_json["backends"]] == ["a", "b"]

    unreachable = zotlb_cli("status", "--admin", f"http://127.0.0.1:{free_port()}")
    assert unreachable.returncode == 1
    assert "cannot reach the admin API" in unreachable.stderr


def test_admin_token_guards_controls_and_read_only_can_stay_open(
    registries, zotlb_factory, tmp_path
):
    a, b = registries
    lb = zotlb_factory([a, b], admin={"token": "s3cret", "open_read": True})
    assert http("GET", lb.admin + "/status")[0] == 200
    assert http("GET", lb.admin + "/")[0] == 200
    status, headers, _ = http("POST", lb.admin + "/backends/a/drain")
    assert status == 401 and headers["WWW-Authenticate"].startswith("Bearer")
    wrong = http("POST", lb.admin + "/backends/a/drain", {"Authorization": "Bearer no"})
    assert wrong[0] == 401
    assert lb.backend_state("a") == "up"
    assert not next(x for x in lb.status()["backends"] if x["name"] == "a")["drained"]

    # The CLI finds the admin address and token in lb.yaml.
    by_config = zotlb_cli("enable", "a", "-c", str(lb.config_path))
    assert by_config.returncode == 0, by_config.stderr

    denied = zotlb_cli("drain", "a", "--admin", lb.admin)
    assert denied.returncode == 1 and "bearer token" in denied.stderr
    allowed = zotlb_cli("drain", "a", "--admin", lb.admin, "--token", "s3cret")
    assert allowed.returncode == 0, allowed.stderr
    assert lb.events("admin.unauthorized")

    # Without open_read, reads need the token too.
    closed = zotlb_factory([a, b], admin={"token": "s3cret"})
    assert http("GET", closed.admin + "/metrics")[0] == 401
    ok = http("GET", closed.admin + "/metrics", {"Authorization": "Bearer s3cret"})
    assert ok[0] == 200


def test_admin_off_loopback_needs_a_token(registries, tmp_path):
    a, b = registries
    cfg = lb_config([a, b], admin={"listen": "0.0.0.0:9100"})
    path = tmp_path / "lb.yaml"
    path.write_text(yaml.safe_dump(cfg))
    env = {k: v for k, v in os.environ.items() if k != "ZOTLB_ADMIN_TOKEN"}
    result = zotlb_cli("check", "-c", str(path), env=env)
    print(result.stderr)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "admin.token: required when admin.listen (0.0.0.0:9100) is not loopback" in (
        result.stderr
    )
    result = zotlb_cli("check", "-c", str(path), env={**env, "ZOTLB_ADMIN_TOKEN": "t"})
    assert result.returncode == 0, result.stderr


def test_request_id_follows_one_push_across_access_events(registries, zotlb_factory):
    a, b = registries
    lb = zotlb_factory([a, b])
    location, backend = open_upload(lb, "trace/app", {"X-Request-ID": "client-id-1"})
    session = urlsplit(location).path.rsplit("/", 1)[1]
    assert finish_upload(lb, location, b"layer") == 201
    status, headers, _ = http("GET", lb.url + "/v2/")
    assert status == 200 and headers["X-Request-ID"]

    wait_until(lambda: len(lb.events("request")) >= 3, 5, "access events")
    opened, finished, base = lb.events("request")[-3:]
    assert opened["request_id"] == "client-id-1"
    assert finished["request_id"] != opened["request_id"]
    assert base["request_id"] == headers["X-Request-ID"]
    for event in (opened, finished):
        assert event["upload"] == session
        assert event["repo"] == "trace/app"
        assert event["route"] == "upload"
        assert event["backend"] == backend
    print(
        f"one push, two events: {opened['request_id']} / {finished['request_id']}, "
        f"session {session} on {backend}"
    )


def test_request_id_is_sent_to_the_backend(tmp_path):
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, str(Path(__file__).parent / "echo_backend.py"), str(port)],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
        cfg = lb_config([])
        cfg["backends"] = [{"name": "echo", "url": f"http://127.0.0.1:{port}"}]
        lb = start_zotlb(tmp_path, cfg)
        try:
            _, headers, body = http("GET", lb.url + "/v2/echo")
            sent = {k.lower(): v for k, v in json.loads(body)["headers"]}
            assert sent["x-request-id"] == headers["X-Request-ID"]
            # A client's own id is kept, not replaced or doubled.
            _, headers, body = http(
                "GET", lb.url + "/v2/echo", {"X-Request-ID": "mine"}
            )
            sent_ids = [
                v for k, v in json.loads(body)["headers"] if k.lower() == "x-request-id"
            ]
            assert sent_ids == ["mine"] and headers["X-Request-ID"] == "mine"
        finally:
            lb.stop()
    finally:
        proc.terminate()
        proc.wait()
        proc.stdout.close()


def test_access_log_sampling_keeps_errors(registries, zotlb_factory):
    a, b = registries
    lb = zotlb_factory([a, b], log={"access_sample": 0.0})
    for _ in range(10):
        assert http("GET", lb.url + "/v2/")[0] == 200
    assert http("GET", lb.url + "/v2/nothere/manifests/x")[0] == 404
    wait_until(lambda: lb.events("request"), 5, "the 404's access event")
    events = lb.events("request")
    assert [e["status"] for e in events] == [404]
    # Metrics still count every request.
    total = sum(
        metric_value(
            lb,
            f'zotlb_requests_total{{backend="{n}",method="GET",route="base",'
            'status_class="2xx"}',
        )
        for n in ("a", "b")
    )
    assert total == 10


@needs_skopeo
def test_a_skopeo_push_can_be_followed_by_upload_session(
    registries, zotlb_factory, image_factory
):
    a, b = registries
    lb = zotlb_factory([a, b])
    image = image_factory("v1")
    result = push(image, f"{lb.hostport}/trace/skopeo:v1")
    assert result.returncode == 0, result.stderr

    wait_until(
        lambda: any(
            e["method"] == "PUT" and e["route"] == "manifest"
            for e in lb.events("request")
        ),
        5,
        "the manifest PUT's access event",
    )
    events = [e for e in lb.events("request") if e["repo"] == "trace/skopeo"]
    sessions: dict[str, list[dict]] = {}
    for event in events:
        if event["upload"]:
            sessions.setdefault(event["upload"], []).append(event)
    # One session per blob skopeo had to send (layers and config).
    assert len(sessions) == len(image.blobs) - 1, sessions
    for lines in sessions.values():
        assert lines[0]["method"] == "POST"
        assert lines[0]["status"] == 202 and lines[-1]["status"] == 201
        assert lines[-1]["method"] == "PUT"
        assert {e["backend"] for e in lines} == {lines[0]["backend"]}
    writes = [e for e in events if e["method"] in ("POST", "PATCH", "PUT")]
    assert len({e["backend"] for e in writes}) == 1
    ids = [e["request_id"] for e in events]
    assert len(set(ids)) == len(ids)
    print(
        f"push of {len(image.blobs)} objects: {len(events)} access events, "
        f"{len(sessions)} upload sessions, all on {writes[0]['backend']}"
    )


def test_admin_controls_refuse_cross_site_requests(registries, zotlb_factory):
    a, b = registries
    lb = zotlb_factory([a, b])
    host = lb.admin.removeprefix("http://")
    forged = [
        # A form on another site, posted by the operator's browser.
        {
            "Origin": "http://evil.example",
            "Content-Type": "application/x-www-form-urlencoded",
        },
        {"Sec-Fetch-Site": "cross-site"},
        # DNS rebinding: the page's own name resolving to 127.0.0.1.
        {
            "Host": "evil.example:" + host.rpartition(":")[2],
            "Origin": "http://evil.example:" + host.rpartition(":")[2],
        },
    ]
    for headers in forged:
        status, _, body = http(
            "POST", lb.admin + "/backends/a/drain", headers, data=b"x=1"
        )
        assert status == 403, (headers, status, body)
        assert http("POST", lb.admin + "/reload", headers)[0] == 403
    assert not next(x for x in lb.status()["backends"] if x["name"] == "a")["drained"]
    assert lb.events("admin.cross_site_refused")

    # The page's own origin, and the CLI (no Origin at all), still work.
    same = http("POST", lb.admin + "/backends/a/drain", {"Origin": lb.admin})
    assert same[0] == 200
    assert zotlb_cli("enable", "a", "--admin", lb.admin).returncode == 0
    assert not next(x for x in lb.status()["backends"] if x["name"] == "a")["drained"]


def test_reload_reports_what_needs_a_restart_against_the_running_listener(
    registries, zotlb_factory
):
    a, b = registries
    lb = zotlb_factory([a, b])
    cfg = yaml.safe_load(lb.config_path.read_text())
    running = cfg["listen"]
    cfg["listen"] = "127.0.0.1:1"  # not applied: the listener stays put
    lb.config_path.write_text(yaml.safe_dump(cfg))
    for _ in range(2):
        # Asked twice, the answer stays the same: zotlb still listens on `running`.
        done = zotlb_cli("reload", "--admin", lb.admin)
        assert done.returncode == 0, done.stderr
        assert "takes effect after a restart: listen" in done.stdout
    assert [e["needs_restart"] for e in lb.events("config.reloaded")] == [
        ["listen"]
    ] * 2

    cfg["listen"] = running
    lb.config_path.write_text(yaml.safe_dump(cfg))
    back = zotlb_cli("reload", "--admin", lb.admin)
    assert back.returncode == 0 and "restart" not in back.stdout
    assert lb.events("config.reloaded")[-1]["needs_restart"] == []
    assert http("GET", lb.url + "/v2/")[0] == 200
