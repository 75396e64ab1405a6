"""Replication between registries that require a login (htpasswd basic auth)."""

from __future__ import annotations

import base64
import subprocess
import sys
from dataclasses import dataclass

import pytest
import yaml
from conftest import Registry, http, make_registry, needs_registry, wait_until
from replhelp import manifest_digest, push_small, small_image

pytestmark = [needs_registry]
bcrypt = pytest.importorskip("bcrypt")

USER, PASSWORD = "replicator", "s3cret-pass"
AUTH = {
    "Authorization": "Basic " + base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()
}


@dataclass
class AuthRegistry(Registry):
    def is_ready(self) -> bool:
        if self.proc is not None and self.proc.poll() is not None:
            raise AssertionError(f"registry {self.name} exited")
        try:
            return http("GET", self.url + "/v2/", timeout=1)[0] == 401
        except OSError:
            return False


@pytest.fixture
def auth_registries(tmp_path):
    htpasswd = tmp_path / "htpasswd"
    hashed = bcrypt.hashpw(PASSWORD.encode(), bcrypt.gensalt(rounds=4)).decode()
    htpasswd.write_text(f"{USER}:{hashed}\n")
    started = []
    for name in ("a", "b"):
        plain = make_registry(tmp_path / f"auth-{name}", name)
        cfg = yaml.safe_load(plain.config.read_text())
        cfg["auth"] = {"htpasswd": {"realm": "zotlb-test", "path": str(htpasswd)}}
        plain.config.write_text(yaml.safe_dump(cfg))
        reg = AuthRegistry(plain.name, plain.port, plain.root, plain.config)
        started.append(reg.start())
    yield started
    for reg in started:
        reg.stop()


def test_copies_log_in_with_the_configured_account(auth_registries, zotlb_factory):
    a, b = auth_registries
    creds = {"username": USER, "password": PASSWORD}
    lb = zotlb_factory(
        [a, b],
        replication={"mode": "async", "credentials": creds, "drift_interval": "100ms"},
    )
    image = small_image("auth")
    # The client's own login goes through zotlb to the home backend.
    push_small(lb.url, "auth/app", "v1", image, AUTH)
    for reg in (a, b):
        wait_until(
            lambda reg=reg: (
                manifest_digest(reg.url, "auth/app", "v1", AUTH) == image["digest"]
            ),
            10,
            f"the image on {reg.name}",
        )
    # A whole drift check after both copies landed: it logs in too.
    from datetime import UTC, datetime

    since = datetime.now(UTC).isoformat()

    def checks_since() -> list[dict]:
        return [e for e in lb.events("drift.checked") if e["timestamp"] > since]

    wait_until(lambda: len(checks_since()) >= 2, 10, "two drift checks")
    assert checks_since()[-1]["result"] == "in_sync"
    assert lb.status()["drift"]["last"]["in_sync"] is True

    diff = subprocess.run(
        [sys.executable, "-m", "zotlb", "diff", "-c", str(lb.config_path)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert diff.returncode == 0, diff.stdout + diff.stderr
    assert PASSWORD not in diff.stdout + diff.stderr


def test_without_the_account_the_peer_refuses_and_the_job_is_dropped(
    auth_registries, zotlb_factory
):
    a, b = auth_registries
    lb = zotlb_factory([a, b], replication={"mode": "async"})
    push_small(lb.url, "auth/app", "v1", small_image("no-creds"), AUTH)
    wait_until(lambda: lb.events("replication.failed"), 10, "the refusal")
    failed = lb.events("replication.failed")[0]
    assert failed["cause"] == "rejected" and failed["permanent"] is True
    assert "401" in failed["error"]
    assert lb.status()["replication"]["queue_length"] == 0
