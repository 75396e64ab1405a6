"""Config fuzzing: any lb.yaml either loads or is refused with a message.

Hypothesis builds documents around the real schema (known keys with values of
any type, unknown keys, deep nesting, odd scalars) and feeds them to the
loader in-process; a few also go through the real CLI, which must exit 0 or 2
and never print a traceback.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from zotlb.config import ConfigError, LBConfig, config_from_mapping, load_config

SECTIONS: dict[str, list[str]] = {
    "health": [
        "path",
        "interval",
        "timeout",
        "rise",
        "fall",
        "expect_status",
        "require_api_header",
    ],
    "timeouts": ["connect", "read", "shutdown_grace"],
    "admin": ["listen", "token", "token_env", "open_read"],
    "log": ["level", "format", "access_sample"],
    "replication": [
        "mode",
        "state_dir",
        "queue_max",
        "workers",
        "retry_initial",
        "retry_max",
        "sync_timeout",
        "drift_interval",
        "credentials",
    ],
    "zot": [
        "version",
        "log_level",
        "sync",
        "backends",
        "htpasswd",
        "tls",
        "metrics",
        "http_timeouts",
    ],
}
TOP = ["listen", "mode", "failback", "backends", "retries", "non_v2", *SECTIONS]

# Scalars a YAML file can hold, weighted toward the edges.
scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.sampled_from([0, -1, 1, 65535, 65536, 10**400]),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=20),
    st.sampled_from(
        [
            "",
            "2s",
            "500ms",
            "-1s",
            "1e9s",
            "9" * 400 + "s",
            "0",
            "soon",
            "1h",
            "off",
            "127.0.0.1:5000",
            ":0",
            "[::1]:5000",
            "[zz]:1",
            "host:99999",
            "a:²",
            "http://127.0.0.1:5001",
            "https://[::1]:5002/",
            "ftp://x:1",
            "http://",
            "http://u:p@h:1",
            "http://h:1/path?q",
            "http://h:notaport",
            "/v2/",
            "/readyz",
            "active-active",
            "active-passive",
            "auto",
            "manual",
            "reject",
            "pass",
            "debug",
            "json",
            "console",
            "v2.1.20",
            "v9.9.9",
            "async",
            "sync",
            "\x00",
            "é" * 3,
        ]
    ),
)
values = st.recursive(
    scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4),
        st.dictionaries(
            st.one_of(st.text(max_size=8), st.integers()), inner, max_size=4
        ),
    ),
    max_leaves=12,
)


@st.composite
def backend_entries(draw: Any) -> Any:
    if draw(st.booleans()):
        return draw(values)
    entry: dict[Any, Any] = {}
    if draw(st.integers(0, 9)):
        entry["name"] = draw(st.one_of(st.sampled_from(["a", "b", "a"]), values))
    if draw(st.integers(0, 9)):
        entry["url"] = draw(
            st.one_of(
                st.sampled_from(["http://127.0.0.1:5001", "http://127.0.0.1:5002"]),
                values,
            )
        )
    if draw(st.integers(0, 5)) == 0:
        entry[draw(st.text(max_size=6))] = draw(values)
    return entry


@st.composite
def documents(draw: Any) -> Any:
    if draw(st.integers(0, 19)) == 0:
        return draw(values)  # not even a mapping
    doc: dict[Any, Any] = {}
    for key in draw(st.lists(st.sampled_from(TOP), unique=True, max_size=len(TOP))):
        if key == "backends":
            doc[key] = draw(st.one_of(st.lists(backend_entries(), max_size=3), values))
        elif key in SECTIONS and draw(st.booleans()):
            doc[key] = {
                sub: draw(values)
                for sub in draw(st.lists(st.sampled_from(SECTIONS[key]), unique=True))
            }
        else:
            doc[key] = draw(values)
    if draw(st.integers(0, 4)) == 0:
        doc[draw(st.one_of(st.text(max_size=8), st.integers(), st.none()))] = draw(
            values
        )
    return doc


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(documents())
def test_any_mapping_loads_or_raises_config_error(doc: Any) -> None:
    try:
        cfg = config_from_mapping(doc)
    except ConfigError as exc:
        assert exc.problems and all(isinstance(p, str) and p for p in exc.problems)
        assert exc.render().count("\n") == len(exc.problems)
    else:
        assert isinstance(cfg, LBConfig)


# Text that is YAML-ish but not always YAML: tags, anchors, tabs, binary.
yaml_text = st.one_of(
    st.builds(yaml.safe_dump, documents()),
    st.text(
        alphabet=st.sampled_from(list("ab:-[]{}!&*|>'\"#\t\n @%`,?0123456789")),
        max_size=60,
    ),
    st.sampled_from(
        [
            "!!python/object/apply:os.system ['true']",
            "a: &x [*x]",
            "listen: !!binary aGVsbG8=",
            "backends:\n- name: a\n  url: http://h:1\n  url: http://h:2\n",
            "? [a, b]\n: c\n",
            "\ufeffbackends: []",
            "backends: [{name: a, url: 'http://h:1'}]\n"
            + "x: "
            + "[" * 200
            + "]" * 200,
        ]
    ),
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(yaml_text)
def test_any_text_loads_or_raises_config_error(
    tmp_path_factory: Any, text: str
) -> None:
    path = tmp_path_factory.mktemp("fuzz") / "lb.yaml"
    path.write_text(text, encoding="utf-8")
    try:
        load_config(path)
    except ConfigError as exc:
        assert exc.problems


def test_binary_file_is_a_config_error(tmp_path: Path) -> None:
    path = tmp_path / "lb.yaml"
    path.write_bytes(b"\xff\xfe\x00garbage\x80")
    try:
        load_config(path)
    except ConfigError as exc:
        assert "cannot read" in exc.problems[0]
    else:
        raise AssertionError("a binary file loaded")


@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(yaml_text)
def test_cli_check_exits_0_or_2_without_traceback(
    tmp_path_factory: Any, text: str
) -> None:
    path = tmp_path_factory.mktemp("cli") / "lb.yaml"
    path.write_text(text, encoding="utf-8")
    result = subprocess.run(
        [sys.executable, "-m", "zotlb", "check", "-c", str(path)],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode in (0, 2), result.stderr
    assert "Traceback" not in result.stderr
    if result.returncode == 2:
        assert "invalid configuration" in result.stderr


def test_non_finite_and_huge_durations_are_refused() -> None:
    base = {"backends": [{"name": "a", "url": "http://127.0.0.1:1"}]}
    for value in (float("inf"), float("nan"), 10**400, "9" * 400 + "s"):
        try:
            config_from_mapping({**base, "health": {"interval": value}})
        except ConfigError as exc:
            assert exc.problems[0].startswith("health.interval:")
        else:
            raise AssertionError(f"{value!r} was accepted as a duration")
