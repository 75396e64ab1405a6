"""Drift: how far the backends' catalogs and tags have moved apart, and repair.

A snapshot lists every repository, tag and tag digest on each backend through
the registry API. Comparing snapshots gives, per backend, the tags it lacks
and the tags whose digest differs from the repository's home backend. Repair
copies what is missing (and what differs) from the home backend, or from any
backend that has the tag, through the replication copier.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from typing import Any

import aiohttp
from prometheus_client import CollectorRegistry, Counter, Gauge
from yarl import URL

from .backends import Backend, Pool, rendezvous_order
from .config import LBConfig, load_config
from .logs import get as get_logger
from .replication import MANIFEST_ACCEPT, Copier, ReplicationFailed

log = get_logger("zotlb.drift")

# repo -> tag -> manifest digest
Snapshot = dict[str, dict[str, str]]
_PAGE = 1000
_CONCURRENCY = 8


class DriftError(Exception):
    pass


@dataclass(slots=True)
class Fix:
    repo: str
    tag: str
    digest: str
    source: str
    target: str
    why: str  # "missing" or "differs"


@dataclass
class DriftReport:
    backends: list[str]
    checked_at: float
    # backend -> list of "repo:tag"
    missing: dict[str, list[str]] = field(default_factory=dict)
    differing: dict[str, list[str]] = field(default_factory=dict)
    errors: dict[str, str] = field(default_factory=dict)
    fixes: list[Fix] = field(default_factory=list)

    @property
    def in_sync(self) -> bool:
        return (
            not self.errors
            and not any(self.missing.values())
            and not any(self.differing.values())
        )

    def as_dict(self) -> dict[str, Any]:
        return {
            "checked_at": self.checked_at,
            "in_sync": self.in_sync,
            "backends": {
                name: {
                    "missing": len(self.missing.get(name, [])),
                    "differing": len(self.differing.get(name, [])),
                    "missing_tags": self.missing.get(name, [])[:100],
                    "differing_tags": self.differing.get(name, [])[:100],
                    "error": self.errors.get(name),
                }
                for name in self.backends
            },
        }


def _next_link(resp: aiohttp.ClientResponse) -> str | None:
    link = resp.headers.get("Link")
    if not link or 'rel="next"' not in link:
        return None
    return link[link.index("<") + 1 : link.index(">")]


async def _paged(
    session: aiohttp.ClientSession,
    backend: Backend,
    path: str,
    key: str,
    auth: aiohttp.BasicAuth | None,
) -> list[str]:
    items: list[str] = []
    url: str | None = f"{path}?n={_PAGE}"
    while url is not None:
        target = URL(backend.origin + url, encoded=True)
        async with session.get(target, auth=auth, ssl=backend.tls) as resp:
            if resp.status == 404:
                return items
            if resp.status != 200:
                raise DriftError(f"{backend.name}: GET {url} answered {resp.status}")
            doc = await resp.json(content_type=None)
            items += (doc or {}).get(key) or []
            url = _next_link(resp)
    return items


async def _tag_digest(
    session: aiohttp.ClientSession,
    backend: Backend,
    repo: str,
    tag: str,
    limit: asyncio.Semaphore,
    auth: aiohttp.BasicAuth | None,
) -> str | None:
    url = URL(f"{backend.origin}/v2/{repo}/manifests/{tag}", encoded=True)
    headers = {"Accept": MANIFEST_ACCEPT}
    head = session.head(url, headers=headers, auth=auth, ssl=backend.tls)
    async with limit, head as resp:
        if resp.status != 200:
            return None
        return resp.headers.get("Docker-Content-Digest")


async def snapshot(
    session: aiohttp.ClientSession,
    backend: Backend,
    auth: aiohttp.BasicAuth | None = None,
) -> Snapshot:
    """Every repository's tags and their digests on one backend."""
    out: Snapshot = {}
    # A few HEADs at a time per backend: a repository with thousands of tags
    # must not open thousands of connections.
    limit = asyncio.Semaphore(_CONCURRENCY)
    catalog = await _paged(session, backend, "/v2/_catalog", "repositories", auth)
    for repo in catalog:
        tags = await _paged(session, backend, f"/v2/{repo}/tags/list", "tags", auth)
        digests = await asyncio.gather(
            *(_tag_digest(session, backend, repo, t, limit, auth) for t in tags)
        )
        entries = {t: d for t, d in zip(tags, digests, strict=True) if d}
        if entries:
            out[repo] = entries
    return out


def _home(repo: str, holders: list[str]) -> str:
    # The same rendezvous order the proxy writes by, over the holders only.
    return rendezvous_order(holders, repo)[0]


def compare(snapshots: dict[str, Snapshot], order: list[str]) -> DriftReport:
    report = DriftReport(list(order), time.time())
    names = [n for n in order if n in snapshots]
    keys = sorted(
        {
            (r, t)
            for snap in snapshots.values()
            for r, tags in snap.items()
            for t in tags
        }
    )
    for name in names:
        report.missing[name] = []
        report.differing[name] = []
    for repo, tag in keys:
        held = {
            n: snapshots[n][repo][tag]
            for n in names
            if tag in snapshots[n].get(repo, {})
        }
        home = _home(repo, list(held))
        truth = held[home]
        label = f"{repo}:{tag}"
        for name in names:
            if name not in held:
                report.missing[name].append(label)
                report.fixes.append(Fix(repo, tag, truth, home, name, "missing"))
            elif held[name] != truth:
                report.differing[name].append(label)
                report.fixes.append(Fix(repo, tag, truth, home, name, "differs"))
    return report


async def check(
    session: aiohttp.ClientSession,
    backends: list[Backend],
    auth: aiohttp.BasicAuth | None = None,
) -> DriftReport:
    results = await asyncio.gather(
        *(snapshot(session, b, auth) for b in backends), return_exceptions=True
    )
    snapshots: dict[str, Snapshot] = {}
    errors: dict[str, str] = {}
    for backend, result in zip(backends, results, strict=True):
        if isinstance(result, BaseException):
            if not isinstance(result, (DriftError, aiohttp.ClientError, TimeoutError)):
                raise result
            errors[backend.name] = f"{type(result).__name__}: {result}"
        else:
            snapshots[backend.name] = result
    report = compare(snapshots, [b.name for b in backends])
    report.errors = errors
    return report


async def repair(
    copier: Copier, pool: Pool, report: DriftReport
) -> tuple[list[Fix], list[tuple[Fix, str]]]:
    """Apply the report's fixes through the copier; returns (done, failed)."""
    done: list[Fix] = []
    failed: list[tuple[Fix, str]] = []
    for fix in report.fixes:
        source = pool.by_name[fix.source]
        others = [b for b in pool.backends if b.name not in (fix.source, fix.target)]
        try:
            await copier.copy_image(
                [source, *others], pool.by_name[fix.target], fix.repo, fix.tag
            )
        except (ReplicationFailed, aiohttp.ClientError, TimeoutError) as exc:
            failed.append((fix, f"{type(exc).__name__}: {exc}"))
            continue
        done.append(fix)
    return done, failed


class DriftMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.missing = Gauge(
            "zotlb_drift_missing_tags",
            "Tags another backend has and this one lacks, at the last drift check.",
            ["backend"],
            registry=registry,
        )
        self.differing = Gauge(
            "zotlb_drift_differing_tags",
            "Tags whose digest on this backend differs from the repository's home "
            "backend, at the last drift check.",
            ["backend"],
            registry=registry,
        )
        self.checks = Counter(
            "zotlb_drift_checks_total",
            "Drift checks run, by result (in_sync/drift/error).",
            ["result"],
            registry=registry,
        )


class DriftWatch:
    """Runs `check` every interval and publishes the result."""

    def __init__(
        self,
        pool: Pool,
        session: aiohttp.ClientSession,
        registry: CollectorRegistry,
        interval: float,
        basic_auth: tuple[str, str] | None = None,
    ) -> None:
        self.pool = pool
        self.session = session
        self.interval = interval
        self.auth = aiohttp.BasicAuth(*basic_auth) if basic_auth else None
        self.metrics = DriftMetrics(registry)
        self.last: DriftReport | None = None
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._loop(), name="drift-watch")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    async def _loop(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            await self.run_once()

    async def run_once(self) -> DriftReport:
        live = [b for b in self.pool.backends if b.is_up()]
        started = time.monotonic()
        report = await check(self.session, live, self.auth)
        self.last = report
        for name in report.backends:
            self.metrics.missing.labels(name).set(len(report.missing.get(name, [])))
            self.metrics.differing.labels(name).set(len(report.differing.get(name, [])))
        result = (
            "error" if report.errors else ("in_sync" if report.in_sync else "drift")
        )
        self.metrics.checks.labels(result).inc()
        log.info(
            "drift.checked",
            result=result,
            backends=report.backends,
            missing={k: len(v) for k, v in report.missing.items()},
            differing={k: len(v) for k, v in report.differing.items()},
            errors=report.errors or None,
            duration_ms=round((time.monotonic() - started) * 1000, 2),
        )
        return report

    def status(self) -> dict[str, Any]:
        return {
            "interval_seconds": self.interval,
            "last": None if self.last is None else self.last.as_dict(),
        }


# --- `zotlb diff` and `zotlb repair`: offline, straight to the backends ---------

EXIT_IN_SYNC = 0
EXIT_DRIFT = 1


def _session(cfg: LBConfig) -> aiohttp.ClientSession:
    basic = cfg.replication.basic_auth
    return aiohttp.ClientSession(
        auth=aiohttp.BasicAuth(*basic) if basic else None,
        auto_decompress=False,
        cookie_jar=aiohttp.DummyCookieJar(),
        timeout=aiohttp.ClientTimeout(total=None, connect=5, sock_read=300),
    )


def _print_report(report: DriftReport) -> None:
    for name in report.backends:
        if name in report.errors:
            print(f"{name}: unreachable: {report.errors[name]}")
            continue
        missing = report.missing.get(name, [])
        differing = report.differing.get(name, [])
        print(f"{name}: {len(missing)} missing, {len(differing)} differing")
        for label in missing:
            print(f"  missing  {label}")
        for label in differing:
            print(f"  differs  {label}")


def _pool(cfg: LBConfig) -> Pool:
    from .tls import backend_contexts

    pool = Pool(cfg.backends, cfg.health, cfg.mode, cfg.failback)
    contexts = backend_contexts(cfg.backends)
    for backend in pool.backends:
        backend.tls = contexts[backend.name]
    return pool


async def _diff(cfg: LBConfig, as_json: bool) -> int:
    import json

    async with _session(cfg) as session:
        report = await check(session, _pool(cfg).backends)
    if as_json:
        print(json.dumps(report.as_dict(), indent=2))
    else:
        _print_report(report)
    return EXIT_IN_SYNC if report.in_sync else EXIT_DRIFT


async def _repair(cfg: LBConfig, dry_run: bool) -> int:
    pool = _pool(cfg)
    async with _session(cfg) as session:
        report = await check(session, pool.backends)
        if report.errors:
            _print_report(report)
            return EXIT_DRIFT
        if not report.fixes:
            print("in sync: nothing to repair")
            return EXIT_IN_SYNC
        if dry_run:
            for fix in report.fixes:
                print(
                    f"would copy {fix.repo}:{fix.tag} ({fix.digest}) "
                    f"{fix.source} -> {fix.target} [{fix.why}]"
                )
            return EXIT_DRIFT
        done, failed = await repair(Copier(session), pool, report)
    for fix in done:
        print(
            f"copied {fix.repo}:{fix.tag} ({fix.digest}) "
            f"{fix.source} -> {fix.target} [{fix.why}]"
        )
    for fix, error in failed:
        print(f"FAILED {fix.repo}:{fix.tag} {fix.source} -> {fix.target}: {error}")
    return EXIT_DRIFT if failed else EXIT_IN_SYNC


def register(sub: Any) -> None:
    def add_config(parser: Any) -> None:
        parser.add_argument(
            "-c",
            "--config",
            default="lb.yaml",
            help="path to lb.yaml (default: %(default)s)",
        )

    diff = sub.add_parser(
        "diff",
        help="compare the backends' repositories and tags (exit 1 on drift)",
    )
    add_config(diff)
    diff.add_argument("--json", action="store_true", help="print the report as JSON")
    diff.set_defaults(func=lambda a: asyncio.run(_diff(load_config(a.config), a.json)))

    rep = sub.add_parser(
        "repair",
        help="copy missing and differing tags from the repository's home backend",
    )
    add_config(rep)
    rep.add_argument(
        "--dry-run",
        action="store_true",
        help="print what would be copied, copy nothing",
    )
    rep.set_defaults(
        func=lambda a: asyncio.run(_repair(load_config(a.config), a.dry_run))
    )
