"""The load: curl for downloads, a sendfile client for uploads, wrk for request rates."""

from __future__ import annotations

import hashlib
import os
import re
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO
from urllib.parse import urlsplit

from .procs import BenchError, find_tool

MANIFEST_TYPE = "application/vnd.oci.image.manifest.v1+json"


# --- blobs on disk --------------------------------------------------------------------


def make_blob(path: Path, size: int) -> str:
    """Write `size` pseudo-random bytes and return their sha256 digest."""
    digest = hashlib.sha256()
    block = os.urandom(1 << 20)
    remaining = size
    counter = 0
    with open(path, "wb") as out:
        while remaining:
            # Each MiB differs, so nothing downstream can dedupe or compress.
            chunk = (counter.to_bytes(8, "big") + block[8:])[:remaining]
            out.write(chunk)
            digest.update(chunk)
            remaining -= len(chunk)
            counter += 1
    return "sha256:" + digest.hexdigest()


# --- downloads: curl --------------------------------------------------------------------


def download(urls: list[str]) -> float:
    """GET every URL at once with curl, discarding the bodies: MB/s over all."""
    curl = find_tool("curl")
    assert curl is not None
    started = time.monotonic()
    procs = [
        subprocess.Popen(
            [
                curl,
                "-sS",
                "-o",
                "/dev/null",
                "-w",
                "%{http_code} %{size_download}",
                url,
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for url in urls
    ]
    total = 0
    for proc, url in zip(procs, urls, strict=True):
        out, err = proc.communicate(timeout=600)
        status, _, size = out.partition(" ")
        if proc.returncode != 0 or status != "200":
            raise BenchError(
                f"GET {url}: curl exit {proc.returncode}, status {status}: {err}"
            )
        total += int(size)
    elapsed = time.monotonic() - started
    return total / elapsed / 1e6


# --- uploads: raw HTTP with sendfile (the client stays cheap) ------------------------


class _Conn:
    """One keep-alive HTTP/1.1 connection; bodies go with os.sendfile."""

    def __init__(self, base: str) -> None:
        parts = urlsplit(base)
        self.host = parts.netloc
        self.sock = socket.create_connection(
            (parts.hostname, parts.port or 80), timeout=300
        )
        self.reader = self.sock.makefile("rb")

    def close(self) -> None:
        self.reader.close()
        self.sock.close()

    def request(
        self,
        method: str,
        target: str,
        headers: dict[str, str] | None = None,
        body: BinaryIO | None = None,
        offset: int = 0,
        count: int = 0,
    ) -> tuple[int, dict[str, str]]:
        lines = [
            f"{method} {target} HTTP/1.1",
            f"Host: {self.host}",
            f"Content-Length: {count}",
        ]
        lines += [f"{k}: {v}" for k, v in (headers or {}).items()]
        self.sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode())
        if count:
            assert body is not None
            # socket.sendfile: os.sendfile, zero-copy, minding the timeout.
            if self.sock.sendfile(body, offset, count) != count:
                raise BenchError(f"{method} {target}: the file ended early")
        return self._response(method)

    def _response(self, method: str) -> tuple[int, dict[str, str]]:
        status_line = self.reader.readline()
        if not status_line:
            raise BenchError("the server closed the connection")
        status = int(status_line.split()[1])
        headers: dict[str, str] = {}
        while line := self.reader.readline().decode("latin-1").rstrip("\r\n"):
            key, _, value = line.partition(":")
            headers[key.strip().lower()] = value.strip()
        if method == "HEAD" or status in (204, 304):
            return status, headers
        if headers.get("transfer-encoding", "").lower() == "chunked":
            while size := int(self.reader.readline().split(b";")[0], 16):
                self.reader.read(size + 2)
            self.reader.readline()
        else:
            self.reader.read(int(headers.get("content-length", "0")))
        return status, headers


def _target(location: str) -> str:
    parts = urlsplit(location)
    return parts.path + (f"?{parts.query}" if parts.query else "")


def upload(
    base: str, repo: str, path: Path, digest: str, chunk: int | None = None
) -> float:
    """Push one blob: POST, then one PUT (monolithic) or PATCHes and a PUT: MB/s."""
    size = path.stat().st_size
    conn = _Conn(base)
    started = time.monotonic()
    try:
        with open(path, "rb") as blob:
            status, headers = conn.request("POST", f"/v2/{repo}/blobs/uploads/")
            if status != 202:
                raise BenchError(f"POST upload via {base}: {status}")
            location = _target(headers["location"])
            octets = {"Content-Type": "application/octet-stream"}
            if chunk:
                for offset in range(0, size, chunk):
                    count = min(chunk, size - offset)
                    status, headers = conn.request(
                        "PATCH",
                        location,
                        {**octets, "Content-Range": f"{offset}-{offset + count - 1}"},
                        blob,
                        offset,
                        count,
                    )
                    if status != 202:
                        raise BenchError(f"PATCH via {base}: {status}")
                    location = _target(headers["location"])
                sep = "&" if "?" in location else "?"
                status, _ = conn.request("PUT", f"{location}{sep}digest={digest}")
            else:
                sep = "&" if "?" in location else "?"
                status, _ = conn.request(
                    "PUT", f"{location}{sep}digest={digest}", octets, blob, 0, size
                )
            if status != 201:
                raise BenchError(f"PUT upload via {base}: {status}")
    finally:
        conn.close()
    return size / (time.monotonic() - started) / 1e6


def put_manifest(base: str, repo: str, tag: str, manifest: bytes) -> None:
    conn = _Conn(base)
    try:
        with open(_spool(manifest), "rb") as body:
            status, _ = conn.request(
                "PUT",
                f"/v2/{repo}/manifests/{tag}",
                {"Content-Type": MANIFEST_TYPE},
                body,
                0,
                len(manifest),
            )
    finally:
        conn.close()
    if status != 201:
        raise BenchError(f"PUT manifest {repo}:{tag} via {base}: {status}")


def _spool(data: bytes) -> str:
    import tempfile

    with tempfile.NamedTemporaryFile(delete=False) as out:
        out.write(data)
    return out.name


# --- request rates: ab (HEAD included) and wrk (paced, counted) ------------------


@dataclass
class RateResult:
    rps: float
    p50_ms: float
    p99_ms: float
    requests: int
    errors: int


def ab(
    url: str, connections: int, seconds: float, method: str, workdir: Path
) -> RateResult:
    """ApacheBench with keep-alive; it handles HEAD, which wrk cannot parse."""
    binary = find_tool("ab")
    assert binary is not None
    csv = workdir / f"ab-{os.getpid()}.csv"
    argv = [
        binary,
        "-q",
        "-k",
        "-c",
        str(connections),
        "-t",
        str(max(1, round(seconds))),
        "-n",
        "100000000",
        "-s",
        "10",
        "-e",
        str(csv),
        "-H",
        f"Accept: {MANIFEST_TYPE}",
    ]
    if method == "HEAD":
        argv.append("-i")
    argv.append(url)
    result = subprocess.run(argv, capture_output=True, text=True, timeout=seconds + 60)
    out = result.stdout
    if result.returncode != 0:
        raise BenchError(
            f"ab {method} {url}: exit {result.returncode}: {result.stderr or out}"
        )
    rps = re.search(r"Requests per second:\s+([\d.]+)", out)
    done = re.search(r"Complete requests:\s+(\d+)", out)
    failed = re.search(r"Failed requests:\s+(\d+)", out)
    non2xx = re.search(r"Non-2xx responses:\s+(\d+)", out)
    pct = dict(line.split(",") for line in csv.read_text().splitlines()[1:])
    if not (rps and done):
        raise BenchError(f"cannot read ab output for {url}:\n{out}")
    errors = (int(failed.group(1)) if failed else 0) + (
        int(non2xx.group(1)) if non2xx else 0
    )
    return RateResult(
        float(rps.group(1)),
        float(pct["50"]),
        float(pct["99"]),
        int(done.group(1)),
        errors,
    )


_UNITS = {"us": 0.001, "ms": 1.0, "s": 1000.0, "m": 60_000.0}


def _latency_ms(text: str) -> float:
    match = re.fullmatch(r"([\d.]+)(us|ms|s|m)", text)
    if not match:
        raise BenchError(f"cannot read wrk latency {text!r}")
    return float(match.group(1)) * _UNITS[match.group(2)]


def wrk_paced(url: str, rate: float, seconds: float, workdir: Path) -> RateResult:
    """GET at about `rate` requests/s: each connection waits 10 ms between requests."""
    binary = find_tool("wrk")
    assert binary is not None
    delay_ms = 10
    connections = max(1, round(rate * delay_ms / 1000))
    script = workdir / "wrk-paced.lua"
    script.write_text(f"function delay() return {delay_ms} end\n")
    threads = 1 if connections < 4 else 2
    argv = [
        binary,
        "-t",
        str(threads),
        "-c",
        str(connections),
        "-d",
        f"{max(1, round(seconds))}s",
        "--latency",
        "--timeout",
        "10s",
        "-s",
        str(script),
        url,
    ]
    result = subprocess.run(argv, capture_output=True, text=True, timeout=seconds + 60)
    out = result.stdout
    if result.returncode != 0:
        raise BenchError(f"wrk {url}: exit {result.returncode}: {result.stderr or out}")
    rps = re.search(r"Requests/sec:\s+([\d.]+)", out)
    p50 = re.search(r"^\s+50%\s+(\S+)", out, re.M)
    p99 = re.search(r"^\s+99%\s+(\S+)", out, re.M)
    total = re.search(r"(\d+) requests in", out)
    if not (rps and p50 and p99 and total):
        raise BenchError(f"cannot read wrk output for {url}:\n{out}")
    bad = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    return RateResult(
        float(rps.group(1)),
        _latency_ms(p50.group(1)),
        _latency_ms(p99.group(1)),
        int(total.group(1)),
        int(bad.group(1)) if bad else 0,
    )


def ab_count(base: str, requests: int, targets: list[tuple[str, str]]) -> None:
    """Exactly `requests` requests over 8 keep-alive connections, split over targets."""
    binary = find_tool("ab")
    assert binary is not None
    share = requests // len(targets)
    for method, path in targets:
        argv = [
            binary,
            "-q",
            "-k",
            "-c",
            "8",
            "-n",
            str(share),
            "-s",
            "10",
            "-H",
            f"Accept: {MANIFEST_TYPE}",
        ]
        if method == "HEAD":
            argv.append("-i")
        result = subprocess.run(
            argv + [base + path], capture_output=True, text=True, timeout=300
        )
        done = re.search(r"Complete requests:\s+(\d+)", result.stdout)
        if (
            result.returncode != 0
            or not done
            or int(done.group(1)) != share
            or "Non-2xx" in result.stdout
        ):
            raise BenchError(
                f"ab {method} {base}{path} failed:\n{result.stdout}{result.stderr}"
            )
