"""`zotlb local`: run the backends of lb.yaml on this machine, and zotlb in front.

For trying zotlb out: each backend whose URL is on loopback gets its own
registry process and storage directory (zot when a `zot` binary is on PATH,
else the CNCF distribution registry, `docker-registry`), then `zotlb serve`
runs in the foreground. Ctrl+C stops all of it.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
import urllib.request
from importlib import resources
from pathlib import Path

import yaml

from .config import LBConfig, config_from_mapping, is_loopback, load_config

DEFAULT_CONFIG = "default-lb.yaml"


def default_config_text() -> str:
    return resources.files("zotlb").joinpath("data", DEFAULT_CONFIG).read_text()


def _registry_config(name: str, port: int, root: Path) -> Path:
    path = root / "config.yml"
    path.write_text(
        yaml.safe_dump(
            {
                "version": 0.1,
                "log": {"level": "warn", "accesslog": {"disabled": True}},
                "storage": {
                    "filesystem": {"rootdirectory": str(root / "data")},
                    "delete": {"enabled": True},
                },
                # One shared secret, so either registry accepts the other's
                # signed upload state (harmless here, required behind any LB).
                "http": {"addr": f"127.0.0.1:{port}", "secret": "zotlb-local"},
            }
        )
    )
    return path


def _zot_config(cfg: LBConfig, name: str, port: int, root: Path) -> Path:
    from . import zotcfg

    generated = json.loads(zotcfg.generate(cfg)[f"{name}.json"])
    generated["storage"]["rootDirectory"] = str(root / "data")
    generated["http"]["address"] = "127.0.0.1"
    generated["http"]["port"] = str(port)
    path = root / "zot.json"
    path.write_text(json.dumps(generated, indent=2))
    return path


def _wait_ready(url: str, proc: subprocess.Popen[bytes], timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the registry for {url} exited with {proc.returncode}")
        try:
            with urllib.request.urlopen(url + "/v2/", timeout=1):
                return
        except urllib.error.HTTPError:
            return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"the registry at {url} did not come up in {timeout:.0f}s")


def start_backends(cfg: LBConfig, state_dir: Path) -> list[subprocess.Popen[bytes]]:
    zot = shutil.which("zot")
    registry = shutil.which("docker-registry")
    if zot is None and registry is None:
        raise RuntimeError(
            "neither zot nor docker-registry is on PATH "
            "(apt-get install docker-registry)"
        )
    procs: list[subprocess.Popen[bytes]] = []
    for backend in cfg.backends:
        url = backend.origin
        if not url.host or not is_loopback(url.host):
            print(f"  {backend.name}: {url} is not local, not starting it")
            continue
        root = state_dir / backend.name
        root.mkdir(parents=True, exist_ok=True)
        port = url.port or 80
        if zot is not None:
            argv = [zot, "serve", str(_zot_config(cfg, backend.name, port, root))]
            kind = "zot"
        else:
            argv = [
                str(registry),
                "serve",
                str(_registry_config(backend.name, port, root)),
            ]
            kind = "docker-registry"
        log = open(root / "registry.log", "ab")
        procs.append(subprocess.Popen(argv, stdout=log, stderr=log))
        log.close()
        _wait_ready(str(url), procs[-1])
        print(f"  {backend.name}: {kind} on {url}, storage {root / 'data'}")
    return procs


def _cmd_local(args: argparse.Namespace) -> int:
    from .server import run

    if args.config:
        cfg = load_config(args.config)
    else:
        cfg = config_from_mapping(
            yaml.safe_load(default_config_text()), "<embedded default>"
        )
    state_dir = Path(args.state_dir).resolve()
    print(f"zotlb local: starting {len(cfg.backends)} registries under {state_dir}")
    try:
        procs = start_backends(cfg, state_dir)
    except RuntimeError as exc:
        print(f"zotlb local: {exc}", file=sys.stderr)
        return 1
    host, port = cfg.listen_address
    print(
        f"zotlb local: serving on {host}:{port}; try\n"
        f"  skopeo copy --dest-tls-verify=false oci:DIR:TAG "
        f"docker://{host}:{port}/REPO:TAG\n"
        "Ctrl+C stops zotlb and the registries."
    )
    try:
        return run(cfg)
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            proc.wait(10)


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "local",
        help="start local registries for the backends and serve in front of them",
    )
    parser.add_argument(
        "-c", "--config", help="lb.yaml (default: the embedded two-registry config)"
    )
    parser.add_argument(
        "--state-dir", default=".run/local", help="where registry storage lives"
    )
    parser.set_defaults(func=_cmd_local)


__all__ = ["default_config_text", "register", "start_backends"]
