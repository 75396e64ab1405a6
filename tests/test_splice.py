"""Zero-copy relay of big plain-HTTP bodies (os.splice): exact bytes, honest breaks."""

from __future__ import annotations

import asyncio
import hashlib
import http.client
import os
import socket
import ssl

import conftest
import pytest
from conftest import lb_config, needs_registry, start_zotlb
from test_http_details import echo, echo_lb  # noqa: F401  (fixtures)
from test_tls import ca, tls_listen, tls_registry, tls_registry_factory  # noqa: F401

from zotlb import splice

MIB = 1024 * 1024


# --- the relay itself, on real loopback sockets -----------------------------------


async def _tcp_pair() -> tuple[socket.socket, socket.socket]:
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        left = socket.create_connection(listener.getsockname())
        right, _ = listener.accept()
    for s in (left, right):
        s.setblocking(False)
    return left, right


async def _drain(sock: socket.socket, out: bytearray) -> None:
    loop = asyncio.get_running_loop()
    while chunk := await loop.sock_recv(sock, 1 << 20):
        out += chunk


@pytest.mark.timeout(30)
async def test_relay_moves_exactly_count_bytes():
    backend_w, backend_r = await _tcp_pair()
    client_r, client_w = await _tcp_pair()
    loop = asyncio.get_running_loop()
    payload = bytes(range(256)) * (12 * 4096)  # 12 MiB
    extra = b"NEXT RESPONSE"
    received = bytearray()
    sender = asyncio.ensure_future(loop.sock_sendall(backend_w, payload + extra))
    reader = asyncio.ensure_future(_drain(client_r, received))

    moved = await splice.relay(backend_r.fileno(), client_w.fileno(), len(payload), 5)
    await sender
    client_w.close()
    await reader

    assert moved == len(payload)
    assert bytes(received) == payload
    # Not one byte past the body: what follows stays for its own reader.
    assert backend_r.recv(100) == extra
    for s in (backend_w, backend_r, client_r):
        s.close()


@pytest.mark.timeout(30)
async def test_relay_reports_a_backend_that_ends_early():
    backend_w, backend_r = await _tcp_pair()
    client_r, client_w = await _tcp_pair()
    backend_w.sendall(b"x" * MIB)
    backend_w.close()
    reader = asyncio.ensure_future(_drain(client_r, bytearray()))
    with pytest.raises(splice.BackendEnded):
        await splice.relay(backend_r.fileno(), client_w.fileno(), 4 * MIB, 5)
    client_w.close()
    await reader
    for s in (backend_r, client_r):
        s.close()


@pytest.mark.timeout(30)
async def test_relay_reports_a_client_that_went_away():
    backend_w, backend_r = await _tcp_pair()
    client_r, client_w = await _tcp_pair()
    client_r.setsockopt(
        socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00"
    )
    client_r.close()  # a reset: the relay's writes fail
    loop = asyncio.get_running_loop()
    sender = asyncio.ensure_future(loop.sock_sendall(backend_w, b"y" * (8 * MIB)))
    with pytest.raises(splice.ClientEnded):
        await splice.relay(backend_r.fileno(), client_w.fileno(), 8 * MIB, 5)
    sender.cancel()
    for s in (backend_w, backend_r, client_w):
        s.close()


@pytest.mark.timeout(30)
async def test_relay_gives_up_after_the_idle_timeout():
    backend_w, backend_r = await _tcp_pair()
    client_r, client_w = await _tcp_pair()
    backend_w.sendall(b"z" * 1000)  # then silence
    with pytest.raises(TimeoutError):
        await splice.relay(backend_r.fileno(), client_w.fileno(), 2 * MIB, 0.3)
    for s in (backend_w, backend_r, client_r, client_w):
        s.close()


# --- through zotlb ---------------------------------------------------------------------


def test_big_body_is_exact_and_the_connection_stays_usable(echo_lb):
    conn = http.client.HTTPConnection("127.0.0.1", echo_lb.port, timeout=20)
    for _ in range(2):
        conn.request("GET", "/v2/stream/8")
        resp = conn.getresponse()
        assert resp.status == 200
        assert resp.getheader("Content-Length") == str(8 * MIB)
        body = resp.read()
        assert len(body) == 8 * MIB and body == b"z" * (8 * MIB)
        # The same keep-alive connection: the next response parses cleanly.
        conn.request("GET", "/v2/")
        small = conn.getresponse()
        assert small.status == 200 and small.read() == b"{}"
    conn.close()
    sizes = [
        e["bytes_out"] for e in echo_lb.events("request") if e["path"] == "/v2/stream/8"
    ]
    assert sizes == [8 * MIB, 8 * MIB]


def test_backend_break_mid_splice_breaks_the_client_connection(echo_lb):
    conn = http.client.HTTPConnection("127.0.0.1", echo_lb.port, timeout=20)
    conn.request("GET", "/v2/break/8")
    resp = conn.getresponse()
    assert resp.status == 200
    with pytest.raises(http.client.IncompleteRead):
        resp.read()
    conn.close()
    truncated = echo_lb.events("request.truncated")
    assert truncated and truncated[0]["path"] == "/v2/break/8"
    assert "BackendEnded" in truncated[0]["error"]


# --- never under TLS: plaintext must not reach a TLS socket -----------------------


def test_tls_client_gets_the_big_body_encrypted(echo, tmp_path, ca):
    lb = start_zotlb(tmp_path, lb_config([echo], listen=tls_listen(ca.issue("zotlb"))))
    try:
        ctx = ssl.create_default_context(cafile=str(ca.pem))
        conn = http.client.HTTPSConnection(
            "127.0.0.1", lb.port, context=ctx, timeout=20
        )
        for _ in range(2):
            conn.request("GET", "/v2/stream/8")
            resp = conn.getresponse()
            assert resp.status == 200
            assert resp.read() == b"z" * (8 * MIB)
        conn.close()
    finally:
        lb.stop()


@needs_registry
def test_https_backend_big_blob_is_exact(tls_registry, tmp_path, ca):
    cfg = lb_config([tls_registry], replication={"mode": "off"})
    cfg["backends"][0]["tls"] = {"ca_file": str(ca.pem)}
    lb = start_zotlb(tmp_path, cfg)
    try:
        blob = os.urandom(3 * MIB)
        digest = "sha256:" + hashlib.sha256(blob).hexdigest()
        status, headers, _ = conftest.http("POST", lb.url + "/v2/big/blobs/uploads/")
        assert status == 202
        location = headers["Location"]
        sep = "&" if "?" in location else "?"
        status, _, _ = conftest.http(
            "PUT",
            f"{location}{sep}digest={digest}",
            headers={"Content-Type": "application/octet-stream"},
            data=blob,
        )
        assert status == 201
        status, _, body = conftest.http("GET", f"{lb.url}/v2/big/blobs/{digest}")
        assert status == 200
        assert body == blob
    finally:
        lb.stop()
