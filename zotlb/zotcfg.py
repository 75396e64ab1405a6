"""`zotlb zot-config`: write every backend's zot config, with mutual sync.

The topology comes from lb.yaml: which backends exist, how zotlb reaches them,
and the mode. In active-active every backend syncs from every other one; in
active-passive the standbys sync from the primary and, unless turned off, the
primary from the standbys, so that images pushed during a failover reach the
primary before failback.
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import sys
from collections import deque
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any
from urllib.parse import urlsplit

import yaml
from yarl import URL

from . import zotkeys
from .config import ConfigError, LBConfig, ZotBackend, load_config, parse_hostport

CREDENTIALS_FILE = "sync-credentials.json"
# Large enough for a multi-GB blob over a slow link; zot's own default is 60s.
DEFAULT_HTTP_TIMEOUT = 3600.0
EXIT_OK = 0
EXIT_PROBLEMS = 2
EXIT_CANNOT_WRITE = 1


@dataclass(frozen=True)
class Member:
    """One backend as zot sees it."""

    name: str
    index: int
    address: str
    port: int
    root: str
    peer_url: str
    sources: tuple[str, ...]


# --- planning: lb.yaml -> members, with errors that name the key path -----------------


def _listen_from_url(url: URL, index: int, problems: list[str]) -> tuple[str, int]:
    where = f"backends[{index}].url"
    port = url.port or 0
    if port == 0:
        problems.append(f"{where}: port 0 makes zot pick a random port")
    host = url.host or ""
    if host == "localhost":
        return "127.0.0.1", port
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        # A DNS name: zot cannot bind a name, so it listens on every interface
        # and the name keeps pointing at this host.
        return "0.0.0.0", port
    if ip.is_multicast or ip.is_reserved or str(ip) == "255.255.255.255":
        problems.append(
            f"{where}: zot cannot listen on {ip} (multicast, broadcast or reserved); "
            f"give the host's own address or zot.backends.<name>.listen"
        )
    return str(ip), port


def _host_identity(url: URL) -> str:
    host = url.host or ""
    try:
        if host == "localhost" or ipaddress.ip_address(host).is_loopback:
            return "localhost"
    except ValueError:
        pass
    return host.lower()


def _nested(a: str, b: str) -> bool:
    pa, pb = PurePosixPath(a), PurePosixPath(b)
    return pa == pb or pa in pb.parents or pb in pa.parents


def _sources(cfg: LBConfig) -> dict[str, tuple[str, ...]]:
    names = [b.name for b in cfg.backends]
    if cfg.mode == "active-active":
        return {n: tuple(p for p in names if p != n) for n in names}
    primary, standbys = names[0], names[1:]
    out = {n: (primary,) for n in standbys}
    out[primary] = tuple(standbys) if cfg.zot.sync.reverse else ()
    return out


def plan(cfg: LBConfig, source: str = "lb.yaml") -> list[Member]:
    """Members with listen address, storage root and sync sources, or ConfigError."""
    zot = cfg.zot
    problems: list[str] = []
    names = {b.name for b in cfg.backends}
    for name in zot.backends:
        if name not in names:
            problems.append(
                f"zot.backends.{name}: no backend named {name!r} in backends"
            )

    sources = _sources(cfg)
    members: list[Member] = []
    roots: list[tuple[str, str, str]] = []
    for i, backend in enumerate(cfg.backends):
        extra = zot.backends.get(backend.name, ZotBackend())
        url = backend.origin
        if url.scheme == "https" and zot.tls is None:
            problems.append(
                f"backends[{i}].url: {backend.url} is https, but zot serves plain "
                "HTTP unless zot.tls.cert and zot.tls.key are set"
            )
        if url.scheme == "http" and zot.tls is not None:
            problems.append(
                f"backends[{i}].url: {backend.url} is http, but zot.tls makes zot "
                "serve HTTPS only"
            )
        if extra.listen is not None:
            address, port = parse_hostport(extra.listen)
            if port == 0:
                problems.append(
                    f"zot.backends.{backend.name}.listen: port 0 makes zot pick a "
                    "random port"
                )
        else:
            address, port = _listen_from_url(url, i, problems)
        if (
            backend.name == CREDENTIALS_FILE.removesuffix(".json")
            and zot.sync.credentials
        ):
            problems.append(
                f"backends[{i}].name: {backend.name!r} clashes with the sync "
                "credentials file; rename the backend"
            )

        root = extra.root_directory or f"/var/lib/zot/{backend.name}"
        host = _host_identity(url)
        for other_name, other_host, other_root in roots:
            if host == other_host and _nested(root, other_root):
                problems.append(
                    f"zot.backends.{backend.name}.root_directory: {root} overlaps "
                    f"{other_root}, the storage root of backend {other_name!r} on the "
                    f"same host {url.host}; give each backend its own directory"
                )
        roots.append((backend.name, host, root))
        members.append(
            Member(
                name=backend.name,
                index=i,
                address=address,
                port=port,
                root=root,
                peer_url=extra.peer_url or backend.url,
                sources=sources[backend.name],
            )
        )

    has_peers = any(m.sources for m in members)
    if zot.htpasswd and has_peers and zot.sync.credentials is None:
        problems.append(
            "zot.sync.credentials: required when zot.htpasswd is set, "
            "because each zot must log in to its peers to sync"
        )
    timeouts = zot.http_timeouts
    if not zotkeys.is_at_least(zot.version, "v2.1.17"):
        for key, value in (("read", timeouts.read), ("write", timeouts.write)):
            if value is not None:
                problems.append(
                    f"zot.http_timeouts.{key}: zot {zot.version} has no "
                    f"http.{key}Timeout (added in v2.1.17) and would refuse to start"
                )
    if problems:
        raise ConfigError(source, problems)
    return members


# --- rendering ------------------------------------------------------------------------


def _registry(cfg: LBConfig, peer: Member) -> dict[str, Any]:
    sync = cfg.zot.sync
    reg: dict[str, Any] = {
        "urls": [peer.peer_url],
        "onDemand": sync.on_demand,
        "tlsVerify": sync.tls_verify,
        "content": [{"prefix": p} for p in sync.prefixes],
    }
    if sync.poll_interval > 0:
        reg["pollInterval"] = zotkeys.go_duration(sync.poll_interval)
    if sync.cert_dir:
        reg["certDir"] = sync.cert_dir
    if sync.max_retries:
        # zot refuses maxRetries without retryDelay.
        reg["maxRetries"] = sync.max_retries
        reg["retryDelay"] = zotkeys.go_duration(sync.retry_delay)
    return reg


def render_member(
    cfg: LBConfig, member: Member, members: list[Member]
) -> dict[str, Any]:
    zot = cfg.zot
    by_name = {m.name: m for m in members}
    http: dict[str, Any] = {"address": member.address, "port": str(member.port)}
    if zotkeys.accepts("http.readTimeout", zot.version):
        read = zot.http_timeouts.read
        write = zot.http_timeouts.write
        http["readTimeout"] = zotkeys.go_duration(
            DEFAULT_HTTP_TIMEOUT if read is None else read
        )
        http["writeTimeout"] = zotkeys.go_duration(
            DEFAULT_HTTP_TIMEOUT if write is None else write
        )
    if zot.tls:
        http["tls"] = {"cert": zot.tls.cert, "key": zot.tls.key}
    if zot.htpasswd:
        http["auth"] = {"htpasswd": {"path": zot.htpasswd}}

    doc: dict[str, Any] = {
        "distSpecVersion": zotkeys.dist_spec_version(zot.version),
        "storage": {"rootDirectory": member.root},
        "http": http,
        "log": {"level": zot.log_level},
    }
    extensions: dict[str, Any] = {}
    if member.sources:
        sync: dict[str, Any] = {
            "enable": True,
            "registries": [_registry(cfg, by_name[s]) for s in member.sources],
        }
        if zot.sync.credentials:
            sync["credentialsFile"] = zot.sync.credentials_path
        extensions["sync"] = sync
    if zot.metrics.enable:
        extensions["metrics"] = {
            "enable": True,
            "prometheus": {"path": zot.metrics.path},
        }
    if extensions:
        doc["extensions"] = extensions
    return doc


def _dump(doc: Any) -> str:
    return json.dumps(doc, indent=2, sort_keys=True) + "\n"


def _credentials(cfg: LBConfig, members: list[Member]) -> dict[str, Any]:
    creds = cfg.zot.sync.credentials
    assert creds is not None
    account = {
        "username": creds.username,
        "password": creds.password.get_secret_value(),
    }
    # zot looks entries up by the upstream's host[:port].
    return {urlsplit(m.peer_url).netloc: account for m in members}


def generate(cfg: LBConfig, source: str = "lb.yaml") -> dict[str, str]:
    """File name -> exact file text, for every file `zot-config` writes."""
    members = plan(cfg, source)
    files: dict[str, str] = {}
    for member in members:
        doc = render_member(cfg, member, members)
        errors = [
            f
            for f in zotkeys.check_config(doc, cfg.zot.version)
            if f.severity == "error"
        ]
        if errors:
            raise RuntimeError(
                f"generated an invalid config for {member.name}: {errors}"
            )
        files[f"{member.name}.json"] = _dump(doc)
    if cfg.zot.sync.credentials and any(m.sources for m in members):
        files[CREDENTIALS_FILE] = _dump(_credentials(cfg, members))
    return dict(sorted(files.items()))


# --- the summary ----------------------------------------------------------------------


def words(seconds: float) -> str:
    """30 -> "30 s", 90 -> "1 min 30 s", 3600 -> "1 h"."""
    if seconds < 1:
        return f"{round(seconds * 1000)} ms"
    total = round(seconds)
    hours, rest = divmod(total, 3600)
    minutes, secs = divmod(rest, 60)
    parts = [(hours, "h"), (minutes, "min"), (secs, "s")]
    return " ".join(f"{n} {unit}" for n, unit in parts if n)


def _hops(members: list[Member]) -> dict[tuple[str, str], int]:
    # Edge peer -> member when the member syncs from the peer.
    onward: dict[str, list[str]] = {m.name: [] for m in members}
    for m in members:
        for src in m.sources:
            onward[src].append(m.name)
    hops = {}
    for start in onward:
        seen = {start: 0}
        queue = deque([start])
        while queue:
            here = queue.popleft()
            for nxt in onward[here]:
                if nxt not in seen:
                    seen[nxt] = seen[here] + 1
                    queue.append(nxt)
        hops.update({(start, end): n for end, n in seen.items() if end != start})
    return hops


def window_lines(cfg: LBConfig, members: list[Member]) -> list[str]:
    sync = cfg.zot.sync
    hops = _hops(members)
    lines = []
    for a in members:
        for b in members:
            if a is b:
                continue
            n = hops.get((a.name, b.name))
            if n is None:
                lines.append(f"an image pushed to {a.name} never reaches {b.name}")
                continue
            via = "" if n == 1 else f" (through {n - 1} other backend{'s' * (n > 2)})"
            ways = []
            if sync.poll_interval > 0:
                ways.append(f"within {words(n * sync.poll_interval)}")
            if sync.on_demand:
                ways.append(f"on {b.name}'s first pull of it")
            lines.append(
                f"an image pushed to {a.name} reaches {b.name}{via} "
                + ", or ".join(ways)
            )
    return lines


def summary(cfg: LBConfig, members: list[Member], written: list[str]) -> str:
    zot, sync = cfg.zot, cfg.zot.sync
    count = f"{len(members)} backend{'s' * (len(members) != 1)}"
    out = [f"zot {zot.version}, {cfg.mode}, {count}: " + ", ".join(written)]
    how = []
    if sync.poll_interval > 0:
        how.append(f"every {words(sync.poll_interval)}")
    if sync.on_demand:
        how.append("on demand")
    for m in members:
        if m.sources:
            out.append(
                f"  {m.name} syncs from {', '.join(m.sources)} ({' and '.join(how)})"
            )
        else:
            out.append(f"  {m.name} syncs from no other backend")
    if cfg.mode == "active-passive" and len(members) > 1:
        primary = members[0].name
        if sync.reverse:
            out.append(
                f"  {primary} (primary) also syncs from its standbys: after a failover "
                "clients push to a standby, and those images must reach "
                f"{primary} before failback"
            )
        else:
            out.append(
                f"  reverse sync is off: images pushed to a standby during a failover "
                f"stay there; copy them to {primary} before failback"
            )
    out.append("failure window:")
    out += [f"  {line}" for line in window_lines(cfg, members)]
    if len(members) > 1:
        out.append(
            "  a backend that fails before then holds the only copy of its newest "
            "images until it is back"
        )
    return "\n".join(out)


# --- the command ----------------------------------------------------------------------


def write_configs(cfg: LBConfig, out_dir: Path, source: str) -> list[str]:
    files = generate(cfg, source)
    out_dir.mkdir(parents=True, exist_ok=True)
    for name, text in files.items():
        path = out_dir / name
        path.write_text(text, encoding="utf-8")
        if name == CREDENTIALS_FILE:
            path.chmod(0o600)
    return [str(out_dir / name) for name in files]


def _read_zot_file(path: str) -> Any:
    text = Path(path).read_text(encoding="utf-8")
    if path.endswith((".yaml", ".yml")):
        return yaml.safe_load(text)
    return json.loads(text)


def check_files(paths: list[str], version: str) -> int:
    status = EXIT_OK
    for path in paths:
        try:
            data = _read_zot_file(path)
        except FileNotFoundError:
            print(f"{path}: file not found")
            status = EXIT_PROBLEMS
            continue
        except (OSError, UnicodeDecodeError, ValueError, yaml.YAMLError) as exc:
            print(f"{path}: cannot parse: {exc}")
            status = EXIT_PROBLEMS
            continue
        findings = zotkeys.check_config(data, version)
        errors = sum(f.severity == "error" for f in findings)
        if errors:
            status = EXIT_PROBLEMS
            print(f"{path}: {errors} problem{'s' * (errors > 1)} for zot {version}")
        else:
            print(f"{path}: ok for zot {version}")
        for finding in findings:
            print(f"  {finding}")
    return status


def _cmd_zot_config(args: argparse.Namespace) -> int:
    if args.check:
        if args.zot_version:
            try:
                version = zotkeys.normalize_version(args.zot_version)
            except ValueError as exc:
                print(f"--zot-version: {exc}", file=sys.stderr)
                return EXIT_PROBLEMS
        elif args.config:
            version = load_config(args.config).zot.version
        else:
            version = zotkeys.newest_release()
        return check_files(args.check, version)

    if not args.out:
        print("zotlb zot-config: give -o DIR, or --check FILE...", file=sys.stderr)
        return EXIT_PROBLEMS
    source = args.config or "lb.yaml"
    cfg = load_config(source)
    try:
        written = write_configs(cfg, Path(args.out), source)
    except OSError as exc:
        where = exc.filename or args.out
        reason = exc.strerror or exc
        print(f"zotlb zot-config: cannot write {where}: {reason}", file=sys.stderr)
        return EXIT_CANNOT_WRITE
    print(summary(cfg, plan(cfg, source), written))
    return EXIT_OK


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "zot-config",
        help="write each backend's zot config (mutual sync), or --check zot configs",
    )
    parser.add_argument("-c", "--config", default=None, help="path to lb.yaml")
    parser.add_argument("-o", "--out", metavar="DIR", help="directory to write into")
    parser.add_argument(
        "--check", nargs="+", metavar="FILE", help="validate existing zot config files"
    )
    parser.add_argument(
        "--zot-version",
        help="zot release to check against (default: lb.yaml's zot.version, "
        "else the newest known)",
    )
    parser.set_defaults(func=_cmd_zot_config)
