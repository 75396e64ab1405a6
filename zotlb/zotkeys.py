"""What released zot versions accept in their config file, and a checker for it.

The knowledge lives in `data/zot-keys.json`, derived from zot's config structs
and loader (see scripts/derive_zot_keys.py). zot's loader is strict: a key it
does not know stops the server, so a key that only exists on zot's main
branch, or in a newer release, breaks a released zot.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from functools import cache
from importlib import resources
from typing import Any, Literal

Severity = Literal["error", "warning"]


@dataclass(frozen=True)
class KeyInfo:
    path: str
    type: str
    since: str
    items: str | None = None
    is_open: bool = False
    status: str = "active"


@dataclass(frozen=True)
class Finding:
    path: str
    message: str
    severity: Severity = "error"

    def __str__(self) -> str:
        return f"{self.path}: {self.severity}: {self.message}"


@cache
def _data() -> dict[str, Any]:
    text = resources.files("zotlb").joinpath("data/zot-keys.json").read_text("utf-8")
    return json.loads(text)


def releases() -> list[str]:
    return list(_data()["releases"])


def newest_release() -> str:
    return releases()[-1]


def version_tuple(version: str) -> tuple[int, ...]:
    return tuple(int(part) for part in version.lstrip("v").split("."))


def normalize_version(value: str) -> str:
    """`2.1.20` or `v2.1.20` into `v2.1.20`; ValueError for unknown releases."""
    version = value if value.startswith("v") else f"v{value}"
    if version not in releases():
        known = releases()
        raise ValueError(
            f"{value!r} is not a zot release zotlb knows "
            f"({known[0]} to {known[-1]}, no release candidates)"
        )
    return version


def is_at_least(version: str, since: str) -> bool:
    return version_tuple(version) >= version_tuple(since)


@cache
def keys() -> dict[str, KeyInfo]:
    out = {}
    for path, raw in _data()["keys"].items():
        out[path] = KeyInfo(
            path=path,
            type=raw["type"],
            since=raw["since"],
            items=raw.get("items"),
            is_open=raw.get("open", False),
            status=raw.get("status", "active"),
        )
    return out


@cache
def _children() -> dict[str, dict[str, str]]:
    # parent path -> {lowercased child name: canonical path}; zot (viper) matches
    # key names case-insensitively.
    index: dict[str, dict[str, str]] = {}
    for path in keys():
        parent, _, name = path.rpartition(".")
        index.setdefault(parent, {})[name.lower()] = path
    return index


@cache
def _unreleased() -> dict[str, dict[str, str]]:
    return {
        p.lower(): {"path": p, **v} for p, v in _data()["unreleased_on_main"].items()
    }


def accepts(path: str, version: str) -> bool:
    """Whether zot `version` knows the canonical key `path`."""
    info = keys().get(path)
    return info is not None and is_at_least(version, info.since)


def dist_spec_version(version: str) -> str:
    # The value zot compiles in; any other value only earns a startup warning.
    if is_at_least(version, "v2.1.3"):
        return "1.1.1"
    if is_at_least(version, "v2.0.2"):
        return "1.1.0"
    return "1.1.0-dev"


def log_levels(version: str) -> frozenset[str]:
    if is_at_least(version, "v2.1.12"):
        names = "debug trace info warn warning error fatal panic"
    elif is_at_least(version, "v2.1.9"):
        names = "debug info warn warning error"
    else:
        names = "trace debug info warn error fatal panic disabled"
    return frozenset(names.split())


# Go's time.ParseDuration: one or more number+unit pairs, or a bare "0".
_GO_DURATION = re.compile(r"^[-+]?(0|((\d+\.?\d*|\.\d+)(ns|us|µs|μs|ms|s|m|h))+)$")
_GO_PART = re.compile(r"(\d+\.?\d*|\.\d+)(ns|us|µs|μs|ms|s|m|h)")
_GO_UNIT = {
    "ns": 1e-9,
    "us": 1e-6,
    "µs": 1e-6,
    "μs": 1e-6,
    "ms": 1e-3,
    "s": 1.0,
    "m": 60.0,
    "h": 3600.0,
}


def parse_go_duration(text: str) -> float | None:
    """Seconds, or None when Go's time.ParseDuration would reject `text`."""
    if not _GO_DURATION.match(text):
        return None
    total = sum(float(n) * _GO_UNIT[u] for n, u in _GO_PART.findall(text))
    return -total if text.startswith("-") else total


def go_duration(seconds: float) -> str:
    """A Go duration string: 30 -> "30s", 5400 -> "1h30m", 0.5 -> "500ms"."""
    millis = round(seconds * 1000)
    if millis % 1000:
        return f"{millis}ms"
    rest = millis // 1000
    if rest == 0:
        return "0s"
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    parts = [(hours, "h"), (minutes, "m"), (secs, "s")]
    return "".join(f"{n}{unit}" for n, unit in parts if n)


# --- checking a config file -----------------------------------------------------------


class _Checker:
    def __init__(self, version: str) -> None:
        self.version = version
        self.findings: list[Finding] = []

    def add(self, path: str, message: str, severity: Severity = "error") -> None:
        self.findings.append(Finding(path or "(top level)", message, severity))

    def walk_object(self, value: dict[str, Any], schema: str, shown: str) -> None:
        children = _children().get(schema, {})
        for name, child in value.items():
            where = f"{shown}.{name}" if shown else str(name)
            canonical = children.get(str(name).lower())
            if canonical is None:
                self.unknown(where, schema, str(name))
                continue
            info = keys()[canonical]
            if not is_at_least(self.version, info.since):
                self.add(
                    where,
                    f"added in zot {info.since}; zot {self.version} refuses to "
                    "start on a key it does not know",
                )
                continue
            if info.status == "internal":
                self.add(where, "internal field, not meant to be set", "warning")
            elif info.status == "ignored":
                self.add(where, "accepted but ignored by zot", "warning")
            self.walk_value(child, info, where)

    def unknown(self, where: str, schema: str, name: str) -> None:
        full = f"{schema}.{name}".lower() if schema else name.lower()
        on_main = _unreleased().get(full)
        if on_main:
            self.add(
                where,
                f"exists only on zot's main branch ({on_main['evidence']}), in no "
                f"release; zot {self.version} refuses to start on it",
            )
        else:
            self.add(
                where, "unknown key; zot refuses to start on a key it does not know"
            )

    def walk_value(self, value: Any, info: KeyInfo, where: str) -> None:
        if info.type == "object":
            if not isinstance(value, dict):
                self.add(where, f"expected an object, got {_json_name(value)}")
            elif info.is_open:
                # Open maps: user-chosen keys whose values may have a known shape.
                inner = f"{info.path}.<key>"
                if inner in _children():
                    for name, child in value.items():
                        if isinstance(child, dict):
                            self.walk_object(child, inner, f"{where}.{name}")
                        else:
                            self.add(f"{where}.{name}", "expected an object")
            else:
                self.walk_object(value, info.path, where)
            return
        if info.type == "array":
            if not isinstance(value, list):
                self.add(
                    where,
                    f"expected an array, got {_json_name(value)} (zot takes a single "
                    "value as a one-element list)",
                    "warning",
                )
                value = [value]
            for i, item in enumerate(value):
                self.check_scalar(item, info.items or "any", f"{where}[{i}]", info)
            return
        self.check_scalar(value, info.type, where, info)

    def check_scalar(self, value: Any, kind: str, where: str, info: KeyInfo) -> None:
        if kind == "object":
            if isinstance(value, dict):
                self.walk_object(value, f"{info.path}[]", where)
            else:
                self.add(where, f"expected an object, got {_json_name(value)}")
        elif kind == "string":
            self.expect(value, isinstance(value, str), "a string", where)
        elif kind == "bool":
            self.expect(value, isinstance(value, bool), "true or false", where)
        elif kind == "int":
            ok = isinstance(value, int) and not isinstance(value, bool)
            self.expect(value, ok, "an integer", where)
        elif kind == "number":
            ok = isinstance(value, (int, float)) and not isinstance(value, bool)
            self.expect(value, ok, "a number", where)
        elif kind == "duration-string":
            self.check_duration(value, where)

    def expect(self, value: Any, ok: bool, wanted: str, where: str) -> None:
        if ok:
            return
        if isinstance(value, (str, int, float, bool)):
            # zot decodes with weak typing: it converts, but only some values.
            self.add(
                where,
                f"expected {wanted}, got {_json_name(value)} {json.dumps(value)}; "
                "zot converts it only if it can, write the expected type",
                "warning",
            )
        else:
            self.add(where, f"expected {wanted}, got {_json_name(value)}")

    def check_duration(self, value: Any, where: str) -> None:
        if isinstance(value, str):
            if parse_go_duration(value) is None:
                self.add(
                    where,
                    f'{value!r} is not a Go duration; use e.g. "30s", "5m", '
                    "\"1h30m\" (there is no 'd' unit)",
                )
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            self.add(
                where,
                f"a bare number is taken as nanoseconds ({value} ns); "
                'write a duration string like "30s"',
                "warning",
            )
        else:
            self.add(where, f"expected a Go duration string, got {_json_name(value)}")


def _json_name(value: Any) -> str:
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "an array"
    if isinstance(value, dict):
        return "an object"
    return "null"


def _get(data: Any, *path: str) -> Any:
    # Case-insensitive lookup, as zot's loader does.
    for name in path:
        if not isinstance(data, dict):
            return None
        data = next(
            (v for k, v in data.items() if str(k).lower() == name.lower()), None
        )
    return data


def _duration(value: Any) -> float | None:
    return parse_go_duration(value) if isinstance(value, str) else None


def _check_rules(data: dict[str, Any], version: str, out: _Checker) -> None:
    root = _get(data, "storage", "rootDirectory")
    if not isinstance(root, str) or not root:
        out.add("storage.rootDirectory", "missing; zot refuses to start without it")

    port = _get(data, "http", "port")
    if port is not None and str(port) != "":
        text = str(port)
        if not text.isdigit() or not 0 <= int(text) <= 65535:
            out.add("http.port", f"{port!r} is not a port number 0-65535")

    level = _get(data, "log", "level")
    if isinstance(level, str) and level.lower() not in log_levels(version):
        allowed = ", ".join(sorted(log_levels(version)))
        out.add(
            "log.level", f"{level!r} is not a level zot {version} knows ({allowed})"
        )

    if is_at_least(version, "v2.1.17"):
        http = _get(data, "http") or {}
        for key in ("readTimeout", "writeTimeout"):
            if _get(http, key) is None:
                out.add(
                    f"http.{key}",
                    "absent, so zot uses 60s: a multi-GB blob upload or download "
                    'that takes longer fails; set e.g. "1h"',
                    "warning",
                )

    path = _get(data, "extensions", "metrics", "prometheus", "path")
    if isinstance(path, str) and is_at_least(version, "v2.1.18"):
        clean = re.sub(r"/+", "/", path).rstrip("/") or "/"
        if path != clean or not path.startswith("/") or path in ("/", "/v2"):
            out.add(
                "extensions.metrics.prometheus.path",
                f"{path!r}: must be a clean path starting with '/', not '/' or '/v2'",
            )

    registries = _get(data, "extensions", "sync", "registries")
    if isinstance(registries, list):
        compat = _get(data, "http", "compat")
        for i, reg in enumerate(registries):
            if isinstance(reg, dict):
                _check_registry(reg, f"extensions.sync.registries[{i}]", compat, out)


def _check_registry(
    reg: dict[str, Any], where: str, compat: Any, out: _Checker
) -> None:
    urls = _get(reg, "urls")
    if not urls:
        out.add(f"{where}.urls", "no URL to sync from; sync fails to start")
    retries, delay = _get(reg, "maxRetries"), _get(reg, "retryDelay")
    if retries is not None and delay is None:
        out.add(f"{where}.retryDelay", "required when maxRetries is set")
    max_delay = _get(reg, "maxRetryDelay")
    if max_delay is not None:
        if delay is None:
            out.add(f"{where}.retryDelay", "required when maxRetryDelay is set")
        else:
            low, high = _duration(delay), _duration(max_delay)
            if low is not None and high is not None and high < low:
                out.add(f"{where}.maxRetryDelay", "must not be less than retryDelay")
    poll = _get(reg, "pollInterval")
    if not _get(reg, "onDemand") and (poll is None or _duration(poll) == 0):
        out.add(
            where,
            "no pollInterval and onDemand is false: zot skips this registry",
            "warning",
        )
    if _get(reg, "preserveDigest") is True and not compat:
        out.add(f"{where}.preserveDigest", "needs a non-empty http.compat")


def check_config(data: Any, version: str) -> list[Finding]:
    """Every problem zot `version` would have with the parsed config `data`."""
    out = _Checker(version)
    if not isinstance(data, dict) or not data:
        out.add("", "expected a non-empty JSON object; zot rejects an empty config")
        return out.findings
    out.walk_object(data, "", "")
    _check_rules(data, version, out)
    return sorted(out.findings, key=lambda f: (f.severity != "error", f.path))
