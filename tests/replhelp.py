"""Raw-HTTP registry client bits for the replication tests and the lag bench."""

from __future__ import annotations

import hashlib
import json
import os
from typing import Any

from conftest import http
from ocilayout import CONFIG_TYPE, LAYER_TYPE, MANIFEST_TYPE

from zotlb.backends import rendezvous_order

INDEX_TYPE = "application/vnd.oci.image.index.v1+json"
ACCEPT = {
    "Accept": ", ".join(
        [MANIFEST_TYPE, INDEX_TYPE, "application/vnd.oci.artifact.manifest.v1+json"]
    )
}


def digest_of(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def home_of(repo: str, names: list[str]) -> str:
    """The backend the proxy writes repo to while all are up."""
    return rendezvous_order(names, repo)[0]


def repo_homed_on(name: str, names: list[str], prefix: str, start: int = 0) -> str:
    i = start
    while home_of(f"{prefix}{i}", names) != name:
        i += 1
    return f"{prefix}{i}"


def put_blob(
    base: str, repo: str, data: bytes, auth: dict[str, str] | None = None
) -> str:
    digest = digest_of(data)
    auth = auth or {}
    status, headers, body = http("POST", f"{base}/v2/{repo}/blobs/uploads/", auth)
    assert status == 202, (status, body)
    location = headers["Location"]
    sep = "&" if "?" in location else "?"
    status, _, body = http(
        "PUT",
        f"{location}{sep}digest={digest}",
        headers={"Content-Type": "application/octet-stream", **auth},
        data=data,
    )
    assert status == 201, (status, body)
    return digest


def put_manifest(
    base: str,
    repo: str,
    ref: str,
    body: bytes,
    media_type: str = MANIFEST_TYPE,
    auth: dict[str, str] | None = None,
) -> int:
    status, _, answer = http(
        "PUT",
        f"{base}/v2/{repo}/manifests/{ref}",
        headers={"Content-Type": media_type, **(auth or {})},
        data=body,
    )
    assert status == 201, (status, answer)
    return status


def small_image(label: str, subject: dict[str, Any] | None = None) -> dict[str, Any]:
    """Blobs and manifest bytes of a tiny unique image."""
    layer = os.urandom(256)
    config = json.dumps(
        {"architecture": "amd64", "os": "linux", "label": label}
    ).encode()
    manifest: dict[str, Any] = {
        "schemaVersion": 2,
        "mediaType": MANIFEST_TYPE,
        "config": {
            "mediaType": CONFIG_TYPE,
            "digest": digest_of(config),
            "size": len(config),
        },
        "layers": [
            {"mediaType": LAYER_TYPE, "digest": digest_of(layer), "size": len(layer)}
        ],
    }
    if subject is not None:
        manifest["subject"] = subject
    body = json.dumps(manifest).encode()
    return {"blobs": [config, layer], "manifest": body, "digest": digest_of(body)}


def push_small(
    base: str,
    repo: str,
    tag: str,
    image: dict[str, Any],
    auth: dict[str, str] | None = None,
) -> None:
    for blob in image["blobs"]:
        put_blob(base, repo, blob, auth)
    put_manifest(base, repo, tag, image["manifest"], auth=auth)


def manifest_digest(
    base: str, repo: str, ref: str, auth: dict[str, str] | None = None
) -> str | None:
    headers = {**ACCEPT, **(auth or {})}
    status, _, body = http("GET", f"{base}/v2/{repo}/manifests/{ref}", headers)
    if status != 200:
        return None
    return digest_of(body)


def pull_small(base: str, repo: str, ref: str) -> str | None:
    """Manifest digest if the manifest and all its blobs read back intact."""
    status, _, body = http("GET", f"{base}/v2/{repo}/manifests/{ref}", ACCEPT)
    if status != 200:
        return None
    doc = json.loads(body)
    for desc in [doc["config"], *doc["layers"]]:
        got = http("GET", f"{base}/v2/{repo}/blobs/{desc['digest']}")
        if got[0] != 200 or digest_of(got[2]) != desc["digest"]:
            return None
    return digest_of(body)


def metric(text: str, name: str, **labels: str) -> float:
    """Sum of a Prometheus sample over the series matching labels."""
    total = 0.0
    for line in text.splitlines():
        if not line.startswith(name):
            continue
        head, _, value = line.rpartition(" ")
        series, _, label_text = head.partition("{")
        if series != name:
            continue
        if all(f'{k}="{v}"' in label_text for k, v in labels.items()):
            total += float(value)
    return total
