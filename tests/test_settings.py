"""Settings (SPEC.md, "Configuration"): the defaults table, the layers and their precedence,
every rejection naming its key and origin, and passwords kept out of every rendering."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest

import extreg
from extreg.adapters.fixtures import load_fixtures
from extreg.errors import ConfigError
from extreg.registry import Registry
from extreg.settings import Settings, redact_url

SECRET = "SECRET-pw-9f3a"


def load(**kwargs: object) -> Settings:
    kwargs.setdefault("environ", {})
    return Settings.load(**kwargs)  # type: ignore[arg-type]


def config_error(**kwargs: object) -> str:
    with pytest.raises(ConfigError) as info:
        load(**kwargs)
    return str(info.value)


def write_toml(path: Path, body: str) -> Path:
    path.write_text(body, encoding="utf-8")
    return path


@pytest.fixture(autouse=True)
def _fresh_folder(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Every test in a folder of its own, so the default data_dir (`.extreg`, relative) holds
    no demo NATS URL from a `scripts/run` in the repository."""
    monkeypatch.chdir(tmp_path)


@pytest.fixture
def environ(monkeypatch: pytest.MonkeyPatch) -> Iterator[pytest.MonkeyPatch]:
    """The process environment without any EXTENSION_REGISTRY_* variable: for `Settings()`
    alone."""
    for name in list(os.environ):
        if name.startswith("EXTENSION_REGISTRY_"):
            monkeypatch.delenv(name)
    yield monkeypatch


# -- defaults --------------------------------------------------------------------------------


def test_defaults_equal_the_contract_table() -> None:
    """With no file, no environment and no flags, every key has the default of SPEC.md's table."""
    s = load()
    actual = {
        "source": s.source,
        "database_url": s.database_url,
        "db_host": s.db_host,
        "db_port": s.db_port,
        "db_name": s.db_name,
        "db_user": s.db_user,
        "db_password": s.db_password.get_secret_value(),
        "cache_type": s.cache_type,
        "sync_interval_seconds": s.sync_interval_seconds,
        "circuit_breaker_enabled": s.circuit_breaker_enabled,
        "circuit_breaker_failure_threshold": s.circuit_breaker_failure_threshold,
        "circuit_breaker_timeout_seconds": s.circuit_breaker_timeout_seconds,
        "circuit_breaker_half_open_max_requests": s.circuit_breaker_half_open_max_requests,
        "circuit_breaker_error_rate_threshold": s.circuit_breaker_error_rate_threshold,
        "circuit_breaker_window_seconds": s.circuit_breaker_window_seconds,
        "circuit_breaker_min_calls": s.circuit_breaker_min_calls,
        "auto_disable_on_circuit_open": s.auto_disable_on_circuit_open,
        "auto_enable_on_circuit_close": s.auto_enable_on_circuit_close,
        "health_based_routing_enabled": s.health_based_routing_enabled,
        "health_based_routing_min_success_rate": s.health_based_routing_min_success_rate,
        "extension_max_payload_size": s.extension_max_payload_size,
        "extension_max_metadata_size": s.extension_max_metadata_size,
        "extension_max_timeout_ms": s.extension_max_timeout_ms,
        "extension_max_retries": s.extension_max_retries,
        "nats_url": s.nats_url.get_secret_value(),
    }
    expected = {
        "source": "auto",
        "database_url": None,
        "db_host": "localhost",
        "db_port": 5432,
        "db_name": "beamline",
        "db_user": "beamline",
        "db_password": "",
        "cache_type": "ets",
        "sync_interval_seconds": 60,
        "circuit_breaker_enabled": False,
        "circuit_breaker_failure_threshold": 5,
        "circuit_breaker_timeout_seconds": 60,
        "circuit_breaker_half_open_max_requests": 3,
        "circuit_breaker_error_rate_threshold": 0.5,
        "circuit_breaker_window_seconds": 60,
        "circuit_breaker_min_calls": 10,
        "auto_disable_on_circuit_open": False,
        "auto_enable_on_circuit_close": False,
        "health_based_routing_enabled": False,
        "health_based_routing_min_success_rate": 0.8,
        "extension_max_payload_size": 1_048_576,
        "extension_max_metadata_size": 65_536,
        "extension_max_timeout_ms": 60_000,
        "extension_max_retries": 10,
        "nats_url": "nats://127.0.0.1:4222",
    }
    assert expected == actual


def test_default_fixtures_dir_is_the_bundled_samples() -> None:
    """fixtures_dir defaults to the package's samples: the four reference extensions."""
    s = load()
    assert Path(extreg.__file__).parent / "fixtures" == s.fixtures_dir
    records = load_fixtures(
        s.fixtures_dir,
        max_timeout_ms=s.extension_max_timeout_ms,
        max_retries=s.extension_max_retries,
    )
    assert [
        ("mask_pii", "post", "beamline.ext.post.mask_pii.v1", 150, 0),
        ("normalize_text", "pre", "beamline.ext.pre.normalize_text.v1", 100, 0),
        ("pii_guard", "validator", "beamline.ext.validate.pii_guard.v1", 200, 0),
        ("test_provider", "provider", "beamline.provider.test_provider.v1", 5000, 1),
    ] == sorted((e.id, e.type, e.subject, e.timeout_ms, e.retry) for e in records.extensions)


# -- db_enabled ------------------------------------------------------------------------------


def test_db_enabled_is_false_by_default() -> None:
    """Without a database URL or host, db_enabled is false (the attribute, as the table says)."""
    s = load()
    assert False is s.db_enabled
    assert False is s.database_configured


def test_db_enabled_is_true_with_a_database_url() -> None:
    """Giving database_url makes db_enabled true."""
    s = load(database_url="postgresql://u@db.example:5432/reg")
    assert True is s.db_enabled
    assert True is s.database_configured


def test_db_enabled_is_true_with_a_db_host() -> None:
    """Giving db_host (here through the environment) makes db_enabled true."""
    s = load(environ={"EXTENSION_REGISTRY_DB_HOST": "db.example"})
    assert True is s.db_enabled
    assert True is s.database_configured


def test_database_configured_follows_url_host_and_explicit_flag() -> None:
    """database_configured: false by default, true with a URL or a host, and an explicit
    db_enabled=false wins over a given URL."""
    assert False is load().database_configured
    assert True is load(database_url="postgresql://u@h/db").database_configured
    assert True is load(db_host="h").database_configured
    assert False is load(database_url="postgresql://u@h/db", db_enabled=False).database_configured
    assert True is load(environ={"EXTENSION_REGISTRY_DB_ENABLED": "true"}).database_configured


# -- layers and precedence -----------------------------------------------------------------


def test_precedence_defaults_then_file_then_environment_then_flags(tmp_path: Path) -> None:
    """Each layer overrides the one below: default < TOML < environment < keyword override."""
    path = write_toml(
        tmp_path / "reg.toml",
        """
[extension_registry]
db_name = "from_file"
db_user = "file_user"
nats_url = "nats://file:4222"
extension_max_retries = 3
""",
    )
    s = load(
        config_file=path,
        environ={
            "EXTENSION_REGISTRY_DB_USER": "env_user",
            "EXTENSION_REGISTRY_NATS_URL": "nats://env:4222",
            "EXTENSION_REGISTRY_SYNC_INTERVAL_SECONDS": "7",
        },
        nats_url="nats://flag:4222",
    )
    assert {
        "db_host": "localhost",  # default only
        "db_name": "from_file",  # file only
        "db_user": "env_user",  # file < environment
        "nats_url": "nats://flag:4222",  # file < environment < flag
        "extension_max_retries": 3,  # file only, typed
        "sync_interval_seconds": 7.0,  # environment only, parsed from text
    } == {
        "db_host": s.db_host,
        "db_name": s.db_name,
        "db_user": s.db_user,
        "nats_url": s.nats_url.get_secret_value(),
        "extension_max_retries": s.extension_max_retries,
        "sync_interval_seconds": s.sync_interval_seconds,
    }


def test_config_environment_variable_selects_the_toml_file(tmp_path: Path) -> None:
    """EXTENSION_REGISTRY_CONFIG names the TOML file when no file is passed."""
    path = write_toml(tmp_path / "reg.toml", '[extension_registry]\ndb_name = "via_env_file"\n')
    s = load(environ={"EXTENSION_REGISTRY_CONFIG": str(path)})
    assert "via_env_file" == s.db_name


def test_config_file_argument_wins_over_the_environment_variable(tmp_path: Path) -> None:
    """An explicit config file (the --config flag) is used instead of EXTENSION_REGISTRY_CONFIG."""
    flag_file = write_toml(tmp_path / "flag.toml", '[extension_registry]\ndb_name = "flag"\n')
    env_file = write_toml(tmp_path / "env.toml", '[extension_registry]\ndb_name = "env"\n')
    s = load(config_file=flag_file, environ={"EXTENSION_REGISTRY_CONFIG": str(env_file)})
    assert "flag" == s.db_name


def test_none_overrides_are_ignored() -> None:
    """A flag left unset (None) does not hide the environment's value."""
    s = load(environ={"EXTENSION_REGISTRY_NATS_URL": "nats://env:4222"}, nats_url=None)
    assert "nats://env:4222" == s.nats_url.get_secret_value()


def test_environment_values_are_parsed_to_the_keys_types() -> None:
    """Environment text becomes bools, ints and floats as each key requires."""
    s = load(
        environ={
            "EXTENSION_REGISTRY_CIRCUIT_BREAKER_ENABLED": "true",
            "EXTENSION_REGISTRY_DB_PORT": "6543",
            "EXTENSION_REGISTRY_CIRCUIT_BREAKER_ERROR_RATE_THRESHOLD": "0.25",
            "EXTENSION_REGISTRY_SOURCE": "fixtures",
        }
    )
    assert (True, 6543, 0.25, "fixtures") == (
        s.circuit_breaker_enabled,
        s.db_port,
        s.circuit_breaker_error_rate_threshold,
        s.source,
    )


def test_every_contract_key_has_an_environment_name() -> None:
    """Every key of the table can be set as EXTENSION_REGISTRY_<KEY>."""
    values = {
        "source": ("database", "database"),
        "db_host": ("h1", "h1"),
        "db_port": ("1234", 1234),
        "db_name": ("n1", "n1"),
        "db_user": ("u1", "u1"),
        "cache_type": ("memory", "memory"),
        "sync_interval_seconds": ("5", 5.0),
        "circuit_breaker_enabled": ("true", True),
        "circuit_breaker_failure_threshold": ("7", 7),
        "circuit_breaker_timeout_seconds": ("9", 9.0),
        "circuit_breaker_half_open_max_requests": ("2", 2),
        "circuit_breaker_error_rate_threshold": ("0.3", 0.3),
        "circuit_breaker_window_seconds": ("30", 30.0),
        "circuit_breaker_min_calls": ("4", 4),
        "auto_disable_on_circuit_open": ("true", True),
        "auto_enable_on_circuit_close": ("true", True),
        "health_based_routing_enabled": ("true", True),
        "health_based_routing_min_success_rate": ("0.6", 0.6),
        "extension_max_payload_size": ("100", 100),
        "extension_max_metadata_size": ("50", 50),
        "extension_max_timeout_ms": ("1000", 1000),
        "extension_max_retries": ("2", 2),
        "nats_url": ("nats://x:1", "nats://x:1"),
    }
    s = load(environ={f"EXTENSION_REGISTRY_{k.upper()}": v for k, (v, _) in values.items()})
    assert {k: want for k, (_, want) in values.items()} == {
        k: getattr(s, k).get_secret_value() if k == "nats_url" else getattr(s, k) for k in values
    }


# -- Settings() alone (issue 8: it ignored the environment) --------------------------------


def test_settings_alone_reads_the_environment(environ: pytest.MonkeyPatch) -> None:
    """`Settings()` with no argument reads EXTENSION_REGISTRY_* from the process environment,
    parsed to each key's type."""
    environ.setenv("EXTENSION_REGISTRY_DB_NAME", "from_env")
    environ.setenv("EXTENSION_REGISTRY_SYNC_INTERVAL_SECONDS", "7")
    environ.setenv("EXTENSION_REGISTRY_CIRCUIT_BREAKER_ENABLED", "true")
    s = Settings()
    assert ("from_env", 7.0, True) == (
        s.db_name,
        s.sync_interval_seconds,
        s.circuit_breaker_enabled,
    )


def test_settings_alone_reads_every_layer(environ: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """`Settings(**keywords)`: default < the TOML file named by EXTENSION_REGISTRY_CONFIG <
    environment < keyword argument."""
    path = write_toml(
        tmp_path / "reg.toml",
        """
[extension_registry]
db_name = "from_file"
db_user = "file_user"
nats_url = "nats://file:4222"
""",
    )
    environ.setenv("EXTENSION_REGISTRY_CONFIG", str(path))
    environ.setenv("EXTENSION_REGISTRY_DB_USER", "env_user")
    environ.setenv("EXTENSION_REGISTRY_NATS_URL", "nats://env:4222")
    s = Settings(nats_url="nats://keyword:4222")
    assert ("localhost", "from_file", "env_user", "nats://keyword:4222") == (
        s.db_host,
        s.db_name,
        s.db_user,
        s.nats_url.get_secret_value(),
    )


def test_settings_alone_refuses_an_unknown_environment_variable(
    environ: pytest.MonkeyPatch,
) -> None:
    """The unknown-key rule holds for `Settings()` too, naming the variable."""
    environ.setenv("EXTENSION_REGISTRY_COLOUR", "blue")
    with pytest.raises(ConfigError) as info:
        Settings()
    for part in ("EXTENSION_REGISTRY_COLOUR", "environment", "unknown setting"):
        assert part in str(info.value), (part, str(info.value))


def test_settings_alone_names_the_file_of_a_bad_value(
    environ: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """A bad value in the file named by EXTENSION_REGISTRY_CONFIG names the key and the file."""
    path = write_toml(tmp_path / "reg.toml", "[extension_registry]\ndb_port = 70000\n")
    environ.setenv("EXTENSION_REGISTRY_CONFIG", str(path))
    with pytest.raises(ConfigError) as info:
        Settings()
    for part in ("db_port", f"config file {path}"):
        assert part in str(info.value), (part, str(info.value))


def test_bad_keyword_database_url_is_a_config_error_without_the_password(
    environ: pytest.MonkeyPatch,
) -> None:
    """`Settings(database_url="postgresql://u:pw@h:bad/x")` raises ConfigError (in the error
    tree, not pydantic's ValidationError, whose text showed the password), naming the key and
    that it came from a keyword argument."""
    with pytest.raises(ConfigError) as info:
        Settings(database_url=f"postgresql://u:{SECRET}@h:bad/x")
    message = str(info.value)
    assert SECRET not in message, message
    for part in ("database_url", "keyword argument", "port"):
        assert part in message, (part, message)


@pytest.mark.parametrize(
    ("values", "key"),
    [
        ({"db_port": 0}, "db_port"),
        ({"cache_type": "mnesia"}, "cache_type"),
        ({"colour": "blue"}, "colour"),
        ({"db_password": 123456789}, "db_password"),
    ],
    ids=["port", "mnesia", "unknown", "password-type"],
)
def test_bad_keyword_is_a_config_error_naming_key_and_origin(
    environ: pytest.MonkeyPatch, values: dict[str, object], key: str
) -> None:
    """Every rejection of a keyword argument is a ConfigError naming the key and the keyword
    origin, and never echoes a password."""
    with pytest.raises(ConfigError) as info:
        Settings(**values)
    message = str(info.value)
    assert (key in message, "keyword argument" in message, "123456789" in message) == (
        True,
        True,
        False,
    ), message


def test_keys_are_lower_case_in_the_file_and_as_keywords(
    environ: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """`DB_NAME` in the TOML file or as a keyword is an unknown setting (only the environment
    spells keys in upper case)."""
    path = write_toml(tmp_path / "reg.toml", '[extension_registry]\nDB_NAME = "x"\n')
    for kwargs in ({"config_file": path}, {"DB_NAME": "x"}):
        assert "unknown setting" in config_error(**kwargs)
    environ.setenv("EXTENSION_REGISTRY_DB_NAME", "upper")
    assert "upper" == Settings().db_name


def test_replace_reads_no_layer_again(environ: pytest.MonkeyPatch) -> None:
    """`replace` copies what was set: an environment isolated with `load(environ={})` stays
    isolated even when the process environment says otherwise."""
    s = load(db_name="mine")
    environ.setenv("EXTENSION_REGISTRY_DB_USER", "intruder")
    copy = s.replace(db_port=6543)
    assert ("mine", "beamline", 6543) == (copy.db_name, copy.db_user, copy.db_port)


async def test_registry_open_settings_uses_the_database_of_the_environment(
    environ: pytest.MonkeyPatch, tmp_path: Path, db_url: str
) -> None:
    """The contract's first lines: with EXTENSION_REGISTRY_DATABASE_URL set,
    `Registry.open(Settings())` serves that database (it used to fall back to fixtures)."""
    with psycopg.connect(db_url, autocommit=True) as conn:
        conn.execute(
            "INSERT INTO extensions (id, type, subject) VALUES ('from_env_db', 'pre', 'a.b')"
        )
    environ.setenv("EXTENSION_REGISTRY_DATABASE_URL", db_url)
    environ.setenv("EXTENSION_REGISTRY_DATA_DIR", str(tmp_path / "data"))
    async with Registry.open(Settings()) as reg:
        assert ("auto", "database", ["from_env_db"]) == (
            reg.status.mode,
            reg.status.source,
            [e.id for e in reg.all()],
        )


# -- cache_type ------------------------------------------------------------------------------


def test_cache_type_mnesia_is_refused_with_a_clear_message() -> None:
    """cache_type=mnesia raises ConfigError naming the key, the value and what to use instead."""
    message = config_error(cache_type="mnesia")
    for part in ("cache_type", "mnesia", "not supported", "ets"):
        assert part in message, (part, message)


def test_cache_type_mnesia_error_names_where_it_came_from() -> None:
    """Like every ConfigError, the mnesia refusal says where the value came from."""
    message = config_error(environ={"EXTENSION_REGISTRY_CACHE_TYPE": "mnesia"})
    assert "environment" in message, message


@pytest.mark.parametrize("cache_type", ["memory", "ets"])
def test_cache_type_memory_and_ets_are_accepted(cache_type: str) -> None:
    """ets and its alias memory are both valid cache types."""
    assert cache_type == load(cache_type=cache_type).cache_type


# -- rejections name the key and where it came from ----------------------------------------


def test_unknown_key_in_the_toml_file_names_key_and_file(tmp_path: Path) -> None:
    """An unknown key in [extension_registry] is a ConfigError naming the key and the file."""
    path = write_toml(tmp_path / "reg.toml", '[extension_registry]\ncolour = "blue"\n')
    message = config_error(config_file=path)
    for part in ("colour", f"config file {path}", "unknown setting"):
        assert part in message, (part, message)


def test_unknown_key_in_the_environment_names_the_variable() -> None:
    """An unknown EXTENSION_REGISTRY_* variable is a ConfigError naming it and the environment."""
    message = config_error(environ={"EXTENSION_REGISTRY_COLOUR": "blue"})
    for part in ("EXTENSION_REGISTRY_COLOUR", "environment", "unknown setting"):
        assert part in message, (part, message)


def test_unknown_table_in_the_toml_file_is_refused(tmp_path: Path) -> None:
    """A TOML table other than [extension_registry] is refused, naming it and the file."""
    path = write_toml(
        tmp_path / "reg.toml", '[extension_registry]\ndb_name = "x"\n[registry]\ndb_name = "y"\n'
    )
    message = config_error(config_file=path)
    for part in (str(path), "registry"):
        assert part in message, (part, message)


def test_toml_file_without_the_table_is_refused(tmp_path: Path) -> None:
    """A TOML file whose keys are not in an [extension_registry] table is refused."""
    path = write_toml(tmp_path / "reg.toml", 'db_name = "x"\n')
    message = config_error(config_file=path)
    for part in (str(path), "[extension_registry]"):
        assert part in message, (part, message)


@pytest.mark.parametrize(
    ("environ", "overrides", "parts"),
    [
        (
            {"EXTENSION_REGISTRY_DB_PORT": "99999"},
            {},
            ("EXTENSION_REGISTRY_DB_PORT", "environment"),
        ),
        (
            {"EXTENSION_REGISTRY_DB_PORT": "not-a-port"},
            {},
            ("EXTENSION_REGISTRY_DB_PORT", "environment"),
        ),
        ({}, {"db_port": 0}, ("db_port", "command line")),
        ({}, {"sync_interval_seconds": -1}, ("sync_interval_seconds", "command line")),
        (
            {"EXTENSION_REGISTRY_SYNC_INTERVAL_SECONDS": "-5"},
            {},
            ("EXTENSION_REGISTRY_SYNC_INTERVAL_SECONDS", "environment"),
        ),
        (
            {"EXTENSION_REGISTRY_SOURCE": "postgres"},
            {},
            ("EXTENSION_REGISTRY_SOURCE", "environment"),
        ),
    ],
    ids=[
        "port-too-big",
        "port-not-a-number",
        "port-zero-flag",
        "negative-interval-flag",
        "negative-interval-env",
        "unknown-source",
    ],
)
def test_bad_values_name_the_key_and_origin(
    environ: dict[str, str], overrides: dict[str, object], parts: tuple[str, ...]
) -> None:
    """A bad port, a negative sync interval or a bad source names the key and its origin."""
    message = config_error(environ=environ, **overrides)
    for part in parts:
        assert part in message, (part, message)


def test_bad_value_in_the_toml_file_names_key_and_file(tmp_path: Path) -> None:
    """A bad value from the file names the key and the file."""
    path = write_toml(tmp_path / "reg.toml", "[extension_registry]\ndb_port = 70000\n")
    message = config_error(config_file=path)
    for part in ("db_port", f"config file {path}"):
        assert part in message, (part, message)


def test_bad_toml_syntax_names_the_file(tmp_path: Path) -> None:
    """A file that is not valid TOML is a ConfigError naming the file."""
    path = write_toml(tmp_path / "broken.toml", "[extension_registry\ndb_name = \n")
    message = config_error(config_file=path)
    for part in (str(path), "not valid TOML"):
        assert part in message, (part, message)


def test_missing_config_file_names_the_file(tmp_path: Path) -> None:
    """A config file that does not exist (named by the environment) is a ConfigError naming it."""
    path = tmp_path / "absent.toml"
    message = config_error(environ={"EXTENSION_REGISTRY_CONFIG": str(path)})
    for part in (str(path), "does not exist"):
        assert part in message, (part, message)


def test_config_file_that_is_a_fifo_is_refused_not_skipped(tmp_path: Path) -> None:
    """A FIFO named as the config file is a ConfigError naming it (pydantic-settings' own TOML
    source would skip it quietly; reading it would block)."""
    path = tmp_path / "reg.toml"
    os.mkfifo(path)
    message = config_error(config_file=path)
    for part in (str(path), "not a regular file"):
        assert part in message, (part, message)


def test_non_postgresql_database_url_is_refused_naming_the_key() -> None:
    """A database_url whose scheme is not postgresql:// is a ConfigError naming database_url."""
    message = config_error(database_url="mysql://u@h/db")
    assert "database_url" in message, message


# -- passwords -------------------------------------------------------------------------------


def test_password_not_in_repr_str_or_db_display_with_a_url() -> None:
    """A password inside database_url appears in neither repr, str nor db_display."""
    s = load(database_url=f"postgresql://reg:{SECRET}@db.example:5432/reg")
    for text in (repr(s), str(s), s.db_display):
        assert SECRET not in text
    assert "postgresql://reg:********@db.example:5432/reg" == s.db_display


def test_password_not_in_repr_str_or_db_display_with_parts() -> None:
    """db_password (set through the environment) stays hidden; db_display masks it."""
    s = load(
        environ={
            "EXTENSION_REGISTRY_DB_HOST": "db.example",
            "EXTENSION_REGISTRY_DB_PASSWORD": SECRET,
        }
    )
    for text in (repr(s), str(s), s.db_display):
        assert SECRET not in text
    assert "postgresql://beamline:********@db.example:5432/beamline" == s.db_display
    assert SECRET == s.db_password.get_secret_value()


def test_password_in_query_not_in_db_display() -> None:
    """A password given as ?password= in database_url is masked in db_display."""
    s = load(database_url=f"postgresql://db.example/reg?user=reg&password={SECRET}")
    assert SECRET not in repr(s)
    assert "postgresql://db.example/reg?user=reg&password=********" == s.db_display


def test_bad_database_url_error_does_not_show_its_password() -> None:
    """A ConfigError about a database_url carrying a password never shows the password."""
    message = config_error(database_url=f"mysql://u:{SECRET}@h/db")
    assert SECRET not in message, message
    assert "database_url" in message


def test_bad_database_url_from_environment_does_not_show_its_password() -> None:
    """The same holds when the bad URL comes from the environment."""
    message = config_error(environ={"EXTENSION_REGISTRY_DATABASE_URL": f"mysql://u:{SECRET}@h/db"})
    assert SECRET not in message, message


def test_unrelated_config_error_does_not_show_the_password() -> None:
    """A ConfigError about another key (cache_type, db_port) never shows db_password or a URL
    password configured alongside it."""
    for bad in ({"EXTENSION_REGISTRY_CACHE_TYPE": "mnesia"}, {"EXTENSION_REGISTRY_DB_PORT": "0"}):
        message = config_error(
            environ={
                "EXTENSION_REGISTRY_DB_PASSWORD": SECRET,
                "EXTENSION_REGISTRY_DATABASE_URL": f"postgresql://u:{SECRET}@h/db",
                **bad,
            }
        )
        assert SECRET not in message, message


def test_bad_password_type_error_does_not_show_it(tmp_path: Path) -> None:
    """A db_password of the wrong type in the TOML file is refused without echoing it."""
    path = write_toml(tmp_path / "reg.toml", "[extension_registry]\ndb_password = 123456789\n")
    message = config_error(config_file=path)
    assert "123456789" not in message
    assert "db_password" in message


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        (f"postgresql://u:{SECRET}@h:5432/db", "postgresql://u:********@h:5432/db"),
        (
            f"postgresql://u:{SECRET}@h/db?sslmode=require",
            "postgresql://u:********@h/db?sslmode=require",
        ),
        (
            f"postgresql://h/db?user=u&password={SECRET}&sslmode=require",
            "postgresql://h/db?user=u&password=********&sslmode=require",
        ),
        (f"postgresql://h/db?PASSWORD={SECRET}", "postgresql://h/db?password=********"),
        (f"postgresql://u:p@{SECRET}@h/db", "postgresql://u:********@h/db"),
        ("postgresql://u@h/db", "postgresql://u@h/db"),
        ("postgresql://h/db", "postgresql://h/db"),
    ],
    ids=[
        "userinfo",
        "userinfo-with-query",
        "query",
        "query-upper-case",
        "at-sign-in-password",
        "user-only",
        "no-auth",
    ],
)
def test_redact_url(url: str, expected: str) -> None:
    """redact_url masks a userinfo password and a password= parameter, and nothing else."""
    assert expected == redact_url(url)


@pytest.mark.parametrize(
    "line",
    ["metrics_token = 12345678", 'db_pasword = "12345678"', 'nats_urls = "12345678"'],
    ids=["secret-setting", "misspelt-password", "unknown-key"],
)
def test_a_rejected_secret_or_unknown_key_is_not_echoed(tmp_path: Path, line: str) -> None:
    """A bad value of a secret setting, or any value of an unknown (perhaps misspelt) key, is
    named by its key and file, never quoted."""
    config = tmp_path / "extreg.toml"
    config.write_text(f"[extension_registry]\n{line}\n", encoding="utf-8")
    with pytest.raises(ConfigError) as info:
        Settings.load(config_file=config, environ={})
    message = str(info.value)
    assert "12345678" not in message, message
    assert line.split(" ")[0] in message and str(config) in message, message
