"""conf/grafana-dashboard.json queries only metrics and labels zotlb exports."""

from __future__ import annotations

import json
import re
from pathlib import Path

from conftest import http, needs_registry
from prometheus_client.metrics import MetricWrapperBase
from prometheus_client.parser import text_string_to_metric_families

from zotlb.metrics import Metrics

DASHBOARD = Path(__file__).parent.parent / "conf" / "grafana-dashboard.json"
_METRIC = re.compile(r"\b((?:zotlb|process)_[a-z_]+)\b")
_BY = re.compile(r"\bby \(([^)]*)\)")
_MATCHER = re.compile(r"\{([^}]*)\}")
# Labels Prometheus adds itself, or that histograms carry.
_IMPLICIT = {"instance", "job", "le"}
_SUFFIXES = {
    "counter": ("_total", "_created"),
    "histogram": ("_bucket", "_sum", "_count", "_created"),
    "gauge": ("",),
    "summary": ("", "_sum", "_count", "_created"),
}


def dashboard_exprs() -> list[str]:
    dashboard = json.loads(DASHBOARD.read_text())
    exprs = []
    for panel in dashboard["panels"]:
        for target in panel.get("targets", []):
            exprs.append(target["expr"])
    return exprs


def exported_names(exposition: str) -> set[str]:
    names = set()
    for family in text_string_to_metric_families(exposition):
        for suffix in _SUFFIXES.get(family.type, ("",)):
            names.add(family.name + suffix)
    return names


def label_names() -> dict[str, set[str]]:
    """Label names of every zotlb_ metric, keyed by each of its sample names."""
    out: dict[str, set[str]] = {}
    for metric in vars(Metrics()).values():
        if isinstance(metric, MetricWrapperBase):
            labels = set(metric._labelnames)
            for family in metric.describe():
                kind = family.type
                for suffix in _SUFFIXES.get(kind, ("",)):
                    out[family.name + suffix] = labels
    return out


def test_dashboard_is_well_formed():
    dashboard = json.loads(DASHBOARD.read_text())
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    for panel in dashboard["panels"]:
        assert set(panel["gridPos"]) == {"h", "w", "x", "y"}
        assert panel["gridPos"]["x"] + panel["gridPos"]["w"] <= 24
        if panel["type"] != "row":
            assert panel["targets"], panel["title"]
            assert panel["datasource"]["uid"] == "${datasource}"


@needs_registry
def test_every_dashboard_metric_and_label_exists(registries, zotlb_factory):
    a, b = registries
    lb = zotlb_factory([a, b])
    assert http("GET", lb.url + "/v2/")[0] == 200
    exported = exported_names(http("GET", lb.admin + "/metrics")[2].decode())
    labels = label_names()

    queried = set()
    for expr in dashboard_exprs():
        names = _METRIC.findall(expr)
        assert names, f"no metric in {expr!r}"
        for name in names:
            queried.add(name)
            assert name in exported, f"{name} (in {expr!r}) is not exported"
        used = {
            label.strip()
            for group in _BY.findall(expr)
            for label in group.split(",")
            if label.strip()
        }
        used |= {
            m.split("=")[0].strip().rstrip("!~")
            for group in _MATCHER.findall(expr)
            for m in group.split(",")
        }
        for name in names:
            known = labels.get(name, set()) | _IMPLICIT
            assert used <= known, f"{expr!r}: labels {used - known} not on {name}"

    # Every metric family zotlb defines is on the dashboard somewhere.
    families = {
        family.name
        for metric in vars(Metrics()).values()
        if isinstance(metric, MetricWrapperBase)
        for family in metric.describe()
    }
    shown = {f for f in families if any(q.startswith(f) for q in queried)}
    print(
        f"dashboard queries {len(queried)} metrics; families not shown: "
        f"{sorted(families - shown)}"
    )
    assert families == shown
