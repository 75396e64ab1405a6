"""Deployment files: docker-compose.yml, the Dockerfile, deploy/kubernetes/."""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from zotlb import zotkeys
from zotlb.config import load_config
from zotlb.zotcfg import generate

REPO = Path(__file__).resolve().parents[1]
COMPOSE_CONF = REPO / "conf" / "compose"
K8S = REPO / "deploy" / "kubernetes"
ZOT_IMAGE = re.compile(r"^ghcr\.io/project-zot/zot(-linux-amd64)?:(v\d+\.\d+\.\d+)$")


def compose() -> dict[str, Any]:
    return yaml.safe_load((REPO / "docker-compose.yml").read_text())


def lb_config() -> Any:
    return load_config(COMPOSE_CONF / "lb.yaml")


def zot_services(doc: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {
        n: s for n, s in doc["services"].items() if ZOT_IMAGE.match(s.get("image", ""))
    }


def host_mounts(service: dict[str, Any]) -> dict[str, str]:
    """Container path -> host path, for bind mounts (those starting with '.')."""
    out = {}
    for volume in service.get("volumes", []):
        source, target = volume.split(":")[:2]
        if source.startswith("."):
            out[target] = source
    return out


def test_committed_zot_configs_are_what_zot_config_writes_today() -> None:
    cfg = lb_config()
    files = generate(cfg, str(COMPOSE_CONF / "lb.yaml"))
    for name, text in files.items():
        assert (COMPOSE_CONF / name).read_text() == text, (
            f"conf/compose/{name} is stale: run "
            "zotlb zot-config -c conf/compose/lb.yaml -o conf/compose"
        )
    committed = {p.name for p in COMPOSE_CONF.glob("*.json")}
    assert committed == set(files)


def test_compose_has_two_zots_and_zotlb_on_5000() -> None:
    doc = compose()
    cfg = lb_config()
    zots = zot_services(doc)
    assert sorted(zots) == sorted(b.name for b in cfg.backends) == ["zot-a", "zot-b"]
    assert "zotlb" in doc["services"]

    for name, service in zots.items():
        # Pinned to the release the configs were generated for.
        tag = ZOT_IMAGE.match(service["image"]).group(2)
        assert tag == cfg.zot.version
        assert tag in zotkeys.releases()
        assert (
            host_mounts(service)["/etc/zot/config.json"]
            == f"./conf/compose/{name}.json"
        )

    zotlb = doc["services"]["zotlb"]
    assert "5000:5000" in zotlb["ports"]
    assert host_mounts(zotlb)["/etc/zotlb/lb.yaml"] == "./conf/compose/lb.yaml"
    assert zotlb["command"] == ["serve", "-c", "/etc/zotlb/lb.yaml"]
    assert set(zotlb["depends_on"]) == set(zots)


def test_compose_gives_each_zot_its_own_declared_volume() -> None:
    doc = compose()
    cfg = lb_config()
    declared = set(doc["volumes"])
    seen = []
    for name, service in zot_services(doc).items():
        named = [v.split(":") for v in service["volumes"] if not v.startswith(".")]
        assert len(named) == 1
        volume, target = named[0][:2]
        assert volume in declared
        # The volume holds the storage root of that backend's generated config.
        config = json.loads((COMPOSE_CONF / f"{name}.json").read_text())
        assert config["storage"]["rootDirectory"] == target
        seen.append(volume)
    assert len(set(seen)) == len(seen) == len(cfg.backends)


def test_compose_mounts_only_files_that_exist() -> None:
    for service in compose()["services"].values():
        for source in host_mounts(service).values():
            assert (REPO / source).is_file(), source


def test_compose_backend_urls_match_services_and_ports() -> None:
    cfg = lb_config()
    for backend in cfg.backends:
        config = json.loads((COMPOSE_CONF / f"{backend.name}.json").read_text())
        assert backend.origin.host == backend.name
        assert config["http"]["port"] == str(backend.origin.port)


def test_dockerfile_runs_zotlb_as_non_root() -> None:
    text = (REPO / "Dockerfile").read_text()
    lines = [line.strip() for line in text.splitlines()]
    final_stage = lines[
        max(i for i, line in enumerate(lines) if line.startswith("FROM")) :
    ]
    users = [line.split()[1] for line in final_stage if line.startswith("USER ")]
    assert users and users[-1] not in ("root", "0")
    assert 'CMD ["serve", "-c", "/etc/zotlb/lb.yaml"]' in lines
    assert 'ENTRYPOINT ["zotlb"]' in lines
    assert all(
        "slim" in line or "alpine" in line for line in lines if line.startswith("FROM")
    )


# --- Kubernetes -----------------------------------------------------------------------


def k8s_docs() -> list[dict[str, Any]]:
    docs = []
    for path in sorted(K8S.glob("*.yaml")):
        docs += [d for d in yaml.safe_load_all(path.read_text()) if d]
    return docs


def by_kind(kind: str) -> dict[str, dict[str, Any]]:
    return {d["metadata"]["name"]: d for d in k8s_docs() if d["kind"] == kind}


def test_kubernetes_manifests_match_the_schemas() -> None:
    kv = pytest.importorskip("kubernetes_validate")
    version = kv.utils.latest_version()
    docs = k8s_docs()
    assert {d["kind"] for d in docs} >= {"Deployment", "Service", "ConfigMap"}
    for doc in docs:
        kv.validate(doc, version, strict=True)

    # The validator does reject what the schema forbids.
    broken = copy.deepcopy(by_kind("Deployment")["zotlb"])
    broken["spec"]["replicas"] = "two"
    with pytest.raises(kv.ValidationError):
        kv.validate(broken, version, strict=True)


def test_two_zotlb_replicas_in_front_of_the_zots() -> None:
    deployments = by_kind("Deployment")
    services = by_kind("Service")
    zotlb = deployments["zotlb"]
    assert zotlb["spec"]["replicas"] == 2
    container = zotlb["spec"]["template"]["spec"]["containers"][0]
    assert container["args"] == ["serve", "-c", "/etc/zotlb/lb.yaml"]
    assert zotlb["spec"]["template"]["spec"]["securityContext"]["runAsNonRoot"] is True

    # Every backend in lb.yaml is a Service selecting a zot Deployment.
    cfg = lb_config()
    for backend in cfg.backends:
        service = services[backend.origin.host]
        assert service["spec"]["ports"][0]["port"] == backend.origin.port
        pod_labels = deployments[backend.name]["spec"]["template"]["metadata"]["labels"]
        assert service["spec"]["selector"].items() <= pod_labels.items()
        image = deployments[backend.name]["spec"]["template"]["spec"]["containers"][0][
            "image"
        ]
        assert ZOT_IMAGE.match(image).group(2) == cfg.zot.version


def test_kubernetes_configmaps_hold_the_generated_files() -> None:
    configmaps = by_kind("ConfigMap")
    assert (
        configmaps["zotlb-config"]["data"]["lb.yaml"]
        == (COMPOSE_CONF / "lb.yaml").read_text()
    )
    files = generate(lb_config())
    for backend in lb_config().backends:
        data = configmaps[f"{backend.name}-config"]["data"]
        assert data["config.json"] == files[f"{backend.name}.json"]


def test_kubernetes_references_resolve() -> None:
    configmaps, claims = by_kind("ConfigMap"), by_kind("PersistentVolumeClaim")
    for deployment in by_kind("Deployment").values():
        spec = deployment["spec"]
        assert spec["selector"]["matchLabels"].items() <= (
            spec["template"]["metadata"]["labels"].items()
        )
        for volume in spec["template"]["spec"]["volumes"]:
            if "configMap" in volume:
                assert volume["configMap"]["name"] in configmaps
            if "persistentVolumeClaim" in volume:
                assert volume["persistentVolumeClaim"]["claimName"] in claims
