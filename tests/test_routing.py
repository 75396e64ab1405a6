"""The routing policy, in-process: which backends, in which order."""

from __future__ import annotations

import pytest

from zotlb.backends import Pool
from zotlb.config import config_from_mapping
from zotlb.errors import BadRequest, NotFound, UploadUnknown
from zotlb.routing import Kind, parse, plan


def make_pool(n: int = 2, mode: str = "active-active", failback: str = "auto") -> Pool:
    cfg = config_from_mapping(
        {
            "mode": mode,
            "failback": failback,
            "backends": [
                {"name": f"b{i}", "url": f"http://127.0.0.1:{6000 + i}"}
                for i in range(n)
            ],
        }
    )
    return Pool(cfg.backends, cfg.health, cfg.mode, cfg.failback)


@pytest.mark.parametrize(
    ("target", "kind", "name", "ref"),
    [
        ("/v2/", Kind.BASE, None, None),
        ("/v2", Kind.BASE, None, None),
        ("/v2/_catalog?n=10", Kind.CATALOG, None, None),
        ("/v2/a/b/c/manifests/latest", Kind.MANIFEST, "a/b/c", "latest"),
        ("/v2/lib/x/blobs/sha256:abc", Kind.BLOB, "lib/x", "sha256:abc"),
        ("/v2/lib/x/blobs/uploads/", Kind.UPLOAD, "lib/x", None),
        ("/v2/lib/x/blobs/uploads/uuid-1?_state=s", Kind.UPLOAD, "lib/x", "uuid-1"),
        ("/v2/blobs/blobs/uploads/u", Kind.UPLOAD, "blobs", "u"),
        ("/v2/x/tags/list?n=5", Kind.TAGS, "x", None),
        ("/v2/x/referrers/sha256:abc", Kind.REFERRERS, "x", "sha256:abc"),
        ("/v2/_zot/ext/search", Kind.OTHER, None, None),
    ],
)
def test_parse(target, kind, name, ref) -> None:
    route = parse("GET", target)
    assert (route.kind, route.name, route.reference) == (kind, name, ref)


def test_session_mark_is_stripped_and_query_kept_byte_for_byte() -> None:
    route = parse(
        "PATCH", "/v2/x/blobs/uploads/u?_state=a%3D%3D&_zlb=b1&digest=sha256%3Ax"
    )
    assert route.session_backend == "b1"
    assert route.target == "/v2/x/blobs/uploads/u?_state=a%3D%3D&digest=sha256%3Ax"


@pytest.mark.parametrize(
    "target",
    [
        "/v2/../../etc/passwd",
        "/v2/x/%2e%2e/y/manifests/a",
        "/v2/a%2fb/tags/list",
        "/v2/./x",
    ],
)
def test_traversal_is_rejected(target) -> None:
    with pytest.raises(BadRequest):
        parse("GET", target)


def test_non_v2_is_404_unless_passed() -> None:
    with pytest.raises(NotFound):
        parse("GET", "/metrics")
    assert parse("GET", "/readyz", allow_non_v2=True).kind is Kind.OTHER


def test_writes_and_blob_heads_go_home_only() -> None:
    pool = make_pool(3)
    homes = set()
    for repo in ("a", "b", "c", "d", "e", "f"):
        home = pool.home_order(repo)[0]
        homes.add(home.name)
        for method, target in (
            ("POST", f"/v2/{repo}/blobs/uploads/"),
            ("PUT", f"/v2/{repo}/manifests/v1"),
            ("HEAD", f"/v2/{repo}/blobs/sha256:aa"),
            ("DELETE", f"/v2/{repo}/manifests/sha256:aa"),
        ):
            p = plan(parse(method, target), pool)
            assert p.backends[0] is home
            assert not p.fallback_on_404
    assert len(homes) > 1


def test_home_moves_only_for_the_down_backends_repos() -> None:
    pool = make_pool(3)
    repos = [f"repo{i}" for i in range(60)]
    before = {r: pool.home_order(r)[0].name for r in repos}
    pool.mark_down(pool.by_name["b1"], "test")
    after = {r: pool.home_order(r)[0].name for r in repos}
    for r in repos:
        if before[r] != "b1":
            assert after[r] == before[r]
        else:
            assert after[r] != "b1"
    # Replicas agree: a fresh pool with the same view gives the same homes.
    other = make_pool(3)
    other.mark_down(other.by_name["b1"], "test")
    assert {r: other.home_order(r)[0].name for r in repos} == after


def test_tag_reads_go_home_first_with_fallback_digest_reads_spread() -> None:
    pool = make_pool(2)
    p = plan(parse("GET", "/v2/app/manifests/latest"), pool)
    assert p.backends[0] is pool.home_order("app")[0] and p.fallback_on_404
    firsts = {
        plan(parse("GET", "/v2/app/blobs/sha256:ab"), pool).backends[0].name
        for _ in range(4)
    }
    assert firsts == {"b0", "b1"}


def test_session_pins_its_backend() -> None:
    pool = make_pool(2)
    p = plan(parse("PATCH", "/v2/app/blobs/uploads/u?_zlb=b1"), pool)
    assert [b.name for b in p.backends] == ["b1"]
    pool.mark_down(pool.by_name["b1"], "test")
    with pytest.raises(UploadUnknown):
        plan(parse("PATCH", "/v2/app/blobs/uploads/u?_zlb=b1"), pool)


def test_active_passive_order_and_failback() -> None:
    pool = make_pool(3, mode="active-passive")
    assert [b.name for b in pool.passive_order()] == ["b0", "b1", "b2"]
    pool.mark_down(pool.by_name["b0"], "test")
    assert pool.active.name == "b1"
    for _ in range(pool.health.rise):
        pool.record_probe(pool.by_name["b0"], _ok())
    assert pool.active.name == "b0"


def test_active_passive_manual_failback() -> None:
    pool = make_pool(2, mode="active-passive", failback="manual")
    pool.mark_down(pool.by_name["b0"], "test")
    for _ in range(pool.health.rise):
        pool.record_probe(pool.by_name["b0"], _ok())
    assert pool.active.name == "b1"
    pool.promote(pool.by_name["b0"])
    assert pool.active.name == "b0"


def test_fall_and_rise_counts() -> None:
    pool = make_pool(1)
    b = pool.backends[0]
    for _ in range(pool.health.fall - 1):
        pool.record_probe(b, _fail())
    assert b.is_up()
    pool.record_probe(b, _fail())
    assert not b.is_up()
    pool.record_probe(b, _ok())
    assert not b.is_up()
    pool.record_probe(b, _ok())
    assert b.is_up()
    assert "in_flight=0" in repr(b)


def _ok():
    from zotlb.backends import ProbeResult

    return ProbeResult(True, 200, 0.001, None, 0.0)


def _fail():
    from zotlb.backends import ProbeResult

    return ProbeResult(False, None, 0.001, "refused", 0.0)
