"""The processes a bench run starts on loopback, each with a readiness poll."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parent.parent
SHARED_SECRET = "zotlb-bench-shared-secret"

# Tool -> the Debian package that provides it.
TOOLS = {
    "docker-registry": "docker-registry",
    "nginx": "nginx",
    "haproxy": "haproxy",
    "wrk": "wrk",
    "curl": "curl",
    "ab": "apache2-utils",
    "skopeo": "skopeo",
}


class BenchError(Exception):
    """A bench run that cannot go on: a tool missing, a service down, a bad answer."""


def find_tool(name: str) -> str | None:
    return shutil.which(name) or next(
        (p for p in (f"/usr/sbin/{name}", f"/sbin/{name}") if os.access(p, os.X_OK)),
        None,
    )


def missing_tools() -> list[str]:
    return [pkg for tool, pkg in TOOLS.items() if find_tool(tool) is None]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def http_status(url: str, method: str = "GET", timeout: float = 1.0) -> int | None:
    request = urllib.request.Request(url, method=method)
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            response.read()
            return int(response.status)
    except urllib.error.HTTPError as exc:
        return exc.code
    except OSError:
        return None


def wait_for(
    predicate: object,
    timeout: float,
    what: str,
    proc: subprocess.Popen[bytes] | None = None,
) -> None:
    """Poll a readiness condition; fail early when the process died."""
    assert callable(predicate)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise BenchError(f"{what}: the process exited with {proc.returncode}")
        if predicate():
            return
        time.sleep(0.02)
    raise BenchError(f"timed out after {timeout:.0f} s waiting for {what}")


def process_tree(pid: int) -> list[int]:
    """pid and all its descendants (nginx workers, zotlb workers)."""
    pids = [pid]
    for current in pids:
        try:
            for task in Path(f"/proc/{current}/task").iterdir():
                children = (task / "children").read_text().split()
                pids.extend(int(c) for c in children)
        except OSError:
            continue
    return pids


def pss_kib(pid: int) -> int:
    """Proportional set size: RSS with each shared page split among its sharers.

    Summed over forked workers it counts the pages they share once, where a
    sum of RSS would count them once per worker.
    """
    for path, key in (
        (f"/proc/{pid}/smaps_rollup", "Pss:"),
        (f"/proc/{pid}/status", "VmRSS:"),
    ):
        try:
            for line in Path(path).read_text().splitlines():
                if line.startswith(key):
                    return int(line.split()[1])
        except OSError:
            continue
    return 0


@dataclass
class Service:
    """One started process with its log file; stop() is safe to call twice."""

    name: str
    proc: subprocess.Popen[bytes]
    log: Path

    def pids(self) -> list[int]:
        return process_tree(self.proc.pid)

    def rss_kib(self) -> int:
        """Memory of the process and its children (PSS, summed)."""
        return sum(pss_kib(pid) for pid in self.pids())

    def stop(self, timeout: float = 15) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def _spawn(name: str, argv: list[str], workdir: Path, **kwargs: object) -> Service:
    log = workdir / f"{name}.log"
    with open(log, "ab") as out:
        proc = subprocess.Popen(
            argv,
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            **kwargs,  # type: ignore[call-overload]
        )
    return Service(name, proc, log)


def _tail(path: Path, lines: int = 20) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def _started(
    service: Service, what: str, predicate: object, timeout: float = 20
) -> Service:
    try:
        wait_for(predicate, timeout, what, service.proc)
    except BenchError as exc:
        service.stop()
        raise BenchError(f"{exc}\n{_tail(service.log)}") from None
    return service


# --- backends -------------------------------------------------------------------------


def start_registries(workdir: Path, count: int = 2) -> tuple[list[Service], list[int]]:
    """`count` distribution registries sharing one storage root and secret.

    Shared storage makes every backend hold every blob and upload session, so
    plain round-robin (HAProxy's) works for pushes too: the fair topology.
    """
    binary = find_tool("docker-registry")
    assert binary is not None
    storage = workdir / "registry-data"
    storage.mkdir(parents=True, exist_ok=True)
    services, ports = [], []
    for index in range(count):
        port = free_port()
        config = workdir / f"registry-{index}.yml"
        config.write_text(
            yaml.safe_dump(
                {
                    "version": 0.1,
                    "log": {"level": "error", "accesslog": {"disabled": True}},
                    "storage": {
                        "filesystem": {"rootdirectory": str(storage)},
                        "delete": {"enabled": True},
                        "maintenance": {"uploadpurging": {"enabled": False}},
                    },
                    "http": {"addr": f"127.0.0.1:{port}", "secret": SHARED_SECRET},
                }
            )
        )
        service = _spawn(f"registry-{index}", [binary, "serve", str(config)], workdir)
        services.append(service)
        ports.append(port)
    for service, port in zip(services, ports, strict=True):
        _started(
            service,
            f"registry on {port}",
            lambda p=port: http_status(f"http://127.0.0.1:{p}/v2/") == 200,
        )
    return services, ports


def write_static_tree(
    root: Path, repo: str, manifest: bytes, blobs: dict[str, Path | bytes]
) -> None:
    """A registry-like tree nginx serves as files: manifests by tag, blobs by digest."""
    (root / "v2" / repo / "manifests").mkdir(parents=True, exist_ok=True)
    (root / "v2" / repo / "blobs").mkdir(parents=True, exist_ok=True)
    (root / "v2" / repo / "manifests" / "latest").write_bytes(manifest)
    for digest, content in blobs.items():
        target = root / "v2" / repo / "blobs" / digest
        target.unlink(missing_ok=True)
        if isinstance(content, Path):
            # A hard link: the 1 GiB blob is on disk once.
            os.link(content, target)
        else:
            target.write_bytes(content)


def start_nginx(
    workdir: Path, root: Path, count: int = 2, workers: int = 2
) -> tuple[Service, list[int]]:
    """One nginx serving the static tree on `count` ports (one per backend)."""
    binary = find_tool("nginx")
    assert binary is not None
    ports = [free_port() for _ in range(count)]
    prefix = workdir / "nginx"
    (prefix / "tmp").mkdir(parents=True, exist_ok=True)
    listens = "\n".join(f"    listen 127.0.0.1:{p} reuseport;" for p in ports)
    # Workers of a root master run as `nobody` unless told otherwise; the
    # tree sits in a private temp dir.
    user = "user root;" if os.geteuid() == 0 else ""
    temp = prefix / "tmp"
    (prefix / "nginx.conf").write_text(
        f"""
daemon off;
{user}
worker_processes {workers};
pid {prefix}/nginx.pid;
error_log {prefix}/error.log error;
events {{ worker_connections 4096; }}
http {{
  access_log off;
  sendfile on;
  tcp_nopush on;
  keepalive_requests 1000000;
  keepalive_timeout 75s;
  client_body_temp_path {temp}/body;
  proxy_temp_path {temp}/proxy;
  fastcgi_temp_path {temp}/fastcgi;
  uwsgi_temp_path {temp}/uwsgi;
  scgi_temp_path {temp}/scgi;
  types {{ }}
  default_type application/octet-stream;
  server {{
{listens}
    root {root};
    add_header Docker-Distribution-API-Version registry/2.0 always;
    location = /v2/ {{
      default_type application/json;
      return 200 '{{}}';
    }}
    location ~ ^/v2/.+/manifests/ {{
      default_type application/vnd.oci.image.manifest.v1+json;
    }}
  }}
}}
"""
    )
    service = _spawn(
        "nginx",
        [
            binary,
            "-p",
            str(prefix),
            "-e",
            str(prefix / "error.log"),
            "-c",
            str(prefix / "nginx.conf"),
        ],
        workdir,
    )
    for port in ports:
        _started(
            service,
            f"nginx on {port}",
            lambda p=port: http_status(f"http://127.0.0.1:{p}/v2/") == 200,
        )
    return service, ports


# --- proxies --------------------------------------------------------------------------


def start_haproxy(
    workdir: Path, backend_ports: list[int], tag: str
) -> tuple[Service, int, int]:
    """HAProxy with two frontends: round-robin and `balance source`."""
    binary = find_tool("haproxy")
    assert binary is not None
    rr_port, source_port = free_port(), free_port()
    servers = "\n".join(
        f"  server b{i} 127.0.0.1:{port} check inter 2s"
        for i, port in enumerate(backend_ports)
    )
    config = workdir / f"haproxy-{tag}.cfg"
    config.write_text(
        f"""
global
  maxconn 8000
defaults
  mode http
  timeout connect 5s
  timeout client 300s
  timeout server 300s
  option http-keep-alive
frontend rr
  bind 127.0.0.1:{rr_port}
  default_backend rr
frontend source
  bind 127.0.0.1:{source_port}
  default_backend source
backend rr
  balance roundrobin
{servers}
backend source
  balance source
{servers}
"""
    )
    service = _spawn(f"haproxy-{tag}", [binary, "-db", "-f", str(config)], workdir)
    for port in (rr_port, source_port):
        _started(
            service,
            f"haproxy on {port}",
            lambda p=port: http_status(f"http://127.0.0.1:{p}/v2/") == 200,
        )
    return service, rr_port, source_port


@dataclass
class ZotlbService(Service):
    port: int = 0
    admin_port: int = 0
    workers: int = 1
    extra: dict[str, object] = field(default_factory=dict)


def start_zotlb(
    workdir: Path, backend_ports: list[int], tag: str, workers: int = 1
) -> ZotlbService:
    """zotlb from this checkout (not an installed copy), one process per worker."""
    port, admin_port = free_port(), free_port()
    config: dict[str, object] = {
        "listen": f"127.0.0.1:{port}",
        "mode": "active-active",
        "backends": [
            {"name": f"b{i}", "url": f"http://127.0.0.1:{p}"}
            for i, p in enumerate(backend_ports)
        ],
        "health": {"interval": "2s", "timeout": "1s"},
        # The backends share storage, as HAProxy's do: nothing to copy.
        "replication": {"mode": "off"},
        "admin": {"listen": f"127.0.0.1:{admin_port}"},
        # Like HAProxy here, no per-request log line; warnings still show.
        "log": {"level": "warning", "format": "json"},
    }
    if workers != 1:
        config["workers"] = workers
    path = workdir / f"zotlb-{tag}.yaml"
    path.write_text(yaml.safe_dump(config))
    env = {
        **os.environ,
        "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""),
    }
    log = workdir / f"zotlb-{tag}.log"
    with open(log, "ab") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "zotlb", "serve", "-c", str(path)],
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            cwd=REPO,
            env=env,
        )
    service = ZotlbService(
        f"zotlb-{tag}", proc, log, port=port, admin_port=admin_port, workers=workers
    )
    # The admin listener opens last, after every worker's proxy listener.
    _started(
        service,
        f"zotlb on {port}",
        lambda: (
            http_status(f"http://127.0.0.1:{admin_port}/status") == 200
            and http_status(f"http://127.0.0.1:{port}/v2/") == 200
        ),
        timeout=30,
    )
    return service


class RSSSampler:
    """Peak of the summed memory (PSS) of some processes, sampled every 20 ms."""

    def __init__(self, services: list[Service]) -> None:
        self.services = services
        self.peak: dict[str, int] = {s.name: 0 for s in services}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            for service in self.services:
                self.peak[service.name] = max(
                    self.peak[service.name], service.rss_kib()
                )
            self._stop.wait(0.02)

    def __enter__(self) -> RSSSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
