"""`zotlb zot-config`: generated zot configs, the summary, bad input, --check."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from zotlb import zotkeys
from zotlb.cli import main
from zotlb.config import LBConfig, config_from_mapping
from zotlb.zotcfg import generate, plan, summary, words

REPO = Path(__file__).resolve().parents[1]
DATA = json.loads((REPO / "zotlb" / "data" / "zot-keys.json").read_text())


def shared_dir() -> Path | None:
    path = Path(os.environ.get("ZOTLB_SHARED") or REPO.parent / "shared")
    return path if path.is_dir() else None


def lb(mode: str = "active-active", count: int = 2, **zot: Any) -> dict[str, Any]:
    names = "abcdefgh"[:count]
    return {
        "mode": mode,
        "backends": [
            {"name": n, "url": f"http://127.0.0.1:{5001 + i}"}
            for i, n in enumerate(names)
        ],
        "zot": zot,
    }


def build(data: dict[str, Any]) -> LBConfig:
    return config_from_mapping(data, "lb.yaml")


def generated(data: dict[str, Any]) -> dict[str, Any]:
    files = generate(build(data))
    return {name: json.loads(text) for name, text in files.items()}


def key_paths(
    value: Any, schema: str = "", shown: str = ""
) -> list[tuple[str, str, Any]]:
    """(schema path, shown path, value) for every key, using zot's spelling."""
    out = []
    if isinstance(value, dict):
        for name, child in value.items():
            sub = f"{schema}.{name}" if schema else name
            out.append((sub, f"{shown}.{name}" if shown else name, child))
            out += key_paths(child, sub, f"{shown}.{name}" if shown else name)
    elif isinstance(value, list):
        for i, item in enumerate(value):
            out += key_paths(item, f"{schema}[]", f"{shown}[{i}]")
    return out


_JSON_TYPES = {
    "string": lambda v: isinstance(v, str),
    "bool": lambda v: isinstance(v, bool),
    "int": lambda v: isinstance(v, int) and not isinstance(v, bool),
    "duration-string": lambda v: (
        isinstance(v, str) and zotkeys.parse_go_duration(v) is not None
    ),
    "object": lambda v: isinstance(v, dict),
    "array": lambda v: isinstance(v, list),
}


def assert_accepted(doc: dict[str, Any], version: str, table: dict[str, Any]) -> None:
    """Every key in `doc` is in `table`, known to `version`, with zot's JSON type."""
    for schema, shown, value in key_paths(doc):
        assert schema in table, f"{shown}: zot does not know this key"
        entry = table[schema]
        since = entry["since"]
        assert zotkeys.version_tuple(version) >= zotkeys.version_tuple(since), (
            f"{shown}: only from {since}, target is {version}"
        )
        kind = entry.get("type") or entry.get("json_type")
        assert _JSON_TYPES[kind](value), f"{shown}: {value!r} is not {kind}"


def expected_sources(
    mode: str, names: list[str], reverse: bool = True
) -> dict[str, list[str]]:
    if mode == "active-active":
        return {n: [p for p in names if p != n] for n in names}
    primary = names[0]
    out = {n: [primary] for n in names[1:]}
    out[primary] = names[1:] if reverse else []
    return out


@pytest.mark.parametrize("count", [2, 3])
@pytest.mark.parametrize("mode", ["active-active", "active-passive"])
def test_each_backend_syncs_from_exactly_its_peers(mode: str, count: int) -> None:
    data = lb(mode, count)
    cfg = build(data)
    docs = generated(data)
    names = [b.name for b in cfg.backends]
    url_of = {b.name: b.url for b in cfg.backends}

    assert sorted(docs) == sorted(f"{n}.json" for n in names)
    for name, sources in expected_sources(mode, names).items():
        doc = docs[f"{name}.json"]
        assert_accepted(doc, cfg.zot.version, DATA["keys"])
        registries = doc["extensions"]["sync"]["registries"]
        urls = [u for reg in registries for u in reg["urls"]]
        assert urls == [url_of[s] for s in sources]
        assert url_of[name] not in urls
        assert doc["http"]["port"] == url_of[name].rsplit(":", 1)[1]

    text = summary(cfg, plan(cfg), [])
    assert f"an image pushed to {names[0]} reaches {names[1]} within 30 s" in text
    assert f"or on {names[1]}'s first pull of it" in text
    if mode == "active-passive":
        assert "before failback" in text


def test_active_passive_without_reverse_sync_says_so() -> None:
    data = lb("active-passive", 2, sync={"reverse": False})
    docs = generated(data)
    assert "extensions" not in docs["a.json"]
    assert docs["b.json"]["extensions"]["sync"]["registries"][0]["urls"] == [
        "http://127.0.0.1:5001"
    ]
    cfg = build(data)
    text = summary(cfg, plan(cfg), [])
    assert "reverse sync is off" in text
    assert "an image pushed to b never reaches a" in text


def test_three_backends_active_passive_window_counts_hops() -> None:
    cfg = build(lb("active-passive", 3))
    text = summary(cfg, plan(cfg), [])
    assert (
        "an image pushed to b reaches c (through 1 other backend) within 1 min" in text
    )


def test_output_is_deterministic_sorted_and_newline_terminated() -> None:
    data = lb("active-active", 3, metrics={"enable": True})
    first, second = generate(build(data)), generate(build(data))
    assert first == second
    for text in first.values():
        assert text.endswith("}\n")
        assert text == json.dumps(json.loads(text), indent=2, sort_keys=True) + "\n"


def test_version_decides_timeouts_and_dist_spec() -> None:
    new = generated(lb(version="v2.1.20"))["a.json"]
    assert new["http"]["readTimeout"] == "1h"
    assert new["http"]["writeTimeout"] == "1h"
    assert new["distSpecVersion"] == "1.1.1"

    old = generated(lb(version="2.1.16"))["a.json"]
    assert "readTimeout" not in old["http"]
    assert "writeTimeout" not in old["http"]

    oldest = generated(lb(version="v2.0.0"))["a.json"]
    assert oldest["distSpecVersion"] == "1.1.0-dev"
    assert_accepted(oldest, "v2.0.0", DATA["keys"])


def test_explicit_timeouts_and_retries() -> None:
    data = lb(
        http_timeouts={"read": "90m", "write": 0},
        sync={"max_retries": 5, "retry_delay": "1m"},
    )
    doc = generated(data)["a.json"]
    assert doc["http"]["readTimeout"] == "1h30m"
    assert doc["http"]["writeTimeout"] == "0s"
    reg = doc["extensions"]["sync"]["registries"][0]
    assert (reg["maxRetries"], reg["retryDelay"]) == (5, "1m")

    no_retries = generated(lb(sync={"max_retries": None}))["a.json"]
    reg = no_retries["extensions"]["sync"]["registries"][0]
    assert "maxRetries" not in reg and "retryDelay" not in reg


def test_sync_options_reach_every_registry() -> None:
    data = lb(
        count=3,
        log_level="warn",
        sync={
            "poll_interval": "5m",
            "on_demand": False,
            "tls_verify": False,
            "cert_dir": "/etc/zot/certs",
            "prefixes": ["team/**", "base/*"],
        },
        metrics={"enable": True, "path": "/zot-metrics"},
    )
    for doc in generated(data).values():
        assert doc["log"]["level"] == "warn"
        assert doc["extensions"]["metrics"]["prometheus"]["path"] == "/zot-metrics"
        for reg in doc["extensions"]["sync"]["registries"]:
            assert reg["pollInterval"] == "5m"
            assert reg["onDemand"] is False
            assert reg["tlsVerify"] is False
            assert reg["certDir"] == "/etc/zot/certs"
            assert reg["content"] == [{"prefix": "team/**"}, {"prefix": "base/*"}]


def test_credentials_file_and_htpasswd(tmp_path: Path, capsys: Any) -> None:
    lb_yaml = tmp_path / "lb.yaml"
    data = lb(
        count=3,
        htpasswd="/etc/zot/htpasswd",
        sync={"credentials": {"username": "sync", "password": "pw"}},
    )
    lb_yaml.write_text(json.dumps(data))
    out = tmp_path / "out"
    assert main(["zot-config", "-c", str(lb_yaml), "-o", str(out)]) == 0

    creds_path = out / "sync-credentials.json"
    creds = json.loads(creds_path.read_text())
    assert sorted(creds) == ["127.0.0.1:5001", "127.0.0.1:5002", "127.0.0.1:5003"]
    assert creds["127.0.0.1:5002"] == {"username": "sync", "password": "pw"}
    assert stat.S_IMODE(creds_path.stat().st_mode) == 0o600
    doc = json.loads((out / "a.json").read_text())
    assert doc["http"]["auth"]["htpasswd"]["path"] == "/etc/zot/htpasswd"
    assert (
        doc["extensions"]["sync"]["credentialsFile"] == "/etc/zot/sync-credentials.json"
    )
    printed = capsys.readouterr().out
    assert "a syncs from b, c" in printed
    assert "pw" not in printed


def test_dns_and_localhost_urls_give_listen_addresses() -> None:
    data = {
        "backends": [
            {"name": "a", "url": "http://zot-a.example:5000"},
            {"name": "b", "url": "http://localhost:5002"},
        ],
        "zot": {
            "backends": {
                "b": {"listen": "10.0.0.2:6000", "peer_url": "http://10.0.0.2:6000"}
            }
        },
    }
    docs = generated(data)
    assert (docs["a.json"]["http"]["address"], docs["a.json"]["http"]["port"]) == (
        "0.0.0.0",
        "5000",
    )
    assert (docs["b.json"]["http"]["address"], docs["b.json"]["http"]["port"]) == (
        "10.0.0.2",
        "6000",
    )
    urls = docs["a.json"]["extensions"]["sync"]["registries"][0]["urls"]
    assert urls == ["http://10.0.0.2:6000"]


def test_same_root_on_different_hosts_is_fine() -> None:
    data = {
        "backends": [
            {"name": "a", "url": "http://10.0.0.1:5000"},
            {"name": "b", "url": "http://10.0.0.2:5000"},
        ],
        "zot": {
            "backends": {
                "a": {"root_directory": "/srv/zot"},
                "b": {"root_directory": "/srv/zot"},
            }
        },
    }
    docs = generated(data)
    assert docs["b.json"]["storage"]["rootDirectory"] == "/srv/zot"


# --- bad input: exit 2, the key path, no traceback ------------------------------------

BAD_INPUTS = [
    (
        {
            "backends": [
                {"name": "a", "url": "http://127.0.0.1:5001"},
                {"name": "b", "url": "http://127.0.0.1:0"},
            ]
        },
        "backends[1].url: port 0",
    ),
    (
        {
            "backends": [
                {"name": "a", "url": "http://127.0.0.1:5001"},
                {"name": "b", "url": "http://239.1.1.1:5000"},
            ]
        },
        "backends[1].url: zot cannot listen on 239.1.1.1",
    ),
    (
        {"backends": [{"name": "a", "url": "https://127.0.0.1:5001"}]},
        "backends[0].url: https://127.0.0.1:5001 is https",
    ),
    (
        lb(sync={"poll_interval": 0, "on_demand": False}),
        "zot.sync.poll_interval: 0 with on_demand false",
    ),
    (
        lb(
            backends={
                "a": {"root_directory": "/data"},
                "b": {"root_directory": "/data"},
            }
        ),
        "zot.backends.b.root_directory: /data overlaps /data",
    ),
    (
        lb(
            backends={
                "a": {"root_directory": "/data"},
                "b": {"root_directory": "/data/b"},
            }
        ),
        "zot.backends.b.root_directory: /data/b overlaps /data",
    ),
    (lb(backends={"z": {}}), "zot.backends.z: no backend named 'z'"),
    (
        lb(version="v2.1.16", http_timeouts={"read": "2h"}),
        "zot.http_timeouts.read: zot v2.1.16 has no http.readTimeout",
    ),
    (lb(version="v9.9.9"), "zot.version: 'v9.9.9' is not a zot release"),
    (lb(htpasswd="/etc/zot/htpasswd"), "zot.sync.credentials: required"),
    (lb(sync={"max_retries": 2, "retry_delay": 0}), "zot.sync.retry_delay: must be"),
    (
        lb(backends={"a": {"root_directory": "relative"}}),
        "zot.backends.a.root_directory: 'relative': give an absolute path",
    ),
    (lb(extra_key=1), "zot.extra_key: unknown key"),
]


@pytest.mark.parametrize(("data", "message"), BAD_INPUTS)
def test_bad_input_names_the_key_path(
    data: dict[str, Any], message: str, tmp_path: Path, capsys: Any
) -> None:
    lb_yaml = tmp_path / "lb.yaml"
    lb_yaml.write_text(json.dumps(data))
    code = main(["zot-config", "-c", str(lb_yaml), "-o", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code == 2
    assert message in err
    assert not (tmp_path / "out").exists()


def test_bad_input_through_the_real_command_has_no_traceback(tmp_path: Path) -> None:
    lb_yaml = tmp_path / "lb.yaml"
    lb_yaml.write_text(json.dumps(lb(sync={"poll_interval": "0s", "on_demand": False})))
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "zotlb",
            "zot-config",
            "-c",
            str(lb_yaml),
            "-o",
            str(tmp_path / "out"),
        ],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=60,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    assert proc.returncode == 2
    assert "zot.sync.poll_interval:" in proc.stderr
    assert "Traceback" not in proc.stderr


# --- --check --------------------------------------------------------------------------


def write_json(path: Path, doc: Any) -> str:
    path.write_text(json.dumps(doc))
    return str(path)


def test_check_accepts_generated_files(tmp_path: Path, capsys: Any) -> None:
    paths = [
        write_json(tmp_path / name, doc) for name, doc in generated(lb(count=3)).items()
    ]
    assert main(["zot-config", "--check", *paths]) == 0
    out = capsys.readouterr().out
    assert out.count("ok for zot v2.1.20") == 3


BASE = {
    "storage": {"rootDirectory": "/r"},
    "http": {"port": "5000", "readTimeout": "1h", "writeTimeout": "1h"},
}


@pytest.mark.parametrize(
    ("doc", "version", "message"),
    [
        (
            {
                **BASE,
                "extensions": {
                    "sync": {
                        "registries": [
                            {"urls": ["http://x:1"], "onDemand": True, "reqPerSec": 10}
                        ]
                    }
                },
            },
            "v2.1.20",
            "extensions.sync.registries[0].reqPerSec: error: exists only on "
            "zot's main branch",
        ),
        (
            {**BASE, "http": {"port": "5000", "readTimeout": "1h"}},
            "v2.1.16",
            "http.readTimeout: error: added in zot v2.1.17",
        ),
        (
            {
                **BASE,
                "extensions": {
                    "sync": {
                        "registries": [
                            {"urls": ["http://x:1"], "onDemand": True, "maxRetries": 3}
                        ]
                    }
                },
            },
            "v2.1.20",
            "extensions.sync.registries[0].retryDelay: error: required",
        ),
        (
            {
                **BASE,
                "extensions": {
                    "sync": {
                        "registries": [{"urls": ["http://x:1"], "pollInterval": "1d"}]
                    }
                },
            },
            "v2.1.20",
            "pollInterval: error: '1d' is not a Go duration",
        ),
        (
            {**BASE, "storage": {"rootDirectory": "/r", "sizeLimit": 3}},
            "v2.1.20",
            "storage.sizeLimit: error: unknown key",
        ),
        (
            {"http": {"port": "70000"}},
            "v2.1.20",
            "storage.rootDirectory: error: missing",
        ),
        (
            {**BASE, "log": {"level": "trace"}},
            "v2.1.10",
            "log.level: error: 'trace' is not a level zot v2.1.10 knows",
        ),
        (
            {**BASE, "extensions": {"metrics": {"prometheus": {"path": "/v2"}}}},
            "v2.1.18",
            "extensions.metrics.prometheus.path: error",
        ),
    ],
)
def test_check_explains_each_problem(
    doc: dict[str, Any], version: str, message: str, tmp_path: Path, capsys: Any
) -> None:
    path = write_json(tmp_path / "zot.json", doc)
    assert main(["zot-config", "--check", path, "--zot-version", version]) == 2
    assert message in capsys.readouterr().out


def test_check_weak_typing_is_a_warning_not_a_failure(
    tmp_path: Path, capsys: Any
) -> None:
    doc = {**BASE, "http": {**BASE["http"], "port": 5000}}
    assert main(["zot-config", "--check", write_json(tmp_path / "z.json", doc)]) == 0
    assert "http.port: warning: expected a string" in capsys.readouterr().out


def test_check_unreadable_file_fails(tmp_path: Path, capsys: Any) -> None:
    (tmp_path / "broken.json").write_text("{")
    code = main(
        [
            "zot-config",
            "--check",
            str(tmp_path / "broken.json"),
            str(tmp_path / "missing.json"),
        ]
    )
    out = capsys.readouterr().out
    assert code == 2
    assert "broken.json: cannot parse" in out
    assert "missing.json: file not found" in out


# --- small pieces ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("seconds", "text"),
    [
        (30, "30s"),
        (5400, "1h30m"),
        (0.25, "250ms"),
        (0, "0s"),
        (86400, "24h"),
        (61, "1m1s"),
    ],
)
def test_go_durations_round_trip(seconds: float, text: str) -> None:
    assert zotkeys.go_duration(seconds) == text
    assert zotkeys.parse_go_duration(text) == seconds


def test_words() -> None:
    assert [words(30), words(90), words(3600), words(0.5)] == [
        "30 s",
        "1 min 30 s",
        "1 h",
        "500 ms",
    ]


# --- against the reference data in ../shared, when present ----------------------------


@pytest.fixture
def shared() -> Path:
    path = shared_dir()
    if path is None:
        pytest.skip("no ../shared reference data (set ZOTLB_SHARED)")
    return path


def test_data_file_is_derived_from_the_reference(shared: Path) -> None:
    sys.path.insert(0, str(REPO / "scripts"))
    try:
        from derive_zot_keys import derive, render
    finally:
        sys.path.remove(str(REPO / "scripts"))
    source = json.loads((shared / "zot-config" / "zot-config-keys.json").read_text())
    expected = render(derive(source))
    assert (REPO / "zotlb" / "data" / "zot-keys.json").read_text() == expected


@pytest.mark.parametrize("mode", ["active-active", "active-passive"])
def test_generated_keys_match_the_reference(shared: Path, mode: str) -> None:
    source = json.loads((shared / "zot-config" / "zot-config-keys.json").read_text())
    table = {k["path"]: k for k in source["keys"]}
    unreleased = {k["path"] for k in source["unreleased_on_main"]}
    data = lb(
        mode,
        3,
        metrics={"enable": True},
        htpasswd="/h",
        sync={"credentials": {"username": "u", "password": "p"}},
    )
    for name, doc in generated(data).items():
        if name == "sync-credentials.json":
            continue
        assert_accepted(doc, source["zot_tag"], table)
        assert not {s for s, _, _ in key_paths(doc)} & unreleased


def test_generated_configs_have_the_shape_of_zot_examples(shared: Path) -> None:
    examples = shared / "zot-examples"
    sync_example = json.loads((examples / "config-sync.json").read_text())
    metrics_example = json.loads((examples / "config-metrics.json").read_text())
    creds_example = json.loads((examples / "sync-auth-filepath.json").read_text())
    docs = generated(
        lb(
            metrics={"enable": True},
            sync={"credentials": {"username": "u", "password": "p"}},
        )
    )
    doc = docs["a.json"]

    # Same sections, and the same JSON type for each value both files have.
    assert set(doc) <= set(sync_example) | {"extensions"}
    example_paths = {s: v for s, _, v in key_paths(sync_example)}
    example_paths.update({s: v for s, _, v in key_paths(metrics_example)})
    shared_paths = [(s, v) for s, _, v in key_paths(doc) if s in example_paths]
    assert len(shared_paths) >= 15
    for path, value in shared_paths:
        assert type(value) is type(example_paths[path]), path

    # The credentials file: host:port keys, each with username and password only.
    for entry in [
        *creds_example.values(),
        *json.loads(
            generate(
                build(lb(sync={"credentials": {"username": "u", "password": "p"}}))
            )["sync-credentials.json"]
        ).values(),
    ]:
        assert set(entry) == {"username", "password"}


def test_unwritable_output_is_a_message_not_a_traceback(tmp_path: Path, capsys) -> None:
    lb_yaml = tmp_path / "lb.yaml"
    lb_yaml.write_text(json.dumps(lb()))
    a_file = tmp_path / "not-a-dir"
    a_file.write_text("x")
    for out in (a_file, a_file / "sub"):
        code = main(["zot-config", "-c", str(lb_yaml), "-o", str(out)])
        err = capsys.readouterr().err
        assert code == 1
        assert err.startswith("zotlb zot-config: cannot write ") and str(a_file) in err
