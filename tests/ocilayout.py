"""Build tiny OCI image layouts on disk, for real clients to push."""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import tarfile
from dataclasses import dataclass
from pathlib import Path

MANIFEST_TYPE = "application/vnd.oci.image.manifest.v1+json"
CONFIG_TYPE = "application/vnd.oci.image.config.v1+json"
LAYER_TYPE = "application/vnd.oci.image.layer.v1.tar+gzip"


def sha256(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


@dataclass
class Image:
    layout: Path
    tag: str
    manifest_digest: str
    manifest: bytes
    blobs: dict[str, bytes]

    @property
    def ref(self) -> str:
        return f"oci:{self.layout}:{self.tag}"


def _layer(files: dict[str, bytes]) -> bytes:
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w") as tar:
        for name, content in sorted(files.items()):
            info = tarfile.TarInfo(name)
            info.size = len(content)
            info.mtime = 0
            tar.addfile(info, io.BytesIO(content))
    return gzip.compress(raw.getvalue(), mtime=0)


def build_image(
    layout: Path, tag: str = "latest", payload: bytes | None = None, layers: int = 1
) -> Image:
    """A valid single-platform image: unique content unless payload is given."""
    layout.mkdir(parents=True, exist_ok=True)
    blob_dir = layout / "blobs" / "sha256"
    blob_dir.mkdir(parents=True, exist_ok=True)
    blobs: dict[str, bytes] = {}

    def put(data: bytes) -> str:
        digest = sha256(data)
        (blob_dir / digest.split(":", 1)[1]).write_bytes(data)
        blobs[digest] = data
        return digest

    layer_descs, diff_ids = [], []
    for i in range(layers):
        content = payload if payload is not None else os.urandom(64)
        tar = _layer({f"file{i}.bin": content})
        diff_ids.append(sha256(gzip.decompress(tar)))
        layer_descs.append(
            {"mediaType": LAYER_TYPE, "digest": put(tar), "size": len(tar)}
        )
    config = json.dumps(
        {
            "architecture": "amd64",
            "os": "linux",
            "rootfs": {"type": "layers", "diff_ids": diff_ids},
            "config": {"Labels": {"zotlb.test": tag}},
        },
        sort_keys=True,
    ).encode()
    manifest = json.dumps(
        {
            "schemaVersion": 2,
            "mediaType": MANIFEST_TYPE,
            "config": {
                "mediaType": CONFIG_TYPE,
                "digest": put(config),
                "size": len(config),
            },
            "layers": layer_descs,
        },
        sort_keys=True,
    ).encode()
    manifest_digest = put(manifest)
    (layout / "oci-layout").write_text(json.dumps({"imageLayoutVersion": "1.0.0"}))
    index_path = layout / "index.json"
    index = {"schemaVersion": 2, "manifests": []}
    if index_path.exists():
        index = json.loads(index_path.read_text())
        index["manifests"] = [
            m
            for m in index["manifests"]
            if m.get("annotations", {}).get("org.opencontainers.image.ref.name") != tag
        ]
    index["manifests"].append(
        {
            "mediaType": MANIFEST_TYPE,
            "digest": manifest_digest,
            "size": len(manifest),
            "annotations": {"org.opencontainers.image.ref.name": tag},
        }
    )
    index_path.write_text(json.dumps(index))
    return Image(layout, tag, manifest_digest, manifest, blobs)


def layout_digest(layout: Path, tag: str) -> str:
    """The manifest digest a pulled layout holds for tag."""
    index = json.loads((layout / "index.json").read_text())
    for m in index["manifests"]:
        if m.get("annotations", {}).get("org.opencontainers.image.ref.name") == tag:
            return m["digest"]
    raise KeyError(tag)


if __name__ == "__main__":
    import sys

    built = build_image(
        Path(sys.argv[1]), sys.argv[2] if len(sys.argv) > 2 else "latest"
    )
    print(f"{built.ref} {built.manifest_digest}")
