"""Timeouts and limits: slow, idle and too many clients; stalled backends."""

from __future__ import annotations

import http.client as httpclient
import json
import re
import shutil
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
from conftest import Registry, http, lb_config, start_zotlb, wait_until

KIB = 1024


class ScriptedBackend:
    """A raw-socket backend on loopback, one thread per connection.

    - GET /v2/: 200 `{}`
    - GET /v2/stall: promises 1 MiB, sends 256 KiB, then goes silent
    - GET /v2/trickle/<n>/<ms>: n KiB, one KiB every <ms> milliseconds
    - PUT /v2/sink: reads the whole body, answers its length
    - PUT /v2/deaf: reads the request head, then neither reads nor answers
    """

    def __init__(self) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.release = threading.Event()
        self._thread = threading.Thread(target=self._accept, daemon=True)
        self._thread.start()

    @property
    def registry(self) -> Registry:
        return Registry("scripted", self.port, None, None)  # type: ignore[arg-type]

    def close(self) -> None:
        self.release.set()
        self.sock.close()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        with conn:
            try:
                self._answer(conn)
            except OSError:
                pass

    def _answer(self, conn: socket.socket) -> None:
        head = b""
        while b"\r\n\r\n" not in head:
            chunk = conn.recv(65536)
            if not chunk:
                return
            head += chunk
        head, _, rest = head.partition(b"\r\n\r\n")
        method, path, _ = head.split(b"\r\n", 1)[0].decode().split(" ", 2)
        if path == "/v2/stall":
            conn.sendall(_head(1024 * KIB) + b"s" * (256 * KIB))
            self.release.wait(30)
        elif match := re.fullmatch(r"/v2/trickle/(\d+)/(\d+)", path):
            kib, delay = int(match.group(1)), int(match.group(2)) / 1000
            conn.sendall(_head(kib * KIB))
            for _ in range(kib):
                time.sleep(delay)
                conn.sendall(b"t" * KIB)
        elif method == "PUT" and path == "/v2/deaf":
            self.release.wait(30)
        elif method == "PUT" and path == "/v2/sink":
            length = int(re.search(rb"(?i)content-length: *(\d+)", head).group(1))
            got = len(rest)
            while got < length:
                chunk = conn.recv(65536)
                if not chunk:
                    return
                got += len(chunk)
            body = json.dumps({"received": got}).encode()
            conn.sendall(_head(len(body)) + body)
        else:
            conn.sendall(_head(2) + b"{}")


def _head(length: int) -> bytes:
    return (
        "HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\n"
        f"Content-Length: {length}\r\nConnection: close\r\n\r\n"
    ).encode()


@pytest.fixture
def backend() -> Iterator[ScriptedBackend]:
    server = ScriptedBackend()
    yield server
    server.close()


@pytest.fixture
def make_lb(tmp_path, backend) -> Iterator[Any]:
    started = []

    def factory(**overrides: Any) -> Any:
        cfg = lb_config([backend.registry], replication={"mode": "off"}, **overrides)
        lb = start_zotlb(tmp_path, cfg, f"lb{len(started)}.yaml")
        started.append(lb)
        return lb

    yield factory
    for lb in started:
        lb.stop()


def read_all(sock: socket.socket) -> bytes:
    data = b""
    try:
        while chunk := sock.recv(65536):
            data += chunk
    except ConnectionResetError:
        pass
    return data


def timed_get(port: int, path: str = "/v2/") -> tuple[int, float]:
    started = time.monotonic()
    status = http("GET", f"http://127.0.0.1:{port}{path}", timeout=5)[0]
    return status, time.monotonic() - started


# --- slow and idle clients --------------------------------------------------------


def test_slowloris_is_cut_off_while_others_are_served(make_lb):
    lb = make_lb(timeouts={"request_header": "500ms", "idle": "10s"})
    with socket.create_connection(("127.0.0.1", lb.port), timeout=5) as slow:
        slow.sendall(b"GET /v2/ HTTP/1.1\r\nHost: x\r\n")
        started = time.monotonic()
        served = []
        cut_at = None
        # A header byte every 50 ms: never silent, never done.
        while cut_at is None and time.monotonic() - started < 5:
            try:
                slow.sendall(b"X")
            except (BrokenPipeError, ConnectionResetError):
                cut_at = time.monotonic() - started
                break
            served.append(timed_get(lb.port))
            slow.settimeout(0.05)
            try:
                reply = slow.recv(4096)
            except TimeoutError:
                continue
            except ConnectionResetError:
                reply = b""
            cut_at = time.monotonic() - started
    assert cut_at is not None, "the slow client was never cut off"
    assert 0.4 <= cut_at <= 1.5, cut_at
    if reply:
        assert reply.startswith(b"HTTP/1.1 408"), reply
    # Meanwhile every other request was served, and quickly.
    assert len(served) >= 3
    assert all(status == 200 and took < 0.5 for status, took in served), served
    metrics = http("GET", lb.admin + "/metrics")[2].decode()
    assert (
        'zotlb_client_limit_hits_total{reason="request_header_timeout"} 1.0' in metrics
    )


def test_idle_keepalive_connection_is_closed(make_lb):
    lb = make_lb(timeouts={"request_header": "2s", "idle": "500ms"})
    with socket.create_connection(("127.0.0.1", lb.port), timeout=5) as sock:
        sock.sendall(b"GET /v2/ HTTP/1.1\r\nHost: x\r\n\r\n")
        reply = b""
        while not reply.endswith(b"\r\n\r\n{}"):
            reply += sock.recv(65536)
        assert reply.startswith(b"HTTP/1.1 200"), reply
        answered = time.monotonic()
        assert sock.recv(65536) == b""  # blocks until zotlb closes
        idle_for = time.monotonic() - answered
    assert 0.4 <= idle_for <= 1.5, idle_for


def test_slow_but_moving_transfers_are_never_cut(make_lb, backend):
    # Every timeout is 500 ms; both transfers take about 2 s and are never
    # silent for more than about 100 ms.
    lb = make_lb(timeouts={"request_header": "500ms", "idle": "500ms", "read": "500ms"})
    started = time.monotonic()
    status, _, body = http("GET", f"{lb.url}/v2/trickle/20/100", timeout=10)
    took = time.monotonic() - started
    assert status == 200 and len(body) == 20 * KIB
    assert took >= 1.8, took

    size = 20 * 64 * KIB
    conn = httpclient.HTTPConnection("127.0.0.1", lb.port, timeout=10)
    conn.putrequest("PUT", "/v2/sink")
    conn.putheader("Content-Length", str(size))
    conn.endheaders()
    started = time.monotonic()
    for _ in range(20):
        time.sleep(0.1)
        conn.send(b"u" * (64 * KIB))
    resp = conn.getresponse()
    took = time.monotonic() - started
    assert resp.status == 200 and json.loads(resp.read()) == {"received": size}
    assert took >= 1.8, took
    conn.close()


# --- headers ----------------------------------------------------------------------


def raw_request(port: int, head: bytes) -> tuple[int, dict[str, str], bytes]:
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(head)
        reply = read_all(sock)
    head_part, _, body = reply.partition(b"\r\n\r\n")
    lines = head_part.decode().split("\r\n")
    headers = dict(line.split(": ", 1) for line in lines[1:])
    return int(lines[0].split(" ")[1]), headers, body


def test_header_size_limit(make_lb):
    lb = make_lb(limits={"max_header_size": 4096})
    ok = raw_request(
        lb.port,
        b"GET /v2/ HTTP/1.1\r\nHost: x\r\nX-Fits: " + b"a" * 3000 + b"\r\n"
        b"Connection: close\r\n\r\n",
    )
    assert ok[0] == 200
    status, headers, body = raw_request(
        lb.port, b"GET /v2/ HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 5000 + b"\r\n\r\n"
    )
    assert status == 431
    assert headers["Docker-Distribution-API-Version"] == "registry/2.0"
    assert json.loads(body)["errors"][0]["code"] == "UNSUPPORTED"
    # An oversized credential is refused without being repeated anywhere.
    secret = b"SECRETTOKEN" + b"s" * 5000
    status, _, body = raw_request(
        lb.port,
        b"GET /v2/ HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer "
        + secret
        + b"\r\n\r\n",
    )
    assert status == 431 and b"SECRETTOKEN" not in body
    wait_until(lambda: len(lb.events("request.malformed")) >= 2, 5, "malformed lines")
    assert "SECRETTOKEN" not in "".join(lb.lines)
    # A request line that long is refused as well.
    assert (
        raw_request(lb.port, b"GET /v2/" + b"a" * 5000 + b" HTTP/1.1\r\n\r\n")[0] == 431
    )
    # zotlb keeps serving.
    assert http("GET", lb.url + "/v2/")[0] == 200


def test_header_count_limit(make_lb):
    lb = make_lb(limits={"max_headers": 20})

    def request(count: int) -> int:
        extra = b"".join(b"X-H%d: v\r\n" % i for i in range(count - 2))
        return raw_request(
            lb.port,
            b"GET /v2/ HTTP/1.1\r\nHost: x\r\nConnection: close\r\n" + extra + b"\r\n",
        )[0]

    assert request(20) == 200
    assert request(21) == 431
    assert http("GET", lb.url + "/v2/")[0] == 200


# --- too many connections -----------------------------------------------------------


def test_connections_beyond_the_limit_get_a_503_at_once(make_lb):
    lb = make_lb(limits={"max_connections": 3}, timeouts={"idle": "10s"})
    held = []
    for _ in range(3):
        conn = httpclient.HTTPConnection("127.0.0.1", lb.port, timeout=5)
        conn.request("GET", "/v2/")
        assert conn.getresponse().read() == b"{}"
        held.append(conn)

    started = time.monotonic()
    status, headers, body = raw_request(
        lb.port, b"GET /v2/ HTTP/1.1\r\nHost: x\r\n\r\n"
    )
    took = time.monotonic() - started
    assert status == 503 and took < 0.5, (status, took)
    assert headers["Docker-Distribution-API-Version"] == "registry/2.0"
    assert headers["Connection"] == "close"
    assert json.loads(body)["errors"][0]["code"] == "UNAVAILABLE"
    # The held connections still work, and a freed slot is usable again.
    held[0].request("GET", "/v2/")
    assert held[0].getresponse().status == 200
    held.pop().close()
    wait_until(lambda: timed_get(lb.port)[0] == 200, 5, "a free slot")
    metrics = http("GET", lb.admin + "/metrics")[2].decode()
    assert 'zotlb_client_limit_hits_total{reason="max_connections"}' in metrics
    for conn in held:
        conn.close()


# --- backends that do not answer ------------------------------------------------------


@pytest.fixture
def blackhole() -> Iterator[Registry]:
    """A loopback port whose accept queue is full: connects to it hang."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(0)
    fillers = []
    for _ in range(4):
        filler = socket.socket()
        filler.setblocking(False)
        filler.connect_ex(sock.getsockname())
        fillers.append(filler)
    with pytest.raises(TimeoutError):
        socket.create_connection(sock.getsockname(), timeout=0.3).close()
    yield Registry("hole", sock.getsockname()[1], None, None)  # type: ignore[arg-type]
    for filler in fillers:
        filler.close()
    sock.close()


def test_connect_timeout_answers_504(blackhole, tmp_path):
    cfg = lb_config(
        [blackhole],
        timeouts={"connect": "500ms"},
        health={"interval": "30s", "fall": 3, "timeout": "200ms"},
        replication={"mode": "off"},
    )
    lb = start_zotlb(tmp_path, cfg)
    try:
        started = time.monotonic()
        status, headers, body = http("GET", lb.url + "/v2/", timeout=10)
        took = time.monotonic() - started
        assert status == 504, body
        assert 0.4 <= took <= 1.5, took
        assert json.loads(body)["errors"][0]["code"] == "UNAVAILABLE"
        assert headers["Docker-Distribution-API-Version"] == "registry/2.0"
        wait_until(lambda: lb.events("backend.down"), 5, "backend.down")
        assert "connect timed out" in lb.events("backend.down")[0]["reason"]
    finally:
        lb.stop()


def test_connect_timeout_fails_over_even_with_a_body(blackhole, backend, tmp_path):
    # Nothing was sent when the connect timed out: a PUT may move too.
    cfg = lb_config(
        [blackhole, backend.registry],
        mode="active-passive",
        timeouts={"connect": "500ms"},
        health={"interval": "30s", "fall": 3, "timeout": "200ms"},
        replication={"mode": "off"},
    )
    lb = start_zotlb(tmp_path, cfg)
    try:
        status, _, body = http("PUT", lb.url + "/v2/sink", data=b"x" * 1000, timeout=10)
        assert status == 200 and json.loads(body) == {"received": 1000}
        assert lb.backend_state("hole") == "down"
    finally:
        lb.stop()


def test_stalled_backend_mid_body_breaks_the_client_connection(make_lb):
    lb = make_lb(timeouts={"read": "500ms"})
    with socket.create_connection(("127.0.0.1", lb.port), timeout=5) as sock:
        sock.sendall(b"GET /v2/stall HTTP/1.1\r\nHost: x\r\n\r\n")
        started = time.monotonic()
        reply = read_all(sock)
        took = time.monotonic() - started
    head, _, body = reply.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200") and b"Content-Length: 1048576" in head
    # Cut after the read timeout: short of the promised length, and closed.
    assert len(body) < 1024 * KIB
    assert 0.4 <= took <= 2.0, took
    assert lb.events("request.truncated")


@pytest.mark.skipif(shutil.which("ss") is None, reason="needs ss (iproute2)")
def test_backend_that_stops_reading_an_upload_is_cut(make_lb, backend):
    # A short grace: aiohttp may still be draining the rest of the upload
    # (lingering close) when the test ends, and SIGTERM would wait for it.
    lb = make_lb(timeouts={"read": "500ms", "shutdown_grace": "1s"})
    with socket.create_connection(("127.0.0.1", lb.port), timeout=10) as sock:
        size = 256 * 1024 * KIB
        sock.sendall(
            b"PUT /v2/deaf HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % size
        )
        sent = 0

        def send() -> None:
            nonlocal sent
            chunk = b"d" * (256 * KIB)
            try:
                while sent < size:
                    sock.sendall(chunk)
                    sent += len(chunk)
            except OSError:
                pass

        sender = threading.Thread(target=send, daemon=True)
        started = time.monotonic()
        sender.start()
        try:
            reply = sock.recv(4096)
        except ConnectionResetError:
            reply = b""
        took = time.monotonic() - started
        sender.join(10)
    # Socket buffers fill within moments; then the read timeout runs out.
    # (After the 504 zotlb reads and drops the rest of the upload.)
    assert took < 5, took
    assert reply == b"" or reply.startswith(b"HTTP/1.1 504"), reply[:200]
    wait_until(lambda: lb.events("request.failed"), 5, "request.failed")
    assert lb.events("request.failed")[0]["status"] == 504
    # zotlb's connection to the backend is gone, not left trying to flush
    # megabytes into a backend that will never read them.
    wait_until(
        lambda: not stuck_uploads(backend.port), 3, "the backend connection closed"
    )


def stuck_uploads(port: int) -> list[str]:
    """Connections to port with more than 64 KiB waiting in their send queue."""
    listing = subprocess.run(
        ["ss", "-tnH", "state", "established", f"( dport = :{port} )"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return [line for line in listing.splitlines() if int(line.split()[1]) > 64 * KIB]


def test_limit_and_timeout_keys_are_checked():
    from zotlb.config import ConfigError, config_from_mapping

    backends = [{"name": "a", "url": "http://127.0.0.1:5001"}]
    cfg = config_from_mapping({"backends": backends})
    assert (cfg.timeouts.request_header, cfg.timeouts.idle) == (10.0, 75.0)
    assert cfg.limits.max_connections > 0 and cfg.limits.max_headers > 0
    with pytest.raises(ConfigError) as info:
        config_from_mapping(
            {
                "backends": backends,
                "timeouts": {"request_header": "0s", "idle": "soon"},
                "limits": {"max_header_size": 10, "max_connections": 0, "max_body": 1},
            }
        )
    problems = info.value.problems
    assert problems[0] == "timeouts.request_header: must be greater than zero"
    assert problems[1].startswith("timeouts.idle: cannot parse duration 'soon'")
    assert problems[2].startswith("limits.max_header_size: ")
    assert problems[3].startswith("limits.max_connections: ")
    assert problems[4] == "limits.max_body: unknown key"
