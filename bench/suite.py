"""The workloads, run against the backend directly, HAProxy and zotlb, and the targets."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from . import load
from .procs import (
    BenchError,
    RSSSampler,
    Service,
    find_tool,
    start_haproxy,
    start_nginx,
    start_registries,
    start_zotlb,
    write_static_tree,
)
from .report import Results, Target

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from ocilayout import CONFIG_TYPE, LAYER_TYPE, MANIFEST_TYPE, build_image, sha256

REPO_NAME = "bench/blob"
SMALL_REPO = "bench/small"
MIB = 1 << 20


@dataclass(frozen=True)
class Settings:
    mode: str
    runs: int
    blob_size: int
    chunk: int
    seconds: int
    connections: tuple[int, ...]
    flow_images: int
    count_requests: int
    workers: int


def settings(
    quick: bool, workers: int | None = None, runs: int | None = None
) -> Settings:
    cores = os.cpu_count() or 1
    if quick:
        base = Settings("quick", 1, 8 * MIB, 2 * MIB, 1, (32,), 2, 1000, cores)
    else:
        base = Settings(
            "full", 3, 1 << 30, 64 * MIB, 2, (1, 32, 128), 20, 10_000, cores
        )
    return Settings(
        base.mode,
        runs or base.runs,
        base.blob_size,
        base.chunk,
        base.seconds,
        base.connections,
        base.flow_images,
        base.count_requests,
        workers or base.workers,
    )


@dataclass
class Topology:
    """The three ways in to the same backends."""

    direct: str
    haproxy: str
    haproxy_source: str
    zotlb: str
    haproxy_service: Service
    zotlb_service: Service

    @property
    def bases(self) -> dict[str, str]:
        return {"direct": self.direct, "haproxy": self.haproxy, "zotlb": self.zotlb}


def _small_image() -> tuple[bytes, dict[str, bytes]]:
    config = b'{"architecture":"amd64","os":"linux","rootfs":{"type":"layers","diff_ids":[]}}'
    layer = b"bench small layer " * 64
    manifest = json.dumps(
        {
            "schemaVersion": 2,
            "mediaType": MANIFEST_TYPE,
            "config": {
                "mediaType": CONFIG_TYPE,
                "digest": sha256(config),
                "size": len(config),
            },
            "layers": [
                {"mediaType": LAYER_TYPE, "digest": sha256(layer), "size": len(layer)}
            ],
        }
    ).encode()
    return manifest, {sha256(config): config, sha256(layer): layer}


class Suite:
    def __init__(
        self, cfg: Settings, workdir: Path, log: Callable[[str], None]
    ) -> None:
        self.cfg = cfg
        self.workdir = workdir
        self.log = log
        self.results = Results(
            {
                "mode": cfg.mode,
                "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                "host": f"{platform.node()}, {os.cpu_count()} cores, {platform.platform()}",
                "python": platform.python_version(),
                "runs": cfg.runs,
                "blob_bytes": cfg.blob_size,
                "zotlb_workers": cfg.workers,
                "haproxy": _version([find_tool("haproxy") or "haproxy", "-v"]),
                "nginx": _version([find_tool("nginx") or "nginx", "-v"]),
            }
        )
        self.blob = workdir / "blob.bin"
        self.digest = ""

    # --- the whole run -------------------------------------------------------------

    def run(self) -> Results:
        started = time.monotonic()
        self.log(
            f"bench ({self.cfg.mode}): writing a {self.cfg.blob_size // MIB} MiB blob"
        )
        self.digest = load.make_blob(self.blob, self.cfg.blob_size)
        self._registry_phase()
        self._nginx_phase()
        self._targets()
        self.results.meta["wall_seconds"] = round(time.monotonic() - started, 1)
        return self.results

    def _registry_phase(self) -> None:
        registries, ports = start_registries(self.workdir / "registry")
        services: list[Service] = list(registries)
        try:
            topo = self._proxies(ports, "registry")
            services += [topo.haproxy_service, topo.zotlb_service]
            load.upload(topo.direct, REPO_NAME, self.blob, self.digest)
            manifest, blobs = _small_image()
            for digest, data in blobs.items():
                path = self.workdir / "small.bin"
                path.write_bytes(data)
                load.upload(topo.direct, SMALL_REPO, path, digest)
            load.put_manifest(topo.direct, SMALL_REPO, "latest", manifest)

            self._download(topo, "registry", memory=True)
            self._upload(topo)
            self._small(topo, "registry")
            self._memory_growth(topo)
            self._flow(topo)
        finally:
            for service in reversed(services):
                service.stop()

    def _nginx_phase(self) -> None:
        root = self.workdir / "static"
        manifest, blobs = _small_image()
        write_static_tree(root, SMALL_REPO, manifest, dict(blobs))
        write_static_tree(root, REPO_NAME, manifest, {self.digest: self.blob})
        nginx, ports = start_nginx(self.workdir / "nginx", root)
        services: list[Service] = [nginx]
        try:
            topo = self._proxies(ports, "nginx")
            services += [topo.haproxy_service, topo.zotlb_service]
            self._download(topo, "nginx", memory=False)
            self._small(topo, "nginx")
            self._paced(topo)
        finally:
            for service in reversed(services):
                service.stop()

    def _proxies(self, ports: list[int], tag: str) -> Topology:
        workdir = self.workdir / tag
        workdir.mkdir(parents=True, exist_ok=True)
        haproxy, rr_port, source_port = start_haproxy(workdir, ports, tag)
        try:
            zotlb = start_zotlb(workdir, ports, tag, workers=self.cfg.workers)
        except BenchError:
            haproxy.stop()
            raise
        self.log(
            f"{tag}: backends {ports}, haproxy :{rr_port}/:{source_port}, zotlb :{zotlb.port} x{self.cfg.workers}"
        )
        return Topology(
            f"http://127.0.0.1:{ports[0]}",
            f"http://127.0.0.1:{rr_port}",
            f"http://127.0.0.1:{source_port}",
            f"http://127.0.0.1:{zotlb.port}",
            haproxy,
            zotlb,
        )

    # --- 1. blob download ------------------------------------------------------------

    def _download(self, topo: Topology, backend: str, memory: bool) -> None:
        size = self.cfg.blob_size // MIB
        single = self.results.figure(
            f"download.{backend}.1",
            f"download {size} MiB, 1 stream ({backend})",
            "MB/s",
        )
        four = self.results.figure(
            f"download.{backend}.4",
            f"download {size} MiB, 4 streams ({backend})",
            "MB/s",
        )
        peak = self.results.figure(
            "memory.peak_rss.download", "peak RSS, downloads (4 streams)", "MiB", False
        )
        path = f"/v2/{REPO_NAME}/blobs/{self.digest}"
        for run in range(self.cfg.runs):
            for name, base in topo.bases.items():
                single.add(name, load.download([base + path]))
                sampler = self._sampler(topo, name) if memory else None
                if sampler is not None:
                    with sampler:
                        four.add(name, load.download([base + path] * 4))
                    peak.add(name, sampler.peak[sampler.services[0].name] / 1024)
                else:
                    four.add(name, load.download([base + path] * 4))
            self.log(f"download {backend} run {run + 1}: " + _brief(single, four))

    def _sampler(self, topo: Topology, name: str) -> RSSSampler | None:
        service = {"haproxy": topo.haproxy_service, "zotlb": topo.zotlb_service}.get(
            name
        )
        return RSSSampler([service]) if service is not None else None

    # --- 2. blob upload ----------------------------------------------------------------

    def _upload(self, topo: Topology) -> None:
        size = self.cfg.blob_size // MIB
        mono = self.results.figure(
            "upload.monolithic", f"upload {size} MiB, monolithic PUT (registry)", "MB/s"
        )
        chunked = self.results.figure(
            "upload.chunked",
            f"upload {size} MiB, PATCH {self.cfg.chunk // MIB} MiB chunks (registry)",
            "MB/s",
        )
        peak = self.results.figure(
            "memory.peak_rss.upload", "peak RSS, uploads", "MiB", False
        )
        for run in range(self.cfg.runs):
            for name, base in topo.bases.items():
                sampler = self._sampler(topo, name)
                with sampler or _nothing():
                    mono.add(name, load.upload(base, REPO_NAME, self.blob, self.digest))
                    chunked.add(
                        name,
                        load.upload(
                            base, REPO_NAME, self.blob, self.digest, self.cfg.chunk
                        ),
                    )
                if sampler is not None:
                    peak.add(name, sampler.peak[sampler.services[0].name] / 1024)
            self.log(f"upload run {run + 1}: " + _brief(mono, chunked))

    # --- 3. small requests -----------------------------------------------------------

    def _small(self, topo: Topology, backend: str) -> None:
        requests = [
            ("GET", "/v2/", "GET /v2/"),
            ("HEAD", f"/v2/{SMALL_REPO}/manifests/latest", "HEAD manifest"),
        ]
        for method, path, label in requests:
            slug = "get_v2" if method == "GET" else "head_manifest"
            for conns in self.cfg.connections:
                key = f"small.{backend}.{slug}.c{conns}"
                rps = self.results.figure(
                    f"{key}.rps", f"{label}, {conns} conn ({backend})", "req/s"
                )
                p50 = self.results.figure(
                    f"{key}.p50", f"{label}, {conns} conn, p50 ({backend})", "ms", False
                )
                p99 = self.results.figure(
                    f"{key}.p99", f"{label}, {conns} conn, p99 ({backend})", "ms", False
                )
                for _ in range(self.cfg.runs):
                    for name, base in topo.bases.items():
                        result = load.ab(
                            base + path, conns, self.cfg.seconds, method, self.workdir
                        )
                        if result.errors:
                            raise BenchError(
                                f"{label} via {name}: {result.errors} failed requests"
                            )
                        rps.add(name, result.rps)
                        p50.add(name, result.p50_ms)
                        p99.add(name, result.p99_ms)
                self.log(f"{label} {backend} c{conns}: " + _brief(rps))

    def _paced(self, topo: Topology) -> None:
        """p99 at half of zotlb's peak GET /v2/ rate, the same rate for all three."""
        peaks = [
            self.results.figures[f"small.nginx.get_v2.c{c}.rps"].median("zotlb") or 0.0
            for c in self.cfg.connections
        ]
        rate = max(peaks) / 2
        self.results.meta["paced_rate_per_s"] = round(rate)
        p99 = self.results.figure(
            "latency.nginx.half_peak.p99",
            f"GET /v2/ p99 at {rate:.0f} req/s (nginx)",
            "ms",
            False,
        )
        got = self.results.figure(
            "latency.nginx.half_peak.rps",
            f"GET /v2/ rate reached, paced at {rate:.0f}/s (nginx)",
            "req/s",
        )
        for _ in range(self.cfg.runs):
            for name, base in topo.bases.items():
                result = load.wrk_paced(
                    base + "/v2/", rate, self.cfg.seconds * 2, self.workdir
                )
                p99.add(name, result.p99_ms)
                got.add(name, result.rps)
        added = self.results.figure(
            "latency.nginx.half_peak.p99_added",
            "p99 added over direct at half peak (nginx)",
            "ms",
            False,
        )
        for name in ("haproxy", "zotlb"):
            for value, direct in zip(
                p99.values[name], p99.values["direct"], strict=True
            ):
                added.add(name, value - direct)
        self.log(f"paced at {rate:.0f}/s: p99 " + _brief(p99))

    # --- 4. memory: no growth after many requests ------------------------------------

    def _memory_growth(self, topo: Topology) -> None:
        after = self.results.figure(
            "memory.rss_after_requests",
            f"RSS after {self.cfg.count_requests} more requests",
            "MiB",
            False,
        )
        growth = self.results.figure(
            "memory.rss_growth",
            f"RSS growth over {self.cfg.count_requests} requests",
            "MiB",
            False,
        )
        targets = [
            ("GET", "/v2/"),
            ("HEAD", f"/v2/{SMALL_REPO}/manifests/latest"),
            ("GET", f"/v2/{SMALL_REPO}/manifests/latest"),
        ]
        for name, service in (
            ("haproxy", topo.haproxy_service),
            ("zotlb", topo.zotlb_service),
        ):
            base = topo.bases[name]
            # One round to warm caches and pools, then the one that counts.
            load.ab_count(base, self.cfg.count_requests, targets)
            before = service.rss_kib()
            load.ab_count(base, self.cfg.count_requests, targets)
            now = service.rss_kib()
            after.add(name, now / 1024)
            growth.add(name, (now - before) / 1024)
        self.log("memory: " + _brief(after, growth))

    # --- 5. a full registry flow with skopeo ------------------------------------------

    def _flow(self, topo: Topology) -> None:
        wall = self.results.figure(
            "flow.skopeo",
            f"{self.cfg.flow_images} skopeo pushes + pulls (registry)",
            "s",
            False,
        )
        ways = {**topo.bases, "haproxy_source": topo.haproxy_source}
        for run in range(self.cfg.runs):
            for name, base in ways.items():
                wall.add(name, self._skopeo_flow(base, f"{name}-{run}"))
            self.log(f"skopeo flow run {run + 1}: " + _brief(wall))

    def _skopeo_flow(self, base: str, tag: str) -> float:
        host = base.removeprefix("http://")
        images = [
            build_image(
                self.workdir / "images" / f"{tag}-{i}",
                "v1",
                payload=f"{tag}-{i}".encode() * 100,
            )
            for i in range(self.cfg.flow_images)
        ]
        started = time.monotonic()
        for i, image in enumerate(images):
            _skopeo(
                "copy",
                "--dest-tls-verify=false",
                image.ref,
                f"docker://{host}/flow/{tag}-{i}:v1",
            )
        pulled = self.workdir / "pulled"
        pulled.mkdir(exist_ok=True)
        for i in range(len(images)):
            dest = pulled / f"{tag}-{i}"
            _skopeo(
                "copy",
                "--src-tls-verify=false",
                f"docker://{host}/flow/{tag}-{i}:v1",
                f"oci:{dest}:v1",
            )
        return time.monotonic() - started

    # --- targets ---------------------------------------------------------------------

    def _targets(self) -> None:
        r = self.results
        for n in ("1", "4"):
            label = "1 stream" if n == "1" else "4 streams"
            r.evaluate(
                Target(
                    f"blob download, {label}: zotlb >= HAProxy",
                    f"download.registry.{n}",
                    "zotlb/haproxy",
                    ">=",
                    1.0,
                )
            )
            r.evaluate(
                Target(
                    f"blob download, {label}: zotlb >= 0.85 x direct",
                    f"download.registry.{n}",
                    "zotlb/direct",
                    ">=",
                    0.85,
                )
            )
        r.evaluate(
            Target(
                "blob upload, monolithic: zotlb >= HAProxy",
                "upload.monolithic",
                "zotlb/haproxy",
                ">=",
                1.0,
            )
        )
        r.evaluate(
            Target(
                "blob upload, chunked: zotlb >= HAProxy",
                "upload.chunked",
                "zotlb/haproxy",
                ">=",
                1.0,
            )
        )
        for slug, label in (("get_v2", "GET /v2/"), ("head_manifest", "HEAD manifest")):
            peak = self._peak_figure("nginx", slug)
            r.evaluate(
                Target(
                    f"small requests (nginx), {label}, peak req/s: zotlb >= 0.5 x HAProxy",
                    peak,
                    "zotlb/haproxy",
                    ">=",
                    0.5,
                )
            )
        r.evaluate(
            Target(
                "p99 added by zotlb at half its peak rate (nginx)",
                "latency.nginx.half_peak.p99_added",
                "zotlb",
                "<",
                2.0,
            )
        )
        for slug, label in (("get_v2", "GET /v2/"), ("head_manifest", "HEAD manifest")):
            peak = self._peak_figure("registry", slug)
            r.evaluate(
                Target(
                    f"small requests (registry), {label}, peak req/s: zotlb >= 0.95 x direct",
                    peak,
                    "zotlb/direct",
                    ">=",
                    0.95,
                )
            )
        r.evaluate(
            Target(
                "peak RSS streaming 4 downloads (MiB)",
                "memory.peak_rss.download",
                "zotlb",
                "<",
                100,
            )
        )
        r.evaluate(
            Target(
                "peak RSS during uploads (MiB)",
                "memory.peak_rss.upload",
                "zotlb",
                "<",
                100,
            )
        )
        r.evaluate(
            Target(
                f"RSS growth over {self.cfg.count_requests} requests (MiB)",
                "memory.rss_growth",
                "zotlb",
                "<",
                1.0,
            )
        )

    def _peak_figure(self, backend: str, slug: str) -> str:
        """The connection count where zotlb's rate peaked."""
        keys = [f"small.{backend}.{slug}.c{c}.rps" for c in self.cfg.connections]
        return max(keys, key=lambda k: self.results.figures[k].median("zotlb") or 0.0)


class _nothing:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        return None


def _skopeo(*args: str) -> None:
    skopeo = find_tool("skopeo")
    assert skopeo is not None
    result = subprocess.run(
        [skopeo, "--insecure-policy", *args],
        capture_output=True,
        text=True,
        timeout=120,
    )
    if result.returncode != 0:
        raise BenchError(f"skopeo {' '.join(args)}: {result.stderr.strip()}")


def _version(argv: list[str]) -> str:
    try:
        result = subprocess.run(argv, capture_output=True, text=True, timeout=10)
    except OSError:
        return "?"
    return (
        (result.stdout or result.stderr).splitlines()[0].strip()
        if (result.stdout or result.stderr)
        else "?"
    )


def _brief(*figures: object) -> str:
    parts = []
    for fig in figures:
        values = getattr(fig, "values", {})
        last = {k: f"{v[-1]:.3g}" for k, v in values.items()}
        parts.append(f"{getattr(fig, 'key', '?')} {last}")
    return "; ".join(parts)
