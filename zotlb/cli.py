"""The `zotlb` command line."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence

from . import __version__
from .config import ConfigError, load_config
from .ctl import register as _register_ctl
from .drift import register as _register_drift
from .local import register as _register_local
from .zotcfg import register as _register_zot_config

EXIT_OK = 0
EXIT_CONFIG = 2


def _cmd_check(args: argparse.Namespace) -> int:
    from .tls import build as build_tls

    cfg = load_config(args.config)
    # Certificates and keys are read too, as `serve` would.
    build_tls(cfg, args.config)
    names = ", ".join(b.name for b in cfg.backends)
    print(f"{args.config}: ok ({cfg.mode}, backends: {names})")
    return EXIT_OK


def _cmd_serve(args: argparse.Namespace) -> int:
    from .server import run

    cfg = load_config(args.config)
    return run(cfg, config_path=args.config)


def _add_config_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "-c",
        "--config",
        default="lb.yaml",
        help="path to lb.yaml (default: %(default)s)",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="zotlb", description="An OCI-aware load balancer for container registries."
    )
    parser.add_argument("--version", action="version", version=f"zotlb {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    serve = sub.add_parser("serve", help="run the load balancer")
    _add_config_arg(serve)
    serve.set_defaults(func=_cmd_serve)

    check = sub.add_parser("check", help="validate lb.yaml and exit")
    _add_config_arg(check)
    check.set_defaults(func=_cmd_check)

    for register in _EXTRA_COMMANDS:
        register(sub)
    return parser


# Further subcommands register themselves here: each takes the subparsers object.
_EXTRA_COMMANDS: list[Callable[[argparse._SubParsersAction], None]] = []
_EXTRA_COMMANDS.append(_register_zot_config)
_EXTRA_COMMANDS.append(_register_local)
_EXTRA_COMMANDS.append(_register_ctl)
_EXTRA_COMMANDS.append(_register_drift)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args))
    except ConfigError as exc:
        print(exc.render(), file=sys.stderr)
        return EXIT_CONFIG
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
