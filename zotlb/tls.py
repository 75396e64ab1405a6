"""TLS contexts: the one clients meet and the ones backends are checked with.

Config holds file names; this module turns them into ssl.SSLContext objects,
once at start (and on a reload), so a bad certificate is a config error that
names its key path rather than a failure on the first connection.
"""

from __future__ import annotations

import ssl
from collections.abc import Iterable
from dataclasses import dataclass

from .config import BackendConfig, BackendTLS, ConfigError, LBConfig, ListenTLS

# What aiohttp takes as `ssl=`: a context, or True for its default (system
# CAs, verification on), or False for no verification at all.
BackendSSL = ssl.SSLContext | bool


@dataclass(frozen=True, slots=True)
class TLSContexts:
    listener: ssl.SSLContext | None
    backends: dict[str, BackendSSL]


def listener_context(tls: ListenTLS) -> tuple[ssl.SSLContext | None, list[str]]:
    """The context for the proxy listener, or the problems that prevent it."""
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    # zotlb speaks HTTP/1.1 only; say so, so no client tries h2.
    ctx.set_alpn_protocols(["http/1.1"])
    problems = []
    try:
        ctx.load_cert_chain(tls.cert, tls.key)
    except (ssl.SSLError, OSError) as exc:
        problems.append(
            f"listen.tls.cert: cannot load it with listen.tls.key "
            f"(PEM certificate chain and its private key): {exc}"
        )
    if tls.client_ca is not None:
        ctx.verify_mode = ssl.CERT_REQUIRED
        try:
            ctx.load_verify_locations(cafile=tls.client_ca)
        except (ssl.SSLError, OSError) as exc:
            problems.append(f"listen.tls.client_ca: cannot load: {exc}")
    return (None if problems else ctx), problems


def backend_context(tls: BackendTLS | None) -> BackendSSL:
    if tls is None:
        return True
    if not tls.verify:
        return False
    if tls.ca_file is None:
        return True
    # Only the given CA: a backend CA file pins who may sign the backend.
    return ssl.create_default_context(cafile=tls.ca_file)


def backend_contexts(
    backends: Iterable[BackendConfig], source: str = "<config>"
) -> dict[str, BackendSSL]:
    out: dict[str, BackendSSL] = {}
    problems = []
    for i, backend in enumerate(backends):
        try:
            out[backend.name] = backend_context(backend.tls)
        except (ssl.SSLError, OSError) as exc:
            problems.append(f"backends[{i}].tls.ca_file: cannot load: {exc}")
    if problems:
        raise ConfigError(source, problems)
    return out


def build(cfg: LBConfig, source: str = "<config>") -> TLSContexts:
    """Every context the config asks for; ConfigError names the faulty keys."""
    listener = None
    problems: list[str] = []
    if cfg.listen.tls is not None:
        listener, problems = listener_context(cfg.listen.tls)
    try:
        backends = backend_contexts(cfg.backends, source)
    except ConfigError as exc:
        problems += exc.problems
        backends = {}
    if problems:
        raise ConfigError(source, problems)
    return TLSContexts(listener, backends)
