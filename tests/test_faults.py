"""Fault injection with real registries: kill -9, SIGSTOP, resets mid-body,
garbage on the health path, SIGTERM under uploads, 1 000 connections.

Each test prints what it measured; run with -s to see it.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import resource
import signal
import socket
import threading
import time
from datetime import datetime
from http import client as httpclient
from pathlib import Path
from urllib.parse import urlsplit

import conftest
import pytest
from conftest import http, needs_registry, needs_skopeo, pull, push, wait_until
from recorder import FaultServer, reset

from zotlb.backends import rendezvous_order

pytestmark = [needs_registry]

ACCEPT = {"Accept": "application/vnd.oci.image.manifest.v1+json"}


def _metric(lb, name: str) -> float:
    text = http("GET", lb.admin + "/metrics")[2].decode()
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith(name) and not line.startswith("#")
    )


def _refused(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
    except ConnectionRefusedError:
        return True
    return False


# --- kill -9 during continuous pulls --------------------------------------------------


@needs_skopeo
def test_kill9_during_continuous_pulls_loses_no_read(
    registries, zotlb_factory, image_factory, tmp_path
):
    a, b = registries
    img = image_factory("v1", payload=b"p" * (256 * 1024))
    for reg in (a, b):
        assert push(img, f"{reg.hostport}/pull/app:v1").returncode == 0
    layer = next(d for d in img.blobs if d != img.manifest_digest)
    lb = zotlb_factory([a, b], replication={"mode": "off"})

    stop = threading.Event()
    counts = {"reads": 0, "pulls": 0}
    failures: list[str] = []
    lock = threading.Lock()

    def reader() -> None:
        while not stop.is_set():
            manifest = http("GET", f"{lb.url}/v2/pull/app/manifests/v1", ACCEPT)
            blob = http("GET", f"{lb.url}/v2/pull/app/blobs/{layer}")
            with lock:
                counts["reads"] += 2
                if manifest[1].get("Docker-Content-Digest") != img.manifest_digest:
                    failures.append(f"manifest {manifest[0]}")
                if blob[0] != 200 or blob[2] != img.blobs[layer]:
                    failures.append(f"blob {blob[0]} {len(blob[2])} bytes")

    def puller() -> None:
        i = 0
        while not stop.is_set():
            i += 1
            try:
                got = pull(f"{lb.hostport}/pull/app:v1", tmp_path / f"p{i}", "v1")
                ok = got == img.manifest_digest
            except AssertionError as exc:
                ok, got = False, str(exc)[-200:]
            with lock:
                counts["pulls"] += 1
                if not ok:
                    failures.append(f"skopeo pull: {got}")

    threads = [threading.Thread(target=reader) for _ in range(4)]
    threads.append(threading.Thread(target=puller))
    for t in threads:
        t.start()
    try:
        wait_until(
            lambda: counts["reads"] >= 200 and counts["pulls"] >= 1, 30, "traffic"
        )
        before = dict(counts)
        a.kill()
        killed = time.monotonic()
        wait_until(
            lambda: counts["reads"] >= before["reads"] + 400, 30, "reads after the kill"
        )
        wait_until(
            lambda: counts["pulls"] >= before["pulls"] + 2, 30, "pulls after the kill"
        )
    finally:
        stop.set()
        for t in threads:
            t.join(60)
    retries = _metric(lb, "zotlb_retries_total")
    print(
        f"\nkill -9 during pulls: {counts['reads']} reads and "
        f"{counts['pulls']} skopeo pulls, {counts['reads'] - before['reads']} "
        f"reads in the {time.monotonic() - killed:.1f}s "
        f"after the kill; failed: {len(failures)}; retried on b: {retries:.0f}"
    )
    assert failures == []
    assert lb.backend_state("a") == "down"


# --- kill -9 during a push ------------------------------------------------------------


def _stream_upload(
    port: int, target: str, total: int, chunk: int, on_sent
) -> tuple[int | None, str]:
    """PATCH a chunked body of `total` bytes; on_sent(sent) after each chunk."""
    conn = httpclient.HTTPConnection("127.0.0.1", port, timeout=15)
    try:
        conn.putrequest("PATCH", target, skip_host=False, skip_accept_encoding=True)
        conn.putheader("Content-Type", "application/octet-stream")
        conn.putheader("Transfer-Encoding", "chunked")
        conn.endheaders()
        sent = 0
        block = b"k" * chunk
        while sent < total:
            conn.send(b"%x\r\n%s\r\n" % (len(block), block))
            sent += len(block)
            on_sent(sent)
        conn.send(b"0\r\n\r\n")
        resp = conn.getresponse()
        return resp.status, resp.read().decode(errors="replace")
    except (OSError, httpclient.HTTPException) as exc:
        return None, f"{type(exc).__name__}: {exc}"
    finally:
        conn.close()


def _bytes_read(reg) -> int:
    """Bytes the registry process has read so far (all file descriptors)."""
    for line in Path(f"/proc/{reg.proc.pid}/io").read_text().splitlines():
        if line.startswith("rchar:"):
            return int(line.split()[1])
    raise AssertionError("no rchar")


@needs_skopeo
def test_kill9_during_push_fails_cleanly_and_retry_lands_on_new_home(
    registries, zotlb_factory, image_factory
):
    a, b = registries
    by_name = {"a": a, "b": b}
    repo = "push/app"
    home, other = (by_name[n] for n in rendezvous_order(["a", "b"], repo))
    lb = zotlb_factory([a, b], replication={"mode": "off"})

    status, headers, _ = http("POST", f"{lb.url}/v2/{repo}/blobs/uploads/")
    assert status == 202 and f"_zlb={home.name}" in headers["Location"]
    target = urlsplit(headers["Location"])
    target = f"{target.path}?{target.query}"

    killed_at: list[float] = []
    read_before = _bytes_read(home)

    def on_sent(sent: int) -> None:
        if sent >= 4 * 1024 * 1024 and not killed_at:
            # Kill once the backend itself has taken in part of the body,
            # not while it still sits in socket buffers.
            wait_until(
                lambda: _bytes_read(home) - read_before >= 1024 * 1024,
                10,
                "body reaching home",
            )
            home.kill()
            killed_at.append(time.monotonic())

    started = time.monotonic()
    result = _stream_upload(lb.port, target, 32 * 1024 * 1024, 64 * 1024, on_sent)
    failed_after = time.monotonic() - killed_at[0]
    print(
        f"\nkill -9 of home {home.name} mid-PATCH: the client got "
        f"{result[0] or 'a broken connection'}"
        f" ({result[1][:120]}) {failed_after:.2f}s after the kill"
    )
    # Cleanly: an error, never a 2xx for an upload the backend did not take.
    assert result[0] is None or result[0] >= 500
    if result[0] is not None:
        assert json.loads(result[1])["errors"][0]["code"]
    assert failed_after < 10

    # The session lived on the dead backend: once zotlb knows it is down,
    # the client is told to start over.
    wait_until(lambda: lb.backend_state(home.name) == "down", 5, "home marked down")
    status, _, body = http("PATCH", f"{lb.url}{target}", data=b"more")
    assert status == 404 and b"BLOB_UPLOAD_UNKNOWN" in body

    # The client's retry (a fresh push) goes to the repository's new home.
    img = image_factory("retry")
    retried = time.monotonic()
    result = push(img, f"{lb.hostport}/{repo}:retry")
    assert result.returncode == 0, result.stderr
    print(
        f"retried push succeeded on {other.name} in {time.monotonic() - retried:.2f}s "
        f"(whole scenario {time.monotonic() - started:.2f}s)"
    )
    assert other.has_manifest(repo, "retry")


def _put_blob(base: str, repo: str, data: bytes) -> str:
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    status, headers, _ = http("POST", f"{base}/v2/{repo}/blobs/uploads/")
    assert status == 202
    location = headers["Location"]
    if location.startswith("/"):
        location = base + location
    sep = "&" if "?" in location else "?"
    status, _, body = http(
        "PUT",
        f"{location}{sep}digest={digest}",
        {"Content-Type": "application/octet-stream"},
        data,
    )
    assert status == 201, body
    return digest


# --- SIGSTOP: frozen, port open -------------------------------------------------------


def test_sigstop_marks_down_within_timeout_x_fall_and_sigcont_brings_it_back(
    registries, zotlb_factory
):
    a, b = registries
    data = b"frozen-backend-blob" * 100
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    for reg in (a, b):
        _put_blob(reg.url, "freeze/app", data)
    interval, timeout, fall, rise = 0.2, 0.5, 2, 2
    lb = zotlb_factory(
        [a, b],
        health={
            "interval": f"{interval}s",
            "timeout": f"{timeout}s",
            "fall": fall,
            "rise": rise,
        },
        timeouts={"read": "2s"},
        replication={"mode": "off"},
    )

    stop = threading.Event()
    reads: list[tuple[float, float]] = []  # (started, seconds)
    failures: list[int] = []

    def reader() -> None:
        while not stop.is_set():
            t = time.monotonic()
            status, _, body = http("GET", f"{lb.url}/v2/freeze/app/blobs/{digest}")
            reads.append((t, time.monotonic() - t))
            if status != 200 or body != data:
                failures.append(status)

    threads = [threading.Thread(target=reader) for _ in range(2)]
    for t in threads:
        t.start()
    try:
        wait_until(lambda: len(reads) >= 20, 10, "reads before the freeze")
        a.proc.send_signal(signal.SIGSTOP)
        frozen = time.monotonic()
        wait_until(
            lambda: lb.backend_state("a") == "down", 10, "a marked down", step=0.01
        )
        marked_down = time.monotonic()
        down_after = marked_down - frozen
        mark = len(reads)
        wait_until(lambda: len(reads) >= mark + 20, 10, "reads while a is down")
        # Reads sent after the mark; those sent before may still wait on a.
        while_down = [seconds for started, seconds in reads if started > marked_down]

        a.proc.send_signal(signal.SIGCONT)
        resumed = time.monotonic()
        wait_until(lambda: lb.backend_state("a") == "up", 10, "a back up", step=0.01)
        up_after = time.monotonic() - resumed
    finally:
        a.proc.send_signal(signal.SIGCONT)
        stop.set()
        for t in threads:
            t.join(15)
    # Log lines arrive through a reader thread: wait for them too.
    wait_until(lambda: lb.events("backend.up"), 5, "backend.up logged")
    down = lb.events("backend.down")[0]
    up = lb.events("backend.up")[-1]
    print(
        f"\nSIGSTOP: a marked down after {down_after:.2f}s "
        f"(timeout x fall = {timeout * fall:.1f}s, "
        f"reason: {down['reason']}); slowest read {max(x[1] for x in reads):.2f}s, "
        f"slowest once down {max(while_down):.3f}s; "
        f"failed reads {len(failures)} of {len(reads)}; "
        f"SIGCONT: up after {up_after:.2f}s ({up['reason']})"
    )
    assert failures == []
    # One probe period of phase, plus scheduling slack on a busy machine.
    assert down_after <= timeout * fall + interval + 0.6
    assert max(while_down) < 0.5, "reads still went to the frozen backend"
    assert up_after <= rise * interval + timeout + 0.6
    assert f"{rise} probes passed" in up["reason"]


# --- a reset in the middle of a blob download -----------------------------------------


BLOB = bytes(range(256)) * 4096  # 1 MiB
BLOB_DIGEST = "sha256:" + hashlib.sha256(BLOB).hexdigest()


def _resetting_registry(chunked: bool):
    def respond(conn: socket.socket, head: bytes) -> bool:
        target = head.split(b" ", 2)[1]
        if not target.startswith(b"/v2/reset/"):
            conn.sendall(
                b"HTTP/1.1 200 OK\r\nDocker-Distribution-API-Version: registry/2.0\r\n"
                b"Content-Length: 2\r\n\r\n{}"
            )
            return True
        framing = (
            b"Transfer-Encoding: chunked\r\n"
            if chunked
            else b"Content-Length: %d\r\n" % len(BLOB)
        )
        conn.sendall(
            b"HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\n"
            b"Docker-Content-Digest: "
            + BLOB_DIGEST.encode()
            + b"\r\n"
            + framing
            + b"\r\n"
        )
        half = BLOB[: len(BLOB) // 2]
        conn.sendall(b"%x\r\n%s\r\n" % (len(half), half) if chunked else half)
        reset(conn)
        return False

    return respond


@pytest.mark.parametrize("framing", ["content-length", "chunked"])
def test_reset_mid_blob_is_an_error_for_the_client(framing, tmp_path):
    server = FaultServer(_resetting_registry(framing == "chunked")).start()
    lb = conftest.start_zotlb(
        tmp_path, conftest.lb_config([server], replication={"mode": "off"})
    )
    try:
        target = f"/v2/reset/app/blobs/{BLOB_DIGEST}"
        # A raw client: what arrives, and how the connection ends.
        with socket.create_connection(("127.0.0.1", lb.port), timeout=10) as sock:
            sock.sendall(f"GET {target} HTTP/1.1\r\nHost: lb\r\n\r\n".encode())
            raw = bytearray()
            ending = "eof"
            while True:
                try:
                    chunk = sock.recv(65536)
                except ConnectionResetError:
                    ending = "reset"
                    break
                except TimeoutError:
                    ending = "timeout (the response looked unfinished but open)"
                    break
                if not chunk:
                    break
                raw.extend(chunk)
        head, _, body = bytes(raw).partition(b"\r\n\r\n")
        # An HTTP client library must raise, not hand back a short blob.
        conn = httpclient.HTTPConnection("127.0.0.1", lb.port, timeout=10)
        conn.request("GET", target)
        with pytest.raises((httpclient.IncompleteRead, ConnectionError)) as info:
            conn.getresponse().read()
        conn.close()
        print(
            f"\nreset mid-blob ({framing}): {len(body)} body bytes of {len(BLOB)} "
            "reached the "
            f"client, then {ending}; http.client raised {type(info.value).__name__}"
        )
        assert head.startswith(b"HTTP/1.1 200")
        assert ending in ("eof", "reset")
        if framing == "content-length":
            assert f"Content-Length: {len(BLOB)}".encode() in head
            assert len(body) < len(BLOB)
        else:
            assert not body.endswith(b"0\r\n\r\n"), (
                "the chunked body was closed as complete"
            )
        wait_until(
            lambda: lb.events("request.truncated"), 5, "request.truncated logged"
        )
        assert http("GET", lb.url + "/v2/")[0] == 200
    finally:
        lb.stop()
        server.close()


# --- garbage and non-registry answers on the health path ------------------------------


def _garbage(conn: socket.socket, head: bytes) -> bool:
    conn.sendall(b"SSH-2.0-OpenSSH_9.6\r\n\x00\xff not http at all\r\n\r\n")
    return False


def _plain_web_server(conn: socket.socket, head: bytes) -> bool:
    conn.sendall(
        b"HTTP/1.1 200 OK\r\nContent-Type: text/html\r\nContent-Length: 14\r\n\r\n"
        b"<h1>hello</h1>"
    )
    return True


def test_health_garbage_and_non_registry_200(registry_factory, tmp_path):
    real = registry_factory("real")
    garbage = FaultServer(_garbage).start()
    web = FaultServer(_plain_web_server).start()
    backends = [real, garbage, web]
    health = {"interval": "100ms", "timeout": "300ms", "fall": 2, "rise": 2}
    lenient = conftest.start_zotlb(
        tmp_path,
        conftest.lb_config(backends, health=health, replication={"mode": "off"}),
        "lenient.yaml",
    )
    strict = conftest.start_zotlb(
        tmp_path,
        conftest.lb_config(
            backends,
            health={**health, "require_api_header": True},
            replication={"mode": "off"},
        ),
        "strict.yaml",
    )
    try:
        wait_until(
            lambda: lenient.backend_state(garbage.name) == "down", 5, "garbage down"
        )
        wait_until(
            lambda: strict.backend_state(web.name) == "down",
            5,
            "web server down (strict)",
        )
        garbage_down = _seconds_to_down(lenient, garbage.name)
        web_down = _seconds_to_down(strict, web.name)
        # Four more probe periods: the lenient view keeps the web server.
        seen = _last_probe_at(lenient, web.name)
        wait_until(
            lambda: _last_probe_at(lenient, web.name) >= seen + 0.4, 5, "more probes"
        )
        assert lenient.backend_state(web.name) == "up"
        assert lenient.backend_state(real.name) == "up"
        assert strict.backend_state(real.name) == "up"
        assert strict.backend_state(garbage.name) == "down"

        wait_until(
            lambda: (
                len(lenient.events("backend.down")) >= 1
                and len(strict.events("backend.down")) >= 2
            ),
            5,
            "backend.down logged",
        )
        reasons = {
            (lb_name, e["backend"]): e["reason"]
            for lb_name, lb in (("lenient", lenient), ("strict", strict))
            for e in lb.events("backend.down")
        }
        failed = [
            e["error"]
            for e in lenient.events("health.probe.failed")
            if e["backend"] == garbage.name
        ]
        print(
            f"\ngarbage on the health path: down after {garbage_down:.2f}s, "
            f"probe error {failed[0]!r}; "
            "plain 200 without the API header: up when lenient, "
            f"down after {web_down:.2f}s "
            f"when strict ({reasons[('strict', web.name)]!r})"
        )
        # fall=2 probes 100 ms apart, each answered at once.
        assert garbage_down < 1.0 and web_down < 1.0
        assert "probes failed" in reasons[("lenient", garbage.name)]
        assert "Docker-Distribution-API-Version" in reasons[("strict", web.name)]
        assert failed and all(failed)
        for lb in (lenient, strict):
            assert lb.proc.poll() is None
            assert "Traceback" not in "".join(lb.lines)
    finally:
        lenient.stop()
        strict.stop()
        garbage.close()
        web.close()


def _seconds_to_down(lb, name: str) -> float:
    """From zotlb's start to the backend's down event, by their log timestamps."""
    started = lb.events("server.started")[0]["timestamp"]
    down = next(e for e in lb.events("backend.down") if e["backend"] == name)[
        "timestamp"
    ]
    return (
        datetime.fromisoformat(down) - datetime.fromisoformat(started)
    ).total_seconds()


def _last_probe_at(lb, name: str) -> float:
    backend = next(b for b in lb.status()["backends"] if b["name"] == name)
    return backend["last_probe"]["at"]


# --- SIGTERM with 4 uploads in flight -------------------------------------------------


class _SlowUpload:
    """A closing PUT whose chunked body the test feeds piece by piece."""

    def __init__(self, port: int, target: str) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=20)
        self.sock.sendall(
            f"PUT {target} HTTP/1.1\r\nHost: lb\r\n"
            "Content-Type: application/octet-stream\r\n"
            "Transfer-Encoding: chunked\r\n\r\n".encode()
        )

    def send(self, data: bytes) -> None:
        self.sock.sendall(b"%x\r\n%s\r\n" % (len(data), data))

    def finish(self) -> tuple[int, dict[str, str]]:
        self.sock.sendall(b"0\r\n\r\n")
        raw = bytearray()
        while b"\r\n\r\n" not in raw:
            chunk = self.sock.recv(65536)
            if not chunk:
                break
            raw.extend(chunk)
        self.sock.close()
        head = bytes(raw).partition(b"\r\n\r\n")[0].decode("latin-1").split("\r\n")
        headers = {
            k.strip(): v.strip() for k, _, v in (x.partition(":") for x in head[1:])
        }
        return int(head[0].split(" ")[1]), headers


def test_sigterm_with_4_uploads_in_flight_lets_them_finish(registries, zotlb_factory):
    a, b = registries
    grace = 10.0
    lb = zotlb_factory(
        [a, b], timeouts={"shutdown_grace": f"{grace}s"}, replication={"mode": "off"}
    )
    pieces = [bytes([i]) * (256 * 1024) for i in range(16)]  # 4 MiB an upload
    uploads, digests = [], []
    for i in range(4):
        repo = f"term/app{i}"
        status, headers, _ = http("POST", f"{lb.url}/v2/{repo}/blobs/uploads/")
        assert status == 202
        content = b"".join(pieces) + repo.encode()
        digest = "sha256:" + hashlib.sha256(content).hexdigest()
        loc = urlsplit(headers["Location"])
        upload = _SlowUpload(lb.port, f"{loc.path}?{loc.query}&digest={digest}")
        upload.send(pieces[0])
        uploads.append((upload, content))
        digests.append((repo, digest))
    # zotlb is relaying all four to the backends.
    wait_until(
        lambda: sum(x["in_flight"] for x in lb.status()["backends"]) == 4,
        10,
        "4 in flight",
    )
    assert http("GET", lb.url + "/v2/")[0] == 200  # new connections still accepted

    lb.proc.send_signal(signal.SIGTERM)
    signalled = time.monotonic()
    wait_until(lambda: _refused(lb.port), 5, "listener closed", step=0.01)
    refused_after = time.monotonic() - signalled

    # The uploads carry on after the listener is gone.
    for upload, content in uploads:
        for piece in pieces[1:]:
            upload.send(piece)
        upload.send(content[len(pieces) * len(pieces[0]) :])
    results = [upload.finish() for upload, _ in uploads]
    finished_after = time.monotonic() - signalled
    code = lb.proc.wait(grace + 5)
    exited_after = time.monotonic() - signalled
    print(
        "\nSIGTERM with 4 uploads in flight: "
        f"listener closed after {refused_after:.2f}s, "
        f"uploads answered {[s for s, _ in results]} after {finished_after:.2f}s, "
        f"exit {code} after {exited_after:.2f}s (grace {grace:.0f}s)"
    )
    for (status, headers), (repo, digest) in zip(results, digests, strict=True):
        assert status == 201 and headers["Docker-Content-Digest"] == digest
        assert any(
            http("HEAD", f"{reg.url}/v2/{repo}/blobs/{digest}")[0] == 200
            for reg in (a, b)
        )
    assert code == 0 and exited_after < grace


def test_sigterm_cuts_off_an_upload_that_outlasts_the_grace(registries, zotlb_factory):
    a, b = registries
    grace = 1.0
    lb = zotlb_factory(
        [a, b], timeouts={"shutdown_grace": f"{grace}s"}, replication={"mode": "off"}
    )
    status, headers, _ = http("POST", f"{lb.url}/v2/stuck/app/blobs/uploads/")
    assert status == 202
    loc = urlsplit(headers["Location"])
    upload = _SlowUpload(lb.port, f"{loc.path}?{loc.query}&digest=sha256:{'0' * 64}")
    upload.send(b"never finished")
    wait_until(
        lambda: sum(x["in_flight"] for x in lb.status()["backends"]) == 1,
        10,
        "in flight",
    )
    lb.proc.send_signal(signal.SIGTERM)
    signalled = time.monotonic()
    code = lb.proc.wait(grace + 10)
    exited_after = time.monotonic() - signalled
    upload.sock.settimeout(5)
    try:
        leftover = upload.sock.recv(65536)
    except OSError:
        leftover = b""
    upload.sock.close()
    print(
        f"\nSIGTERM with an upload that never ends: exit {code} after "
        f"{exited_after:.2f}s (grace {grace:.0f}s); the client got {leftover[:12]!r}"
    )
    assert code == 0 and grace <= exited_after < grace + 3
    assert not leftover.startswith(b"HTTP/1.1 2")
    wait_until(lambda: lb.events("server.grace_expired"), 5, "grace_expired logged")


# --- 1 000 concurrent connections -----------------------------------------------------


async def _hold_and_ask(
    port: int, count: int
) -> tuple[list[int], list[asyncio.StreamWriter]]:
    """Open `count` connections, then send GET /v2/ on all of them at once."""
    opened = await asyncio.gather(
        *(asyncio.open_connection("127.0.0.1", port) for _ in range(count))
    )
    request = b"GET /v2/ HTTP/1.1\r\nHost: lb\r\n\r\n"
    for _, writer in opened:
        writer.write(request)

    async def answer(reader: asyncio.StreamReader) -> int:
        head = await reader.readuntil(b"\r\n\r\n")
        length = next(
            int(line.split(b":")[1])
            for line in head.split(b"\r\n")
            if line.lower().startswith(b"content-length:")
        )
        await reader.readexactly(length)
        return int(head.split(b" ")[1])

    statuses = await asyncio.wait_for(
        asyncio.gather(*(answer(r) for r, _ in opened)), timeout=60
    )
    return list(statuses), [w for _, w in opened]


@pytest.mark.slow
def test_1000_concurrent_connections_all_served(registries, tmp_path):
    a, b = registries
    count = 1000
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    need = 3 * count
    if hard != resource.RLIM_INFINITY and hard < need:
        pytest.skip(f"the hard open-files limit {hard} is below {need}")
    # zotlb starts with a soft limit of 1024 (a common default) and must
    # raise it itself: 1 000 clients and their backend connections need more.
    resource.setrlimit(resource.RLIMIT_NOFILE, (1024, hard))
    try:
        lb = conftest.start_zotlb(
            tmp_path, conftest.lb_config([a, b], replication={"mode": "off"})
        )
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, need), hard))
    try:
        raised = lb.events("server.nofile")
        assert raised and raised[0]["previous"] == 1024

        async def run() -> tuple[list[int], float, float]:
            started = time.monotonic()
            statuses, writers = await _hold_and_ask(lb.port, count)
            elapsed = time.monotonic() - started
            # All still open: zotlb counts them.
            metrics = await asyncio.to_thread(http, "GET", lb.admin + "/metrics")
            open_now = next(
                float(line.split(" ")[1])
                for line in metrics[2].decode().splitlines()
                if line.startswith("zotlb_client_connections ")
            )
            for writer in writers:
                writer.close()
            return statuses, elapsed, open_now

        statuses, elapsed, open_now = asyncio.run(run())
        rss = lb.peak_rss_kib()
        print(
            f"\n{count} concurrent connections: {statuses.count(200)} answered 200 in "
            f"{elapsed:.2f}s, {open_now:.0f} client connections open at once, "
            f"zotlb peak RSS {rss / 1024:.1f} MiB "
            f"(soft limit raised from 1024 to {raised[0]['soft']})"
        )
        assert statuses == [200] * count
        assert open_now >= count
        assert lb.proc.poll() is None
    finally:
        lb.stop()


def test_first_request_of_a_session_whose_backend_died_is_upload_unknown(
    registries, zotlb_factory
):
    a, b = registries
    by_name = {"a": a, "b": b}
    repo = "orphan/app"
    home = by_name[rendezvous_order(["a", "b"], repo)[0]]
    # Probes far apart: only live traffic can find out that home is gone.
    lb = zotlb_factory(
        [a, b], replication={"mode": "off"}, health={"interval": "60s", "rise": 1}
    )
    status, headers, _ = http("POST", f"{lb.url}/v2/{repo}/blobs/uploads/")
    assert status == 202
    target = urlsplit(headers["Location"])
    home.kill()
    assert lb.backend_state(home.name) == "up"

    status, headers, body = http(
        "PATCH", f"{lb.url}{target.path}?{target.query}", data=b"more"
    )
    print(f"\nfirst PATCH after kill -9 of {home.name}: {status} {body[:80]!r}")
    assert status == 404
    assert json.loads(body)["errors"][0]["code"] == "BLOB_UPLOAD_UNKNOWN"
    assert headers.get("Docker-Distribution-API-Version") == "registry/2.0"
    assert lb.backend_state(home.name) == "down"
