"""Issue 9, item 4: no log line, error, status or API answer shows a password, a token or a
file's content.

The main test runs a real `extreg serve` with a password in the database URL (a role with a
password on the session's PostgreSQL) and in the NATS URL (a nats-server with user/password
auth), an admin token in use, NATS absent at boot (`invoker_unavailable`), then started
(`invoker_connected`) and restarted (`nats_disconnected`, `nats_reconnected`); it also runs
`extreg sample-extensions` and a failing `extreg invoke` on the same URL. Every line of
every process's output and every answer of the API (bodies and headers) is searched for the
two passwords and the token.
"""

from __future__ import annotations

import os
import secrets
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest
from helpers import record, stop_process

from extreg.adapters.fixtures import load_fixtures
from extreg.adapters.migrate import migrate
from extreg.errors import FixtureError
from extreg.local.natsserver import NatsServer
from extreg.settings import Settings, redact_nats_url
from testsupport.pgprocess import PostgresProcess, free_port

EXTREG = Path(sys.executable).parent / "extreg"
DEADLINE_S = 90.0


def _env(**settings: str) -> dict[str, str]:
    env = {
        k: v for k, v in os.environ.items() if not k.startswith(("EXTENSION_REGISTRY_", "EXTREG_"))
    }
    env.update({f"EXTENSION_REGISTRY_{k.upper()}": v for k, v in settings.items()})
    return env


@pytest.fixture
def secret_db(pg_server: PostgresProcess) -> str:
    """A migrated database owned by a role with a password; its URL carries the password."""
    role = f"leaky_{secrets.token_hex(4)}"
    password = f"pg-pw-{secrets.token_hex(8)}"
    with psycopg.connect(pg_server.url(), autocommit=True) as conn:
        conn.execute(f"CREATE ROLE {role} LOGIN PASSWORD '{password}'")
        conn.execute(f'CREATE DATABASE "{role}" OWNER {role}')
    url = f"postgresql://{role}:{password}@127.0.0.1:{pg_server.port}/{role}"
    migrate(url)
    return url


@pytest.fixture
def secret_nats() -> Iterator[tuple[NatsServer, str]]:
    """A nats-server requiring user/password (not started yet) and the URL that logs in."""
    password = f"nats-pw-{secrets.token_hex(8)}"
    server = NatsServer(extra_args=["--user", "extreg", "--pass", password])
    try:
        yield server, f"nats://extreg:{password}@127.0.0.1:{server.port}"
    finally:
        server.stop()


def _wait(what: str, condition: Callable[[], bool], log: Path) -> None:
    deadline = time.monotonic() + DEADLINE_S
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}:\n{log.read_text()[-3000:]}")
        time.sleep(0.1)


def _logged(log: Path, event: str) -> Callable[[], bool]:
    return lambda: f'"{event}"' in log.read_text()


def _answer_text(answer: httpx.Response) -> str:
    headers = "\n".join(f"{k}: {v}" for k, v in answer.headers.items())
    return f"{answer.status_code}\n{headers}\n{answer.text}"


def test_no_password_or_token_in_any_log_line_or_answer(
    tmp_path: Path, secret_db: str, secret_nats: tuple[NatsServer, str]
) -> None:
    nats, nats_url = secret_nats
    db_password = secret_db.split("//", 1)[1].split("@", 1)[0].split(":", 1)[1]
    nats_password = nats_url.split("//", 1)[1].split("@", 1)[0].split(":", 1)[1]
    env = _env(
        source="database",
        database_url=secret_db,
        nats_url=nats_url,
        data_dir=str(tmp_path / "data"),
    )
    made = subprocess.run(
        [str(EXTREG), "token", "create", "probe", "--role", "admin"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert 0 == made.returncode, made.stderr
    token = made.stdout.strip().splitlines()[-1]
    secrets_ = {"database password": db_password, "NATS password": nats_password, "token": token}

    port = free_port()
    out, err = tmp_path / "serve.out", tmp_path / "serve.err"
    with out.open("w") as stdout, err.open("w") as stderr:
        proc = subprocess.Popen(
            [str(EXTREG), "serve", "--port", str(port)],
            env=env,
            stdout=stdout,
            stderr=stderr,
            start_new_session=True,
        )
    answers: list[str] = []
    outputs: dict[str, str] = {}
    try:
        base = f"http://127.0.0.1:{port}"
        auth = {"Authorization": f"Bearer {token}"}
        with httpx.Client(base_url=base, timeout=10) as client:
            _wait("the API", lambda: _ready(client), err)
            _wait("invoker_unavailable", _logged(err, "invoker_unavailable"), err)
            nats.start()
            _wait("invoker_connected", _logged(err, "invoker_connected"), err)
            nats.restart()
            _wait("nats_reconnected", _logged(err, "nats_reconnected"), err)
            assert _logged(err, "nats_disconnected")()

            created = client.post(
                "/admin/extensions", headers=auth, json=record("secret_probe", timeout_ms=200)
            )
            assert 201 == created.status_code, created.text
            anonymous_ready = client.get("/readyz")
            assert (200, {"status": "ready"}) == (
                anonymous_ready.status_code,
                anonymous_ready.json(),
            )
            detailed = client.get("/readyz", headers=auth)
            assert "********" in detailed.json()["details"]["database"]
            answers += [_answer_text(a) for a in (created, anonymous_ready, detailed)]
            for method, path, headers in [
                ("GET", "/healthz", {}),
                ("GET", "/metrics", {}),
                ("GET", "/admin/status", auth),
                ("GET", "/admin/extensions", auth),
                ("GET", "/admin/extensions/secret_probe", auth),
                ("GET", "/admin/extensions/health", auth),
                ("GET", "/admin/audit", auth),
                ("GET", "/admin/extensions/no_such_thing", auth),  # 404
                ("POST", "/admin/extensions/secret_probe/invoke", auth),  # no responder
                ("GET", "/admin/status", {}),  # 401
                ("GET", "/admin/status", {"Authorization": f"Bearer {token}x"}),  # 401
                ("GET", "/readyz", {"Authorization": f"Bearer {token}x"}),  # 401
                ("GET", "/admin/extensions", {"Authorization": "Basic " + token}),
            ]:
                body: dict[str, Any] | None = {"payload": {}} if method == "POST" else None
                answers.append(
                    _answer_text(client.request(method, path, headers=headers, json=body))
                )
        outputs["sample-extensions"] = _sample_extensions_output(env, tmp_path)
        outputs["extreg invoke"] = _failed_invoke_output(env, nats_password)
    finally:
        stop_process(proc)
    outputs["serve stderr"] = err.read_text()
    outputs["serve stdout"] = out.read_text()
    outputs["API answers"] = "\n\n".join(answers)
    leaks = [
        (name, where)
        for where, text in outputs.items()
        for name, secret in secrets_.items()
        if secret in text
    ]
    assert [] == leaks, leaks
    print(
        f"searched {sum(t.count(chr(10)) for t in outputs.values())} lines: "
        f"{len(outputs['serve stderr'].splitlines())} log lines of serve, "
        f"{len(answers)} API answers, sample-extensions and extreg invoke output"
    )
    assert "extreg:********@" in outputs["serve stderr"]  # the URL is shown, redacted


def _ready(client: httpx.Client) -> bool:
    try:
        return client.get("/readyz").status_code == 200
    except httpx.HTTPError:
        return False


def _sample_extensions_output(env: dict[str, str], tmp_path: Path) -> str:
    """`extreg sample-extensions` on the password URL: its start line, then Ctrl-C."""
    log = tmp_path / "samples.err"
    with log.open("w") as stderr:
        proc = subprocess.Popen(
            [str(EXTREG), "sample-extensions"], env=env, stdout=subprocess.DEVNULL, stderr=stderr
        )
    try:
        _wait(
            "sample extensions serving", lambda: "sample extensions serving" in log.read_text(), log
        )
    finally:
        proc.send_signal(signal.SIGINT)
        proc.wait(30)
    return log.read_text()


def _failed_invoke_output(env: dict[str, str], nats_password: str) -> str:
    """`extreg invoke` with NATS unreachable at a password URL: its error message."""
    wrong = f"nats://extreg:{nats_password}@127.0.0.1:{free_port()}"
    result = subprocess.run(
        [str(EXTREG), "invoke", "secret_probe"],
        env={**env, "EXTENSION_REGISTRY_NATS_URL": wrong},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert 0 != result.returncode
    assert "cannot connect to NATS at nats://extreg:********@127.0.0.1" in result.stderr, (
        result.stderr
    )
    return result.stdout + result.stderr


# -- units -----------------------------------------------------------------------------------


def test_nats_url_is_a_secret_and_shown_redacted() -> None:
    """`nats_url` is a SecretStr (its repr hides it); `nats_display` hides a password and a
    token (a lone user part is a token to NATS) in every server of the list."""
    s = Settings.load(environ={}, nats_url="nats://u:pw1@h1:4222, nats://tok2@h2:4222,nats://h3")
    assert "pw1" not in repr(s) and "tok2" not in repr(s)
    assert "nats://u:********@h1:4222,nats://********@h2:4222,nats://h3" == s.nats_display
    assert "tls://********@h" == redact_nats_url("tls://secret@h")


def test_yaml_error_names_file_line_and_column_but_not_content(tmp_path: Path) -> None:
    """PyYAML's message quotes the offending line; the fixture problem must not."""
    (tmp_path / "creds.yaml").write_text(
        "id: x\ntype: pre\npassword: hunter2: oops\nsubject: a.b\n", encoding="utf-8"
    )
    with pytest.raises(FixtureError) as info:
        load_fixtures(tmp_path, max_timeout_ms=60_000, max_retries=10)
    [problem] = info.value.problems
    assert problem.startswith("creds.yaml: invalid YAML: "), problem
    assert "(line 3, column " in problem, problem
    assert "hunter2" not in problem and "password" not in problem, problem
