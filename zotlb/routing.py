"""The OCI-aware policy: which backends a request may go to, in which order.

Rules (active-active):
1. Writes of a repository (uploads, manifest PUT/DELETE, blob DELETE, mounts)
   and the blob existence check (HEAD of a blob) go to the repository's home
   backend: the first in rendezvous-hash order over the available backends.
2. A request of an upload session goes to the backend that opened it: zotlb
   marks the session's Location with that backend's name, and falls back to
   the repository's home when the mark is missing.
3. Mutable reads (manifest by tag, tags list, referrers) try the home first,
   so a client reads its own writes; content-addressed reads (blob GET,
   manifest by digest) spread round-robin. A read that gets 404 is tried on
   the other backends before the client sees it.
Active-passive keeps the same 404 fallback, with the active backend first.
"""

from __future__ import annotations

import enum
import re
from dataclasses import dataclass
from urllib.parse import unquote

from .backends import Backend, Pool
from .errors import BadRequest, NotFound, UploadUnknown

# The query parameter zotlb adds to upload Locations and strips again.
SESSION_PARAM = "_zlb"


class Kind(enum.Enum):
    BASE = "base"
    CATALOG = "catalog"
    MANIFEST = "manifest"
    BLOB = "blob"
    UPLOAD = "upload"
    TAGS = "tags"
    REFERRERS = "referrers"
    OTHER = "other"


_PATTERNS: list[tuple[Kind, re.Pattern[str]]] = [
    (Kind.UPLOAD, re.compile(r"^/v2/(?P<name>.+?)/blobs/uploads/(?P<ref>[^/]*)$")),
    (Kind.BLOB, re.compile(r"^/v2/(?P<name>.+?)/blobs/(?P<ref>[^/]+)$")),
    (Kind.MANIFEST, re.compile(r"^/v2/(?P<name>.+?)/manifests/(?P<ref>[^/]+)$")),
    (Kind.TAGS, re.compile(r"^/v2/(?P<name>.+?)/tags/list$")),
    (Kind.REFERRERS, re.compile(r"^/v2/(?P<name>.+?)/referrers/(?P<ref>[^/]+)$")),
]
_DIGEST = re.compile(r"^[a-z0-9]+(?:[+._-][a-z0-9]+)*:[a-zA-Z0-9=_-]+$")
_READS = frozenset({"GET", "HEAD"})


@dataclass(frozen=True, slots=True)
class Route:
    kind: Kind
    method: str
    path: str
    query: str
    name: str | None = None
    reference: str | None = None
    session_backend: str | None = None

    @property
    def target(self) -> str:
        """Path and query to send to the backend, zotlb's own mark removed."""
        return f"{self.path}?{self.query}" if self.query else self.path

    @property
    def is_read(self) -> bool:
        return self.method in _READS

    @property
    def by_digest(self) -> bool:
        return bool(self.reference and _DIGEST.match(self.reference))

    @property
    def is_session(self) -> bool:
        """A request inside an opened upload session (PATCH, PUT, GET, DELETE)."""
        return self.kind is Kind.UPLOAD and bool(self.reference)

    @property
    def is_upload_open(self) -> bool:
        return self.kind is Kind.UPLOAD and not self.reference and self.method == "POST"


def _strip_session_mark(query: str) -> tuple[str, str | None]:
    if SESSION_PARAM not in query:
        return query, None
    kept, backend = [], None
    for part in query.split("&"):
        key, _, value = part.partition("=")
        if key == SESSION_PARAM:
            backend = unquote(value)
        else:
            kept.append(part)
    return "&".join(kept), backend


def _check_segments(path: str) -> None:
    for segment in path.split("/"):
        decoded = unquote(segment)
        if decoded in (".", "..") or "/" in decoded or "\\" in decoded:
            raise BadRequest(f"path segment {segment!r} is not allowed")
        if any(ord(c) < 0x20 or ord(c) == 0x7F for c in decoded):
            raise BadRequest("control characters are not allowed in the path")


def parse(method: str, raw_target: str, allow_non_v2: bool = False) -> Route:
    """Classify a request target (raw path and query, as the client sent it)."""
    path, _, query = raw_target.partition("?")
    if not path.startswith("/"):
        raise BadRequest("only origin-form request targets are accepted")
    _check_segments(path)
    query, session_backend = _strip_session_mark(query)

    if path in ("/v2", "/v2/"):
        return Route(Kind.BASE, method, path, query)
    if not path.startswith("/v2/"):
        if allow_non_v2:
            return Route(Kind.OTHER, method, path, query)
        raise NotFound(f"{path} is not a registry API path")
    if path == "/v2/_catalog":
        return Route(Kind.CATALOG, method, path, query)
    for kind, pattern in _PATTERNS:
        match = pattern.match(path)
        if match:
            return Route(
                kind,
                method,
                path,
                query,
                name=match["name"],
                reference=match.groupdict().get("ref") or None,
                session_backend=session_backend,
            )
    return Route(Kind.OTHER, method, path, query)


@dataclass(frozen=True, slots=True)
class Plan:
    """Backends to try in order, and what may move a request to the next one."""

    backends: list[Backend]
    # A 404 is a miss worth asking the next backend about.
    fallback_on_404: bool
    # The request may go to the next backend after a failure (else only on
    # connect failure, before anything was sent).
    retry_idempotent: bool


def plan(route: Route, pool: Pool) -> Plan:
    if route.is_session and route.session_backend is not None:
        backend = pool.by_name.get(route.session_backend)
        if backend is None or not backend.is_up():
            raise UploadUnknown(
                f"the upload session lives on backend {route.session_backend!r}, "
                "which is not available; start the upload again"
            )
        return Plan([backend], fallback_on_404=False, retry_idempotent=False)

    if pool.mode == "active-passive":
        order = pool.passive_order()
        if route.is_read and route.kind is not Kind.UPLOAD:
            return Plan(
                order, fallback_on_404=route.name is not None, retry_idempotent=True
            )
        return Plan(order, fallback_on_404=False, retry_idempotent=False)

    if route.name is None:
        # /v2/, _catalog, extensions: any backend will do.
        return Plan(
            pool.round_robin(), fallback_on_404=False, retry_idempotent=route.is_read
        )

    if not route.is_read or route.kind is Kind.UPLOAD:
        return Plan(pool.home_order(route.name), False, False)
    if route.kind is Kind.BLOB and route.method == "HEAD":
        # The push-time existence check must see the home backend's truth:
        # a "yes" from another backend would make the client skip an upload
        # the home backend needs for the manifest PUT.
        return Plan(pool.home_order(route.name), False, True)
    if route.kind in (Kind.BLOB, Kind.MANIFEST) and route.by_digest:
        return Plan(pool.round_robin(), True, True)
    return Plan(pool.home_order(route.name), True, True)
