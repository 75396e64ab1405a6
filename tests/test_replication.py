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
    repo_homed_on,
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

    wait_until(lambda: lb.events("replication.copied"), 5, "the copy logged")
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


def _drift_checks_after(lb, since: float) -> list[dict]:
    return [e for e in lb.events("drift.checked") if e["timestamp"] > since]


def test_delete_is_gone_from_both_and_stays_gone_after_drift_watch(
    registries, zotlb_factory
):
    a, b = registries
    lb = zotlb_factory([a, b], replication={**ASYNC, "drift_interval": "100ms"})
    repo = "repl/deleted"
    image = small_image("to-delete")
    push_small(lb.url, repo, "v1", image)
    digest = image["digest"]
    wait_until(
        lambda: a.has_manifest(repo, digest) and b.has_manifest(repo, digest),
        10,
        "the image on both backends",
    )

    status, _, body = http("DELETE", f"{lb.url}/v2/{repo}/manifests/{digest}")
    assert status == 202, body
    wait_until(
        lambda: not a.has_manifest(repo, digest) and not b.has_manifest(repo, digest),
        10,
        "the delete on both backends",
    )
    wait_until(lambda: lb.events("replication.deleted"), 5, "the delete logged")
    deleted = lb.events("replication.deleted")
    assert [(e["repo"], e["reference"]) for e in deleted] == [(repo, digest)]

    # Two full drift checks that started after the delete: nothing came back,
    # and the backends count as in sync.
    from datetime import UTC, datetime

    since = datetime.now(UTC).isoformat()
    wait_until(lambda: len(_drift_checks_after(lb, since)) >= 2, 10, "drift checks")
    for reg in (a, b):
        assert not reg.has_manifest(repo, digest)
        assert not reg.has_manifest(repo, "v1")
    assert lb.status()["drift"]["last"]["in_sync"] is True
    assert manifest_digest(lb.url, repo, "v1") is None


def test_bad_replication_config_names_the_key(tmp_path):
    import subprocess
    import sys

    import yaml

    path = tmp_path / "lb.yaml"
    path.write_text(
        yaml.safe_dump(
            {
                "backends": [{"name": "a", "url": "http://127.0.0.1:1"}],
                "replication": {"mode": "eventually", "queue_max": 0, "colour": 1},
            }
        )
    )
    result = subprocess.run(
        [sys.executable, "-m", "zotlb", "check", "-c", str(path)],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    for key in ("replication.mode", "replication.queue_max", "replication.colour"):
        assert key in result.stderr, result.stderr

    # YAML's bare `off` is a boolean: it still means mode off.
    path.write_text(
        "backends: [{name: a, url: 'http://127.0.0.1:1'}]\nreplication: {mode: off}\n"
    )
    from zotlb.config import load_config

    assert load_config(path).replication.mode == "off"


def test_queued_replications_survive_a_zotlb_kill(registries, zotlb_factory, tmp_path):
    import concurrent.futures
    import signal

    a, b = registries
    repl = {**ASYNC, "state_dir": str(tmp_path / "state")}
    lb = zotlb_factory([a, b], replication=repl)
    b.kill()
    wait_until(lambda: lb.backend_state("b") == "down", 10, "b marked down")

    # With b down every push lands on a, and its copy for b waits in the queue.
    jobs = [(f"queued/r{i % 10}", f"t{i}", small_image(f"q{i}")) for i in range(50)]
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        list(pool.map(lambda job: push_small(lb.url, *job), jobs))
    assert lb.status()["replication"]["queue_length"] == 50
    text = http("GET", lb.admin + "/metrics")[2].decode()
    assert metric(text, "zotlb_replication_queue_length") == 50
    lb.stop(signal.SIGKILL)

    b.start()
    lb2 = zotlb_factory([a, b], replication=repl)

    def all_on_b() -> bool:
        return all(b.has_manifest(repo, tag) for repo, tag, _ in jobs)

    wait_until(all_on_b, 30, "all 50 queued copies on b")
    for repo, tag, image in jobs[:5]:
        assert manifest_digest(b.url, repo, tag) == image["digest"]
    assert lb2.events("replication.resumed")[0]["jobs"] == 50
    wait_until(
        lambda: lb2.status()["replication"]["queue_length"] == 0, 5, "an empty queue"
    )


def _zotlb_cli(*args: str):
    import subprocess
    import sys

    return subprocess.run(
        [sys.executable, "-m", "zotlb", *args],
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_diff_finds_seeded_image_and_repair_fixes_it(registries, zotlb_factory):
    a, b = registries
    # Seeded straight into b: a lacks it.
    seeded = small_image("seeded")
    push_small(b.url, "seeded/app", "v1", seeded)
    # The same tag with different content on each: the home backend's wins.
    split_repo = "split/app"
    home = home_of(split_repo, ["a", "b"])
    stray = other(registries, home)
    versions = {}
    for reg in (a, b):
        versions[reg.name] = small_image(f"split-{reg.name}")
        push_small(reg.url, split_repo, "v1", versions[reg.name])

    lb = zotlb_factory([a, b], replication={**ASYNC, "drift_interval": "100ms"})
    wait_until(lambda: lb.events("drift.checked"), 10, "a drift check")
    drift = lb.status()["drift"]["last"]
    assert drift["in_sync"] is False
    assert drift["backends"]["a"]["missing_tags"] == ["seeded/app:v1"]
    assert drift["backends"][stray.name]["differing_tags"] == ["split/app:v1"]
    text = http("GET", lb.admin + "/metrics")[2].decode()
    assert metric(text, "zotlb_drift_missing_tags", backend="a") == 1
    assert metric(text, "zotlb_drift_missing_tags", backend="b") == 0
    assert metric(text, "zotlb_drift_differing_tags", backend=stray.name) == 1

    config = str(lb.config_path)
    diff = _zotlb_cli("diff", "-c", config)
    assert diff.returncode == 1, diff.stderr
    assert "a: 1 missing" in diff.stdout
    assert "missing  seeded/app:v1" in diff.stdout
    assert "differs  split/app:v1" in diff.stdout

    dry = _zotlb_cli("repair", "--dry-run", "-c", config)
    assert dry.returncode == 1, dry.stderr
    assert "would copy seeded/app:v1" in dry.stdout
    assert not a.has_manifest("seeded/app", "v1")

    fixed = _zotlb_cli("repair", "-c", config)
    assert fixed.returncode == 0, fixed.stdout + fixed.stderr
    assert manifest_digest(a.url, "seeded/app", "v1") == seeded["digest"]
    assert manifest_digest(stray.url, split_repo, "v1") == versions[home]["digest"]

    again = _zotlb_cli("diff", "-c", config)
    assert again.returncode == 0, again.stdout
    print(diff.stdout + fixed.stdout)


def test_failed_copies_back_off_and_complete_when_the_source_returns(
    registries, zotlb_factory
):
    a, b = registries
    lb = zotlb_factory(
        [a, b],
        replication={"mode": "async", "retry_initial": "100ms", "retry_max": "400ms"},
    )
    repo = repo_homed_on("a", ["a", "b"], "retry/r")
    # The copy waits while b is down; then a (its only source) dies before b
    # returns, so every attempt fails until a is back.
    b.kill()
    wait_until(lambda: lb.backend_state("b") == "down", 10, "b marked down")
    push_small(lb.url, repo, "v1", small_image("retried"))
    a.kill()
    b.start()
    wait_until(lambda: len(lb.events("replication.failed")) >= 3, 10, "three failures")
    a.start()
    wait_until(lambda: b.has_manifest(repo, "v1"), 10, "the copy after a returned")

    wait_until(lambda: lb.events("replication.copied"), 5, "the copy logged")
    failures = lb.events("replication.failed")
    assert {f["cause"] for f in failures} == {"source_down"}
    assert [f["attempts"] for f in failures[:3]] == [1, 2, 3]
    # Backoff: the second wait (about 200 ms) is longer than the first (100 ms).
    from datetime import datetime

    at = [datetime.fromisoformat(f["timestamp"]) for f in failures[:3]]
    assert (at[2] - at[1]) > (at[1] - at[0])
    wait_until(lambda: lb.events("replication.copied"), 5, "the copy logged")
    assert lb.events("replication.copied")[0]["attempts"] == len(failures) + 1
    text = http("GET", lb.admin + "/metrics")[2].decode()
    assert metric(text, "zotlb_replication_failures_total", cause="source_down") >= 3
    assert metric(text, "zotlb_replication_jobs_total", result="ok") == 1


def test_bounded_queue_drops_the_excess_and_a_returning_peer_gets_the_rest(
    registries, zotlb_factory
):
    a, b = registries
    lb = zotlb_factory([a, b], replication={**ASYNC, "queue_max": 3})
    b.kill()
    wait_until(lambda: lb.backend_state("b") == "down", 10, "b marked down")
    pushed = [(f"bounded/r{i}", small_image(f"bounded{i}")) for i in range(5)]
    for repo, image in pushed:
        push_small(lb.url, repo, "v1", image)
    assert lb.status()["replication"]["backlog"] == {"b": 3}
    text = http("GET", lb.admin + "/metrics")[2].decode()
    assert metric(text, "zotlb_replication_failures_total", cause="queue_full") == 2
    wait_until(lambda: len(lb.events("replication.dropped")) == 2, 5, "drops logged")

    b.start()
    wait_until(
        lambda: all(b.has_manifest(r, "v1") for r, _ in pushed[:3]), 10, "the backlog"
    )
    assert not any(b.has_manifest(r, "v1") for r, _ in pushed[3:])


def test_blob_the_peer_holds_elsewhere_is_mounted_not_copied(registries, zotlb_factory):
    a, b = registries
    lb = zotlb_factory([a, b], replication=ASYNC)
    first = repo_homed_on("a", ["a", "b"], "mount/r")
    second = repo_homed_on("a", ["a", "b"], "mount/r", int(first[7:]) + 1)
    image = small_image("shared")
    push_small(lb.url, first, "v1", image)
    wait_until(lambda: b.has_manifest(first, "v1"), 10, "the first copy")
    push_small(lb.url, second, "v1", image)
    wait_until(lambda: b.has_manifest(second, "v1"), 10, "the second copy")
    wait_until(lambda: len(lb.events("replication.copied")) == 2, 5, "copies logged")

    one, two = lb.events("replication.copied")
    blob_bytes = sum(len(x) for x in image["blobs"])
    assert one["bytes"] == blob_bytes + len(image["manifest"])
    # Only the manifest moved the second time: both blobs were mounted.
    assert two["bytes"] == len(image["manifest"])
    for blob in image["blobs"]:
        status, _, body = http("GET", f"{b.url}/v2/{second}/blobs/{digest_of(blob)}")
        assert status == 200 and body == blob


def test_sync_waits_for_a_peer_but_not_forever_nor_for_a_dead_one(
    registries, zotlb_factory
):
    import signal
    import time

    a, b = registries
    lb = zotlb_factory(
        [a, b],
        health={"interval": "5s"},
        replication={"mode": "sync", "sync_timeout": "300ms", "retry_initial": "1s"},
    )
    wait_until(
        lambda: all(x["last_probe"] for x in lb.status()["backends"]), 5, "probes"
    )
    repo = repo_homed_on("a", ["a", "b"], "sync/r")

    # A frozen peer accepts connections and never answers: the PUT waits for
    # it no longer than sync_timeout, and the image is still acknowledged.
    assert b.proc is not None
    b.proc.send_signal(signal.SIGSTOP)
    started = time.monotonic()
    push_small(lb.url, repo, "v1", small_image("sync-timeout"))
    waited = time.monotonic() - started
    b.proc.send_signal(signal.SIGCONT)
    assert waited >= 0.3
    wait_until(lambda: lb.events("replication.sync.timeout"), 5, "timeout logged")
    assert lb.events("replication.sync.timeout")[0]["repo"] == repo
    wait_until(lambda: b.has_manifest(repo, "v1"), 10, "the copy once b thawed")

    # A dead peer: the copy's refused connection takes b out, and the PUT
    # stops waiting for it; the next PUT has no live peer to wait for.
    b.kill()
    push_small(lb.url, repo, "v2", small_image("sync-peer-down"))
    assert lb.backend_state("b") == "down"
    push_small(lb.url, repo, "v3", small_image("sync-no-peer"))
    text = http("GET", lb.admin + "/metrics")[2].decode()
    waits = {
        outcome: metric(text, "zotlb_replication_sync_waits_total", outcome=outcome)
        for outcome in ("timeout", "peer_down", "no_peer", "replicated")
    }
    assert waits == {"timeout": 1, "peer_down": 1, "no_peer": 1, "replicated": 0}


@needs_skopeo
def test_oras_sbom_referrer_follows_its_image(
    registries, zotlb_factory, image_factory, tmp_path, monkeypatch
):
    oras_client = pytest.importorskip("oras.client")
    from oras.oci import Subject

    a, b = registries
    lb = zotlb_factory([a, b], replication=ASYNC)
    repo = "repl/signed"
    img = image_factory("signed")
    assert push(img, f"{lb.hostport}/{repo}:signed").returncode == 0

    (tmp_path / "sbom.json").write_text('{"packages": ["zotlb"]}')
    monkeypatch.chdir(tmp_path)
    client = oras_client.OrasClient(hostname=lb.hostport, insecure=True)
    subject = Subject(
        "application/vnd.oci.image.manifest.v1+json",
        img.manifest_digest,
        len(img.manifest),
    )
    response = client.push(
        files=["sbom.json"], target=f"{lb.hostport}/{repo}:sbom", subject=subject
    )
    assert response.status_code == 201

    peer = other(registries, home_of(repo, ["a", "b"]))
    wait_until(lambda: peer.has_manifest(repo, "sbom"), 10, "the SBOM on the peer")
    status, _, body = http("GET", f"{peer.url}/v2/{repo}/manifests/sbom", ACCEPT)
    assert status == 200
    assert json.loads(body)["subject"]["digest"] == img.manifest_digest
    assert manifest_digest(peer.url, repo, "sbom") == manifest_digest(
        lb.url, repo, "sbom"
    )
    assert peer.has_manifest(repo, img.manifest_digest)


async def test_blob_from_a_source_without_length_is_streamed_chunked(registries):
    import os

    import aiohttp
    from aiohttp import web
    from conftest import free_port
    from yarl import URL

    from zotlb.backends import Backend
    from zotlb.replication import Copier

    a, _ = registries
    data = os.urandom(3 * 256 * 1024 + 7)
    digest = digest_of(data)

    async def blob(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse()
        resp.enable_chunked_encoding()
        await resp.prepare(request)
        for i in range(0, len(data), 100_000):
            await resp.write(data[i : i + 100_000])
        await resp.write_eof()
        return resp

    app = web.Application()
    app.router.add_get("/v2/chunked/blob/blobs/{digest}", blob)
    runner = web.AppRunner(app)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    source = Backend("src", URL(f"http://127.0.0.1:{port}"))
    target = Backend("a", URL(a.url))
    try:
        async with aiohttp.ClientSession() as session:
            copier = Copier(session)
            copied = await copier.ensure_blob([source], target, "chunked/blob", digest)
            # Present now: a second call finds it with the HEAD and copies nothing.
            again = await copier.ensure_blob([source], target, "chunked/blob", digest)
    finally:
        await runner.cleanup()
    assert (copied, again) == (len(data), 0)
    status, _, body = http("GET", f"{a.url}/v2/chunked/blob/blobs/{digest}")
    assert status == 200 and body == data


@needs_skopeo
def test_active_passive_standby_holds_the_primarys_pushes(
    registries, zotlb_factory, image_factory, tmp_path
):
    a, b = registries
    lb = zotlb_factory([a, b], mode="active-passive", replication=ASYNC)
    img = image_factory("ap")
    assert push(img, f"{lb.hostport}/ap/replicated:ap").returncode == 0
    wait_until(lambda: b.has_manifest("ap/replicated", "ap"), 10, "copy on standby")
    a.kill()
    got = pull(f"{lb.hostport}/ap/replicated:ap", tmp_path / "p", "ap")
    assert got == img.manifest_digest


def test_diff_names_an_unreachable_backend(registries, tmp_path):
    import yaml
    from conftest import free_port

    a, _ = registries
    config = tmp_path / "lb.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "backends": [
                    {"name": "a", "url": a.url},
                    {"name": "gone", "url": f"http://127.0.0.1:{free_port()}"},
                ]
            }
        )
    )
    result = _zotlb_cli("diff", "-c", str(config))
    assert result.returncode == 1
    assert "gone: unreachable" in result.stdout
    assert "Traceback" not in result.stderr
    repair = _zotlb_cli("repair", "-c", str(config))
    assert repair.returncode == 1 and "gone: unreachable" in repair.stdout


def test_copy_whose_source_lost_the_image_gives_up_and_unblocks_its_lane(
    registries, zotlb_factory
):
    a, b = registries
    lb = zotlb_factory([a, b], replication=ASYNC)
    repo = "repl/lost"
    b.kill()
    wait_until(lambda: lb.backend_state("b") == "down", 10, "b marked down")
    lost, kept = small_image("lost"), small_image("kept")
    push_small(lb.url, repo, "lost", lost)
    push_small(lb.url, repo, "kept", kept)
    # The first image's layer vanishes from its only source behind zotlb's back.
    layer = digest_of(lost["blobs"][1])
    assert http("DELETE", f"{a.url}/v2/{repo}/blobs/{layer}")[0] == 202

    b.start()
    wait_until(lambda: b.has_manifest(repo, "kept"), 10, "the second copy")
    assert not b.has_manifest(repo, "lost")
    wait_until(lambda: lb.events("replication.copied"), 5, "the copy logged")
    failures = lb.events("replication.failed")
    assert [f["cause"] for f in failures] == ["source_missing"] * 5
    assert failures[-1]["permanent"] is True
    text = http("GET", lb.admin + "/metrics")[2].decode()
    assert metric(text, "zotlb_replication_jobs_total", result="failed") == 1
    assert metric(text, "zotlb_replication_jobs_total", result="ok") == 1
