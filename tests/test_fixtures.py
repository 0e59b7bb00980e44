"""Fixtures folders (SPEC.md, "Fixtures"): JSON and YAML, one object or a list per file, strict,
all-or-nothing, every problem naming the file, the record and the field."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Self

import fifo_swap
import httpx
import pytest
from helpers import record
from structlog.testing import capture_logs

from extreg.adapters.fixtures import load_fixtures, load_policy_file, read_fixtures
from extreg.core.model import Extension, parse_extension
from extreg.core.policy import PolicyLimits
from extreg.errors import FixtureError
from extreg.registry import Registry
from extreg.settings import Settings
from testsupport.pgprocess import free_port

SUBJECT_RULE = (
    "must be a NATS subject: dot-separated non-empty tokens, at most 512 characters, "
    "no whitespace and no wildcards (* or >)"
)


def load(folder: Path) -> list[Extension]:
    return load_fixtures(folder, max_timeout_ms=60_000, max_retries=10).extensions


def problems_of(folder: Path) -> list[str]:
    with pytest.raises(FixtureError) as info:
        load(folder)
    assert "\n".join(info.value.problems) == str(info.value)
    return info.value.problems


def write(folder: Path, name: str, content: str | bytes) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content, encoding="utf-8")
    return path


def as_json(data: object) -> str:
    return json.dumps(data, indent=2)


def parsed(data: dict[str, object]) -> Extension:
    return parse_extension(data, max_timeout_ms=60_000, max_retries=10)


# -- good folders --------------------------------------------------------------------------


def test_json_one_object_and_a_list_per_file(tmp_path: Path) -> None:
    """A JSON file may hold one object or a list; records come back in file-name, then list,
    order, exactly as parsed."""
    a, b, c = record("a"), record("b", type="validator", retry=1), record("c", enabled=False)
    write(tmp_path, "1-single.json", as_json(a))
    write(tmp_path, "2-list.json", as_json([b, c]))
    assert [parsed(a), parsed(b), parsed(c)] == load(tmp_path)


def test_yaml_one_object_and_a_list_per_file_with_both_suffixes(tmp_path: Path) -> None:
    """.yaml and .yml files may hold one object or a list; the values equal the JSON form."""
    write(
        tmp_path,
        "1-single.yaml",
        """
id: yaml_one
type: post
subject: beamline.ext.post.yaml_one.v1
timeout_ms: 150
config: {mode: strict}
metadata:
  description: one object
""",
    )
    write(
        tmp_path,
        "2-list.yml",
        """
- id: yaml_two
  type: provider
  subject: beamline.provider.yaml_two.v1
  retry: 2
  enabled: false
  versions:
    - version: v2
      subject: beamline.provider.yaml_two.v2
      routing_rules: {tenant_id: [acme, beta]}
  instances:
    - instance_id: i1
      subject: beamline.provider.yaml_two.i1
      weight: 25
      health_status: healthy
- id: yaml_three
  type: pre
  subject: beamline.ext.pre.yaml_three.v1
""",
    )
    expected = [
        parsed(
            {
                "id": "yaml_one",
                "type": "post",
                "subject": "beamline.ext.post.yaml_one.v1",
                "timeout_ms": 150,
                "config": {"mode": "strict"},
                "metadata": {"description": "one object"},
            }
        ),
        parsed(
            {
                "id": "yaml_two",
                "type": "provider",
                "subject": "beamline.provider.yaml_two.v1",
                "retry": 2,
                "enabled": False,
                "versions": [
                    {
                        "version": "v2",
                        "subject": "beamline.provider.yaml_two.v2",
                        "routing_rules": {"tenant_id": ["acme", "beta"]},
                    }
                ],
                "instances": [
                    {
                        "instance_id": "i1",
                        "subject": "beamline.provider.yaml_two.i1",
                        "weight": 25,
                        "health_status": "healthy",
                    }
                ],
            }
        ),
        parsed({"id": "yaml_three", "type": "pre", "subject": "beamline.ext.pre.yaml_three.v1"}),
    ]
    assert expected == load(tmp_path)


def test_json_and_yaml_mixed_in_one_folder(tmp_path: Path) -> None:
    """JSON and YAML files load together into one list."""
    write(tmp_path, "a.json", as_json(record("from_json")))
    write(tmp_path, "b.yaml", "id: from_yaml\ntype: pre\nsubject: x.y\n")
    assert ["from_json", "from_yaml"] == [e.id for e in load(tmp_path)]


def test_other_files_and_subfolders_are_ignored(tmp_path: Path) -> None:
    """Only *.json, *.yaml and *.yml files directly in the folder are read."""
    write(tmp_path, "good.json", as_json(record("good")))
    write(tmp_path, "README.md", "# not a fixture {")
    write(tmp_path, "notes.txt", "[[[")
    write(tmp_path / "nested", "inner.json", as_json(record("inner")))
    assert ["good"] == [e.id for e in load(tmp_path)]


def test_upper_case_suffix_is_read(tmp_path: Path) -> None:
    """Suffixes match case-insensitively (GOOD.JSON is a fixture file)."""
    write(tmp_path, "GOOD.JSON", as_json(record("upper")))
    assert ["upper"] == [e.id for e in load(tmp_path)]


def test_empty_folder_yields_no_records(tmp_path: Path) -> None:
    """A folder with no fixture files is valid and empty."""
    tmp_path.joinpath("empty").mkdir()
    assert [] == load(tmp_path / "empty")


# -- one problem each ------------------------------------------------------------------------


def test_invalid_json_names_the_file(tmp_path: Path) -> None:
    """A JSON syntax error is reported against the file."""
    write(tmp_path, "broken.json", '{"id": "x", "type": "pre"')
    problems = problems_of(tmp_path)
    assert ["broken.json: invalid JSON: Input data was truncated"] == problems


def test_invalid_yaml_names_the_file_and_position(tmp_path: Path) -> None:
    """A YAML syntax error is reported against the file, on one line, with the line number."""
    write(tmp_path, "broken.yaml", "id: x\ntype: [pre\nsubject: a.b\n")
    [problem] = problems_of(tmp_path)
    assert problem.startswith("broken.yaml: invalid YAML: "), problem
    assert "line 3" in problem
    assert "\n" not in problem


def test_wrong_type_names_file_record_and_field(tmp_path: Path) -> None:
    """timeout_ms given as a string is reported with file, record number, id and field."""
    write(tmp_path, "ext.json", as_json(record("ext1", timeout_ms="100")))
    assert ["ext.json record #1 (ext1): field timeout_ms: Expected int, got str"] == problems_of(
        tmp_path
    )


def test_unknown_field_names_file_record_and_field(tmp_path: Path) -> None:
    """An unknown field in the second record of a YAML list names that record and field."""
    write(
        tmp_path,
        "list.yaml",
        "- {id: a, type: pre, subject: a.b}\n- {id: b, type: pre, subject: a.c, colour: blue}\n",
    )
    assert ["list.yaml record #2 (b): field colour: unknown field"] == problems_of(tmp_path)


def test_bad_nested_field_names_its_path(tmp_path: Path) -> None:
    """A wildcard in a version's subject names versions[0].subject and explains the rule."""
    write(
        tmp_path,
        "ext.json",
        as_json(record("ext1", versions=[{"version": "v2", "subject": "a.*"}])),
    )
    assert [f"ext.json record #1 (ext1): field versions[0].subject: {SUBJECT_RULE}"] == problems_of(
        tmp_path
    )


def test_limit_problem_names_the_limit(tmp_path: Path) -> None:
    """timeout_ms above the configured maximum is reported with the limit."""
    write(tmp_path, "ext.json", as_json(record("ext1", timeout_ms=60_001)))
    assert [
        "ext.json record #1 (ext1): field timeout_ms: 60001 exceeds extension_max_timeout_ms 60000"
    ] == problems_of(tmp_path)


def test_duplicate_id_across_two_files_names_both(tmp_path: Path) -> None:
    """The same id in two files is an error on the second naming where the first was."""
    write(tmp_path, "a.json", as_json(record("twice")))
    write(tmp_path, "b.yaml", "id: twice\ntype: post\nsubject: x.y\n")
    assert [
        "b.yaml record #1 (twice): field id: duplicate id, first defined in a.json record #1"
    ] == problems_of(tmp_path)


def test_duplicate_id_within_one_list(tmp_path: Path) -> None:
    """The same id twice in one list is an error on the later record."""
    write(tmp_path, "list.json", as_json([record("x"), record("y"), record("x")]))
    assert [
        "list.json record #3 (x): field id: duplicate id, first defined in list.json record #1"
    ] == problems_of(tmp_path)


def test_one_policy_file_is_checked_like_a_policies_folder_but_for_references(
    tmp_path: Path,
) -> None:
    """`load_policy_file` (policy apply) describes each item's problems by the file's path
    and the item, refuses a policy_id met again naming where it was first, and leaves the
    references to the caller: a file of policies naming no extension it holds loads."""
    route = {"policy_id": "route_a", "validators": [{"id": "elsewhere"}], "providers": ["llm"]}
    good = write(tmp_path, "good.json", as_json([route, {**route, "policy_id": "route_b"}]))
    loaded = load_policy_file(good, policy_limits=PolicyLimits())
    assert ["route_a", "route_b"] == [p.policy_id for p in loaded]
    bad = write(tmp_path, "bad.yaml", as_json([route, {**route, "pre": [{}]}, route]))
    with pytest.raises(FixtureError) as info:
        load_policy_file(bad, policy_limits=PolicyLimits())
    assert [
        f"{bad} record #2 (route_a): field pre[0].id: required field is missing",
        f"{bad} record #3 (route_a): field policy_id: duplicate policy_id,"
        f" first defined in {bad} record #1",
    ] == info.value.problems


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("empty.json", "", "file is empty"),
        ("blank.yaml", "  \n\n", "file is empty"),
        ("empty-list.json", "[]", "file holds an empty list"),
        ("empty-list.yaml", "[]\n", "file holds an empty list"),
        ("string.json", '"hello"', "expected an extension object or a list of them, got a string"),
        (
            "string.yaml",
            "just some words\n",
            "expected an extension object or a list of them, got a string",
        ),
        ("number.json", "42", "expected an extension object or a list of them, got a number"),
        ("null.yaml", "~\n", "expected an extension object or a list of them, got nothing"),
        ("latin1.json", b'{"id": "caf\xe9"}', "not UTF-8 text (invalid byte at offset 11)"),
        ("binary.yaml", b"\xff\xfe\x00", "not UTF-8 text (invalid byte at offset 0)"),
    ],
)
def test_bad_file_content_names_the_file(
    tmp_path: Path, name: str, content: str | bytes, message: str
) -> None:
    """Empty files, empty lists, scalars and non-UTF-8 bytes are each one precise problem."""
    write(tmp_path, "good.json", as_json(record("good")))
    write(tmp_path, name, content)
    assert [f"{name}: {message}"] == problems_of(tmp_path)


def test_missing_folder_is_a_fixture_error(tmp_path: Path) -> None:
    """A folder that does not exist is a FixtureError naming it."""
    missing = tmp_path / "no-such-folder"
    assert [f"{missing}: fixtures folder does not exist or is not a folder"] == problems_of(missing)


def test_a_file_in_place_of_the_folder_is_a_fixture_error(tmp_path: Path) -> None:
    """A path to a file, not a folder, is refused the same way."""
    path = write(tmp_path, "one.json", as_json(record("x")))
    assert [f"{path}: fixtures folder does not exist or is not a folder"] == problems_of(path)


def test_record_that_is_not_an_object_in_a_list(tmp_path: Path) -> None:
    """A list item that is not an object is reported against its record number."""
    write(tmp_path, "list.json", as_json([record("ok"), "oops"]))
    assert [
        "list.json record #2 (<record without id>): field record: Expected a JSON object, got `str`"
    ] == problems_of(tmp_path)


# -- all or nothing, everything reported ----------------------------------------------------


def test_one_bad_file_among_good_ones_fails_the_whole_folder(tmp_path: Path) -> None:
    """All-or-nothing: good files do not load when one file is bad; only the bad one is named."""
    write(tmp_path, "a.json", as_json(record("a")))
    write(tmp_path, "b.json", as_json([record("b1"), record("b2", type="bogus")]))
    write(tmp_path, "c.yaml", "id: c\ntype: pre\nsubject: c.d\n")
    assert ["b.json record #2 (b2): field type: Invalid enum value 'bogus'"] == problems_of(
        tmp_path
    )


def test_problems_from_several_files_are_reported_together(tmp_path: Path) -> None:
    """Every problem of every file is listed, in file order, in one FixtureError."""
    write(tmp_path, "1.json", "{not json")
    write(
        tmp_path,
        "2.json",
        as_json([record("r1", retry=-1), record("r2"), record("r3", subject="a b")]),
    )
    write(tmp_path, "3.yaml", "")
    write(tmp_path, "4.yml", "id: r2\ntype: pre\nsubject: x.y\n")
    write(tmp_path, "5.json", as_json(record("r5", colour="red")))
    problems = problems_of(tmp_path)
    assert 6 == len(problems), problems
    assert problems[0].startswith("1.json: invalid JSON: "), problems[0]
    assert [
        "2.json record #1 (r1): field retry: Expected int >= 0",
        f"2.json record #3 (r3): field subject: {SUBJECT_RULE}",
        "3.yaml: file is empty",
        "4.yml record #1 (r2): field id: duplicate id, first defined in 2.json record #2",
        "5.json record #1 (r5): field colour: unknown field",
    ] == problems[1:]


# -- reads never block (issue 8, point 9) ---------------------------------------------------
# A FIFO renamed over a fixture file used to block `open()` for good: on the event loop under
# `serve --source fixtures` (/healthz timed out, SIGTERM ignored) and in `extreg validate`.
# `fifo_swap` renames the FIFO in at the worst moment, right after a check of the path. Each
# test arms an `Unblocker`, which after a generous deadline opens the FIFO for writing and
# closes it, releasing a reader stuck opening it: a regression fails instead of hanging.

NOT_REGULAR = "not a regular file (a device, FIFO or socket)"
EXTREG = Path(sys.executable).parent / "extreg"


class Unblocker:
    """Releases whoever is blocked opening `fifo` for reading, if the test is not over after
    `after_s`; `fired` says it had to."""

    def __init__(self, fifo: Path, after_s: float = 20.0) -> None:
        self.fifo, self.after_s, self.fired = fifo, after_s, False
        self._over = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> Self:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._over.set()
        self._thread.join()

    def _run(self) -> None:
        if self._over.wait(self.after_s):
            return
        self.fired = True
        while not self._over.is_set():
            with contextlib.suppress(OSError):  # ENXIO: no reader has it open (yet)
                os.close(os.open(self.fifo, os.O_WRONLY | os.O_NONBLOCK))
            time.sleep(0.05)


@pytest.fixture
def fifo(tmp_path: Path) -> Path:
    path = tmp_path / "pipe"
    os.mkfifo(path)
    return path


def two_records(folder: Path) -> Path:
    write(folder, "a.json", as_json(record("a")))
    return write(folder, "b.json", as_json(record("b")))


def test_a_fifo_in_the_folder_is_refused_without_blocking(tmp_path: Path) -> None:
    """A FIFO named like a fixture is one problem naming it; opening it does not wait."""
    write(tmp_path, "a.json", as_json(record("a")))
    os.mkfifo(tmp_path / "x.json")
    with Unblocker(tmp_path / "x.json") as unblocker:
        problems = problems_of(tmp_path)
    assert (False, [f"x.json: {NOT_REGULAR}"]) == (unblocker.fired, problems)


def test_a_fifo_renamed_in_after_a_check_of_the_path_is_not_waited_on(
    tmp_path: Path, fifo: Path
) -> None:
    """The race of the issue, made certain: the FIFO replaces b.json right after the reader
    looks at the path. The load returns (the file it opened, or a problem naming b.json)."""
    folder = tmp_path / "fixtures"
    target = two_records(folder)
    armed = tmp_path / "armed"
    armed.touch()
    uninstall = fifo_swap.install(target, fifo, armed)
    try:
        with Unblocker(fifo) as unblocker:
            try:
                outcome: object = [e.id for e in load(folder)]
            except FixtureError as exc:
                outcome = exc.problems
    finally:
        uninstall()
    assert False is unblocker.fired
    assert outcome in (["a", "b"], [f"b.json: {NOT_REGULAR}"])


def test_loading_while_a_fifo_and_a_file_swap_places_never_blocks(
    tmp_path: Path, fifo: Path
) -> None:
    """A FIFO and a regular file renamed in turn over b.json while the folder is loaded again
    and again: each load reads the file or refuses the FIFO, none waits on it."""
    folder = tmp_path / "fixtures"
    target = two_records(folder)
    regular = tmp_path / "regular.json"
    stop = threading.Event()

    def swap() -> None:
        while not stop.is_set():
            fifo_swap.swap_in_fifo(fifo, target)
            regular.write_text(as_json(record("b")), encoding="utf-8")
            os.rename(regular, target)

    outcomes: set[str] = set()

    def load_often() -> None:
        for _ in range(2000):
            try:
                outcomes.add(str(sorted(e.id for e in load(folder))))
            except FixtureError as exc:
                outcomes.add(str(exc.problems))

    swapper = threading.Thread(target=swap, daemon=True)
    loader = threading.Thread(target=load_often, daemon=True)
    with Unblocker(fifo, after_s=30) as unblocker:
        swapper.start()
        loader.start()
        loader.join(60)
        stop.set()
        swapper.join()
    assert (False, False) == (unblocker.fired, loader.is_alive())
    assert {"['a', 'b']", str([f"b.json: {NOT_REGULAR}"])} >= outcomes


async def test_read_fixtures_is_bounded_in_time(tmp_path: Path) -> None:
    """`read_fixtures` (the registry's way in) gives up after its time bound with a
    FixtureError naming the folder, instead of waiting on a read that does not return."""
    two_records(tmp_path)
    assert ["a", "b"] == [
        e.id
        for e in (await read_fixtures(tmp_path, max_timeout_ms=60_000, max_retries=10)).extensions
    ]
    with pytest.raises(FixtureError) as caught:
        await read_fixtures(tmp_path, max_timeout_ms=60_000, max_retries=10, timeout_s=0)
    assert [
        f"{tmp_path}: reading the fixtures took longer than 0 s (a stuck filesystem?)"
    ] == caught.value.problems


async def test_registry_keeps_serving_when_a_fifo_is_renamed_over_a_fixture(
    tmp_path: Path, fifo: Path
) -> None:
    """A fixtures-mode Registry watching its folder: the FIFO replaces b.json (right after a
    check of the path, if the reader makes one). The reload is rejected with a log naming
    b.json, the cache keeps both records, the loop is never blocked, and close() returns."""
    folder = tmp_path / "fixtures"
    target = two_records(folder)
    armed = tmp_path / "armed"
    settings = Settings(source="fixtures", fixtures_dir=folder)
    uninstall = fifo_swap.install(target, fifo, armed)
    try:
        with capture_logs() as events, Unblocker(fifo) as unblocker:
            async with Registry.open(settings) as registry:
                deadline = time.monotonic() + 60
                while not any(e["event"] == "reloaded" for e in events):  # the watcher is up
                    assert time.monotonic() < deadline, events
                    (folder / "nudge.txt").write_text("")  # a change: the watcher reloads
                    await asyncio.sleep(0.2)
                armed.touch()
                while not any(e["event"] == "fixtures_rejected" for e in events):
                    assert time.monotonic() < deadline, events
                    (folder / "nudge.txt").write_text("")
                    for _ in range(50):
                        await asyncio.sleep(0.1)
                        if not armed.exists():
                            break
                    else:  # no reload checked the path: swap it in ourselves
                        armed.unlink()
                        fifo_swap.swap_in_fifo(fifo, target)
                assert ["a", "b"] == sorted(e.id for e in registry.all())
                assert "fixtures" == registry.status.source
            fired = unblocker.fired
    finally:
        uninstall()
    rejected = [e["problems"] for e in events if e["event"] == "fixtures_rejected"]
    assert (False, [f"b.json: {NOT_REGULAR}"]) == (fired, rejected[0])


def cli_env(tmp: Path, **extra: str) -> dict[str, str]:
    env = {
        k: v for k, v in os.environ.items() if not k.startswith(("EXTENSION_REGISTRY_", "EXTREG_"))
    }
    env.update(
        {
            "EXTENSION_REGISTRY_DATA_DIR": str(tmp / "data"),
            "EXTENSION_REGISTRY_NATS_URL": f"nats://127.0.0.1:{free_port()}",
            **extra,
        }
    )
    return env


def test_validate_refuses_a_fifo_named_like_a_fixture(tmp_path: Path) -> None:
    """`extreg validate DIR` with a FIFO named x.json exits 2 at once, naming it."""
    folder = tmp_path / "fixtures"
    write(folder, "a.json", as_json(record("a")))
    os.mkfifo(folder / "x.json")
    with Unblocker(folder / "x.json", after_s=50):
        result = subprocess.run(
            [str(EXTREG), "validate", str(folder)],
            capture_output=True,
            text=True,
            env=cli_env(tmp_path),
            timeout=60,
            check=False,
        )
    assert (2, f"error: x.json: {NOT_REGULAR}\n") == (result.returncode, result.stderr)


def test_serve_survives_a_fifo_renamed_over_a_fixture_and_stops_on_sigterm(
    tmp_path: Path, fifo: Path
) -> None:
    """`extreg serve --source fixtures`: after the FIFO replaces b.json (right after a check of
    the path, if the server makes one) the server logs the rejection naming b.json, /healthz
    still answers, and SIGTERM stops it."""
    folder = tmp_path / "fixtures"
    target = two_records(folder)
    armed = tmp_path / "armed"
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log_path = tmp_path / "serve.log"
    env = fifo_swap.subprocess_env(
        cli_env(
            tmp_path,
            EXTENSION_REGISTRY_SOURCE="fixtures",
            EXTENSION_REGISTRY_FIXTURES_DIR=str(folder),
        ),
        tmp_path / "hook",
        target,
        fifo,
        armed,
    )
    with log_path.open("w") as log_file, Unblocker(fifo, after_s=40) as unblocker:
        proc = subprocess.Popen(
            [str(EXTREG), "serve", "--port", str(port)],
            env=env,
            stdout=log_file,
            stderr=subprocess.STDOUT,
        )
        try:
            wait_until(lambda: healthz(url) == 200, proc, log_path, "serve did not start")
            wait_until(
                lambda: nudged(folder) and '"reloaded"' in log_path.read_text(),
                proc,
                log_path,
                "the watcher never reloaded",
            )
            armed.touch()
            nudged(folder)
            wait_until(
                lambda: not armed.exists(), proc, log_path, "no reload", timeout_s=5, fail=False
            )
            if armed.exists():  # the server made no check of the path
                armed.unlink()
                fifo_swap.swap_in_fifo(fifo, target)
            wait_until(
                lambda: "fixtures_rejected" in log_path.read_text(),
                proc,
                log_path,
                "the FIFO was not rejected",
            )
            assert 200 == healthz(url)
            proc.send_signal(signal.SIGTERM)
            returncode = proc.wait(60)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        fired = unblocker.fired
    log = log_path.read_text()
    assert (False, 0) == (fired, returncode), log
    rejected = next(line for line in log.splitlines() if "fixtures_rejected" in line)
    assert f"b.json: {NOT_REGULAR}" in rejected, log


def nudged(folder: Path) -> bool:
    """A change in `folder` that is no fixture: the watcher reloads, nothing else changes."""
    (folder / "nudge.txt").write_text(str(time.monotonic()))
    time.sleep(0.2)
    return True


def healthz(url: str) -> int | None:
    try:
        return httpx.get(url + "/healthz", timeout=5).status_code
    except httpx.HTTPError:
        return None


def wait_until(
    condition: Callable[[], bool],
    proc: subprocess.Popen[bytes],
    log: Path,
    what: str,
    timeout_s: float = 60,
    fail: bool = True,
) -> None:
    """Until `condition()`; past `timeout_s` (or if the process ended) fail, or just return."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        if proc.poll() is not None or time.monotonic() > deadline:
            if fail:
                raise AssertionError(f"{what}:\n{log.read_text()}")
            return
        time.sleep(0.05)
