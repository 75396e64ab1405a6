"""Registries with htpasswd basic auth behind zotlb."""

from __future__ import annotations

import base64

import pytest
from conftest import (
    http,
    needs_registry,
    needs_skopeo,
    skopeo,
    wait_until,
)
from test_replication_auth import AUTH, PASSWORD, USER, auth_registries  # noqa: F401

# The htpasswd registries fixture; tests take it by name (ruff: F811).
from test_tls import round_trip

pytestmark = [needs_registry]


def _probes(lb, name: str, result: str) -> float:
    metrics = http("GET", lb.admin + "/metrics")[2].decode()
    sample = f'zotlb_health_checks_total{{backend="{name}",result="{result}"}} '
    for line in metrics.splitlines():
        if line.startswith(sample):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def _last_probe(lb, name: str) -> dict:
    return next(b for b in lb.status()["backends"] if b["name"] == name)["last_probe"]


@needs_skopeo
def test_push_and_pull_with_credentials(
    auth_registries, zotlb_factory, image_factory, tmp_path
):
    a, b = auth_registries
    lb = zotlb_factory([a, b], replication={"mode": "off"}, log={"level": "debug"})
    image = image_factory("v1")
    dest = f"docker://{lb.hostport}/private/app:v1"
    creds = f"{USER}:{PASSWORD}"

    anonymous = skopeo(
        "copy", "--dest-tls-verify=false", "--retry-times=0", image.ref, dest
    )
    assert anonymous.returncode != 0
    assert "unauthorized" in anonymous.stderr.lower(), anonymous.stderr

    round_trip(
        image,
        dest,
        tmp_path / "pulled",
        push=("--dest-tls-verify=false", "--dest-creds", creds),
        pull=("--src-tls-verify=false", "--src-creds", creds),
    )

    # The password, plain or base64-encoded, shows up nowhere zotlb reports.
    encoded = base64.b64encode(creds.encode()).decode()
    reported = "".join(lb.lines) + http("GET", lb.admin + "/metrics")[2].decode()
    reported += http("GET", lb.admin + "/status")[2].decode()
    assert lb.events("request"), "the access log is on"
    for secret in (PASSWORD, encoded):
        assert secret not in reported


def test_wrong_credentials_get_the_backends_401_untouched(
    auth_registries, zotlb_factory
):
    a, b = auth_registries
    lb = zotlb_factory([a, b], replication={"mode": "off"})
    wrong = {
        "Authorization": "Basic " + base64.b64encode(f"{USER}:wrong".encode()).decode()
    }
    for path in (
        "/v2/",
        "/v2/private/app/manifests/v1",
        "/v2/private/app/blobs/uploads/",
    ):
        method = "POST" if path.endswith("uploads/") else "GET"
        direct = http(method, a.url + path, headers=wrong)
        via = http(method, lb.url + path, headers=wrong)
        assert via[0] == direct[0] == 401, (path, via, direct)
        via_headers = {k.lower(): v for k, v in via[1].items()}
        direct_headers = {k.lower(): v for k, v in direct[1].items()}
        for name in (
            "www-authenticate",
            "content-type",
            "docker-distribution-api-version",
        ):
            assert via_headers[name] == direct_headers[name], name
        assert via[2] == direct[2] and b"UNAUTHORIZED" in via[2]
    # The right ones pass.
    assert http("GET", lb.url + "/v2/", headers=AUTH)[0] == 200


def test_probes_count_401_as_alive(auth_registries, zotlb_factory):
    a, b = auth_registries
    lb = zotlb_factory([a, b], replication={"mode": "off"})
    # More probes than `fall` (2): a 401 counted as a failure would have
    # marked the backend down by then.
    wait_until(lambda: _probes(lb, "a", "ok") >= 3, 5, "three probes of a")
    assert _last_probe(lb, "a")["status"] == 401
    assert _probes(lb, "a", "fail") == 0
    assert lb.backend_state("a") == "up"


def test_probes_send_configured_credentials(auth_registries, zotlb_factory):
    a, b = auth_registries
    creds = {"username": USER, "password": PASSWORD}
    lb = zotlb_factory(
        [a, b],
        replication={"mode": "off"},
        health={"credentials": creds, "expect_status": [200]},
        log={"level": "debug"},
    )
    wait_until(
        lambda: (_last_probe(lb, "a") or {}).get("status") == 200, 5, "a 200 probe"
    )
    assert lb.backend_state("a") == "up" and lb.backend_state("b") == "up"
    reported = "".join(lb.lines) + http("GET", lb.admin + "/metrics")[2].decode()
    reported += http("GET", lb.admin + "/status")[2].decode()
    assert PASSWORD not in reported


def test_probes_with_wrong_credentials_mark_the_backend_down(
    auth_registries, zotlb_factory
):
    a, b = auth_registries
    creds = {"username": USER, "password": "not-" + PASSWORD}
    lb = zotlb_factory(
        [a, b],
        replication={"mode": "off"},
        health={"credentials": creds, "expect_status": [200]},
    )
    wait_until(lambda: lb.backend_state("a") == "down", 5, "a down")
    assert "401" in _last_probe(lb, "a")["error"]
    assert creds["password"] not in "".join(lb.lines)


def test_health_credentials_need_a_password(tmp_path):
    from zotlb.config import ConfigError, config_from_mapping

    with pytest.raises(ConfigError) as info:
        config_from_mapping(
            {
                "backends": [{"name": "a", "url": "http://127.0.0.1:5001"}],
                "health": {"credentials": {"username": "u"}},
            }
        )
    assert info.value.problems == [
        "health.credentials.password: required key is missing"
    ]
    cfg = config_from_mapping(
        {
            "backends": [{"name": "a", "url": "http://127.0.0.1:5001"}],
            "health": {"credentials": {"username": "u", "password": "p4ss"}},
        }
    )
    assert "p4ss" not in repr(cfg)
