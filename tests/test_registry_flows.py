"""Push and pull through zotlb with real clients, against two separate registries."""

from __future__ import annotations

import concurrent.futures
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest
from conftest import http, needs_registry, needs_skopeo, pull, push, skopeo

pytestmark = [needs_registry, needs_skopeo]


def test_five_images_to_five_repos_round_trip(
    registries, zotlb_factory, image_factory, tmp_path
):
    a, b = registries
    # Replication off: this test checks where the proxy itself writes.
    lb = zotlb_factory([a, b], replication={"mode": "off"})
    homes = set()
    for i in range(5):
        img = image_factory(f"v{i}")
        repo = f"team/app{i}"
        result = push(img, f"{lb.hostport}/{repo}:{img.tag}")
        assert result.returncode == 0, result.stderr
        got = pull(f"{lb.hostport}/{repo}:{img.tag}", tmp_path / f"pull{i}", img.tag)
        assert got == img.manifest_digest
        # All writes of one repository landed on one backend.
        on_a, on_b = a.has_manifest(repo, img.tag), b.has_manifest(repo, img.tag)
        assert on_a != on_b, f"{repo}: on a={on_a}, on b={on_b}"
        homes.add("a" if on_a else "b")
    # Five repositories hash over both backends (fixed names, so this is stable).
    assert homes == {"a", "b"}


def test_image_seeded_into_one_backend_is_always_found(
    registries, zotlb_factory, image_factory, tmp_path
):
    a, b = registries
    img = image_factory("only-b")
    for repo in ("seeded/one", "seeded/two"):
        result = push(img, f"{b.hostport}/{repo}:{img.tag}")
        assert result.returncode == 0, result.stderr
    lb = zotlb_factory([a, b])
    for i in range(6):
        repo = ("seeded/one", "seeded/two")[i % 2]
        got = pull(f"{lb.hostport}/{repo}:{img.tag}", tmp_path / f"pull{i}", img.tag)
        assert got == img.manifest_digest
    assert not a.has_manifest("seeded/one", img.tag)


def test_overwritten_tag_always_reads_newest(
    registries, zotlb_factory, image_factory, tmp_path
):
    a, b = registries
    lb = zotlb_factory([a, b])
    ref = f"{lb.hostport}/rolling/app:stable"
    for round_ in range(4):
        img = image_factory("stable")
        assert push(img, ref).returncode == 0
        for j in range(2):
            got = pull(ref, tmp_path / f"pull-{round_}-{j}", "stable")
            assert got == img.manifest_digest, f"round {round_}: stale digest"
        # The other backend holds an older "stable": plant it to prove the
        # read goes to the home backend rather than anywhere.
        other = b if a.has_manifest("rolling/app", "stable") else a
        stale = image_factory("stable")
        assert push(stale, f"{other.hostport}/rolling/app:stable").returncode == 0
        assert pull(ref, tmp_path / f"pull-{round_}-x", "stable") == img.manifest_digest


def test_sixteen_concurrent_pushes(registries, zotlb_factory, image_factory, tmp_path):
    a, b = registries
    lb = zotlb_factory([a, b])
    jobs = []
    for r in range(8):
        for tag in ("one", "two"):
            jobs.append((f"parallel/repo{r}", image_factory(tag)))
    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        results = list(
            pool.map(
                lambda job: push(job[1], f"{lb.hostport}/{job[0]}:{job[1].tag}"), jobs
            )
        )
    failures = [r.stderr for r in results if r.returncode != 0]
    assert not failures, failures[:2]
    for i, (repo, img) in enumerate(jobs):
        assert (
            pull(f"{lb.hostport}/{repo}:{img.tag}", tmp_path / f"p{i}", img.tag)
            == img.manifest_digest
        )


def test_head_and_range_match_direct(registries, zotlb_factory, image_factory):
    a, b = registries
    img = image_factory("ranged", payload=bytes(range(256)) * 8)
    # Both hold it: a blob HEAD goes to the repository's home, whichever it is.
    for reg in (a, b):
        assert push(img, f"{reg.hostport}/ranged/app:ranged").returncode == 0
    lb = zotlb_factory([a, b])
    layer = max(
        img.blobs, key=lambda d: len(img.blobs[d]) if d != img.manifest_digest else -1
    )
    accept = {"Accept": "application/vnd.oci.image.manifest.v1+json"}
    for path, headers in (
        ("/v2/ranged/app/manifests/ranged", accept),
        (f"/v2/ranged/app/blobs/{layer}", {}),
    ):
        direct = http("HEAD", a.url + path, headers)
        proxied = http("HEAD", lb.url + path, headers)
        assert proxied[0] == direct[0] == 200
        for key in ("Content-Length", "Docker-Content-Digest", "Content-Type"):
            assert proxied[1].get(key) == direct[1].get(key), key
    rng = {"Range": "bytes=100-199"}
    direct = http("GET", f"{a.url}/v2/ranged/app/blobs/{layer}", rng)
    proxied = http("GET", f"{lb.url}/v2/ranged/app/blobs/{layer}", rng)
    assert direct[0] == proxied[0] == 206
    assert proxied[2] == direct[2] == img.blobs[layer][100:200]
    assert proxied[1]["Content-Range"] == direct[1]["Content-Range"]


def test_upload_location_is_marked_and_points_at_zotlb(registries, zotlb_factory):
    a, b = registries
    lb = zotlb_factory([a, b])
    status, headers, _ = http("POST", f"{lb.url}/v2/loc/app/blobs/uploads/")
    assert status == 202
    location = headers["Location"]
    assert location.startswith(lb.url + "/v2/loc/app/blobs/uploads/")
    assert "_zlb=" in location
    # The session continues on its backend: a status GET through zotlb works.
    status, headers, _ = http("GET", location)
    assert status == 204, status
    assert headers["Range"] == "0-0"


@pytest.mark.skipif(shutil.which("podman") is None, reason="podman is not installed")
def test_podman_push_and_pull(registries, zotlb_factory, image_factory, request):
    a, b = registries
    lb = zotlb_factory([a, b])
    img = image_factory("pod")
    # podman refuses a runroot path longer than 50 characters.
    short = Path(tempfile.mkdtemp(prefix="zlbpod", dir="/tmp"))
    request.addfinalizer(lambda: shutil.rmtree(short, ignore_errors=True))
    root, runroot = short / "root", short / "run"
    base = [
        "podman",
        "--root",
        str(root),
        "--runroot",
        str(runroot),
        "--storage-driver",
        "vfs",
    ]

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [*base, *args], capture_output=True, text=True, timeout=120
        )

    pulled = run("pull", "-q", img.ref)
    if pulled.returncode != 0:
        pytest.skip(f"podman cannot load images here: {pulled.stderr.strip()[:200]}")
    image_id = pulled.stdout.strip()
    pushed = run(
        "push", "--tls-verify=false", image_id, f"{lb.hostport}/podman/app:pod"
    )
    assert pushed.returncode == 0, pushed.stderr
    run("rmi", "-a", "-f")
    back = run("pull", "--tls-verify=false", f"{lb.hostport}/podman/app:pod")
    assert back.returncode == 0, back.stderr
    inspect = skopeo(
        "inspect", "--tls-verify=false", f"docker://{lb.hostport}/podman/app:pod"
    )
    assert inspect.returncode == 0, inspect.stderr


def test_oras_push_and_pull(registries, zotlb_factory, tmp_path):
    oras_client = pytest.importorskip("oras.client")
    a, b = registries
    lb = zotlb_factory([a, b])
    artifact = tmp_path / "sbom.json"
    artifact.write_text('{"packages": ["zotlb"]}')
    client = oras_client.OrasClient(hostname=lb.hostport, insecure=True)
    target = f"{lb.hostport}/artifacts/sbom:v1"
    import os

    cwd = os.getcwd()
    os.chdir(tmp_path)
    try:
        response = client.push(files=["sbom.json"], target=target)
        assert response.status_code in (200, 201)
        out = tmp_path / "out"
        files = client.pull(target=target, outdir=str(out))
    finally:
        os.chdir(cwd)
    assert [Path(f).read_text() for f in files] == ['{"packages": ["zotlb"]}']
