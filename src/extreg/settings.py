"""Settings, read once into an immutable value object, with pydantic-settings.

`Settings()` reads every layer; lowest to highest: defaults, the running demo's NATS URL
(`data_dir/demo-nats.json`, only while `extreg serve --demo` runs and only when no layer names
`nats_url`), a TOML file (`[extension_registry]` table, named by `EXTENSION_REGISTRY_CONFIG`),
`EXTENSION_REGISTRY_*` environment variables, then keyword arguments. `Settings.load` is the
same with an explicit file and environment, for the CLI (its flags are the keywords) and tests.
Every rejection is a `ConfigError` naming the key and where its value came from, never a raw
pydantic `ValidationError`. The password lives in a `SecretStr` and URLs are only ever shown
through `redact_url`, so neither can leak through a repr, a log line or an error.
"""

from __future__ import annotations

import os
import tomllib
from collections.abc import Mapping
from contextvars import ContextVar
from dataclasses import dataclass, field
from ipaddress import ip_network
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import quote, urlsplit, urlunsplit

from pydantic import (
    Field,
    SecretStr,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic.fields import FieldInfo
from pydantic_settings import (
    BaseSettings,
    EnvSettingsSource,
    NoDecode,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

from .errors import ConfigError
from .published import published_url

ENV_PREFIX = "EXTENSION_REGISTRY_"
CONFIG_ENV = ENV_PREFIX + "CONFIG"
TOML_TABLE = "extension_registry"
BUNDLED_FIXTURES = Path(__file__).parent / "fixtures"
DEFAULT_DATA_DIR = Path(".extreg")
DEMO_NATS_FILE = "demo-nats.json"  # in data_dir, while `extreg serve --demo` runs
KEYWORD = "keyword argument"
COMMAND_LINE = "command line"


class Settings(BaseSettings):
    """Every key of the contract's settings table, plus extreg's own (data_dir, snapshot_file)."""

    model_config = SettingsConfigDict(
        frozen=True,
        extra="forbid",
        validate_default=True,
        env_prefix=ENV_PREFIX,
        case_sensitive=True,  # a TOML or keyword `DB_NAME` is unknown; see _Environment
    )

    source: Literal["database", "fixtures", "auto"] = "auto"
    db_enabled: bool = False
    database_url: SecretStr | None = None
    db_host: str = "localhost"
    db_port: int = Field(5432, ge=1, le=65535)
    db_name: str = "beamline"
    db_user: str = "beamline"
    db_password: SecretStr = SecretStr("")
    db_pool_size: int = Field(4, ge=1, le=100)
    fixtures_dir: Path = BUNDLED_FIXTURES
    cache_type: Literal["ets", "memory", "mnesia"] = "ets"
    sync_interval_seconds: float = Field(60, gt=0, allow_inf_nan=False)
    # How changes reach this node (SPEC.md "Scale"): `listen` on PostgreSQL, or `nats` from the
    # one publisher of the database, under subjects `<change_feed_subject>.*`.
    change_feed: Literal["listen", "nats"] = "listen"
    change_feed_subject: str = Field("extreg.feed", pattern=r"^[A-Za-z0-9_-]+(\.[A-Za-z0-9_-]+)*$")
    data_dir: Path = DEFAULT_DATA_DIR
    snapshot_file: Path | None = None
    api_tokens_file: Path | None = None  # extra API tokens, for fixtures without a database

    circuit_breaker_enabled: bool = False
    circuit_breaker_failure_threshold: int = Field(5, ge=1)
    circuit_breaker_timeout_seconds: float = Field(60, gt=0, allow_inf_nan=False)
    circuit_breaker_half_open_max_requests: int = Field(3, ge=1)
    circuit_breaker_error_rate_threshold: float = Field(0.5, gt=0, le=1, allow_inf_nan=False)
    circuit_breaker_window_seconds: float = Field(60, gt=0, allow_inf_nan=False)
    circuit_breaker_min_calls: int = Field(10, ge=1)
    # A call slower than this counts as slow (0: off); slow calls open the circuit like
    # failures once their share of the window reaches the threshold (health: successes).
    circuit_breaker_slow_call_duration_ms: int = Field(0, ge=0)
    circuit_breaker_slow_call_rate_threshold: float = Field(1.0, gt=0, le=1, allow_inf_nan=False)
    auto_disable_on_circuit_open: bool = False
    auto_enable_on_circuit_close: bool = False
    health_based_routing_enabled: bool = False
    health_based_routing_min_success_rate: float = Field(0.8, ge=0, le=1, allow_inf_nan=False)
    health_flush_interval_seconds: float = Field(2, gt=0, allow_inf_nan=False)
    # The recent window of status, charts and health-based routing: at least one interval
    # (core.intervals.INTERVAL_S), at most the 6 hours of intervals the database keeps.
    health_window_seconds: float = Field(300, ge=10, le=21_600, allow_inf_nan=False)

    extension_max_payload_size: int = Field(1_048_576, ge=1)
    extension_max_metadata_size: int = Field(65_536, ge=1)
    extension_max_timeout_ms: int = Field(60_000, ge=1)
    extension_max_retries: int = Field(10, ge=0)
    # Overload protection on one node: calls in flight per extension (0: unlimited; metadata
    # `max_concurrency` overrides), and a limit that follows measured latency.
    extension_max_concurrency: int = Field(0, ge=0)
    adaptive_concurrency_enabled: bool = False
    # Outlier ejection of instances (Envoy's outlier detection; core/outliers.py).
    outlier_detection_enabled: bool = False
    outlier_consecutive_failures: int = Field(5, ge=1)
    outlier_base_ejection_seconds: float = Field(30, gt=0, allow_inf_nan=False)
    outlier_max_ejection_percent: float = Field(50, ge=0, le=100, allow_inf_nan=False)
    # Routing policies (the original's depth limits: security against runaway pipelines).
    extension_max_pipeline_depth: int = Field(10, ge=1)  # pre + validators + post items
    extension_max_pre_count: int = Field(5, ge=0)
    extension_max_validators_count: int = Field(5, ge=0)
    extension_max_post_count: int = Field(5, ge=0)
    nats_url: SecretStr = SecretStr("nats://127.0.0.1:4222")  # may carry a password or token
    # proxies whose X-Forwarded-For the API believes: addresses or networks, comma-separated
    forwarded_allow_ips: Annotated[tuple[str, ...], NoDecode] = ()

    @field_validator("forwarded_allow_ips", mode="before")
    @classmethod
    def _networks(cls, value: Any) -> tuple[str, ...]:
        """A comma-separated string or a list of IP addresses or networks, normalized."""
        items = value.split(",") if isinstance(value, str) else value
        if not isinstance(items, list | tuple) or not all(isinstance(i, str) for i in items):
            raise ValueError("expected IP addresses or networks, comma-separated or as a list")
        try:
            return tuple(str(ip_network(i.strip(), strict=False)) for i in items if i.strip())
        except ValueError as exc:
            raise ValueError(str(exc).replace(" does not appear to be", " is not")) from None

    # The admin API's HTTP server (`extreg serve`; see extreg.api.connections).
    http_keep_alive_seconds: int = Field(5, ge=1)  # an idle connection closes after this
    http_request_timeout_seconds: float = Field(30, gt=0, allow_inf_nan=False)  # headers + body
    http_max_connections: int = Field(1024, ge=1)  # kept below RLIMIT_NOFILE, see connections
    metrics_token: SecretStr | None = None  # when set, /metrics needs it as a bearer token

    @field_validator("cache_type")
    @classmethod
    def _no_mnesia(cls, value: str) -> str:
        if value == "mnesia":
            raise ValueError(
                "'mnesia' is not supported: extreg keeps its cache in process; "
                "use 'ets' (or its alias 'memory')"
            )
        return value

    @field_validator("database_url")
    @classmethod
    def _postgres_url(cls, value: SecretStr | None) -> SecretStr | None:
        if value is not None:
            _check_url(value.get_secret_value(), ("postgresql", "postgres"))
        return value

    @field_validator("nats_url")
    @classmethod
    def _nats_url(cls, value: SecretStr) -> SecretStr:
        for url in value.get_secret_value().split(","):  # nats-py takes a list of servers
            _check_url(url.strip(), ("nats", "tls", "ws", "wss"))
        return value

    @field_validator("*", mode="before")
    @classmethod
    def _no_bool_numbers(cls, value: Any, info: ValidationInfo) -> Any:
        """TOML `true` is not a number (pydantic would read it as 1)."""
        if (
            isinstance(value, bool)
            and info.field_name
            and cls.model_fields[info.field_name].annotation in (int, float)
        ):
            raise ValueError("expected a number, got a boolean")
        return value

    @model_validator(mode="before")
    @classmethod
    def _derive_db_enabled(cls, data: Any) -> Any:
        """db_enabled defaults to true when a database URL or host is given, else false."""
        if isinstance(data, dict) and data.get("db_enabled") is None:
            data = {**data, "db_enabled": bool(data.get("database_url") or data.get("db_host"))}
        return data

    @property
    def database_configured(self) -> bool:
        return self.db_enabled

    @property
    def persists_health(self) -> bool:
        """Health goes to a database: one is configured and not set aside for fixtures."""
        return self.database_configured and self.source != "fixtures"

    @property
    def conninfo(self) -> str:
        """The PostgreSQL connection string, with the password. Never log this; use `db_display`."""
        if self.database_url is not None:
            return self.database_url.get_secret_value()
        password = self.db_password.get_secret_value()
        auth = quote(self.db_user, safe="") + (":" + quote(password, safe="") if password else "")
        return f"postgresql://{auth}@{self.db_host}:{self.db_port}/{quote(self.db_name, safe='')}"

    @property
    def db_display(self) -> str:
        """Where the database is, safe to print."""
        return redact_url(self.conninfo)

    @property
    def nats_display(self) -> str:
        """The NATS server(s), safe to print (a NATS URL may carry a password or a token)."""
        return redact_nats_url(self.nats_url.get_secret_value())

    @property
    def snapshot_path(self) -> Path:
        return self.snapshot_file or self.data_dir / "snapshot.json"

    def __init__(self, **values: Any) -> None:
        """Read every layer; a rejection is a `ConfigError` naming key and origin (the raw
        `ValidationError` would show the offending input, a password included)."""
        request = _REQUEST.get() or _Request()
        build = request.build()
        token = _BUILD.set(build)
        try:
            super().__init__(**values)
        except ValidationError as exc:
            raise ConfigError(_describe(exc, build.origins)) from None
        finally:
            _BUILD.reset(token)

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        """Keywords, environment, TOML file, the demo's NATS URL: highest first. No dotenv and
        no secrets folder: the contract names neither."""
        build = _BUILD.get() or _Request().build()
        sources: list[PydanticBaseSettingsSource] = [
            _Traced(init_settings, build.keyword_origin, build),
            _Traced(_Environment(settings_cls, build.environ), "environment", build),
        ]
        if build.config_file is not None:
            path = build.config_file
            sources.append(_Traced(_TomlFile(settings_cls, path), f"config file {path}", build))
        sources.append(_DemoNats(settings_cls, build))
        return tuple(sources)

    def replace(self, **changes: Any) -> Settings:
        """A validated copy with some keys changed (what was set stays set; the environment
        and the file are not read again)."""
        data = {key: getattr(self, key) for key in self.model_fields_set}
        token = _REQUEST.set(_Request(environ={}))
        try:
            return type(self)(**{**data, **changes})
        finally:
            _REQUEST.reset(token)

    @classmethod
    def load(
        cls,
        config_file: Path | str | None = None,
        environ: Mapping[str, str] | None = None,
        **overrides: Any,
    ) -> Settings:
        """`Settings(**overrides)` with an explicit config file (else `EXTENSION_REGISTRY_CONFIG`)
        and environment (else `os.environ`): the CLI's flags are the overrides (named
        "command line" in errors), and `None` values (flags not given) are ignored."""
        request = _Request(Path(config_file) if config_file else None, environ, COMMAND_LINE)
        token = _REQUEST.set(request)
        try:
            return cls(**{k: v for k, v in overrides.items() if v is not None})
        finally:
            _REQUEST.reset(token)


# -- the layers ------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Request:
    """What `load` (or `replace`) asks of the next `Settings(...)`; `Settings()` alone reads the
    process's environment and the file it names."""

    config_file: Path | None = None
    environ: Mapping[str, str] | None = None
    keyword_origin: str = KEYWORD

    def build(self) -> _Build:
        environ = os.environ if self.environ is None else self.environ
        named = environ.get(CONFIG_ENV)
        config_file = self.config_file or (Path(named) if named else None)
        return _Build(config_file, environ, self.keyword_origin)


@dataclass
class _Build:
    """One construction's inputs, and where each key's value came from (highest layer)."""

    config_file: Path | None
    environ: Mapping[str, str]
    keyword_origin: str
    origins: dict[str, str] = field(default_factory=dict)
    values: dict[str, Any] = field(default_factory=dict)

    def record(self, values: Mapping[str, Any], where: str) -> None:
        for key, value in values.items():
            if key not in self.origins:
                self.origins[key] = where
                self.values[key] = value


_REQUEST: ContextVar[_Request | None] = ContextVar("extreg_settings_request", default=None)
_BUILD: ContextVar[_Build | None] = ContextVar("extreg_settings_build", default=None)


class _Traced(PydanticBaseSettingsSource):
    """A source that notes which keys it supplied, so a rejection can say where a value came
    from (pydantic-settings merges the layers without keeping that)."""

    def __init__(self, inner: PydanticBaseSettingsSource, where: str, build: _Build) -> None:
        super().__init__(inner.settings_cls)
        self.inner, self.where, self.build = inner, where, build

    def get_field_value(self, field: FieldInfo, field_name: str) -> tuple[Any, str, bool]:
        return self.inner.get_field_value(field, field_name)

    def __call__(self) -> dict[str, Any]:
        values = self.inner()
        self.build.record(values, self.where)
        return values


class _Environment(EnvSettingsSource):
    """`EXTENSION_REGISTRY_<KEY>` from a given mapping (the prefix as written, the key in any
    case); a variable with the prefix that names no setting is passed on as a key, so that it
    is refused as an unknown setting."""

    def __init__(self, settings_cls: type[BaseSettings], environ: Mapping[str, str]) -> None:
        self._environ = environ
        super().__init__(settings_cls)

    def _load_env_vars(self) -> Mapping[str, str | None]:
        return {
            ENV_PREFIX + name[len(ENV_PREFIX) :].lower(): value
            for name, value in self._environ.items()
            if name.startswith(ENV_PREFIX)
        }

    def __call__(self) -> dict[str, Any]:
        values = super().__call__()
        for name, value in self._environ.items():
            if not name.startswith(ENV_PREFIX) or name == CONFIG_ENV:
                continue
            key = name[len(ENV_PREFIX) :].lower()
            if not key:
                raise ConfigError(f"environment variable {ENV_PREFIX} names no setting")
            if key not in self.settings_cls.model_fields:
                values[key] = value
        return values


class _TomlFile(TomlConfigSettingsSource):
    """The `[extension_registry]` table of the TOML file; a file that is missing or unreadable,
    or has another table, is an error naming it (pydantic-settings would skip it quietly)."""

    def __init__(self, settings_cls: type[BaseSettings], path: Path) -> None:
        if not path.exists():
            raise ConfigError(f"config file {path} does not exist")
        if path.is_dir():
            raise ConfigError(f"config file {path} is a directory")
        if not path.is_file():  # a FIFO or a device: reading it could block for good
            raise ConfigError(f"config file {path} is not a regular file")
        super().__init__(settings_cls, toml_file=path)

    def _read_file(self, file_path: Any) -> dict[str, Any]:
        return _read_toml(Path(str(file_path)))


class _DemoNats(PydanticBaseSettingsSource):
    """The NATS URL that a running `extreg serve --demo` publishes in its data_dir, when no
    other layer names `nats_url`: the docs' examples then reach the demo's extensions."""

    def __init__(self, settings_cls: type[BaseSettings], build: _Build) -> None:
        super().__init__(settings_cls)
        self.build = build

    def get_field_value(self, field: FieldInfo, field_name: str) -> tuple[Any, str, bool]:
        return None, field_name, False

    def __call__(self) -> dict[str, Any]:
        if "nats_url" in self.build.values:
            return {}
        try:
            data_dir = Path(self.build.values.get("data_dir", DEFAULT_DATA_DIR))
        except TypeError:
            return {}  # a bad data_dir is reported by validation
        path = data_dir / DEMO_NATS_FILE
        url = published_url(path)
        if url is None:
            return {}
        self.build.record({"nats_url": url}, f"demo file {path}")
        return {"nats_url": url}


def _check_url(url: str, schemes: tuple[str, ...]) -> None:
    """A URL with one of `schemes` and, for each host it names, a port in range if it names
    one. A PostgreSQL URL may name several hosts (`h1:5432,h2:5432`, libpq's multi-host form,
    for high availability: SPEC.md "Scale: past one machine"). Never shown whole: it may carry
    a password."""
    parts = urlsplit(url)
    if parts.scheme not in schemes:
        raise ValueError(f"must start with {schemes[0]}:// (got scheme {parts.scheme!r})")
    for host in parts.netloc.rpartition("@")[2].split(","):
        try:
            port = urlsplit(f"//{host}").port  # urlsplit checks the port only when it is read
        except ValueError:
            port = 0
        if port == 0:
            raise ValueError("has a port that is not a number from 1 to 65535")
    if not parts.hostname and "host=" not in parts.query:
        raise ValueError("names no host")


def _read_toml(path: Path) -> dict[str, Any]:
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"config file {path} does not exist") from None
    except IsADirectoryError:
        raise ConfigError(f"config file {path} is a directory") from None
    except OSError as exc:
        raise ConfigError(f"config file {path} cannot be read: {exc.strerror or exc}") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"config file {path} is not valid TOML: {exc}") from None
    table = data.get(TOML_TABLE)
    if not isinstance(table, dict):
        raise ConfigError(f"config file {path} has no [{TOML_TABLE}] table")
    unknown_tables = sorted(set(data) - {TOML_TABLE})
    if unknown_tables:
        raise ConfigError(f"config file {path}: unknown table(s) {', '.join(unknown_tables)}")
    return table


def _may_be_secret(key: str, error_type: str) -> bool:
    """Whether a rejected value must not be echoed: a secret setting's, or an unknown key's
    (a misspelt `db_pasword` holds a password all the same)."""
    field = Settings.model_fields.get(key)
    return (
        error_type == "extra_forbidden"
        or field is None
        or "SecretStr" in str(field.annotation)
        or any(word in key for word in ("password", "url", "token", "secret"))
    )


def _describe(exc: ValidationError, origin: dict[str, str]) -> str:
    lines = []
    for error in exc.errors():
        key = ".".join(str(part) for part in error["loc"]) or "settings"
        where = origin.get(key)
        if error["type"] == "extra_forbidden":
            message = "unknown setting"
        else:
            message = error["msg"].removeprefix("Value error, ")
        shown = "" if _may_be_secret(key, error["type"]) else f" (got {error.get('input')!r})"
        place = f" from {where}" if where else ""
        if where == "environment":
            key = ENV_PREFIX + key.upper()
        lines.append(f"setting {key}{place}: {message}{shown}")
    return "\n".join(lines)


def redact_url(url: str) -> str:
    """Hide the password of a URL (and any `password=` parameter) so it can be shown."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return "<unparseable database URL>"
    netloc = parts.netloc
    if "@" in netloc:
        userinfo, host = netloc.rsplit("@", 1)
        if ":" in userinfo:
            userinfo = userinfo.split(":", 1)[0] + ":********"
        netloc = f"{userinfo}@{host}"
    query = (
        "&".join(
            "password=********" if item.lower().startswith("password=") else item
            for item in parts.query.split("&")
        )
        if parts.query
        else ""
    )
    return urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))


def redact_nats_url(urls: str) -> str:
    """`redact_url` for a NATS server list: a lone user part (`nats://TOKEN@host`) is a token
    there, so it is hidden too."""
    shown = []
    for url in urls.split(","):
        url = redact_url(url.strip())
        scheme, sep, rest = url.partition("://")
        userinfo, at, host = rest.rpartition("@")
        if at and ":" not in userinfo:
            url = f"{scheme}{sep}********@{host}"
        shown.append(url)
    return ",".join(shown)
