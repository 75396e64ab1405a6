"""Write-through replication: every push and delete, copied to the other backends.

The copier moves one image (or one delete) from a source backend to a target
backend with plain registry API calls, streaming blobs and keeping manifest
bytes exact so digests match. The replicator decides what to copy (after a
manifest PUT or DELETE through the proxy), keeps it in the durable queue, and
runs the queue against the peers that are up.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import random
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from typing import Any

import aiohttp
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from yarl import URL

from .backends import Backend, Pool, State
from .config import ReplicationConfig
from .logs import get as get_logger
from .queue import Job, JobQueue, Op, QueueFull, QueueUnusable
from .routing import Kind, Route

log = get_logger("zotlb.replication")

# A manifest PUT body zotlb keeps while relaying it; bigger ones are fetched
# back from the home backend by digest.
MANIFEST_CAPTURE_LIMIT = 4 * 1024 * 1024
INDEX_TYPES = frozenset(
    {
        "application/vnd.oci.image.index.v1+json",
        "application/vnd.docker.distribution.manifest.list.v2+json",
    }
)
MANIFEST_ACCEPT = ", ".join(
    [
        "application/vnd.oci.image.manifest.v1+json",
        "application/vnd.oci.image.index.v1+json",
        "application/vnd.docker.distribution.manifest.v2+json",
        "application/vnd.docker.distribution.manifest.list.v2+json",
        "application/vnd.oci.artifact.manifest.v1+json",
    ]
)
_CHUNK = 256 * 1024
# Source failures: unreachable (wait for it, however long) or answering 404
# (the image went away: give up after a few tries rather than block the lane).
SOURCE_DOWN = "source_down"
SOURCE_MISSING = "source_missing"
MISSING_ATTEMPTS = 5
_LAG_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 3600)


class ReplicationFailed(Exception):
    """One copy or delete that did not complete; `cause` labels the metric."""

    def __init__(self, cause: str, message: str, permanent: bool = False) -> None:
        super().__init__(message)
        self.cause = cause
        self.permanent = permanent


class ReplicationMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        r = registry
        self.lag = Histogram(
            "zotlb_replication_lag_seconds",
            "Time from a write acknowledged to the client to the same write "
            "present on a peer.",
            ["peer", "op"],
            buckets=_LAG_BUCKETS,
            registry=r,
        )
        self.queue_length = Gauge(
            "zotlb_replication_queue_length",
            "Replication jobs waiting or running.",
            registry=r,
        )
        self.copied_bytes = Counter(
            "zotlb_replication_copied_bytes_total",
            "Blob and manifest bytes copied to each peer.",
            ["peer"],
            registry=r,
        )
        self.jobs = Counter(
            "zotlb_replication_jobs_total",
            "Replication jobs finished, by peer, operation and result.",
            ["peer", "op", "result"],
            registry=r,
        )
        self.failures = Counter(
            "zotlb_replication_failures_total",
            "Failed replication attempts, by peer and cause.",
            ["peer", "cause"],
            registry=r,
        )
        self.sync_waits = Counter(
            "zotlb_replication_sync_waits_total",
            "sync mode: manifest PUTs held for a peer, by outcome.",
            ["outcome"],
            registry=r,
        )


def _join(backend: Backend, location: str) -> URL:
    return URL(backend.origin).join(URL(location, encoded=True))


Descriptor = dict[str, Any]


def manifest_children(
    body: bytes, media_type: str | None
) -> tuple[list[Descriptor], list[Descriptor]]:
    """(child manifests, blobs) a manifest refers to, as descriptors."""
    try:
        doc = json.loads(body)
    except ValueError:
        raise ReplicationFailed("bad_manifest", "manifest is not JSON", True) from None
    if not isinstance(doc, dict):
        raise ReplicationFailed("bad_manifest", "manifest is not an object", True)
    kind = doc.get("mediaType") or media_type
    if kind in INDEX_TYPES or ("manifests" in doc and "layers" not in doc):
        return [d for d in doc.get("manifests", []) if isinstance(d, dict)], []
    blobs = []
    if isinstance(doc.get("config"), dict):
        blobs.append(doc["config"])
    for key in ("layers", "blobs"):
        blobs += [d for d in doc.get(key, []) or [] if isinstance(d, dict)]
    return [], blobs


class Copier:
    """Registry-API copies between backends; used by the queue and `repair`."""

    def __init__(
        self,
        session: aiohttp.ClientSession,
        metrics: ReplicationMetrics | None = None,
        read_timeout: float = 300.0,
        connect_timeout: float = 5.0,
        basic_auth: tuple[str, str] | None = None,
    ) -> None:
        self.session = session
        self.metrics = metrics
        self.auth = aiohttp.BasicAuth(*basic_auth) if basic_auth else None
        self.timeout = aiohttp.ClientTimeout(
            total=None,
            connect=connect_timeout,
            sock_connect=connect_timeout,
            sock_read=read_timeout,
        )
        # Per peer: digest -> a repository the peer is known to hold it in,
        # for cross-repository mounts. Bounded, oldest forgotten first.
        self._seen: dict[str, OrderedDict[str, str]] = {}

    def _remember(self, target: Backend, digest: str, repo: str) -> None:
        seen = self._seen.setdefault(target.name, OrderedDict())
        seen[digest] = repo
        seen.move_to_end(digest)
        if len(seen) > 100_000:
            seen.popitem(last=False)

    def _count(self, target: Backend, n: int) -> None:
        if self.metrics is not None and n:
            self.metrics.copied_bytes.labels(target.name).inc(n)

    # --- manifests ------------------------------------------------------------

    async def fetch_manifest(
        self, sources: list[Backend], repo: str, reference: str
    ) -> tuple[bytes, str | None, Backend]:
        last, cause = "no source backend", SOURCE_DOWN
        for source in sources:
            url = URL(f"{source.origin}/v2/{repo}/manifests/{reference}", encoded=True)
            try:
                async with self.session.get(
                    url,
                    headers={"Accept": MANIFEST_ACCEPT},
                    timeout=self.timeout,
                    auth=self.auth,
                    ssl=source.tls,
                ) as resp:
                    if resp.status == 200:
                        return await resp.read(), resp.content_type, source
                    last = f"{source.name} answered {resp.status}"
                    if resp.status == 404:
                        cause = SOURCE_MISSING
            except (aiohttp.ClientError, TimeoutError) as exc:
                last = f"{source.name}: {type(exc).__name__}: {exc}"
        raise ReplicationFailed(cause, f"manifest {reference}: {last}")

    async def has_manifest(self, target: Backend, repo: str, reference: str) -> bool:
        url = URL(f"{target.origin}/v2/{repo}/manifests/{reference}", encoded=True)
        async with self.session.head(
            url,
            headers={"Accept": MANIFEST_ACCEPT},
            timeout=self.timeout,
            auth=self.auth,
            ssl=target.tls,
        ) as resp:
            return resp.status == 200

    async def copy_image(
        self,
        sources: list[Backend],
        target: Backend,
        repo: str,
        reference: str,
        body: bytes | None = None,
        media_type: str | None = None,
        digest: str | None = None,
        _depth: int = 0,
    ) -> int:
        """Copy a manifest and everything it refers to; returns bytes copied.

        Without body, the manifest is read from the sources by digest when
        known (a tag may have moved on since), else by reference.
        """
        if body is None:
            body, fetched_type, _ = await self.fetch_manifest(
                sources, repo, digest or reference
            )
            media_type = media_type or fetched_type
        children, blobs = manifest_children(body, media_type)
        copied = 0
        for child in children:
            digest = child.get("digest")
            if not isinstance(digest, str) or _depth > 4:
                continue
            if not await self.has_manifest(target, repo, digest):
                copied += await self.copy_image(
                    sources,
                    target,
                    repo,
                    digest,
                    None,
                    child.get("mediaType"),
                    _depth=_depth + 1,
                )
        digests = {d["digest"] for d in blobs if isinstance(d.get("digest"), str)}
        # Blobs go side by side: each is a few round trips, and the lag a
        # client's push is exposed for is their sum when done one by one.
        try:
            async with asyncio.TaskGroup() as group:
                tasks = [
                    group.create_task(self.ensure_blob(sources, target, repo, digest))
                    for digest in sorted(digests)
                ]
        except BaseExceptionGroup as group_error:
            raise group_error.exceptions[0] from None
        copied += sum(t.result() for t in tasks)
        await self._put_manifest(target, repo, reference, body, media_type)
        return copied + len(body)

    async def _put_manifest(
        self,
        target: Backend,
        repo: str,
        reference: str,
        body: bytes,
        media_type: str | None,
    ) -> None:
        if not media_type:
            media_type = json.loads(body).get("mediaType") or (
                "application/vnd.oci.image.manifest.v1+json"
            )
        url = URL(f"{target.origin}/v2/{repo}/manifests/{reference}", encoded=True)
        async with self.session.put(
            url,
            data=body,
            headers={"Content-Type": media_type},
            timeout=self.timeout,
            auth=self.auth,
            ssl=target.tls,
        ) as resp:
            if resp.status != 201:
                detail = (await resp.content.read(2048)).decode(errors="replace")
                _raise_for(resp.status, f"manifest PUT to {target.name}: {detail}")
        self._count(target, len(body))

    async def delete(self, target: Backend, repo: str, reference: str) -> None:
        url = URL(f"{target.origin}/v2/{repo}/manifests/{reference}", encoded=True)
        async with self.session.delete(
            url, timeout=self.timeout, auth=self.auth, ssl=target.tls
        ) as resp:
            # 404: already gone, which is what was asked.
            if resp.status not in (200, 202, 204, 404):
                _raise_for(resp.status, f"DELETE on {target.name}")

    # --- blobs -----------------------------------------------------------------

    async def ensure_blob(
        self, sources: list[Backend], target: Backend, repo: str, digest: str
    ) -> int:
        """Make target hold digest in repo: HEAD, then mount, then stream a copy."""
        blob_url = URL(f"{target.origin}/v2/{repo}/blobs/{digest}", encoded=True)
        async with self.session.head(
            blob_url, timeout=self.timeout, auth=self.auth, ssl=target.tls
        ) as resp:
            if resp.status == 200:
                self._remember(target, digest, repo)
                return 0

        uploads = f"{target.origin}/v2/{repo}/blobs/uploads/"
        seen = self._seen.get(target.name)
        elsewhere = seen.get(digest) if seen is not None else None
        params = {"mount": digest, "from": elsewhere} if elsewhere else None
        async with self.session.post(
            uploads,
            params=params,
            timeout=self.timeout,
            auth=self.auth,
            ssl=target.tls,
        ) as resp:
            if resp.status == 201:
                self._remember(target, digest, repo)
                return 0
            if resp.status != 202 or "Location" not in resp.headers:
                _raise_for(resp.status, f"upload open on {target.name}")
            location = _join(target, resp.headers["Location"])

        last, cause = "no source backend", SOURCE_DOWN
        for source in sources:
            try:
                size = await self._stream(source, target, repo, digest, location)
            except ReplicationFailed as exc:
                if exc.cause not in (SOURCE_DOWN, SOURCE_MISSING):
                    raise
                last = str(exc)
                if exc.cause == SOURCE_MISSING:
                    cause = SOURCE_MISSING
                continue
            self._remember(target, digest, repo)
            self._count(target, size)
            return size
        await self._abandon(target, location)
        raise ReplicationFailed(cause, f"blob {digest}: {last}")

    async def _stream(
        self, source: Backend, target: Backend, repo: str, digest: str, location: URL
    ) -> int:
        src_url = URL(f"{source.origin}/v2/{repo}/blobs/{digest}", encoded=True)
        try:
            src = await self.session.get(
                src_url, timeout=self.timeout, auth=self.auth, ssl=source.tls
            )
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise ReplicationFailed(
                SOURCE_DOWN, f"{source.name}: {type(exc).__name__}: {exc}"
            ) from None
        async with src:
            if src.status != 200:
                raise ReplicationFailed(
                    SOURCE_MISSING if src.status == 404 else SOURCE_DOWN,
                    f"{source.name} answered {src.status}",
                )
            counted = 0

            async def body() -> AsyncIterator[bytes]:
                nonlocal counted
                while chunk := await src.content.read(_CHUNK):
                    counted += len(chunk)
                    yield chunk

            # Streamed straight through, never held: a monolithic PUT with the
            # source's length, or chunked when the source sends none.
            headers = {"Content-Type": "application/octet-stream"}
            if src.content_length is not None:
                headers["Content-Length"] = str(src.content_length)
            put_url = location.update_query({"digest": digest})
            async with self.session.put(
                put_url,
                data=body(),
                headers=headers,
                timeout=self.timeout,
                auth=self.auth,
                ssl=target.tls,
            ) as resp:
                if resp.status != 201:
                    _raise_for(resp.status, f"blob PUT to {target.name}")
        return counted

    async def _abandon(self, target: Backend, location: URL) -> None:
        try:
            async with self.session.delete(
                location, timeout=self.timeout, auth=self.auth, ssl=target.tls
            ):
                pass
        except (aiohttp.ClientError, TimeoutError):
            pass


def _raise_for(status: int, what: str) -> None:
    # 4xx other than throttling will not get better by retrying.
    permanent = 400 <= status < 500 and status not in (408, 429)
    cause = "rejected" if permanent else "target_error"
    raise ReplicationFailed(cause, f"{what}: status {status}", permanent)


@dataclass(slots=True)
class _Waiter:
    future: asyncio.Future[bool]
    pending: int


class Replicator:
    """Queues each write for every other backend and copies it there."""

    def __init__(
        self,
        cfg: ReplicationConfig,
        pool: Pool,
        session: aiohttp.ClientSession,
        registry: CollectorRegistry,
        read_timeout: float = 300.0,
        connect_timeout: float = 5.0,
    ) -> None:
        self.cfg = cfg
        self.pool = pool
        self.metrics = ReplicationMetrics(registry)
        self.copier = Copier(
            session, self.metrics, read_timeout, connect_timeout, cfg.basic_auth
        )
        self.queue = JobQueue(cfg.state_dir, cfg.queue_max)
        self.metrics.queue_length.set(len(self.queue))
        self._wake = asyncio.Event()
        self._running: dict[int, asyncio.Task[None]] = {}
        self._busy_lanes: set[tuple[str, str]] = set()
        self._waiters: dict[int, _Waiter] = {}
        self._dispatcher: asyncio.Task[None] | None = None
        pool.on_state_change(self._on_state_change)

    def __repr__(self) -> str:
        return (
            f"<Replicator {self.cfg.mode} queued={len(self.queue)} "
            f"running={len(self._running)}>"
        )

    @property
    def enabled(self) -> bool:
        return self.cfg.mode != "off"

    # --- lifecycle ---------------------------------------------------------------

    def start(self) -> None:
        if self.cfg.state_dir is None and self.enabled:
            log.warning(
                "replication.queue.volatile",
                reason="replication.state_dir is not set: queued copies are "
                "lost if zotlb stops",
            )
        if len(self.queue):
            log.info("replication.resumed", jobs=len(self.queue))
        self._dispatcher = asyncio.create_task(self._dispatch(), name="replication")

    async def stop(self) -> None:
        tasks = list(self._running.values())
        if self._dispatcher is not None:
            tasks.append(self._dispatcher)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self.queue.close()

    def _on_state_change(self, backend: Backend, state: State, reason: str) -> None:
        if state is State.UP:
            self._wake.set()

    # --- the proxy's hook -----------------------------------------------------

    def wants(self, route: Route, status: int) -> bool:
        if not self.enabled or route.kind is not Kind.MANIFEST or route.name is None:
            return False
        return (route.method == "PUT" and status == 201) or (
            route.method == "DELETE" and status == 202
        )

    async def on_write(
        self,
        route: Route,
        backend: Backend,
        headers: Mapping[str, str],
        body: bytes | bytearray | None,
        content_type: str | None,
    ) -> None:
        """A manifest PUT or DELETE succeeded on backend: copy it to the others."""
        assert route.name is not None and route.reference is not None
        if route.method == "PUT":
            data = bytes(body) if body is not None else None
            digest = (
                "sha256:" + hashlib.sha256(data).hexdigest()
                if data is not None
                else headers.get("Docker-Content-Digest")
            )
            template = Job(
                Op.PUT,
                route.name,
                route.reference,
                digest=digest,
                media_type=content_type,
                body=data,
                source=backend.name,
                target="",
            )
        else:
            template = Job(
                Op.DELETE,
                route.name,
                route.reference,
                digest=None,
                media_type=None,
                body=None,
                source=backend.name,
                target="",
            )
        jobs = self.enqueue(
            template, [b for b in self.pool.backends if b is not backend]
        )
        if self.cfg.mode == "sync" and template.op is Op.PUT:
            await self._wait_for_one(jobs)

    def enqueue(self, template: Job, targets: list[Backend]) -> list[Job]:
        now = time.time()
        jobs = []
        for target in targets:
            job = Job(
                template.op,
                template.repo,
                template.reference,
                template.digest,
                template.media_type,
                template.body,
                template.source,
                target.name,
                created_at=now,
            )
            try:
                jobs.append(self.queue.add(job))
            except (QueueFull, QueueUnusable) as exc:
                # The write itself succeeded: the client still gets its
                # answer, and the drift watch will show the missing copy.
                cause = "queue_full" if isinstance(exc, QueueFull) else "queue_error"
                self.metrics.failures.labels(target.name, cause).inc()
                log.error(
                    "replication.dropped",
                    peer=target.name,
                    repo=job.repo,
                    reference=job.reference,
                    error=str(exc),
                )
        self.metrics.queue_length.set(len(self.queue))
        if jobs:
            self._wake.set()
        return jobs

    async def _wait_for_one(self, jobs: list[Job]) -> None:
        # Only peers that are up can answer within a request's lifetime.
        live = [j for j in jobs if self.pool.by_name[j.target].is_up()]
        if not live:
            self.metrics.sync_waits.labels("no_peer").inc()
            log.warning("replication.sync.no_peer", repo=jobs[0].repo if jobs else None)
            return
        waiter = _Waiter(asyncio.get_running_loop().create_future(), len(live))
        for job in live:
            self._waiters[job.id] = waiter
        try:
            replicated = await asyncio.wait_for(
                asyncio.shield(waiter.future), self.cfg.sync_timeout
            )
            outcome = "replicated" if replicated else "peer_down"
            self.metrics.sync_waits.labels(outcome).inc()
            if not replicated:
                log.warning(
                    "replication.sync.peer_down",
                    repo=live[0].repo,
                    reference=live[0].reference,
                )
        except TimeoutError:
            self.metrics.sync_waits.labels("timeout").inc()
            log.warning(
                "replication.sync.timeout",
                repo=live[0].repo,
                reference=live[0].reference,
                seconds=self.cfg.sync_timeout,
            )
        finally:
            for job in live:
                self._waiters.pop(job.id, None)

    def _settle(self, job: Job, ok: bool) -> None:
        waiter = self._waiters.pop(job.id, None)
        if waiter is None or waiter.future.done():
            return
        waiter.pending -= 1
        if ok:
            waiter.future.set_result(True)
        elif waiter.pending == 0:
            waiter.future.set_result(False)

    # --- running the queue -------------------------------------------------------

    async def _dispatch(self) -> None:
        while True:
            self._wake.clear()
            now = time.time()
            next_due: float | None = None
            for job in list(self.queue.heads()):
                if len(self._running) >= self.cfg.workers:
                    break
                if job.id in self._running or job.lane in self._busy_lanes:
                    continue
                target = self.pool.by_name.get(job.target)
                if target is None:
                    # The peer left the configuration: nothing to copy to.
                    self._finish(job, "dropped")
                    continue
                if not target.is_up():
                    continue
                if job.next_at > now:
                    next_due = (
                        job.next_at if next_due is None else min(next_due, job.next_at)
                    )
                    continue
                self._busy_lanes.add(job.lane)
                self._running[job.id] = asyncio.create_task(self._run(job))
            timeout = None if next_due is None else max(0.0, next_due - time.time())
            try:
                await asyncio.wait_for(self._wake.wait(), timeout)
            except TimeoutError:
                pass

    def _sources(self, job: Job) -> list[Backend]:
        first = self.pool.by_name.get(job.source)
        rest = [
            b
            for b in self.pool.backends
            if b is not first and b.name != job.target and b.is_up()
        ]
        return ([first] if first is not None else []) + rest

    async def _run(self, job: Job) -> None:
        target = self.pool.by_name[job.target]
        try:
            if job.op is Op.PUT:
                copied = await self.copier.copy_image(
                    self._sources(job),
                    target,
                    job.repo,
                    job.reference,
                    self.queue.load_body(job),
                    job.media_type,
                    job.digest,
                )
            else:
                copied = 0
                await self.copier.delete(target, job.repo, job.reference)
        except ReplicationFailed as exc:
            self._failed(job, exc.cause, str(exc), exc.permanent)
        except aiohttp.ClientConnectorError as exc:
            # Sources' errors are caught in the copier: this is the peer. Take
            # it out as the proxy would; the probes bring it back.
            self.pool.mark_down(target, f"replication connect failed: {exc}")
            self._failed(job, "connect", str(exc), False)
        except (aiohttp.ClientError, TimeoutError, asyncio.IncompleteReadError) as exc:
            cause = "timeout" if isinstance(exc, TimeoutError) else "broken"
            self._failed(job, cause, f"{type(exc).__name__}: {exc}", False)
        else:
            lag = max(0.0, time.time() - job.created_at)
            self.metrics.lag.labels(job.target, job.op.value).observe(lag)
            log.info(
                "replication.copied" if job.op is Op.PUT else "replication.deleted",
                peer=job.target,
                repo=job.repo,
                reference=job.reference,
                bytes=copied,
                attempts=job.attempts + 1,
                lag_ms=round(lag * 1000, 2),
            )
            self._finish(job, "ok")
        finally:
            self._running.pop(job.id, None)
            self._busy_lanes.discard(job.lane)
            self._wake.set()

    def _failed(self, job: Job, cause: str, error: str, permanent: bool) -> None:
        if cause == SOURCE_MISSING and job.attempts + 1 >= MISSING_ATTEMPTS:
            permanent = True
        self.metrics.failures.labels(job.target, cause).inc()
        log.warning(
            "replication.failed",
            peer=job.target,
            repo=job.repo,
            reference=job.reference,
            op=job.op.value,
            cause=cause,
            error=error,
            attempts=job.attempts + 1,
            permanent=permanent,
        )
        if permanent:
            self._finish(job, "failed")
            return
        if not self.pool.by_name[job.target].is_up():
            # A sync push stops waiting for a peer that is gone.
            self._settle(job, False)
        delay = min(
            self.cfg.retry_max, self.cfg.retry_initial * 2 ** min(job.attempts, 20)
        )
        if cause == "broken" and job.attempts == 0:
            # Most often a pooled connection the peer had already closed (or a
            # peer that just died): a fresh connection tells which, at once.
            delay = 0.0
        # Jitter spreads the retries of many jobs that failed together.
        self.queue.retry_later(job, delay * random.uniform(0.8, 1.2), error)

    def _finish(self, job: Job, result: str) -> None:
        self.queue.done(job)
        self.metrics.jobs.labels(job.target, job.op.value, result).inc()
        self.metrics.queue_length.set(len(self.queue))
        self._settle(job, result == "ok")

    def status(self) -> dict[str, object]:
        return {
            "mode": self.cfg.mode,
            "durable": self.cfg.state_dir is not None,
            "queue_length": len(self.queue),
            "running": len(self._running),
            "backlog": self.queue.backlog(),
        }
