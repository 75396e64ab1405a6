"""HTTP-level behaviour: headers both ways, bad requests, truncation, shutdown."""

from __future__ import annotations

import http.client
import json
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import conftest
import pytest
from conftest import free_port, lb_config, needs_registry, start_zotlb, wait_until


@dataclass
class Echo:
    name: str
    url: str
    proc: subprocess.Popen[str]


@pytest.fixture
def echo():
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, str(Path(__file__).parent / "echo_backend.py"), str(port)],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
    yield Echo("echo", f"http://127.0.0.1:{port}", proc)
    proc.terminate()
    proc.wait()
    proc.stdout.close()


@pytest.fixture
def echo_lb(echo, tmp_path):
    lb = start_zotlb(tmp_path, lb_config([echo]))
    yield lb
    lb.stop()


def test_request_headers_forwarded(echo_lb):
    conn = http.client.HTTPConnection("127.0.0.1", echo_lb.port, timeout=10)
    conn.request(
        "GET",
        "/v2/echo?q=%2Fa",
        headers={
            "Authorization": "Bearer secret-token",
            "Range": "bytes=0-9",
            "Connection": "X-Drop-Me",
            "X-Drop-Me": "1",
            "Proxy-Authorization": "Basic eDp5",
            "X-Forwarded-For": "10.9.8.7",
        },
    )
    resp = conn.getresponse()
    assert resp.status == 200
    seen = json.loads(resp.read())
    conn.close()
    headers = {k.lower(): v for k, v in seen["headers"]}
    assert seen["raw_path"] == "/v2/echo?q=%2Fa"
    assert headers["authorization"] == "Bearer secret-token"
    assert headers["range"] == "bytes=0-9"
    assert headers["host"] == echo_lb.hostport
    assert headers["x-forwarded-host"] == echo_lb.hostport
    assert headers["x-forwarded-proto"] == "http"
    assert headers["x-forwarded-for"] == "10.9.8.7, 127.0.0.1"
    for hop in ("x-drop-me", "proxy-authorization"):
        assert hop not in headers
    # zotlb adds no client-side defaults of its own.
    # Forwarded as the client sent them; zotlb adds no defaults of its own.
    assert headers["accept-encoding"] == "identity" and "user-agent" not in headers


def test_response_headers_rewritten_and_hop_by_hop_dropped(echo_lb):
    status, headers, _ = conftest.http("GET", echo_lb.url + "/v2/echo")
    assert status == 200
    assert headers["Location"] == f"{echo_lb.url}/v2/somewhere?x=1"
    assert (
        headers["WWW-Authenticate"]
        == f'Bearer realm="{echo_lb.url}/token",service="reg"'
    )
    assert headers["X-Kept"] == "yes"
    assert "X-Private" not in headers and "Keep-Alive" not in headers


def test_truncated_backend_body_is_never_a_complete_response(echo_lb):
    for path in ("/v2/break/4", "/v2/breakchunked"):
        with pytest.raises(Exception) as info:
            conftest.http("GET", echo_lb.url + path)
        assert "IncompleteRead" in repr(info.value) or "Connection" in repr(info.value)
    # zotlb keeps serving.
    assert conftest.http("GET", echo_lb.url + "/v2/")[0] == 200
    assert echo_lb.events("request.truncated")


def raw_exchange(port: int, data: bytes, timeout: float = 5) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(data)
        chunks = []
        try:
            while True:
                chunk = sock.recv(65536)
                if not chunk:
                    break
                chunks.append(chunk)
        except (TimeoutError, ConnectionResetError):
            pass
    return b"".join(chunks)


MALFORMED = {
    "cl_and_te": b"POST /v2/echo HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\n"
    b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
    "huge_header": b"GET /v2/ HTTP/1.1\r\nHost: x\r\nX-Big: "
    + b"a" * 100_000
    + b"\r\n\r\n",
    "bad_method": b"G@T /v2/ HTTP/1.1\r\nHost: x\r\n\r\n",
    "traversal": b"GET /v2/../../etc/passwd HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    "encoded_traversal": b"GET /v2/a/%2e%2e/%2e%2e/etc/passwd HTTP/1.1\r\nHost: x\r\n"
    b"Connection: close\r\n\r\n",
}


@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_malformed_requests_get_4xx_or_close(echo_lb, case):
    reply = raw_exchange(echo_lb.port, MALFORMED[case])
    if reply:
        status = int(reply.split(b" ", 2)[1])
        assert 400 <= status < 500, reply[:200]
    assert conftest.http("GET", echo_lb.url + "/v2/")[0] == 200


def test_traversal_answer_is_oci_json(echo_lb):
    reply = raw_exchange(echo_lb.port, MALFORMED["traversal"])
    head, _, body = reply.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 400")
    assert json.loads(body)["errors"][0]["code"]


def test_streaming_passes_content_length_untouched(echo_lb):
    status, headers, body = conftest.http("GET", echo_lb.url + "/v2/stream/2")
    assert status == 200 and headers["Content-Length"] == str(2 * 1024 * 1024)
    assert len(body) == 2 * 1024 * 1024 and "Transfer-Encoding" not in headers


def test_sigterm_lets_in_flight_finish_and_exits_zero(echo, tmp_path):
    lb = start_zotlb(tmp_path, lb_config([echo]))
    received = {}
    reading = threading.Event()

    def slow_reader():
        with socket.create_connection(("127.0.0.1", lb.port)) as sock:
            sock.sendall(b"GET /v2/stream/64 HTTP/1.1\r\nHost: x\r\n\r\n")
            total = 0
            first = sock.recv(4096)
            total += len(first)
            reading.set()
            while chunk := sock.recv(65536):
                total += len(chunk)
                time.sleep(0.002)  # a slow client keeps the request in flight
            received["bytes"] = total

    reader = threading.Thread(target=slow_reader)
    reader.start()
    assert reading.wait(5)
    lb.proc.send_signal(signal.SIGTERM)
    # The listener closes while the download is still in flight.
    wait_until(lambda: _refused(lb.port), 5, "listener closed")
    reader.join(30)
    assert lb.proc.wait(20) == 0
    lb.stop()
    header_len = 200  # the status line and headers
    assert received["bytes"] > 64 * 1024 * 1024
    assert received["bytes"] < 64 * 1024 * 1024 + header_len * 2
    assert [e["event"] for e in lb.events() if e["event"].startswith("server.")][
        -2:
    ] == [
        "server.stopping",
        "server.stopped",
    ]


def _refused(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
    except ConnectionRefusedError:
        return True
    return False


@needs_registry
def test_metrics_status_and_access_log(registries, zotlb_factory):
    a, b = registries
    lb = zotlb_factory([a, b])
    for _ in range(4):
        assert conftest.http("GET", lb.url + "/v2/")[0] == 200
    assert conftest.http("GET", lb.url + "/v2/nothere/manifests/x")[0] == 404
    status = lb.status()
    assert status["mode"] == "active-active"
    assert {b["name"]: b["state"] for b in status["backends"]} == {"a": "up", "b": "up"}
    assert all("in_flight" in b and b["last_probe"] for b in status["backends"])
    metrics = conftest.http("GET", lb.admin + "/metrics")[2].decode()
    for name in (
        'zotlb_requests_total{backend="a",method="GET",route="base",status_class="2xx"}',
        "zotlb_request_duration_seconds_bucket",
        'zotlb_backend_up{backend="a"} 1.0',
        "zotlb_health_checks_total",
        "zotlb_fallback_reads_total",
        "process_resident_memory_bytes",
    ):
        assert name in metrics, name
    wait_until(lambda: len(lb.events("request")) >= 5, 5, "access events")
    event = lb.events("request")[-1]
    for key in (
        "method",
        "path",
        "status",
        "bytes_in",
        "bytes_out",
        "duration_ms",
        "backend",
        "retries",
    ):
        assert key in event
    assert event["status"] == 404 and event["route"] == "manifest"
