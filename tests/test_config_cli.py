"""lb.yaml validation and the CLI's exit codes: never a traceback."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from zotlb import __version__
from zotlb.config import ConfigError, config_from_mapping, parse_duration

GOOD = {
    "listen": "127.0.0.1:5000",
    "backends": [
        {"name": "a", "url": "http://127.0.0.1:5001"},
        {"name": "b", "url": "http://127.0.0.1:5002"},
    ],
}


def zotlb(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "zotlb", *args],
        capture_output=True,
        text=True,
        timeout=30,
    )


def write(tmp_path: Path, data: object, name: str = "lb.yaml") -> Path:
    path = tmp_path / name
    path.write_text(data if isinstance(data, str) else yaml.safe_dump(data))
    return path


def test_version() -> None:
    result = zotlb("--version")
    assert result.returncode == 0
    assert result.stdout.strip() == f"zotlb {__version__}"


def test_check_accepts_the_shipped_default(tmp_path: Path) -> None:
    result = zotlb(
        "check", "-c", str(Path(__file__).parent.parent / "conf" / "lb.yaml")
    )
    assert result.returncode == 0, result.stderr
    assert "ok" in result.stdout


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        (lambda c: c["backends"][1].update(url="ftp://x:1"), "backends[1].url:"),
        (
            lambda c: c["backends"][1].update(url="http://127.0.0.1:99999"),
            "backends[1].url:",
        ),
        (
            lambda c: c["backends"][0].update(color="red"),
            "backends[0].color: unknown key",
        ),
        (
            lambda c: c["backends"][1].update(name="a"),
            "backends[1].name: duplicate name 'a'",
        ),
        (lambda c: c.update(backends=[]), "backends:"),
        (
            lambda c: c.update(health={"interval": "soon"}),
            "health.interval: cannot parse duration",
        ),
        (lambda c: c.update(health={"rise": "two"}), "health.rise:"),
        (lambda c: c.update(mode="round-robin"), "mode:"),
        (lambda c: c.update(listen="nowhere"), "listen:"),
        (lambda c: c.update(extra=1), "extra: unknown key"),
        (
            lambda c: c["backends"][0].pop("url"),
            "backends[0].url: required key is missing",
        ),
    ],
)
def test_invalid_config_names_key_path(tmp_path: Path, change, expected) -> None:
    cfg = yaml.safe_load(yaml.safe_dump(GOOD))
    change(cfg)
    path = write(tmp_path, cfg)
    for command in ("check", "serve"):
        result = zotlb(command, "-c", str(path))
        assert result.returncode == 2, result
        assert expected in result.stderr
        assert "Traceback" not in result.stderr


def test_every_problem_is_reported(tmp_path: Path) -> None:
    backends = [GOOD["backends"][0], {**GOOD["backends"][0]}]
    path = write(
        tmp_path,
        {
            **GOOD,
            "backends": backends,
            "mode": "x",
            "health": {"timeout": "-1s", "fall": 0},
        },
    )
    result = zotlb("check", "-c", str(path))
    assert result.returncode == 2
    # The duplicate backend is named beside the field errors, not after them.
    for key in (
        "mode:",
        "health.timeout:",
        "health.fall:",
        "backends[1].name: duplicate",
    ):
        assert key in result.stderr


@pytest.mark.parametrize(
    ("section", "value", "expected"),
    [
        (
            "listen",
            5000,
            "listen: expected 'host:port' or a mapping with address (and tls)",
        ),
        ("health", [1], "health: expected a mapping of keys"),
        ("limits", "big", "limits: expected a mapping of keys"),
    ],
)
def test_wrong_section_type_says_so_in_plain_words(section, value, expected) -> None:
    with pytest.raises(ConfigError) as info:
        config_from_mapping({**GOOD, section: value})
    assert info.value.problems == [expected]
    assert "Config" not in info.value.render()


def test_admin_null_turns_the_admin_listener_off() -> None:
    assert config_from_mapping({**GOOD, "admin": None}).admin.listen is None


def test_missing_file_and_bad_yaml(tmp_path: Path) -> None:
    result = zotlb("check", "-c", str(tmp_path / "nope.yaml"))
    assert result.returncode == 2
    assert "nope.yaml: invalid configuration" in result.stderr
    assert "file not found" in result.stderr

    path = write(
        tmp_path, "listen: 127.0.0.1:5000\nbackends:\n  - name: a\n   url: [\n"
    )
    result = zotlb("check", "-c", str(path))
    assert result.returncode == 2
    assert "lb.yaml" in result.stderr and "line 4" in result.stderr
    assert "Traceback" not in result.stderr


def test_top_level_not_a_mapping() -> None:
    with pytest.raises(ConfigError) as info:
        config_from_mapping(["a"])
    assert "expected a mapping" in info.value.problems[0]


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("500ms", 0.5), ("2s", 2.0), ("1m", 60.0), ("1.5h", 5400.0), (3, 3.0), ("7", 7.0)],
)
def test_durations(text, seconds) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("bad", ["2x", "", "-1s", True, None, "1 2s"])
def test_bad_durations(bad) -> None:
    with pytest.raises(ValueError):
        parse_duration(bad)


def test_defaults_are_filled() -> None:
    cfg = config_from_mapping({"backends": [{"name": "a", "url": "http://h:1/"}]})
    assert cfg.mode == "active-active"
    assert cfg.health.path == "/v2/" and cfg.health.expect_status == [200, 401]
    assert cfg.backends[0].url == "http://h:1"
    assert cfg.admin.listen == "127.0.0.1:9100"


def test_serve_on_a_port_in_use_fails_cleanly(tmp_path: Path) -> None:
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        cfg = {
            **GOOD,
            "listen": f"127.0.0.1:{port}",
            "admin": {"listen": None},
            "replication": {"mode": "async"},
        }
        proc = zotlb("serve", "-c", str(write(tmp_path, cfg)))
    assert proc.returncode == 1
    assert '"server.failed"' in proc.stderr and "address already in use" in proc.stderr
    # Nothing half-started is left to complain on the way out.
    assert "Traceback" not in proc.stderr
    assert "Unclosed" not in proc.stderr
