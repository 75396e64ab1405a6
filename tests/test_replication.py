"""Write-through replication through zotlb, against two real registries."""

from __future__ import annotations

import json

import pytest
from conftest import http, needs_registry, needs_skopeo, pull, push, wait_until
from replhelp import (
    ACCEPT,
    INDEX_TYPE,
    digest_of,
    home_of,
    manifest_digest,
    metric,
    push_small,
    put_manifest,
    small_image,
)

pytestmark = [needs_registry]

ASYNC = {"mode": "async", "retry_initial": "50ms", "retry_max": "500ms"}


def other(regs, name):
    return next(r for r in regs if r.name != name)


@needs_skopeo
def test_push_is_copied_to_the_peer_with_identical_digests(
    registries, zotlb_factory, image_factory, tmp_path
):
    a, b = registries
    lb = zotlb_factory([a, b], replication=ASYNC)
    img = image_factory("v1", layers=2)
    repo = "repl/app"
    assert push(img, f"{lb.hostport}/{repo}:v1").returncode == 0

    home = home_of(repo, ["a", "b"])
    peer = other(registries, home)
    wait_until(lambda: peer.has_manifest(repo, "v1"), 10, "copy on the peer")
    # Pull straight from the peer, not through zotlb: same digest, all blobs.
    got = pull(f"{peer.hostport}/{repo}:v1", tmp_path / "from-peer", "v1")
    assert got == img.manifest_digest
    for digest, data in img.blobs.items():
        if digest == img.manifest_digest:
            continue
        status, _, body = http("GET", f"{peer.url}/v2/{repo}/blobs/{digest}")
        assert status == 200 and body == data

    copied = lb.events("replication.copied")
    assert [(e["peer"], e["repo"], e["reference"]) for e in copied] == [
        (peer.name, repo, "v1")
    ]
    text = http("GET", lb.admin + "/metrics")[2].decode()
    assert metric(text, "zotlb_replication_lag_seconds_count", peer=peer.name) == 1
    blob_bytes = sum(len(v) for v in img.blobs.values())
    assert metric(text, "zotlb_replication_copied_bytes_total") == blob_bytes
    assert metric(text, "zotlb_replication_queue_length") == 0
    status = lb.status()["replication"]
    assert status["mode"] == "async" and status["queue_length"] == 0
    print(f"replication lag of one skopeo push: {copied[0]['lag_ms']} ms")


def test_index_brings_children_and_referrers_follow(registries, zotlb_factory):
    a, b = registries
    repo = "repl/multi"
    home = home_of(repo, ["a", "b"])
    peer = other(registries, home)
    home_reg = other(registries, peer.name)

    # Children pushed straight into the home backend, bypassing zotlb: only
    # the index goes through it, so the copier must bring them itself.
    children = [small_image("amd64"), small_image("arm64")]
    for i, child in enumerate(children):
        push_small(home_reg.url, repo, f"child{i}", child)
    index = json.dumps(
        {
            "schemaVersion": 2,
            "mediaType": INDEX_TYPE,
            "manifests": [
                {
                    "mediaType": "application/vnd.oci.image.manifest.v1+json",
                    "digest": c["digest"],
                    "size": len(c["manifest"]),
                }
                for c in children
            ],
        }
    ).encode()
    lb = zotlb_factory([a, b], replication=ASYNC)
    put_manifest(lb.url, repo, "multi", index, INDEX_TYPE)
    wait_until(lambda: manifest_digest(peer.url, repo, "multi"), 10, "index copied")
    assert manifest_digest(peer.url, repo, "multi") == digest_of(index)
    for child in children:
        assert manifest_digest(peer.url, repo, child["digest"]) == child["digest"]

    # A signature-like referrer pushed by digest through zotlb.
    subject = {
        "mediaType": INDEX_TYPE,
        "digest": digest_of(index),
        "size": len(index),
    }
    sig = small_image("signature", subject=subject)
    push_small(lb.url, repo, sig["digest"], sig)
    wait_until(
        lambda: manifest_digest(peer.url, repo, sig["digest"]), 10, "referrer copied"
    )
    status, headers, _ = http(
        "HEAD", f"{peer.url}/v2/{repo}/manifests/{sig['digest']}", ACCEPT
    )
    assert status == 200 and headers["Docker-Content-Digest"] == sig["digest"]


@pytest.mark.parametrize("mode", ["async", "sync"])
def test_mode_in_status(registries, zotlb_factory, mode):
    a, b = registries
    lb = zotlb_factory([a, b], replication={"mode": mode})
    assert lb.status()["replication"]["mode"] == mode
