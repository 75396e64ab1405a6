"""lb.yaml: typed, validated once, with errors that name the key path."""

from __future__ import annotations

import ipaddress
import math
import os
import re
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)
from yarl import URL


class ConfigError(Exception):
    """An lb.yaml that cannot be used; `problems` holds one line per fault."""

    def __init__(self, source: str, problems: list[str]) -> None:
        self.source = source
        self.problems = problems
        super().__init__(f"{source}: " + "; ".join(problems))

    def render(self) -> str:
        lines = [f"{self.source}: invalid configuration"]
        lines += [f"  {p}" for p in self.problems]
        return "\n".join(lines)


_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h)?\s*$")
_UNIT_SECONDS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, None: 1.0}


def parse_duration(value: Any) -> float:
    """Seconds from `500ms`, `2s`, `1m`, `1h` or a plain number of seconds."""
    if isinstance(value, bool):
        raise ValueError("a duration is a number of seconds or a string like '2s'")
    if isinstance(value, (int, float)):
        try:
            seconds = float(value)
        except OverflowError:
            raise ValueError("the number is too large for a duration") from None
    elif isinstance(value, str):
        match = _DURATION.match(value)
        if not match:
            raise ValueError(
                f"cannot parse duration {value!r}: use e.g. '500ms', '2s', '1m'"
            )
        seconds = float(match.group(1)) * _UNIT_SECONDS[match.group(2)]
    else:
        raise ValueError("a duration is a number of seconds or a string like '2s'")
    if not math.isfinite(seconds):
        raise ValueError(f"{value!r} is not a finite duration")
    if seconds < 0:
        raise ValueError("a duration cannot be negative")
    return seconds


def _positive(value: float) -> float:
    if value <= 0:
        raise ValueError("must be greater than zero")
    return value


Duration = Annotated[float, BeforeValidator(parse_duration)]
PositiveDuration = Annotated[
    float, BeforeValidator(parse_duration), AfterValidator(_positive)
]


def parse_hostport(value: Any) -> tuple[str, int]:
    """`host:port`, `:port` or `[v6]:port` into (host, port)."""
    if not isinstance(value, str):
        raise ValueError("expected 'host:port', e.g. '127.0.0.1:5000'")
    host, sep, port_text = value.rpartition(":")
    if not sep or not port_text.isdigit():
        raise ValueError(f"{value!r} is not 'host:port'")
    port = int(port_text)
    if not 0 <= port <= 65535:
        raise ValueError(f"port {port} is out of range 0-65535")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
        ipaddress.IPv6Address(host)
    return (host or "0.0.0.0", port)


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _workers_from_yaml(value: Any) -> Any:
    return 0 if value == "auto" else value


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$")


def _readable_file(value: str) -> str:
    if not os.path.isfile(value):
        raise ValueError(f"{value!r}: no such file")
    if not os.access(value, os.R_OK):
        raise ValueError(f"{value!r}: not readable")
    return value


ReadableFile = Annotated[str, AfterValidator(_readable_file)]


class BackendTLS(_Section):
    # CA bundle (PEM) that signed the backend's certificate; None: the system CAs.
    ca_file: ReadableFile | None = None
    # Check the backend's certificate and host name; off only for testing.
    verify: bool = True


class BackendConfig(_Section):
    name: str
    url: str
    tls: BackendTLS | None = None

    @field_validator("name")
    @classmethod
    def _check_name(cls, value: str) -> str:
        if not _NAME.match(value):
            raise ValueError(
                "a backend name is 1-63 letters, digits, '.', '_' or '-', "
                "starting with a letter or digit"
            )
        return value

    @field_validator("url")
    @classmethod
    def _check_url(cls, value: str) -> str:
        try:
            url = URL(value)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"not a URL: {exc}") from None
        if url.scheme not in ("http", "https"):
            raise ValueError(f"{value!r}: the scheme must be http or https")
        if not url.host:
            raise ValueError(f"{value!r}: the URL has no host")
        try:
            _ = url.port  # yarl raises on a port that is not a number
        except ValueError:
            raise ValueError(f"{value!r}: the port is not a number") from None
        if url.path not in ("", "/") or url.query_string or url.fragment:
            raise ValueError(f"{value!r}: give only scheme, host and port")
        if url.user or url.password:
            raise ValueError(f"{value!r}: credentials do not belong in the URL")
        return str(url.origin())

    @field_validator("tls")
    @classmethod
    def _check_tls(cls, value: BackendTLS | None, info: Any) -> BackendTLS | None:
        url = info.data.get("url", "")
        if value is not None and url and not url.startswith("https:"):
            raise ValueError(f"only for https URLs, and {url} is not one")
        return value

    @property
    def origin(self) -> URL:
        return URL(self.url)


class Credentials(_Section):
    username: str = Field(min_length=1)
    password: SecretStr = Field(min_length=1)


class HealthConfig(_Section):
    path: str = "/v2/"
    interval: PositiveDuration = 2.0
    timeout: PositiveDuration = 1.0
    rise: int = Field(2, ge=1)
    fall: int = Field(3, ge=1)
    expect_status: list[int] = Field(default_factory=lambda: [200, 401], min_length=1)
    # Sent as HTTP basic auth with every probe, for registries that need a login.
    credentials: Credentials | None = None
    # Also demand `Docker-Distribution-API-Version: registry/2.0` in the answer,
    # so a web server that happens to answer 200 on the path is not a registry.
    require_api_header: bool = False

    @field_validator("path")
    @classmethod
    def _check_path(cls, value: str) -> str:
        if not value.startswith("/"):
            raise ValueError("the health path must start with '/'")
        return value

    @field_validator("expect_status")
    @classmethod
    def _check_statuses(cls, value: list[int]) -> list[int]:
        for code in value:
            if not 100 <= code <= 599:
                raise ValueError(f"{code} is not an HTTP status")
        return value


class TimeoutsConfig(_Section):
    connect: PositiveDuration = 5.0
    # Inactivity: the longest wait for the next bytes from a backend.
    read: PositiveDuration = 300.0
    # SIGTERM: how long in-flight requests get to finish.
    shutdown_grace: Duration = 30.0
    # A client's request headers must be complete this long after their
    # first byte (slowloris).
    request_header: PositiveDuration = 10.0
    # A client connection with no request in progress is closed after this.
    idle: PositiveDuration = 75.0


class LimitsConfig(_Section):
    # The longest request line or single header line, in bytes.
    max_header_size: int = Field(32 * 1024, ge=1024, le=1024 * 1024)
    # The most header fields one request may carry.
    max_headers: int = Field(128, ge=16, le=10_000)
    # Client connections open at once; beyond it new ones get a 503.
    max_connections: int = Field(8192, ge=1)


class ListenTLS(_Section):
    # PEM certificate chain and private key zotlb presents to clients.
    cert: ReadableFile
    key: ReadableFile
    # With a CA file, clients must present a certificate it signed (mTLS).
    client_ca: ReadableFile | None = None


class ListenConfig(_Section):
    address: str = "127.0.0.1:5000"
    tls: ListenTLS | None = None

    @field_validator("address")
    @classmethod
    def _check_address(cls, value: str) -> str:
        parse_hostport(value)
        return value


def _listen_from_yaml(value: Any) -> Any:
    # `listen: host:port` is short for `listen: {address: host:port}`.
    if isinstance(value, str):
        parse_hostport(value)  # so a bad address is reported as `listen:`
        return {"address": value}
    return value


class AdminConfig(_Section):
    listen: str | None = "127.0.0.1:9100"
    # Bearer token for the admin API; required when listen is not loopback.
    # The environment variable named by token_env overrides it.
    token: SecretStr | None = None
    token_env: str = "ZOTLB_ADMIN_TOKEN"
    # Let /, /status and /metrics answer without the token.
    open_read: bool = False

    @field_validator("listen")
    @classmethod
    def _check_listen(cls, value: str | None) -> str | None:
        if value is not None:
            parse_hostport(value)
        return value

    def resolved_token(self) -> str | None:
        from_env = os.environ.get(self.token_env) if self.token_env else None
        if from_env:
            return from_env
        return self.token.get_secret_value() if self.token else None


class LogConfig(_Section):
    level: Literal["debug", "info", "warning", "error"] = "info"
    format: Literal["auto", "json", "console"] = "auto"
    # Share of successful requests that get an access event (errors always do).
    access_sample: float = Field(1.0, ge=0.0, le=1.0)


class LBConfig(_Section):
    """The whole of lb.yaml."""

    listen: Annotated[ListenConfig, BeforeValidator(_listen_from_yaml)] = ListenConfig()
    mode: Literal["active-active", "active-passive"] = "active-active"
    failback: Literal["auto", "manual"] = "auto"
    backends: list[BackendConfig] = Field(min_length=1)
    health: HealthConfig = HealthConfig()
    timeouts: TimeoutsConfig = TimeoutsConfig()
    limits: LimitsConfig = LimitsConfig()
    # How many other backends an idempotent read may be retried on.
    retries: int = Field(2, ge=0, le=16)
    # Processes serving `listen` together (SO_REUSEPORT); 0 or auto: one per core.
    workers: Annotated[int, BeforeValidator(_workers_from_yaml)] = Field(1, ge=0, le=64)
    # What to do with paths outside /v2/: answer 404, or pass them on.
    non_v2: Literal["reject", "pass"] = "reject"
    # `admin: null` turns the admin listener off, as `admin: {listen: null}`.
    admin: Annotated[
        AdminConfig, BeforeValidator(lambda v: {"listen": None} if v is None else v)
    ] = AdminConfig()
    log: LogConfig = LogConfig()
    zot: ZotSection = Field(default_factory=lambda: ZotSection())
    replication: ReplicationConfig = Field(default_factory=lambda: ReplicationConfig())

    @model_validator(mode="after")
    def _check_backends(self) -> LBConfig:
        problems = duplicate_backends([(b.name, b.url) for b in self.backends])
        if problems:
            raise ValueError("; ".join(problems))
        return self

    @model_validator(mode="after")
    def _check_admin_token(self) -> LBConfig:
        admin = self.admin
        if admin.listen is None or admin.resolved_token():
            return self
        if not is_loopback(parse_hostport(admin.listen)[0]):
            raise ValueError(
                f"admin.token: required when admin.listen ({admin.listen}) is not "
                f"loopback (set it here or in ${admin.token_env})"
            )
        return self

    @property
    def listen_address(self) -> tuple[str, int]:
        return parse_hostport(self.listen.address)

    @property
    def worker_count(self) -> int:
        return self.workers or os.cpu_count() or 1


_PLAIN_KEY = re.compile(r"[\w.-]+")


def _key_path(loc: tuple[int | str, ...]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            # A key with spaces or control characters is quoted, so it cannot
            # forge further lines in the report.
            text = str(part) if _PLAIN_KEY.fullmatch(str(part)) else repr(part)
            out += f".{text}" if out else text
    return out or "(top level)"


def _describe(error: Any) -> str:
    kind = error["type"]
    msg = error["msg"]
    if kind == "extra_forbidden":
        return "unknown key"
    if kind == "missing":
        return "required key is missing"
    if kind == "model_type":
        if tuple(error["loc"]) == ("listen",):
            return "expected 'host:port' or a mapping with address (and tls)"
        return "expected a mapping of keys"
    if kind == "value_error" and msg.startswith("Value error, "):
        return msg[len("Value error, ") :]
    return msg


def problems_from(exc: ValidationError) -> list[str]:
    problems = []
    for error in exc.errors():
        path = _key_path(tuple(error["loc"]))
        text = _describe(error)
        # Model-level checks already name their own key paths.
        if path == "(top level)" and re.match(r"^\w+(\[\d+\])?\.", text):
            problems.extend(text.split("; "))
        else:
            problems.append(f"{path}: {text}")
    return problems


def duplicate_backends(pairs: list[tuple[object, object]]) -> list[str]:
    """Backends that repeat an earlier one's name or URL, by key path."""
    seen_names: dict[object, int] = {}
    seen_urls: dict[object, int] = {}
    problems = []
    for i, (name, url) in enumerate(pairs):
        if name is not None and name in seen_names:
            problems.append(
                f"backends[{i}].name: duplicate name {name!r} "
                f"(also backends[{seen_names[name]}])"
            )
        seen_names.setdefault(name, i)
        if url is not None and url in seen_urls:
            problems.append(
                f"backends[{i}].url: {url} is already backends[{seen_urls[url]}]"
            )
        seen_urls.setdefault(url, i)
    return problems


def _raw_duplicates(data: dict[str, Any]) -> list[str]:
    """The duplicate check on the raw document, for when other keys failed.

    Model-level checks only run once every field is valid; this one is cheap
    to repeat, so a file with several mistakes gets all of them at once.
    """
    backends = data.get("backends")
    if not isinstance(backends, list):
        return []
    pairs: list[tuple[object, object]] = []
    for entry in backends:
        entry = entry if isinstance(entry, dict) else {}
        name, url = entry.get("name"), entry.get("url")
        pairs.append(
            (
                name if isinstance(name, str) else None,
                url.rstrip("/") if isinstance(url, str) else None,
            )
        )
    return duplicate_backends(pairs)


def config_from_mapping(data: Any, source: str = "<config>") -> LBConfig:
    if not isinstance(data, dict):
        raise ConfigError(source, ["(top level): expected a mapping of keys"])
    try:
        return LBConfig.model_validate(data)
    except ValidationError as exc:
        problems = problems_from(exc)
        problems += [p for p in _raw_duplicates(data) if p not in problems]
        raise ConfigError(source, problems) from None


def read_yaml(path: str | Path) -> Any:
    source = str(path)
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(source, ["file not found"]) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(source, [f"cannot read: {exc}"]) from None
    try:
        return yaml.safe_load(text)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        where = f"line {mark.line + 1}, column {mark.column + 1}" if mark else "?"
        raise ConfigError(
            source, [f"{where}: invalid YAML: {exc.problem or exc.context}"]
        ) from None
    except yaml.YAMLError as exc:
        raise ConfigError(source, [f"invalid YAML: {exc}"]) from None


def load_config(path: str | Path) -> LBConfig:
    """Read and validate lb.yaml; raises ConfigError naming every problem."""
    return config_from_mapping(read_yaml(path), str(path))


# --- zot: what `zotlb zot-config` needs to write each backend's zot config ------


def _zot_version(value: str) -> str:
    from .zotkeys import normalize_version

    return normalize_version(value)


def _newest_zot() -> str:
    from .zotkeys import newest_release

    return newest_release()


def _absolute_path(value: str) -> str:
    if not value.startswith("/"):
        raise ValueError(f"{value!r}: give an absolute path")
    return value


AbsolutePath = Annotated[str, AfterValidator(_absolute_path)]


class ZotSyncCredentials(_Section):
    # The account each zot uses to log in to its peers (zot's credentialsFile).
    username: str = Field(min_length=1)
    password: SecretStr = Field(min_length=1)


class ZotSyncConfig(_Section):
    on_demand: bool = True
    # Declared after on_demand so its validator can see it.
    poll_interval: Duration = 30.0
    tls_verify: bool = True
    cert_dir: AbsolutePath | None = None
    max_retries: int | None = Field(3, ge=1)
    retry_delay: Duration = 10.0
    prefixes: list[str] = Field(default_factory=lambda: ["**"], min_length=1)
    credentials: ZotSyncCredentials | None = None
    # Where zot finds the credentials file on its own host.
    credentials_path: AbsolutePath = "/etc/zot/sync-credentials.json"
    # active-passive: the primary also syncs from its standbys.
    reverse: bool = True

    @field_validator("poll_interval")
    @classmethod
    def _check_poll(cls, value: float, info: Any) -> float:
        if value == 0 and not info.data.get("on_demand", True):
            raise ValueError(
                "0 with on_demand false: the backends would never copy "
                "each other's images"
            )
        return value

    @field_validator("retry_delay")
    @classmethod
    def _check_retry_delay(cls, value: float, info: Any) -> float:
        if value == 0 and info.data.get("max_retries"):
            raise ValueError("must be greater than zero when max_retries is set")
        return value

    @field_validator("prefixes")
    @classmethod
    def _check_prefixes(cls, value: list[str]) -> list[str]:
        for prefix in value:
            if not prefix.strip():
                raise ValueError("an empty prefix matches nothing")
        return value


class ZotBackend(_Section):
    root_directory: AbsolutePath | None = None
    # host:port zot listens on; default from the backend URL.
    listen: str | None = None
    # How the other zots reach this one, when not by the URL zotlb uses.
    peer_url: str | None = None

    @field_validator("listen")
    @classmethod
    def _check_listen(cls, value: str | None) -> str | None:
        if value is not None:
            parse_hostport(value)
        return value

    @field_validator("peer_url")
    @classmethod
    def _check_peer_url(cls, value: str | None) -> str | None:
        if value is not None:
            value = BackendConfig._check_url(value)
        return value


class ZotTLS(_Section):
    cert: AbsolutePath
    key: AbsolutePath


class ZotHTTPTimeouts(_Section):
    # None: 1h where the target zot has these keys (v2.1.17+), else omitted.
    read: Duration | None = None
    write: Duration | None = None


class ZotMetrics(_Section):
    enable: bool = False
    path: str = "/metrics"

    @field_validator("path")
    @classmethod
    def _check_path(cls, value: str) -> str:
        if not value.startswith("/") or value.rstrip("/") in ("", "/v2"):
            raise ValueError("must start with '/' and be neither '/' nor '/v2'")
        return value


class ZotSection(_Section):
    version: Annotated[str, AfterValidator(_zot_version)] = Field(
        default_factory=_newest_zot
    )
    log_level: Literal["debug", "info", "warn", "error"] = "info"
    sync: ZotSyncConfig = ZotSyncConfig()
    backends: dict[str, ZotBackend] = Field(default_factory=dict)
    # Path of an htpasswd file on every zot host; all backends share it.
    htpasswd: AbsolutePath | None = None
    tls: ZotTLS | None = None
    metrics: ZotMetrics = ZotMetrics()
    http_timeouts: ZotHTTPTimeouts = ZotHTTPTimeouts()


# --- replication: copying each push and delete to the other backends ------------


def _mode_from_yaml(value: Any) -> Any:
    # YAML 1.1 reads a bare `off` as false.
    if value is False:
        return "off"
    return value


class ReplicationCredentials(_Section):
    # HTTP basic auth for every request zotlb makes to copy between backends
    # (and for the drift watch): an account allowed to read and write all
    # repositories on every backend, like zot sync's credentials.
    username: str = Field(min_length=1)
    password: SecretStr = Field(min_length=1)


class ReplicationConfig(_Section):
    # off: no copies; async: copy after answering the client; sync: answer a
    # manifest PUT only once at least one peer holds the image.
    mode: Annotated[
        Literal["off", "async", "sync"], BeforeValidator(_mode_from_yaml)
    ] = "async"
    # Where the durable queue lives; None keeps it in memory (lost on restart).
    state_dir: str | None = None
    queue_max: int = Field(10_000, ge=1)
    workers: int = Field(8, ge=1, le=256)
    retry_initial: PositiveDuration = 0.5
    retry_max: PositiveDuration = 60.0
    # sync: the longest a manifest PUT waits for the first peer.
    sync_timeout: PositiveDuration = 10.0
    # Compare catalogs and tags across backends this often; 0 turns it off.
    drift_interval: Duration = 0.0
    credentials: ReplicationCredentials | None = None

    @property
    def basic_auth(self) -> tuple[str, str] | None:
        if self.credentials is None:
            return None
        creds = self.credentials
        return (creds.username, creds.password.get_secret_value())

    @model_validator(mode="after")
    def _check_retry(self) -> ReplicationConfig:
        if self.retry_max < self.retry_initial:
            raise ValueError("retry_max must not be less than retry_initial")
        return self


LBConfig.model_rebuild()
