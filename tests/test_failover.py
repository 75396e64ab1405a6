"""Backends dying under traffic: retries, passive detection, failover."""

from __future__ import annotations

import json
import time

from conftest import http, needs_registry, needs_skopeo, pull, push, wait_until

pytestmark = [needs_registry, needs_skopeo]

ACCEPT = {"Accept": "application/vnd.oci.image.manifest.v1+json"}


def test_kill_one_backend_during_reads_loses_none(
    registries, zotlb_factory, image_factory
):
    a, b = registries
    img = image_factory("both")
    for reg in (a, b):
        assert push(img, f"{reg.hostport}/shared/app:both").returncode == 0
    layer = next(d for d in img.blobs if d != img.manifest_digest)
    lb = zotlb_factory([a, b], health={"interval": "5s"})

    failures = []
    for i in range(40):
        if i == 10:
            a.kill()
        manifest = http("GET", f"{lb.url}/v2/shared/app/manifests/both", ACCEPT)
        blob = http("GET", f"{lb.url}/v2/shared/app/blobs/{layer}")
        if (
            manifest[0] != 200
            or manifest[1].get("Docker-Content-Digest") != img.manifest_digest
        ):
            failures.append(("manifest", i, manifest[0]))
        if blob[0] != 200 or blob[2] != img.blobs[layer]:
            failures.append(("blob", i, blob[0]))
    print(f"failed reads after kill -9: {len(failures)} of 80")
    assert failures == []
    # Passive detection took it out without waiting for the 5 s probe.
    assert lb.backend_state("a") == "down"
    assert lb.events("backend.down")[0]["backend"] == "a"


def test_all_backends_down_gives_503_oci_json_fast(registries, zotlb_factory):
    a, b = registries
    lb = zotlb_factory([a, b])
    a.kill()
    b.kill()
    for path in ("/v2/", "/v2/x/manifests/latest", "/v2/x/blobs/uploads/"):
        started = time.monotonic()
        method = "POST" if path.endswith("uploads/") else "GET"
        status, headers, body = http(method, lb.url + path)
        elapsed = time.monotonic() - started
        assert elapsed < 3, f"{path} took {elapsed:.2f}s"
        assert status == 503 or status == 502, status
        assert headers["Docker-Distribution-API-Version"] == "registry/2.0"
        errors = json.loads(body)["errors"]
        assert errors[0]["code"] and errors[0]["message"]
    # Once both are marked down, answers are immediate 503s.
    status, _, _ = http("GET", lb.url + "/v2/")
    assert status == 503


def test_backend_returns_after_rise_probes(registries, zotlb_factory):
    a, b = registries
    lb = zotlb_factory([a, b])
    a.kill()
    wait_until(lambda: lb.backend_state("a") == "down", 5, "a marked down")
    a.start()
    wait_until(lambda: lb.backend_state("a") == "up", 5, "a back up")
    up = lb.events("backend.up")[-1]
    assert up["backend"] == "a" and "2 probes passed" in up["reason"]


def test_active_passive_push_lands_on_primary_and_fails_over(
    registries, zotlb_factory, image_factory, tmp_path
):
    a, b = registries
    lb = zotlb_factory(
        [a, b],
        mode="active-passive",
        health={"interval": "1s"},
        replication={"mode": "off"},
    )
    first = image_factory("one")
    assert push(first, f"{lb.hostport}/ap/app:one").returncode == 0
    assert a.has_manifest("ap/app", "one") and not b.has_manifest("ap/app", "one")

    a.kill()
    killed = time.monotonic()
    second = image_factory("two")
    result = push(second, f"{lb.hostport}/ap/app:two")
    assert result.returncode == 0, result.stderr
    assert (
        pull(f"{lb.hostport}/ap/app:two", tmp_path / "p2", "two")
        == second.manifest_digest
    )
    elapsed = time.monotonic() - killed
    print(f"push and pull via the standby took {elapsed:.2f}s after kill -9")
    assert elapsed < 5
    assert b.has_manifest("ap/app", "two")
    assert lb.events("backend.failover")[0]["active"] == "b"


def test_active_passive_fails_back_after_rise(registries, zotlb_factory, image_factory):
    a, b = registries
    lb = zotlb_factory([a, b], mode="active-passive")
    a.kill()
    http("GET", lb.url + "/v2/")
    wait_until(lambda: lb.backend_state("a") == "down", 5, "a down")
    assert next(x for x in lb.status()["backends"] if x["name"] == "b")["active"]
    a.start()
    wait_until(lambda: lb.backend_state("a") == "up", 5, "a up")
    assert next(x for x in lb.status()["backends"] if x["name"] == "a")["active"]
    img = image_factory("back")
    assert push(img, f"{lb.hostport}/fb/app:back").returncode == 0
    assert a.has_manifest("fb/app", "back")


def test_active_passive_manual_failback_stays_on_standby(registries, zotlb_factory):
    a, b = registries
    lb = zotlb_factory([a, b], mode="active-passive", failback="manual")
    a.kill()
    http("GET", lb.url + "/v2/")
    wait_until(lambda: lb.backend_state("a") == "down", 5, "a down")
    a.start()
    wait_until(lambda: lb.backend_state("a") == "up", 5, "a up")
    # a is healthy again, but the standby keeps the traffic until told.
    http("GET", lb.url + "/v2/")
    assert next(x for x in lb.status()["backends"] if x["name"] == "b")["active"]


def test_read_miss_on_active_is_tried_on_standby(
    registries, zotlb_factory, image_factory, tmp_path
):
    a, b = registries
    img = image_factory("standby-only")
    assert push(img, f"{b.hostport}/sb/app:standby-only").returncode == 0
    lb = zotlb_factory([a, b], mode="active-passive")
    got = pull(f"{lb.hostport}/sb/app:standby-only", tmp_path / "p", "standby-only")
    assert got == img.manifest_digest


def _upload_through(lb_first, lb_second, repo: str) -> tuple[int, str]:
    """Open an upload on one zotlb, continue and close it on another."""
    import hashlib
    from urllib.parse import urlsplit

    data = b"session-affinity" * 64
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    status, headers, _ = http("POST", f"{lb_first.url}/v2/{repo}/blobs/uploads/")
    assert status == 202
    loc = urlsplit(headers["Location"])
    status, headers, _ = http(
        "PATCH",
        f"{lb_second.url}{loc.path}?{loc.query}",
        {"Content-Type": "application/octet-stream"},
        data,
    )
    assert status == 202, status
    loc = urlsplit(headers["Location"])
    status, headers, _ = http(
        "PUT", f"{lb_second.url}{loc.path}?{loc.query}&digest={digest}"
    )
    return status, digest


def test_upload_session_continues_on_another_replica_and_after_restart(
    registries, zotlb_factory
):
    a, b = registries
    first, second = zotlb_factory([a, b]), zotlb_factory([a, b])
    for i in range(4):
        # Whatever the repository's home, the session follows its mark.
        status, digest = _upload_through(first, second, f"replica/app{i}")
        assert status == 201
    first.stop()
    third = zotlb_factory([a, b])
    status, _ = _upload_through(second, third, "replica/after-restart")
    assert status == 201


def test_home_moves_when_down_and_back_when_it_returns(
    registries, zotlb_factory, image_factory
):
    a, b = registries
    lb = zotlb_factory([a, b])
    repo = "moving/app"
    first = image_factory("one")
    assert push(first, f"{lb.hostport}/{repo}:one").returncode == 0
    home, other = (a, b) if a.has_manifest(repo, "one") else (b, a)

    home.kill()
    second = image_factory("two")
    result = push(second, f"{lb.hostport}/{repo}:two")
    assert result.returncode == 0, result.stderr
    assert other.has_manifest(repo, "two")

    home.start()
    wait_until(lambda: lb.backend_state(home.name) == "up", 5, "home back up")
    third = image_factory("three")
    assert push(third, f"{lb.hostport}/{repo}:three").returncode == 0
    assert home.has_manifest(repo, "three") and not other.has_manifest(repo, "three")
