"""Real parts on loopback: distribution registries, zotlb itself, real clients."""

from __future__ import annotations

import json
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml

sys.path.insert(0, str(Path(__file__).parent))

from ocilayout import Image, build_image, layout_digest

REGISTRY_BIN = shutil.which("docker-registry")
SKOPEO = shutil.which("skopeo")
PODMAN = shutil.which("podman")
SHARED_SECRET = "zotlb-test-shared-secret"
BLOB_INFO_CACHE = Path("/var/lib/containers/cache")

needs_registry = pytest.mark.skipif(
    REGISTRY_BIN is None,
    reason="docker-registry is not installed (apt-get install docker-registry)",
)
needs_skopeo = pytest.mark.skipif(SKOPEO is None, reason="skopeo is not installed")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until(predicate: Any, timeout: float, what: str, step: float = 0.02) -> None:
    """Poll a readiness condition (a port answering, a state reached)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(step)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def http(
    method: str,
    url: str,
    headers: dict[str, str] | None = None,
    data: bytes | None = None,
    timeout: float = 10,
) -> tuple[int, dict[str, str], bytes]:
    req = urllib.request.Request(url, method=method, headers=headers or {}, data=data)
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return resp.status, dict(resp.headers.items()), resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, dict(exc.headers.items()), exc.read()


# --- registries ---------------------------------------------------------------------


@dataclass
class Registry:
    name: str
    port: int
    root: Path
    config: Path
    proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def hostport(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self) -> Registry:
        assert REGISTRY_BIN is not None
        log = open(self.root / "registry.log", "ab")
        self.proc = subprocess.Popen(
            [REGISTRY_BIN, "serve", str(self.config)], stdout=log, stderr=log
        )
        log.close()
        wait_until(self.is_ready, 15, f"registry {self.name} on {self.port}")
        return self

    def is_ready(self) -> bool:
        if self.proc is not None and self.proc.poll() is not None:
            raise AssertionError(f"registry {self.name} exited: {self.proc.returncode}")
        try:
            return http("GET", self.url + "/v2/", timeout=1)[0] == 200
        except OSError:
            return False

    def kill(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait()

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.kill()

    def has_manifest(self, repo: str, ref: str) -> bool:
        status, _, _ = http(
            "HEAD",
            f"{self.url}/v2/{repo}/manifests/{ref}",
            headers={"Accept": "application/vnd.oci.image.manifest.v1+json"},
        )
        return status == 200


def make_registry(root: Path, name: str, port: int | None = None) -> Registry:
    root.mkdir(parents=True, exist_ok=True)
    port = port or free_port()
    config = root / "config.yml"
    config.write_text(
        yaml.safe_dump(
            {
                "version": 0.1,
                "log": {"level": "error", "accesslog": {"disabled": True}},
                "storage": {
                    "filesystem": {"rootdirectory": str(root / "data")},
                    "delete": {"enabled": True},
                },
                "http": {"addr": f"127.0.0.1:{port}", "secret": SHARED_SECRET},
            }
        )
    )
    return Registry(name, port, root, config)


@pytest.fixture
def registry_factory(tmp_path: Path) -> Iterator[Any]:
    started: list[Registry] = []

    def factory(name: str) -> Registry:
        if REGISTRY_BIN is None:
            pytest.skip("docker-registry is not installed")
        reg = make_registry(tmp_path / f"registry-{name}", name).start()
        started.append(reg)
        return reg

    yield factory
    for reg in started:
        reg.stop()


@pytest.fixture
def registries(registry_factory: Any) -> tuple[Registry, Registry]:
    return registry_factory("a"), registry_factory("b")


# --- zotlb -------------------------------------------------------------------------------


@dataclass
class Zotlb:
    config_path: Path
    port: int
    admin_port: int
    proc: subprocess.Popen[str]
    lines: list[str] = field(default_factory=list)
    started: threading.Event = field(default_factory=threading.Event)
    _reader: threading.Thread | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def hostport(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def admin(self) -> str:
        return f"http://127.0.0.1:{self.admin_port}"

    def _read(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self.lines.append(line)
            if '"server.started"' in line:
                self.started.set()

    def events(self, name: str | None = None) -> list[dict[str, Any]]:
        out = []
        for line in list(self.lines):
            try:
                event = json.loads(line)
            except ValueError:
                continue
            if name is None or event.get("event") == name:
                out.append(event)
        return out

    def status(self) -> dict[str, Any]:
        return json.loads(http("GET", self.admin + "/status")[2])

    def backend_state(self, name: str) -> str:
        return next(b["state"] for b in self.status()["backends"] if b["name"] == name)

    def peak_rss_kib(self) -> int:
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
        raise AssertionError("no VmHWM")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 20) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self._reader:
            self._reader.join(5)
        if self.proc.stderr is not None:
            self.proc.stderr.close()
        return self.proc.returncode


def lb_config(backends: list[Registry], **overrides: Any) -> dict[str, Any]:
    cfg: dict[str, Any] = {
        "listen": f"127.0.0.1:{free_port()}",
        "mode": "active-active",
        "backends": [{"name": r.name, "url": r.url} for r in backends],
        "health": {"interval": "200ms", "timeout": "500ms", "rise": 2, "fall": 2},
        "timeouts": {"connect": "1s", "read": "30s", "shutdown_grace": "10s"},
        "admin": {"listen": f"127.0.0.1:{free_port()}"},
        "log": {"level": "info", "format": "json"},
    }
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(cfg.get(key), dict):
            cfg[key] = {**cfg[key], **value}
        else:
            cfg[key] = value
    return cfg


def start_zotlb(tmp_path: Path, cfg: dict[str, Any], name: str = "lb.yaml") -> Zotlb:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(cfg))
    proc = subprocess.Popen(
        [sys.executable, "-m", "zotlb", "serve", "-c", str(path)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    listen = cfg["listen"]
    if isinstance(listen, dict):  # `listen: {address: ..., tls: ...}`
        listen = listen["address"]
    lb = Zotlb(
        path,
        int(listen.rsplit(":", 1)[1]),
        int(cfg["admin"]["listen"].rsplit(":", 1)[1]),
        proc,
    )
    lb._reader = threading.Thread(target=lb._read, daemon=True)
    lb._reader.start()
    if not lb.started.wait(15):
        lb.stop(signal.SIGKILL)
        raise AssertionError("zotlb did not start:\n" + "".join(lb.lines))
    return lb


@pytest.fixture
def zotlb_factory(tmp_path: Path) -> Iterator[Any]:
    started: list[Zotlb] = []

    def factory(backends: list[Registry], **overrides: Any) -> Zotlb:
        lb = start_zotlb(
            tmp_path, lb_config(backends, **overrides), f"lb{len(started)}.yaml"
        )
        started.append(lb)
        return lb

    yield factory
    for lb in started:
        lb.stop()


# --- clients -----------------------------------------------------------------------------


def _clear_blob_info_cache() -> None:
    # skopeo remembers where it saw blobs; a stale memory from another run
    # would make it try mounts the test did not ask for.
    for f in BLOB_INFO_CACHE.glob("blob-info-cache*"):
        f.unlink(missing_ok=True)


def skopeo(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    assert SKOPEO is not None
    _clear_blob_info_cache()
    return subprocess.run(
        [SKOPEO, "--insecure-policy", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def push(image: Image, dest: str) -> subprocess.CompletedProcess[str]:
    return skopeo(
        "copy",
        "--preserve-digests",
        "--dest-tls-verify=false",
        "--retry-times=0",
        image.ref,
        f"docker://{dest}",
    )


def pull(src: str, layout: Path, tag: str) -> str:
    """Pull src into an OCI layout and return the manifest digest it holds."""
    result = skopeo(
        "copy",
        "--preserve-digests",
        "--src-tls-verify=false",
        "--retry-times=0",
        f"docker://{src}",
        f"oci:{layout}:{tag}",
    )
    assert result.returncode == 0, result.stderr
    return layout_digest(layout, tag)


@pytest.fixture
def image_factory(tmp_path: Path) -> Any:
    counter = iter(range(10_000))

    def factory(tag: str = "latest", **kwargs: Any) -> Image:
        return build_image(tmp_path / f"image-{next(counter)}", tag, **kwargs)

    return factory


__all__ = ["Image", "build_image", "layout_digest"]
