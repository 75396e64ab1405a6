"""A 256 MiB blob through zotlb, both ways, with flat memory."""

from __future__ import annotations

import hashlib
import http.client
import os
from urllib.parse import urlsplit

import pytest
from conftest import needs_registry

pytestmark = [needs_registry, pytest.mark.slow]

MIB = 1024 * 1024
SIZE = 256 * MIB
BLOCK = os.urandom(MIB)


def chunks(n_mib: int):
    for _ in range(n_mib):
        yield BLOCK


def test_256_mib_blob_push_and_pull_with_flat_memory(registries, zotlb_factory):
    a, b = registries
    lb = zotlb_factory([a, b])
    digest = "sha256:" + hashlib.sha256(BLOCK * (SIZE // MIB)).hexdigest()
    conn = http.client.HTTPConnection("127.0.0.1", lb.port, timeout=120)

    conn.request("POST", "/v2/big/blob/blobs/uploads/")
    resp = conn.getresponse()
    resp.read()
    assert resp.status == 202
    location = urlsplit(resp.headers["Location"])

    # First half as a chunked PATCH without Content-Length (as docker sends it).
    target = f"{location.path}?{location.query}"
    conn.request(
        "PATCH",
        target,
        body=chunks(128),
        encode_chunked=True,
        headers={"Content-Type": "application/octet-stream"},
    )
    resp = conn.getresponse()
    resp.read()
    assert resp.status == 202, resp.status
    assert resp.headers["Range"] == f"0-{128 * MIB - 1}"
    location = urlsplit(resp.headers["Location"])

    # Second half with the closing PUT, with Content-Length.
    target = f"{location.path}?{location.query}&digest={digest}"
    conn.request(
        "PUT",
        target,
        body=chunks(128),
        headers={
            "Content-Length": str(128 * MIB),
            "Content-Type": "application/octet-stream",
        },
    )
    resp = conn.getresponse()
    resp.read()
    assert resp.status == 201, resp.status
    assert resp.headers["Docker-Content-Digest"] == digest

    conn.request("GET", f"/v2/big/blob/blobs/{digest}")
    resp = conn.getresponse()
    assert resp.status == 200
    assert int(resp.headers["Content-Length"]) == SIZE
    hasher, total = hashlib.sha256(), 0
    while block := resp.read(MIB):
        hasher.update(block)
        total += len(block)
    conn.close()
    assert total == SIZE
    assert "sha256:" + hasher.hexdigest() == digest

    peak = lb.peak_rss_kib() / 1024
    print(f"zotlb peak RSS through 256 MiB up and down: {peak:.1f} MiB")
    assert peak < 100
