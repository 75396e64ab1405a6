"""Drift comparison on its own: what each backend lacks, and whose version wins."""

from __future__ import annotations

from zotlb.backends import Pool, rendezvous_order
from zotlb.config import BackendConfig, HealthConfig
from zotlb.drift import compare


def test_rendezvous_order_is_the_pools_home_order():
    names = ["a", "b", "c"]
    pool = Pool(
        [
            BackendConfig(name=n, url=f"http://127.0.0.1:{5000 + i}")
            for i, n in enumerate(names)
        ],
        HealthConfig(),
    )
    for key in ("x", "team/app", "library/alpine", "z" * 40):
        assert rendezvous_order(names, key) == [b.name for b in pool.home_order(key)]


def test_compare_reports_missing_and_differing_with_the_home_version_winning():
    repo = "team/app"
    home, stray = rendezvous_order(["a", "b"], repo)
    snapshots = {
        home: {repo: {"v1": "sha256:1", "v2": "sha256:2"}},
        stray: {repo: {"v1": "sha256:old"}, "only/here": {"x": "sha256:x"}},
    }
    report = compare(snapshots, ["a", "b"])
    assert report.missing[home] == ["only/here:x"]
    assert report.missing[stray] == [f"{repo}:v2"]
    assert report.differing[stray] == [f"{repo}:v1"]
    assert report.differing[home] == []
    assert not report.in_sync
    fixes = {
        (f.repo, f.tag): (f.source, f.target, f.digest, f.why) for f in report.fixes
    }
    assert fixes == {
        ("only/here", "x"): (stray, home, "sha256:x", "missing"),
        (repo, "v2"): (home, stray, "sha256:2", "missing"),
        (repo, "v1"): (home, stray, "sha256:1", "differs"),
    }
    status = report.as_dict()["backends"][stray]
    assert (status["missing"], status["differing"]) == (1, 1)


def test_identical_backends_are_in_sync():
    snap = {"r": {"t": "sha256:1"}}
    report = compare({"a": snap, "b": snap}, ["a", "b"])
    assert report.in_sync and report.fixes == []
