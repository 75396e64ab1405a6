"""TLS toward clients (listen.tls) and toward https backends (backends[].tls)."""

from __future__ import annotations

import http.client as httpclient
import json
import socket
import ssl
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml
from certs import CA, Pair
from conftest import (
    Registry,
    free_port,
    http,
    layout_digest,
    lb_config,
    make_registry,
    needs_registry,
    needs_skopeo,
    skopeo,
    start_zotlb,
    wait_until,
)
from ocilayout import Image

# The echo backend fixture; tests take it by name (ruff: F811).
from test_http_details import echo  # noqa: F401


@pytest.fixture
def ca(tmp_path: Path) -> CA:
    return CA(tmp_path / "ca")


def tls_listen(pair: Pair, **extra: str) -> dict[str, object]:
    return {
        "address": f"127.0.0.1:{free_port()}",
        "tls": {"cert": str(pair.cert), "key": str(pair.key), **extra},
    }


def round_trip(
    image: Image, ref: str, layout: Path, push: tuple[str, ...], pull: tuple[str, ...]
) -> None:
    """Push image to ref and pull it back into layout with skopeo, digests intact."""
    common = ("copy", "--preserve-digests", "--retry-times=0")
    pushed = skopeo(*common, *push, image.ref, ref)
    assert pushed.returncode == 0, pushed.stderr
    pulled = skopeo(*common, *pull, ref, f"oci:{layout}:{image.tag}")
    assert pulled.returncode == 0, pulled.stderr
    assert layout_digest(layout, image.tag) == image.manifest_digest


def https_get(
    port: int,
    path: str,
    ca: CA,
    client: Pair | None = None,
    headers: dict[str, str] | None = None,
) -> tuple[int, dict[str, str], bytes]:
    ctx = ssl.create_default_context(cafile=str(ca.pem))
    if client is not None:
        ctx.load_cert_chain(str(client.cert), str(client.key))
    conn = httpclient.HTTPSConnection("127.0.0.1", port, context=ctx, timeout=10)
    try:
        conn.request("GET", path, headers=headers or {})
        resp = conn.getresponse()
        return resp.status, dict(resp.getheaders()), resp.read()
    finally:
        conn.close()


# --- clients to zotlb over TLS ----------------------------------------------------


@needs_registry
@needs_skopeo
def test_skopeo_pushes_and_pulls_over_tls(registries, tmp_path, ca, image_factory):
    a, b = registries
    lb = start_zotlb(
        tmp_path,
        lb_config(
            [a, b], listen=tls_listen(ca.issue("zotlb")), replication={"mode": "off"}
        ),
    )
    try:
        certs = str(ca.cert_dir())
        image = image_factory("v1")
        dest = f"docker://{lb.hostport}/tls/app:v1"

        # Verification is on: without the CA, skopeo refuses zotlb's certificate.
        refused = skopeo("copy", "--retry-times=0", image.ref, dest)
        assert refused.returncode != 0
        assert "certificate" in refused.stderr, refused.stderr

        round_trip(
            image,
            dest,
            tmp_path / "pulled",
            push=("--dest-cert-dir", certs),
            pull=("--src-cert-dir", certs),
        )
        started = lb.events("server.started")[0]
        assert started["tls"] is True
    finally:
        lb.stop()


def test_backends_hear_https_and_locations_keep_the_client_scheme(echo, tmp_path, ca):
    lb = start_zotlb(tmp_path, lb_config([echo], listen=tls_listen(ca.issue("zotlb"))))
    try:
        status, headers, body = https_get(lb.port, "/v2/echo", ca)
        assert status == 200
        seen = {k.lower(): v for k, v in json.loads(body)["headers"]}
        assert seen["x-forwarded-proto"] == "https"
        # The backend's own http:// address becomes the https address the
        # client used.
        assert headers["Location"] == f"https://{lb.hostport}/v2/somewhere?x=1"
        assert headers["WWW-Authenticate"].startswith(
            f'Bearer realm="https://{lb.hostport}/'
        )
    finally:
        lb.stop()


def test_client_certificates_are_required_with_client_ca(echo, tmp_path, ca):
    listen = tls_listen(ca.issue("zotlb"), client_ca=str(ca.pem))
    lb = start_zotlb(tmp_path, lb_config([echo], listen=listen))
    try:
        status, _, _ = https_get(
            lb.port, "/v2/", ca, client=ca.issue("client", client=True)
        )
        assert status == 200
        with pytest.raises((ssl.SSLError, ConnectionError)):
            https_get(lb.port, "/v2/", ca)
        # A certificate from another CA is refused as well.
        other = CA(tmp_path / "other-ca")
        with pytest.raises((ssl.SSLError, ConnectionError)):
            https_get(lb.port, "/v2/", ca, client=other.issue("stranger", client=True))
    finally:
        lb.stop()


def test_a_stalled_tls_handshake_is_cut_off(echo, tmp_path, ca):
    cfg = lb_config([echo], listen=tls_listen(ca.issue("zotlb")))
    cfg["timeouts"]["request_header"] = "500ms"
    lb = start_zotlb(tmp_path, cfg)
    try:
        with socket.create_connection(("127.0.0.1", lb.port), timeout=5) as sock:
            sock.sendall(b"\x16\x03\x01")  # the first bytes of a ClientHello
            started = time.monotonic()
            try:
                assert sock.recv(4096) == b""
            except ConnectionResetError:
                pass
            took = time.monotonic() - started
        assert 0.4 <= took <= 1.5, took
        # Others complete their handshakes meanwhile and afterwards.
        assert https_get(lb.port, "/v2/", ca)[0] == 200
    finally:
        lb.stop()


# --- zotlb to https backends ------------------------------------------------------


@dataclass
class TLSRegistry(Registry):
    ca_file: Path = Path()

    @property
    def url(self) -> str:
        return f"https://127.0.0.1:{self.port}"

    def is_ready(self) -> bool:
        if self.proc is not None and self.proc.poll() is not None:
            raise AssertionError(f"registry {self.name} exited: {self.proc.returncode}")
        ctx = ssl.create_default_context(cafile=str(self.ca_file))
        conn = httpclient.HTTPSConnection(
            "127.0.0.1", self.port, context=ctx, timeout=1
        )
        try:
            conn.request("GET", "/v2/")
            return conn.getresponse().status == 200
        except OSError:
            return False
        finally:
            conn.close()


@pytest.fixture
def tls_registry_factory(tmp_path, ca):
    started = []

    def factory(name: str) -> TLSRegistry:
        pair = ca.issue(f"registry-{name}")
        plain = make_registry(tmp_path / f"tls-registry-{name}", name)
        cfg = yaml.safe_load(plain.config.read_text())
        cfg["http"]["tls"] = {"certificate": str(pair.cert), "key": str(pair.key)}
        plain.config.write_text(yaml.safe_dump(cfg))
        reg = TLSRegistry(
            plain.name, plain.port, plain.root, plain.config, ca_file=ca.pem
        )
        started.append(reg.start())
        return reg

    yield factory
    for reg in started:
        reg.stop()


@pytest.fixture
def tls_registry(tls_registry_factory):
    return tls_registry_factory("secure")


@needs_registry
@needs_skopeo
def test_https_backend_verified_with_its_ca_file(
    tls_registry, tmp_path, ca, image_factory
):
    cfg = lb_config([tls_registry], replication={"mode": "off"})
    cfg["backends"][0]["tls"] = {"ca_file": str(ca.pem)}
    lb = start_zotlb(tmp_path, cfg)
    try:
        image = image_factory("v1")
        dest = f"docker://{lb.hostport}/secure/app:v1"
        pushed = skopeo(
            "copy",
            "--preserve-digests",
            "--dest-tls-verify=false",
            "--retry-times=0",
            image.ref,
            dest,
        )
        assert pushed.returncode == 0, pushed.stderr
        accept = {"Accept": "application/vnd.oci.image.manifest.v1+json"}
        status, _, _ = https_get(
            tls_registry.port, "/v2/secure/app/manifests/v1", ca, headers=accept
        )
        assert status == 200
        pulled = skopeo(
            "copy",
            "--preserve-digests",
            "--src-tls-verify=false",
            "--retry-times=0",
            dest,
            f"oci:{tmp_path / 'pulled'}:v1",
        )
        assert pulled.returncode == 0, pulled.stderr
        assert layout_digest(tmp_path / "pulled", "v1") == image.manifest_digest
        assert lb.backend_state("secure") == "up"
    finally:
        lb.stop()


@needs_registry
def test_https_backend_with_an_unknown_ca_is_refused(tls_registry, tmp_path):
    # No ca_file: the system CAs do not know the test CA, so the handshake
    # fails. Slow probes so the request, not a probe, finds out first.
    lb = start_zotlb(
        tmp_path,
        lb_config(
            [tls_registry],
            health={"interval": "30s", "fall": 3},
            replication={"mode": "off"},
        ),
    )
    try:
        conn = httpclient.HTTPConnection("127.0.0.1", lb.port, timeout=10)
        conn.request("GET", "/v2/")
        resp = conn.getresponse()
        body = json.loads(resp.read())
        conn.close()
        assert resp.status == 502
        assert resp.getheader("Docker-Distribution-API-Version") == "registry/2.0"
        assert body["errors"][0]["code"] == "UNAVAILABLE"
        assert "TLS" in body["errors"][0]["message"]
        down = lb.events("backend.down")
        assert down and "certificate verify failed" in down[0]["reason"], down
    finally:
        lb.stop()


# --- bad TLS settings are config errors -------------------------------------------


def zotlb_run(command: str, path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "zotlb", command, "-c", str(path)],
        capture_output=True,
        text=True,
        timeout=30,
    )


def test_unusable_certificates_name_their_key(tmp_path, ca):
    pair = ca.issue("zotlb")
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("not a certificate\n")
    cases = [
        (
            {"cert": str(tmp_path / "missing.crt"), "key": str(pair.key)},
            None,
            "listen.tls.cert: ",
        ),
        (
            {"cert": str(garbage), "key": str(pair.key)},
            None,
            "listen.tls.cert: cannot load",
        ),
        # A key that does not belong to the certificate.
        (
            {"cert": str(pair.cert), "key": str(ca.issue("other").key)},
            None,
            "listen.tls.cert: cannot load",
        ),
        (
            {"cert": str(pair.cert), "key": str(pair.key), "client_ca": str(garbage)},
            None,
            "listen.tls.client_ca: cannot load",
        ),
        (None, {"ca_file": str(garbage)}, "backends[0].tls.ca_file: cannot load"),
        (None, {"ca_file": str(tmp_path / "nope.pem")}, "backends[0].tls.ca_file: "),
    ]
    for listen_tls, backend_tls, expected in cases:
        cfg = {"backends": [{"name": "a", "url": "https://127.0.0.1:5001"}]}
        if listen_tls:
            cfg["listen"] = {"address": "127.0.0.1:5000", "tls": listen_tls}
        if backend_tls:
            cfg["backends"][0]["tls"] = backend_tls
        path = tmp_path / "lb.yaml"
        path.write_text(yaml.safe_dump(cfg))
        # `serve` reads them the same way; once per kind is enough.
        commands = ("check", "serve") if "cannot load" in expected else ("check",)
        for command in commands:
            result = zotlb_run(command, path)
            assert result.returncode == 2, (expected, result.stdout, result.stderr)
            assert expected in result.stderr, result.stderr
            assert "Traceback" not in result.stderr


@needs_registry
def test_replication_between_https_backends_uses_their_ca(
    tls_registry_factory, tmp_path, ca
):
    from replhelp import push_small, small_image

    a, b = tls_registry_factory("a"), tls_registry_factory("b")
    cfg = lb_config([a, b], replication={"mode": "async"})
    for backend in cfg["backends"]:
        backend["tls"] = {"ca_file": str(ca.pem)}
    lb = start_zotlb(tmp_path, cfg)
    try:
        image = small_image("tls")
        push_small(lb.url, "secure/app", "v1", image)
        wait_until(
            lambda: (
                len(lb.events("replication.copied")) >= 1
                or lb.events("replication.failed")
            ),
            10,
            "the copy",
        )
        assert not lb.events("replication.failed"), lb.events("replication.failed")
        accept = {"Accept": "application/vnd.oci.image.manifest.v1+json"}
        for reg in (a, b):
            status, headers, _ = https_get(
                reg.port, "/v2/secure/app/manifests/v1", ca, headers=accept
            )
            assert status == 200, reg.name
            digest = {k.lower(): v for k, v in headers.items()}["docker-content-digest"]
            assert digest == image["digest"]
    finally:
        lb.stop()


@needs_registry
def test_reload_adds_an_https_backend_and_refuses_a_bad_ca_file(
    registries, tls_registry, tmp_path, ca
):
    import signal

    a, _ = registries
    cfg = lb_config([a], replication={"mode": "off"})
    lb = start_zotlb(tmp_path, cfg)
    try:
        garbage = tmp_path / "garbage.pem"
        garbage.write_text("not a certificate\n")
        secure = {
            "name": "secure",
            "url": tls_registry.url,
            "tls": {"ca_file": str(garbage)},
        }
        cfg["backends"].append(secure)
        lb.config_path.write_text(yaml.safe_dump(cfg))
        lb.proc.send_signal(signal.SIGHUP)
        wait_until(lambda: lb.events("config.reload.failed"), 10, "the refused reload")
        problems = lb.events("config.reload.failed")[0]["problems"]
        assert problems and problems[0].startswith(
            "backends[1].tls.ca_file: cannot load"
        )
        assert [b["name"] for b in lb.status()["backends"]] == ["a"]

        secure["tls"]["ca_file"] = str(ca.pem)
        lb.config_path.write_text(yaml.safe_dump(cfg))
        lb.proc.send_signal(signal.SIGHUP)
        wait_until(lambda: lb.events("config.reloaded"), 10, "the reload")
        # New backends start down and come up by passing probes over TLS.
        wait_until(lambda: lb.backend_state("secure") == "up", 10, "secure up")
    finally:
        lb.stop()


@needs_registry
def test_https_backend_with_verification_off(tls_registry, tmp_path):
    cfg = lb_config([tls_registry], replication={"mode": "off"})
    cfg["backends"][0]["tls"] = {"verify": False}
    lb = start_zotlb(tmp_path, cfg)
    try:
        assert http("GET", lb.url + "/v2/")[0] == 200
        assert lb.backend_state("secure") == "up"
    finally:
        lb.stop()


def test_tls_keys_are_checked(tmp_path, ca):
    from zotlb.config import ConfigError, config_from_mapping

    pair = ca.issue("zotlb")
    backend = {"name": "a", "url": "http://127.0.0.1:5001"}
    cfg = config_from_mapping(
        {
            "listen": {
                "address": "0.0.0.0:443",
                "tls": {"cert": str(pair.cert), "key": str(pair.key)},
            },
            "backends": [backend],
        }
    )
    assert cfg.listen_address == ("0.0.0.0", 443)
    assert config_from_mapping({"backends": [backend]}).listen.tls is None

    with pytest.raises(ConfigError) as info:
        config_from_mapping(
            {
                "listen": {"address": "0.0.0.0:443", "tls": {"cert": str(pair.cert)}},
                "backends": [{**backend, "tls": {"ca_file": str(ca.pem)}}],
            }
        )
    assert info.value.problems == [
        "listen.tls.key: required key is missing",
        "backends[0].tls: only for https URLs, and http://127.0.0.1:5001 is not one",
    ]
