"""`zotlb status`, `drain`, `enable` and `reload`: clients of the admin API."""

from __future__ import annotations

import argparse
import json
import os
import sys
import urllib.error
import urllib.request
from typing import Any

from .config import load_config, parse_hostport

DEFAULT_ADMIN = "http://127.0.0.1:9100"
EXIT_FAILED = 1


class AdminError(Exception):
    pass


def _admin_from_config(path: str) -> tuple[str, str | None]:
    """The admin URL and token a running zotlb with this lb.yaml uses."""
    cfg = load_config(path)
    if cfg.admin.listen is None:
        raise AdminError(f"{path}: admin.listen is off; this zotlb has no admin API")
    host, port = parse_hostport(cfg.admin.listen)
    if host in ("0.0.0.0", "::", ""):
        host = "127.0.0.1"
    if ":" in host:
        host = f"[{host}]"
    return f"http://{host}:{port}", cfg.admin.resolved_token()


def _call(args: argparse.Namespace, method: str, path: str) -> tuple[int, Any]:
    admin, token = args.admin, args.token
    if args.config:
        admin, config_token = _admin_from_config(args.config)
        token = token or config_token
    url = admin.rstrip("/") + path
    headers = {"Accept": "application/json"}
    token = token or os.environ.get("ZOTLB_ADMIN_TOKEN")
    if token:
        headers["Authorization"] = f"Bearer {token}"
    req = urllib.request.Request(url, method=method, headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=args.timeout) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        try:
            body = json.loads(exc.read())
        except ValueError:
            body = {"error": exc.reason}
        return exc.code, body
    except (OSError, ValueError) as exc:
        reason = getattr(exc, "reason", exc)
        raise AdminError(f"cannot reach the admin API at {url}: {reason}") from None


def _rate(value: float) -> str:
    return f"{100 * value:.1f}%"


def _bytes(value: float) -> str:
    for unit in ("B", "KiB", "MiB"):
        if value < 1024:
            return f"{value:.0f}{unit}" if unit == "B" else f"{value:.1f}{unit}"
        value /= 1024
    return f"{value:.1f}GiB"


def render_table(status: dict[str, Any]) -> str:
    """The status page as a terminal table."""
    header = (
        f"zotlb {status['version']}  mode: {status['mode']}  "
        f"uptime: {status['uptime_seconds']:.0f}s"
    )
    columns = (
        "BACKEND",
        "STATE",
        "FLAGS",
        "IN-FLIGHT",
        "UPLOADS",
        "REQ/S",
        "ERRORS",
        "BYTES/S",
        "SHARE",
        "PROBE",
        "SINCE",
    )
    rows = [columns]
    for b in status["backends"]:
        flags = ",".join(
            f for f, on in (("drained", b["drained"]), ("active", b["active"])) if on
        )
        probe = b.get("probe_latency_ms")
        rows.append(
            (
                b["name"],
                b["state"],
                flags or "-",
                str(b["in_flight"]),
                str(b.get("uploads_in_progress", 0)),
                f"{b.get('requests_per_second', 0):.2f}",
                _rate(b.get("error_rate", 0)),
                _bytes(b.get("bytes_per_second", 0)),
                _rate(b.get("traffic_share", 0)),
                "-" if probe is None else f"{probe:.1f}ms",
                f"{b['seconds_in_state']:.0f}s",
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(columns))]
    lines = [header, ""]
    for row in rows:
        lines.append(
            "  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)).rstrip()
        )
    return "\n".join(lines)


def _cmd_status(args: argparse.Namespace) -> int:
    code, body = _call(args, "GET", "/status")
    if code != 200:
        print(f"zotlb status: {body.get('error', code)}", file=sys.stderr)
        return EXIT_FAILED
    print(json.dumps(body, indent=2) if args.json else render_table(body))
    return 0


def _cmd_drain(args: argparse.Namespace) -> int:
    action = "drain" if args.command == "drain" else "enable"
    code, body = _call(args, "POST", f"/backends/{args.name}/{action}")
    if code != 200:
        print(f"zotlb {action}: {body.get('error', code)}", file=sys.stderr)
        return EXIT_FAILED
    print(f"{body['name']}: {'drained' if body['drained'] else 'enabled'}")
    return 0


def _cmd_reload(args: argparse.Namespace) -> int:
    code, body = _call(args, "POST", "/reload")
    if code == 200:
        print("configuration reloaded")
        pending = body.get("needs_restart") or []
        if pending:
            print(f"  takes effect after a restart: {', '.join(pending)}")
        return 0
    print(
        "zotlb reload: the configuration was rejected; the old one stays in force",
        file=sys.stderr,
    )
    for problem in body.get("problems", [body.get("error", code)]):
        print(f"  {problem}", file=sys.stderr)
    return EXIT_FAILED


def _add_admin_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--admin",
        default=os.environ.get("ZOTLB_ADMIN", DEFAULT_ADMIN),
        help="admin listener URL (default: $ZOTLB_ADMIN or %(default)s)",
    )
    parser.add_argument("--token", help="bearer token (default: $ZOTLB_ADMIN_TOKEN)")
    parser.add_argument(
        "-c",
        "--config",
        help="take the admin URL and token from this lb.yaml instead",
    )
    parser.add_argument("--timeout", type=float, default=10.0, help=argparse.SUPPRESS)


def _run(func: Any) -> Any:
    def wrapped(args: argparse.Namespace) -> int:
        try:
            return int(func(args))
        except AdminError as exc:
            print(f"zotlb {args.command}: {exc}", file=sys.stderr)
            return EXIT_FAILED

    return wrapped


def register(sub: argparse._SubParsersAction) -> None:
    status = sub.add_parser("status", help="show the backends of a running zotlb")
    _add_admin_args(status)
    status.add_argument("--json", action="store_true", help="print the raw JSON")
    status.set_defaults(func=_run(_cmd_status))

    for name, text in (
        ("drain", "stop sending new requests to a backend; in-flight ones finish"),
        ("enable", "undo drain"),
    ):
        parser = sub.add_parser(name, help=text)
        parser.add_argument("name", help="backend name from lb.yaml")
        _add_admin_args(parser)
        parser.set_defaults(func=_run(_cmd_drain))

    reload = sub.add_parser(
        "reload", help="re-read lb.yaml in a running zotlb (same as SIGHUP)"
    )
    _add_admin_args(reload)
    reload.set_defaults(func=_run(_cmd_reload))
