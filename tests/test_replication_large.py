"""A 512 MiB layer replicated from the home backend to the peer, with flat memory."""

from __future__ import annotations

import hashlib
import http.client
import json
import os
from urllib.parse import urlsplit

import pytest
from conftest import http as http_call
from conftest import needs_registry, wait_until
from ocilayout import CONFIG_TYPE, LAYER_TYPE, MANIFEST_TYPE
from replhelp import digest_of, put_blob, put_manifest, repo_homed_on

pytestmark = [needs_registry, pytest.mark.slow]

MIB = 1024 * 1024
SIZE_MIB = 512
BLOCK = os.urandom(MIB)


def _seed_big_blob(base: str, repo: str) -> str:
    digest = "sha256:" + hashlib.sha256(BLOCK * SIZE_MIB).hexdigest()
    status, headers, _ = http_call("POST", f"{base}/v2/{repo}/blobs/uploads/")
    assert status == 202
    location = urlsplit(headers["Location"])
    conn = http.client.HTTPConnection(location.hostname, location.port, timeout=120)
    conn.request(
        "PUT",
        f"{location.path}?{location.query}&digest={digest}",
        body=(BLOCK for _ in range(SIZE_MIB)),
        headers={"Content-Length": str(SIZE_MIB * MIB)},
    )
    resp = conn.getresponse()
    resp.read()
    conn.close()
    assert resp.status == 201, resp.status
    return digest


def test_512_mib_layer_replicates_with_flat_memory(registries, zotlb_factory):
    a, b = registries
    repo = repo_homed_on("a", ["a", "b"], "big/layer")
    # The layer goes straight into the home backend, so zotlb's memory only
    # sees the copy to the peer.
    layer = _seed_big_blob(a.url, repo)
    config = json.dumps({"architecture": "amd64", "os": "linux"}).encode()
    put_blob(a.url, repo, config)
    manifest = json.dumps(
        {
            "schemaVersion": 2,
            "mediaType": MANIFEST_TYPE,
            "config": {
                "mediaType": CONFIG_TYPE,
                "digest": digest_of(config),
                "size": len(config),
            },
            "layers": [
                {"mediaType": LAYER_TYPE, "digest": layer, "size": SIZE_MIB * MIB}
            ],
        }
    ).encode()

    lb = zotlb_factory([a, b], replication={"mode": "async"})
    put_manifest(lb.url, repo, "big", manifest)
    wait_until(lambda: b.has_manifest(repo, "big"), 60, "the 512 MiB copy on b")

    status, headers, _ = http_call("HEAD", f"{b.url}/v2/{repo}/blobs/{layer}")
    assert status == 200
    assert int(headers["Content-Length"]) == SIZE_MIB * MIB
    assert headers["Docker-Content-Digest"] == layer
    wait_until(lambda: lb.events("replication.copied"), 5, "the copy logged")
    copied = lb.events("replication.copied")[0]
    assert copied["bytes"] >= SIZE_MIB * MIB
    peak = lb.peak_rss_kib() / 1024
    print(
        f"512 MiB layer replicated in {copied['lag_ms'] / 1000:.1f} s; "
        f"zotlb peak RSS {peak:.1f} MiB"
    )
    assert peak < 100
