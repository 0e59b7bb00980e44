"""Bad-input corpus, fixture files and configuration (issue 5, part 3).

Every case is one malformed input. Fixture files live in `tests/corpus/fixtures/` (one file per
case, named for what is wrong); large or filesystem-shaped cases (16 MiB files, 100k-deep
nesting, symlink loops...) are generated in `tmp_path` by the builders below. Each fixture
case is checked four ways:

- `load_fixtures` raises `FixtureError` whose problem names the file (and the record and field
  where that applies), and blames nothing else;
- a running fixtures-mode `Registry` whose folder gets the bad file refuses the reload and keeps
  serving the very same snapshot (`registry.snapshot is before`);
- every problem is one short printable line (no terminal escapes or megabytes from the input);
- `extreg validate` on the corpus exits 2 with every case named and no Python traceback.

Entries that would hang or eat memory if read blindly (a FIFO, a link to /dev/zero) are run
through `extreg validate` on their own, under a time and memory limit.

Configuration cases (`tests/corpus/config/*.toml`, environment variables and flags) must each
give a `ConfigError` naming the key and where it came from, never showing a password, and
through the `extreg` command exit 2 with one clear line.

Nothing here is xfailed or skipped: a case that src gets wrong fails. The module prints how many
cases it tried at the end of its run.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import sys
import time
import tracemalloc
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import annotated_types
import pytest
from helpers import CaseCounter, make_settings, record
from structlog.testing import capture_logs
from structlog.typing import EventDict

from extreg import Registry
from extreg.adapters.fixtures import MAX_FILE_BYTES, load_fixtures
from extreg.errors import ConfigError, FixtureError
from extreg.settings import Settings

CORPUS = Path(__file__).parent / "corpus"
FIXTURE_CORPUS = CORPUS / "fixtures"
CONFIG_CORPUS = CORPUS / "config"
EXTREG = Path(sys.executable).parent / "extreg"
SECRET = "SECRET-pw-7c1e"  # the password planted in the config corpus; must never be shown
BASELINE = "0-baseline.json"  # the good file every fixture case is added next to
DEEP = 100_000  # nesting depth of the deep-nesting cases

# -- counting what was tried ----------------------------------------------------------------

COUNTER = CaseCounter(
    "bad-input corpus", ["fixture files", "configuration", "cli runs"], unit="checks"
)
tried = COUNTER.tried
_print_case_count = COUNTER.fixture()


@pytest.fixture(scope="module", autouse=True)
def _start_cli_early(request: pytest.FixtureRequest) -> None:
    """Start the background `extreg` runs (fixture `cli`) with the module's first test when
    any selected test needs them, so they overlap the in-process tests."""
    if any(
        "cli" in getattr(item, "fixturenames", ())
        for item in request.session.items
        if getattr(item, "module", None) is request.module
    ):
        request.getfixturevalue("cli")


# -- fixture cases ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Expect:
    """One problem the case must produce: `text` in a problem about the case's file, about
    record number `record` and field `field` when given."""

    text: str
    record: int | None = None
    field: str | None = None


@dataclass(frozen=True)
class Case:
    name: str  # the entry the problems must name
    build: Callable[[Path], None]  # creates the case's entries in a folder
    expect: tuple[Expect, ...]
    names: tuple[str, ...] = field(default=())  # every entry the problems must name

    @property
    def named(self) -> tuple[str, ...]:
        return self.names or (self.name,)


def _copy(name: str) -> Callable[[Path], None]:
    def build(folder: Path) -> None:
        shutil.copyfile(FIXTURE_CORPUS / name, folder / name)

    return build


def F(text: str) -> Expect:
    return Expect(text)


def R(field_name: str, text: str, record_no: int = 1) -> Expect:
    return Expect(text, record_no, field_name)


ID_RULE = "must be 1-255 characters of a-z A-Z 0-9 _ - . and start with a letter or digit"
SUBJECT_RULE = "must be a NATS subject"
NOT_AN_EXTENSION = "expected an extension object or a list of them"
NO_ALIASES = "invalid YAML: YAML aliases (*name) are not allowed in fixtures"

# Every file of tests/corpus/fixtures and what it must produce (test_corpus_files_are_all_listed
# keeps this table and the folder in step).
STATIC: dict[str, tuple[Expect, ...]] = {
    # JSON syntax
    "trailing_comma.json": (F("invalid JSON: JSON is malformed: trailing comma"),),
    "truncated.json": (F("invalid JSON: Input data was truncated"),),
    "single_quotes.json": (F("invalid JSON"),),
    "unquoted_keys.json": (F("invalid JSON"),),
    "comment.json": (F("invalid JSON"),),
    "nan_literal.json": (F("invalid JSON"),),
    "two_top_level_values.json": (F("invalid JSON: JSON is malformed: trailing characters"),),
    "lone_surrogate_escape.json": (F("invalid JSON"),),
    "integer_beyond_64_bits.json": (R("timeout_ms", "exceeds extension_max_timeout_ms 60000"),),
    # encodings and bytes
    "utf8_bom.json": (F("invalid JSON"),),
    "utf16_with_bom.json": (F("not UTF-8 text (invalid byte at offset 0)"),),
    "utf16le_without_bom.json": (F("invalid JSON"),),
    "latin1_encoded.yaml": (F("not UTF-8 text"),),
    "overlong_utf8.json": (F("not UTF-8 text"),),
    "nul_bytes.json": (F("invalid JSON"),),
    "nul_bytes.yaml": (F("invalid YAML: unacceptable character #x0000"),),
    # empty and wrong top level
    "empty.json": (F("file is empty"),),
    "whitespace_only.json": (F("file is empty"),),
    "comments_only.yaml": (F(f"{NOT_AN_EXTENSION}, got nothing"),),
    "top_level_null.json": (F(f"{NOT_AN_EXTENSION}, got nothing"),),
    "top_level_true.json": (F(f"{NOT_AN_EXTENSION}, got a boolean"),),
    "top_level_float.json": (F(f"{NOT_AN_EXTENSION}, got a number"),),
    "top_level_string.yaml": (F(f"{NOT_AN_EXTENSION}, got a string"),),
    "empty_list.yml": (F("file holds an empty list"),),
    "empty_object.json": (
        R("id", "required field is missing"),
        R("type", "required field is missing"),
        R("subject", "required field is missing"),
    ),
    "list_of_lists.json": (R("record", "Expected a JSON object, got `array`"),),
    "list_with_null.json": (R("record", "Expected a JSON object, got `null`", 2),),
    # wrong field types and values
    "id_not_a_string.json": (R("id", "Expected str, got int"),),
    "id_null.json": (R("id", "Expected str, got null"),),
    "type_unknown.json": (R("type", "Invalid enum value 'router'"),),
    "type_wrong_case.json": (R("type", "Invalid enum value 'PRE'"),),
    "timeout_ms_float.json": (R("timeout_ms", "Expected int, got float"),),
    "timeout_ms_bool.json": (R("timeout_ms", "Expected int, got bool"),),
    "timeout_ms_zero.json": (R("timeout_ms", "Expected int >= 1"),),
    "timeout_ms_negative.json": (R("timeout_ms", "Expected int >= 1"),),
    "retry_over_limit.json": (R("retry", "11 exceeds extension_max_retries 10"),),
    "enabled_string.json": (R("enabled", "Expected bool, got str"),),
    "config_is_a_list.json": (R("config", "Expected object, got array"),),
    "metadata_is_a_string.json": (R("metadata", "Expected object, got str"),),
    "versions_is_an_object.json": (R("versions", "Expected array, got object"),),
    "version_name_too_long.json": (R("version", "Expected str of length <= 32"),),
    "instance_weight_101.json": (R("instances[0].weight", "Expected int <= 100"),),
    "instance_health_status_unknown_value.json": (
        R("instances[0].health_status", "Invalid enum value 'sick'"),
    ),
    "duplicate_instance_ids.json": (R("instances", "instance_id 'i1' appears twice"),),
    "created_at_not_a_date.json": (R("created_at", "Invalid RFC3339"),),
    "subject_wildcard.json": (R("subject", SUBJECT_RULE),),
    "subject_empty_token.json": (R("subject", SUBJECT_RULE),),
    "subject_with_space.json": (R("subject", SUBJECT_RULE),),
    "subject_513_chars.json": (R("subject", "Expected str of length <= 512"),),
    "subject_missing.json": (R("subject", "required field is missing"),),
    "subject_trailing_newline.json": (R("subject", SUBJECT_RULE),),
    # unknown fields
    "misspelled_field.json": (R("timeout", "unknown field"),),
    "unknown_nested_field.json": (R("versions[0].colour", "unknown field"),),
    "unknown_field_with_markup.json": (R("[/red]", "unknown field"),),
    # duplicates
    "duplicate_id_in_list.json": (
        R("id", "duplicate id, first defined in duplicate_id_in_list.json record #1", 3),
    ),
    "duplicate_id_of_other_file.json": (
        R("id", f"duplicate id, first defined in {BASELINE} record #1"),
    ),
    "duplicate_key_in_object.json": (F("invalid JSON: key enabled appears twice in one object"),),
    "duplicate_key_in_object.yaml": (
        F("invalid YAML: key timeout_ms appears twice (line 5, column"),
    ),
    # ids
    "id_cyrillic_confusable.json": (R("id", ID_RULE),),
    "id_fullwidth_letters.json": (R("id", ID_RULE),),
    "id_sql_injection.json": (R("id", ID_RULE),),
    "id_256_chars.json": (R("id", "Expected str of length <= 255"),),
    "id_path_separator.json": (R("id", ID_RULE),),
    "id_path_traversal.json": (R("id", ID_RULE),),
    "id_backslash.json": (R("id", ID_RULE),),
    "id_leading_dot.json": (R("id", ID_RULE),),
    "id_leading_dash.json": (R("id", ID_RULE),),
    "id_with_space.json": (R("id", ID_RULE),),
    "id_empty.json": (R("id", "Expected str of length >= 1"),),
    "id_zero_width_space.json": (R("id", ID_RULE),),
    "id_rtl_override.json": (R("id", ID_RULE),),
    "id_nul_escape.json": (R("id", ID_RULE),),
    "id_ansi_escape.json": (R("id", ID_RULE),),
    "id_trailing_newline.json": (R("id", ID_RULE),),
    # YAML
    "yaml_bad_indentation.yaml": (F("invalid YAML: mapping values are not allowed"),),
    "yaml_tab_indentation.yaml": (F("invalid YAML"),),
    "yaml_unclosed_flow.yaml": (F("invalid YAML: while parsing a flow mapping"),),
    "yaml_two_documents.yaml": (F("invalid YAML: expected a single document"),),
    "yaml_python_object_apply.yaml": (F("invalid YAML: could not determine a constructor"),),
    "yaml_python_name_tag.yaml": (F("invalid YAML: could not determine a constructor"),),
    "yaml_python_object_new.yaml": (F("invalid YAML: could not determine a constructor"),),
    "yaml_custom_tag.yaml": (
        F("invalid YAML: could not determine a constructor for the tag '!Ref'"),
    ),
    "yaml_undefined_alias.yaml": (F(NO_ALIASES),),  # refused as an alias before it is resolved
    "yaml_date_as_version.yaml": (R("version", "Expected str, got date"),),
    "yaml_int_id.yaml": (R("id", "Expected str, got int"),),
    "yaml_non_string_config_key.yaml": (F("key 1 at config is not a string"),),
    "yaml_binary_in_config.yaml": (F("bytes value at config.blob is not JSON"),),
    "yaml_set_in_config.yaml": (F("set value at config.tags is not JSON"),),
    "yaml_recursive_alias_in_config.yaml": (F(NO_ALIASES),),
    "yaml_billion_laughs_top_level.yaml": (F(NO_ALIASES),),
    "yaml_billion_laughs_in_config.yaml": (F(NO_ALIASES),),
}


def _write(name: str, content: str | bytes) -> Callable[[Path], None]:
    def build(folder: Path) -> None:
        data = content.encode() if isinstance(content, str) else content
        (folder / name).write_bytes(data)

    return build


def _sparse(name: str, size: int) -> Callable[[Path], None]:
    def build(folder: Path) -> None:
        with (folder / name).open("wb") as f:
            f.truncate(size)  # a hole: instant, takes no disk

    return build


def _symlinks(*pairs: tuple[str, str]) -> Callable[[Path], None]:
    def build(folder: Path) -> None:
        for name, target in pairs:
            os.symlink(target, folder / name)

    return build


def _mkdir(name: str) -> Callable[[Path], None]:
    def build(folder: Path) -> None:
        (folder / name).mkdir()

    return build


def _deep_record_json(depth: int) -> str:
    head = json.dumps({"id": "deep_config", "type": "pre", "subject": "a.b"})[:-1]
    return head + ', "config": ' + '{"a": ' * depth + "1" + "}" * depth + "}"


HUGE_KEY = "k" * (5 * 1024 * 1024)
HUGE_KEY_SHOWN = "k" * 80 + f"... ({len(HUGE_KEY)} characters)"  # the field name, cut short
DANGLING = "a symbolic link to nothing (dangling, or a loop)"
A_DIRECTORY = "a directory, not a file"

GENERATED: list[Case] = [
    Case(
        "huge_file_over_16mib.json",
        _sparse("huge_file_over_16mib.json", MAX_FILE_BYTES + 1),
        (F("file is larger than 16 MiB"),),
    ),
    Case(
        "huge_file_over_16mib.yaml",
        _sparse("huge_file_over_16mib.yaml", MAX_FILE_BYTES + 1),
        (F("file is larger than 16 MiB"),),
    ),
    Case(
        "deep_nesting_lists.json",
        _write("deep_nesting_lists.json", "[" * DEEP + "]" * DEEP),
        (F("invalid JSON: nested too deeply"),),
    ),
    Case(
        "deep_nesting_objects.json",
        _write("deep_nesting_objects.json", '{"a": ' * DEEP + "1" + "}" * DEEP),
        (F("invalid JSON: nested too deeply"),),
    ),
    Case(
        "deep_nesting_in_config.json",
        _write("deep_nesting_in_config.json", _deep_record_json(DEEP)),
        (F("invalid JSON: nested too deeply"),),
    ),
    Case(
        "nesting_over_64_levels.json",  # parses, but deeper than fixtures allow (63 passes)
        _write("nesting_over_64_levels.json", _deep_record_json(64)),
        (F("nested more than 64 levels deep at config" + ".a" * 64),),
    ),
    Case(
        "deep_nesting_flow.yaml",
        _write("deep_nesting_flow.yaml", "[" * DEEP + "]" * DEEP),
        (F("invalid YAML: nested too deeply"),),
    ),
    Case(
        "deep_nesting_flow_mappings.yaml",
        _write("deep_nesting_flow_mappings.yaml", "{a: " * DEEP + "1" + "}" * DEEP),
        (F("invalid YAML: nested too deeply"),),
    ),
    Case(
        "deep_nesting_block.yaml",
        _write("deep_nesting_block.yaml", "- " * DEEP + "x\n"),
        (F("invalid YAML: nested too deeply"),),
    ),
    Case(
        "symlink_loop_a.json",
        _symlinks(
            ("symlink_loop_a.json", "symlink_loop_b.json"),
            ("symlink_loop_b.json", "symlink_loop_a.json"),
        ),
        (F(DANGLING),),
        names=("symlink_loop_a.json", "symlink_loop_b.json"),
    ),
    Case(
        "symlink_self_loop.yaml",
        _symlinks(("symlink_self_loop.yaml", "symlink_self_loop.yaml")),
        (F(DANGLING),),
    ),
    Case(
        "dangling_symlink.json",
        _symlinks(("dangling_symlink.json", "no-such-target.json")),
        (F(DANGLING),),
    ),
    Case(
        "symlink_to_directory.json",
        _symlinks(("symlink_to_directory.json", ".")),
        (F(A_DIRECTORY),),
    ),
    Case("directory_named.json", _mkdir("directory_named.json"), (F(A_DIRECTORY),)),
    Case(
        "symlink_to_proc_self_mem.json",  # unreadable even by root: read() gives EIO
        _symlinks(("symlink_to_proc_self_mem.json", "/proc/self/mem")),
        (F("cannot read file: Input/output error"),),
    ),
    Case(
        "unknown_field_name_5mib.json",
        _write(
            "unknown_field_name_5mib.json",
            json.dumps({"id": "big_key", "type": "pre", "subject": "a.b", HUGE_KEY: 1}),
        ),
        (R(HUGE_KEY_SHOWN, "unknown field"),),
    ),
    Case(
        "id_10mib.json",
        _write(
            "id_10mib.json",
            json.dumps({"id": "a" * (10 * 1024 * 1024), "type": "pre", "subject": "a.b"}),
        ),
        (R("id", "Expected str of length <= 255"),),
    ),
]

CASES: list[Case] = [Case(name, _copy(name), expect) for name, expect in STATIC.items()] + GENERATED
CASE_PARAMS = [pytest.param(c, id=c.name) for c in CASES]


def load(folder: Path) -> list[Any]:
    return load_fixtures(folder, max_timeout_ms=60_000, max_retries=10).extensions


def with_baseline(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / BASELINE).write_text(json.dumps(record("baseline")), encoding="utf-8")
    return folder


def check_problems(problems: list[str], case: Case) -> None:
    """Every expected problem is there, names the case's file (record, field), and nothing
    blames the good baseline file."""
    assert problems, "FixtureError without problems"
    for name in case.named:
        assert any(p.startswith((f"{name}: ", f"{name} record #")) for p in problems), (
            name,
            problems,
        )
    for want in case.expect:
        if want.record is None:
            prefix, middle = f"{case.name}: ", ""
        else:
            prefix, middle = f"{case.name} record #{want.record} (", f"): field {want.field}: "
        hits = [p for p in problems if p.startswith(prefix) and middle in p and want.text in p]
        assert hits, (want, [p[:300] for p in problems])
    assert not [p for p in problems if p.startswith(BASELINE)], problems


@pytest.mark.parametrize("case", CASE_PARAMS)
def test_load_fixtures_refuses_and_names_the_file(tmp_path: Path, case: Case) -> None:
    """load_fixtures raises FixtureError for the case, naming its file (and the record and the
    field where that applies) and leaving the good file next to it unblamed; it never lets a
    RecursionError, MemoryError or OSError through. (A hang would meet pytest's timeout; how
    fast it answers is not asserted.)"""
    tried("fixture files", case.name)
    folder = with_baseline(tmp_path / "fx")
    case.build(folder)
    with pytest.raises(FixtureError) as info:
        load(folder)
    assert "\n".join(info.value.problems) == str(info.value)
    check_problems(info.value.problems, case)


@pytest.mark.parametrize("case", CASE_PARAMS)
async def test_running_registry_keeps_its_snapshot(tmp_path: Path, case: Case) -> None:
    """A fixtures-mode Registry whose folder gets the bad entry refuses the reload with a
    FixtureError naming it, and keeps serving the very same snapshot and records."""
    tried("fixture files", case.name)
    folder = with_baseline(tmp_path / "fx")
    staging = tmp_path / "staging"
    staging.mkdir()
    case.build(staging)
    settings = make_settings(tmp_path, source="fixtures", fixtures_dir=folder)
    async with Registry.open(settings) as reg:
        before = reg.snapshot
        for entry in sorted(staging.iterdir()):
            os.rename(entry, folder / entry.name)  # appears at once, never half-written
        with pytest.raises(FixtureError) as info:
            await reg.reload()
        assert reg.snapshot is before
        assert (["baseline"], "fixtures") == ([e.id for e in reg.all()], reg.status.source)
        assert "baseline" == reg.lookup("baseline").id
        assert any(p.startswith(case.name) for p in info.value.problems), info.value.problems


@pytest.mark.parametrize("case", CASE_PARAMS)
def test_problems_are_short_printable_lines(tmp_path: Path, case: Case) -> None:
    """Each problem is one printable line of reasonable length: no control or invisible
    format characters copied from the input (terminal escapes, NUL, bidi overrides), and no
    multi-megabyte echo of a huge field name."""
    tried("fixture files", case.name)
    folder = with_baseline(tmp_path / "fx")
    case.build(folder)
    with pytest.raises(FixtureError) as info:
        load(folder)
    for problem in info.value.problems:
        assert len(problem) <= 2000, (len(problem), problem[:200])
        assert problem.isprintable(), ascii(problem)


def test_corpus_files_are_all_listed() -> None:
    """Every file in tests/corpus/fixtures has its expectation in STATIC and vice versa, so no
    corpus file goes untested."""
    assert sorted(STATIC) == sorted(p.name for p in FIXTURE_CORPUS.iterdir())
    assert sorted(CONFIG_TOML) == sorted(p.name for p in CONFIG_CORPUS.iterdir())


def test_billion_laughs_loads_quickly_in_little_memory(tmp_path: Path) -> None:
    """The YAML anchors bomb neither hangs nor eats memory while the folder is read (aliases
    are refused, never expanded): a few MiB at most. Memory is the proof; time is not asserted
    (an expansion would exhaust memory long before a clock could tell)."""
    tried("fixture files", "yaml_billion_laughs (time and memory)")
    folder = with_baseline(tmp_path / "fx")
    for name in ("yaml_billion_laughs_in_config.yaml", "yaml_billion_laughs_top_level.yaml"):
        _copy(name)(folder)
    tracemalloc.start()
    try:
        with pytest.raises(FixtureError):
            load(folder)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 20 * 1024 * 1024


def test_python_tags_run_nothing(tmp_path: Path) -> None:
    """`!!python/object/apply:os.system` is refused by the safe loader and runs nothing: the
    file its command would create does not appear."""
    tried("fixture files", "yaml_python_object_apply.yaml (side effect)")
    marker = Path("/tmp/extreg-corpus-pwned")  # named inside the corpus file
    marker.unlink(missing_ok=True)
    folder = with_baseline(tmp_path / "fx")
    _copy("yaml_python_object_apply.yaml")(folder)
    _copy("yaml_python_object_new.yaml")(folder)
    with pytest.raises(FixtureError):
        load(folder)
    assert not marker.exists()


def test_unreadable_file_real_behaviour(tmp_path: Path) -> None:
    """A chmod 000 file: run as root (as here) it is read anyway, since root ignores
    permission bits; run as any other user it is a FixtureError 'Permission denied' naming
    the file. The root-proof unreadable case is symlink_to_proc_self_mem.json."""
    tried("fixture files", "unreadable_chmod_000.json")
    folder = with_baseline(tmp_path / "fx")
    path = folder / "unreadable_chmod_000.json"
    path.write_text(json.dumps(record("locked")), encoding="utf-8")
    path.chmod(0)
    try:
        if os.geteuid() == 0:
            assert ["baseline", "locked"] == [e.id for e in load(folder)]
        else:
            with pytest.raises(FixtureError) as info:
                load(folder)
            assert ["unreadable_chmod_000.json: cannot read file: Permission denied"] == (
                info.value.problems
            )
    finally:
        path.chmod(0o600)


def test_yaml_bom_is_accepted_json_bom_is_refused(tmp_path: Path) -> None:
    """A UTF-8 byte-order mark is allowed by YAML (the file loads) and refused in JSON with a
    FixtureError naming the file (msgspec: invalid character at byte 0)."""
    tried("fixture files", "utf8_bom.yaml")
    folder = tmp_path / "fx"
    folder.mkdir()
    (folder / "bom.yaml").write_bytes(b"\xef\xbb\xbfid: bom\ntype: pre\nsubject: a.b\n")
    assert ["bom"] == [e.id for e in load(folder)]
    _copy("utf8_bom.json")(folder)
    with pytest.raises(FixtureError) as info:
        load(folder)
    assert ["utf8_bom.json: invalid JSON: JSON is malformed: invalid character (byte 0)"] == (
        info.value.problems
    )


DEADLINE_S = 30.0  # generous: fails only what never happens


async def until(condition: Callable[[], bool], seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while not condition() and time.monotonic() < deadline:
        await asyncio.sleep(0.02)
    return condition()


async def watcher_ready(folder: Path, events: list[EventDict]) -> None:
    """Touch a non-fixture file until the folder watcher reacts, so it is known to be live."""
    for attempt in range(100):
        (folder / "ready.txt").write_text(str(attempt), encoding="utf-8")
        if await until(lambda: any(e["event"] == "reloaded" for e in events), 0.1):
            return
    raise AssertionError("the fixtures watcher never started")


async def test_watcher_keeps_serving_through_the_whole_corpus(tmp_path: Path) -> None:
    """A running fixtures-mode registry whose folder receives the whole corpus at once: its
    folder watcher logs the rejection and the registry keeps the very same snapshot; the
    watcher is still alive afterwards (once the bad entries go, a good new file is served)."""
    folder = with_baseline(tmp_path / "fx")
    staging = tmp_path / "staging"
    staging.mkdir()
    for case in CASES:
        case.build(staging)
        tried("fixture files", case.name)
    settings = make_settings(tmp_path, source="fixtures", fixtures_dir=folder)
    with capture_logs() as events:
        async with Registry.open(settings) as reg:
            await watcher_ready(folder, events)
            before = reg.snapshot
            moved = []
            for entry in sorted(staging.iterdir()):
                os.rename(entry, folder / entry.name)
                moved.append(folder / entry.name)

            def names_every_case(event: EventDict) -> bool:
                return event["event"] == "fixtures_rejected" and all(
                    any(p.startswith(c.name) for p in event["problems"]) for c in CASES
                )

            # on a loaded machine the moves may reach the watcher in more than one batch, each
            # rejected; the one after the last move names every case
            def rejections() -> list[EventDict]:
                return [e for e in events if e["event"] == "fixtures_rejected"]

            assert await until(lambda: any(map(names_every_case, rejections())), DEADLINE_S), [
                e["problems"][:3] for e in rejections()
            ]
            assert reg.snapshot is before
            for path in moved:
                if path.is_dir() and not path.is_symlink():
                    path.rmdir()
                else:
                    path.unlink()
            (folder / "later.json").write_text(json.dumps(record("later")), encoding="utf-8")
            assert await until(lambda: reg.get("later") is not None, DEADLINE_S)
            assert ["baseline", "later"] == [e.id for e in reg.all()]


async def test_watcher_survives_deep_json(tmp_path: Path) -> None:
    """A 100k-deep JSON file that shows up alone is rejected by the folder watcher (no
    RecursionError ending its task), and once it goes the watcher applies the next good
    edit."""
    name = "deep_nesting_lists.json"
    tried("fixture files", f"{name} (watcher)")
    folder = with_baseline(tmp_path / "fx")
    staging = tmp_path / "staging"
    staging.mkdir()
    next(c for c in CASES if c.name == name).build(staging)
    settings = make_settings(tmp_path, source="fixtures", fixtures_dir=folder)
    with capture_logs() as events:
        async with Registry.open(settings) as reg:
            await watcher_ready(folder, events)
            seen = len(events)
            os.rename(staging / name, folder / name)
            assert await until(
                lambda: any(e["event"] == "fixtures_rejected" for e in events[seen:]), DEADLINE_S
            )
            [rejected] = [e for e in events[seen:] if e["event"] == "fixtures_rejected"]
            assert [f"{name}: invalid JSON: nested too deeply"] == rejected["problems"]
            (folder / name).unlink()
            (folder / "later.json").write_text(json.dumps(record("later")), encoding="utf-8")
            assert await until(lambda: reg.get("later") is not None, DEADLINE_S)


# -- the command line, run in parallel in the background -------------------------------------


def clean_env(tmp: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("EXTENSION_REGISTRY_")}
    env["COLUMNS"] = "400"  # keep rich from wrapping messages
    env["EXTENSION_REGISTRY_DATA_DIR"] = str(tmp / "data")
    env.update(extra)
    return env


@dataclass
class CliRun:
    args: list[str]
    env: dict[str, str]
    timeout: float = 30
    memory_kib: int | None = None  # ulimit -v for the run


Result = subprocess.CompletedProcess[str] | subprocess.TimeoutExpired


def _execute(run: CliRun) -> Result:
    cmd = [str(EXTREG), *run.args]
    if run.memory_kib:
        cmd = ["sh", "-c", f'ulimit -v {run.memory_kib} && exec "$@"', "sh", *cmd]
    try:
        return subprocess.run(
            cmd,
            capture_output=True,
            text=True,
            env=run.env,
            timeout=run.timeout,
            check=False,
            errors="replace",
        )
    except subprocess.TimeoutExpired as exc:
        return exc


def outcome(result: Result) -> str:
    if isinstance(result, subprocess.TimeoutExpired):
        return f"timed out after {result.timeout} s"
    return (
        f"exit {result.returncode}\nstdout:\n{result.stdout[-3000:]}\n"
        f"stderr:\n{result.stderr[-3000:]}"
    )


# A valid record (NATS allows brackets in a subject) whose values look like rich markup.
MARKUP_RECORD = record("markup", subject="beamline.[/red]", version="[bold]v1")

# Entries that would hang or eat memory if src read them blindly: each is run through `extreg
# validate` on its own, under a time and memory limit, so that a regression fails its own case
# instead of hanging the module. (entry -> how to make it, the one problem it must give)
NOT_A_REGULAR_FILE = "not a regular file (a device, FIFO or socket)"
SPECIAL_FILES: dict[str, tuple[Callable[[Path], None], str]] = {
    "fifo_named.json": (lambda folder: os.mkfifo(folder / "fifo_named.json"), NOT_A_REGULAR_FILE),
    "symlink_to_dev_zero.json": (
        _symlinks(("symlink_to_dev_zero.json", "/dev/zero")),
        NOT_A_REGULAR_FILE,
    ),
}


def _fixture_cli_runs(root: Path) -> dict[str, CliRun]:
    runs: dict[str, CliRun] = {}
    corpus = with_baseline(root / "whole-corpus")
    for case in CASES:
        case.build(corpus)
    runs["validate:corpus"] = CliRun(["validate", str(corpus)], clean_env(root))
    runs["validate:corpus:json"] = CliRun(["validate", "--json", str(corpus)], clean_env(root))
    markup = with_baseline(root / "markup-like-values")
    (markup / "markup.json").write_text(json.dumps(MARKUP_RECORD), encoding="utf-8")
    runs["list:markup"] = CliRun(
        ["--source", "fixtures", "--fixtures-dir", str(markup), "list"], clean_env(root)
    )
    for name, (build, _) in SPECIAL_FILES.items():
        folder = with_baseline(root / f"special-{name}")
        build(folder)
        runs[f"validate:{name}"] = CliRun(
            ["validate", str(folder)], clean_env(root), timeout=10, memory_kib=700_000
        )
    return runs


@dataclass(frozen=True)
class CliConfigCase:
    args: tuple[str, ...]
    env: tuple[tuple[str, str], ...] = ()
    parts: tuple[str, ...] = ()  # what the one error line (or the usage error) must contain
    usage: bool = False  # a flag click refuses: its usage error, not our one 'error:' line


def toml_arg(name: str) -> tuple[str, ...]:
    return ("--config", str(CONFIG_CORPUS / name), "list")


CLI_CONFIG: dict[str, CliConfigCase] = {
    "toml-unknown-key": CliConfigCase(
        toml_arg("unknown_key.toml"), parts=("db_prot", "config file", "unknown setting")
    ),
    "toml-invalid": CliConfigCase(
        toml_arg("invalid_unclosed_table.toml"),
        parts=("invalid_unclosed_table.toml", "not valid TOML"),
    ),
    "toml-mnesia": CliConfigCase(
        toml_arg("cache_type_mnesia.toml"),
        parts=("cache_type", "config file", "mnesia", "not supported"),
    ),
    "toml-mysql-url": CliConfigCase(
        toml_arg("database_url_mysql.toml"), parts=("database_url", "config file", "postgresql://")
    ),
    "toml-no-table": CliConfigCase(
        toml_arg("no_table.toml"), parts=("no_table.toml", "[extension_registry]")
    ),
    "toml-directory": CliConfigCase(
        ("--config", str(CONFIG_CORPUS), "list"),
        parts=(f"config file {CONFIG_CORPUS} is a directory",),
    ),
    "env-unknown-key": CliConfigCase(
        ("list",),
        (("EXTENSION_REGISTRY_COLOUR", "blue"),),
        ("EXTENSION_REGISTRY_COLOUR", "environment", "unknown"),
    ),
    "env-negative-port": CliConfigCase(
        ("list",),
        (("EXTENSION_REGISTRY_DB_PORT", "-1"),),
        ("EXTENSION_REGISTRY_DB_PORT", "environment", "greater than or equal to 1"),
    ),
    "env-url-port-99999": CliConfigCase(
        ("list",),
        (
            ("EXTENSION_REGISTRY_SOURCE", "auto"),
            ("EXTENSION_REGISTRY_DATABASE_URL", f"postgresql://reg:{SECRET}@127.0.0.1:99999/reg"),
        ),
        ("setting EXTENSION_REGISTRY_DATABASE_URL from environment: ", "port"),
    ),
    "serve-port-70000": CliConfigCase(
        ("serve", "--port", "70000"), usage=True, parts=("Invalid value for '--port'", "65535")
    ),
    "serve-port-0": CliConfigCase(
        ("serve", "--port", "0"),
        usage=True,
        parts=("Invalid value for '--port'", "greater than or equal to 1"),
    ),
}


def _config_cli_runs(root: Path) -> dict[str, CliRun]:
    runs = {}
    for key, case in CLI_CONFIG.items():
        env = clean_env(
            root,
            EXTENSION_REGISTRY_SOURCE="fixtures",  # never an embedded database
            EXTENSION_REGISTRY_DB_PASSWORD=SECRET,
        )
        env.update(dict(case.env))
        runs[f"config:{key}"] = CliRun(list(case.args), env, timeout=15)
    return runs


@pytest.fixture(scope="module")
def cli(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Future[Result]]]:
    """Every `extreg` run of the module, started at once on a small pool (each costs ~0.5 s of
    interpreter start-up), so the in-process tests run while they do."""
    root = tmp_path_factory.mktemp("cli")
    runs = {**_fixture_cli_runs(root), **_config_cli_runs(root)}
    with ThreadPoolExecutor(max_workers=3) as pool:
        yield {key: pool.submit(_execute, run) for key, run in runs.items()}


def finished(cli: dict[str, Future[Result]], key: str) -> subprocess.CompletedProcess[str]:
    tried("cli runs", key)
    result = cli[key].result()
    assert not isinstance(result, subprocess.TimeoutExpired), outcome(result)
    return result


def squeeze(text: str) -> str:
    return "".join(text.split())


def test_cli_validate_whole_corpus(cli: dict[str, Future[Result]]) -> None:
    """`extreg validate` on a folder holding the whole corpus exits 2, names every case's file
    in its error output, prints '[...]' from the input as it is (not as rich markup), and
    shows no Python traceback."""
    result = finished(cli, "validate:corpus")
    assert 2 == result.returncode, outcome(result)
    assert "Traceback" not in result.stderr, outcome(result)
    assert result.stderr.startswith("error: "), outcome(result)
    shown = squeeze(result.stderr)
    missing = [n for c in CASES for n in c.named if squeeze(n) not in shown]
    assert not missing, (missing, outcome(result))
    assert (
        "unknown_field_with_markup.json record #1 (unknown_field_with_markup): "
        "field [/red]: unknown field"
    ) in result.stderr, outcome(result)
    lines = [line.removeprefix("error: ") for line in result.stderr.splitlines()]
    assert not [line for line in lines if line.startswith(BASELINE)], outcome(result)


def test_cli_validate_whole_corpus_json(cli: dict[str, Future[Result]]) -> None:
    """`extreg validate --json` on the whole corpus exits 2 and lists, as JSON, every problem
    that load_fixtures reports for every case (same wording, file, record and field)."""
    result = finished(cli, "validate:corpus:json")
    assert 2 == result.returncode, outcome(result)
    assert "Traceback" not in result.stderr, outcome(result)
    answer = json.loads(result.stdout)
    assert False is answer["valid"]
    for case in CASES:
        check_problems(answer["problems"], case)


@pytest.mark.parametrize("name", list(SPECIAL_FILES))
def test_cli_validate_special_file(cli: dict[str, Future[Result]], name: str) -> None:
    """`extreg validate` on a folder holding a FIFO or a link to /dev/zero exits 2 within
    seconds and bounded memory (the entry is not read), with one 'error:' line naming the
    entry and what it is, and no traceback."""
    tried("fixture files", name)
    result = finished(cli, f"validate:{name}")
    assert 2 == result.returncode, outcome(result)
    assert "Traceback" not in result.stderr, outcome(result)
    assert f"error: {name}: {SPECIAL_FILES[name][1]}\n" == result.stderr, outcome(result)


def test_cli_list_shows_markup_like_values_verbatim(cli: dict[str, Future[Result]]) -> None:
    """`extreg list` prints a valid record whose subject and version hold '[...]' as they are,
    not read as rich markup."""
    result = finished(cli, "list:markup")
    assert 0 == result.returncode, outcome(result)
    assert "Traceback" not in result.stderr, outcome(result)
    assert_has_all(result.stdout, "beamline.[/red]", "[bold]v1")


# -- configuration ---------------------------------------------------------------------------


def config_error(**kwargs: Any) -> str:
    kwargs.setdefault("environ", {})
    with pytest.raises(ConfigError) as info:
        Settings.load(**kwargs)
    message = str(info.value)
    assert SECRET not in message, message
    assert "Traceback" not in message
    for line in message.splitlines():
        assert line.startswith(("setting ", "config file ", "environment variable ")), message
    return message


def assert_has_all(message: str, *parts: str) -> None:
    for part in parts:
        assert part in message, (part, message)


URL_PORT = "has a port that is not a number from"  # database_url and nats_url

# Every file of tests/corpus/config: (the key the message names, or None for a file-level
# problem; a fragment the message must hold). The message must also name the file.
CONFIG_TOML: dict[str, tuple[str | None, str]] = {
    "invalid_unclosed_table.toml": (None, "is not valid TOML"),
    "invalid_missing_value.toml": (None, "is not valid TOML"),
    "invalid_duplicate_key.toml": (None, "is not valid TOML"),
    "invalid_bare_string.toml": (None, "is not valid TOML"),
    "not_utf8_latin1.toml": (None, "is not valid TOML"),
    "utf16.toml": (None, "is not valid TOML"),
    "utf8_bom.toml": (None, "is not valid TOML"),
    "nul_byte.toml": (None, "is not valid TOML"),
    "empty.toml": (None, "has no [extension_registry] table"),
    "no_table.toml": (None, "has no [extension_registry] table"),
    "array_of_tables.toml": (None, "has no [extension_registry] table"),
    "unknown_table.toml": (None, "unknown table(s) extension-registry"),
    "unknown_key.toml": ("db_prot", "unknown setting"),
    "unknown_key_upper_case.toml": ("DB_PORT", "unknown setting"),
    "unknown_nested_table.toml": ("db", "unknown setting"),
    "port_zero.toml": ("db_port", "greater than or equal to 1"),
    "port_negative.toml": ("db_port", "greater than or equal to 1"),
    "port_70000.toml": ("db_port", "less than or equal to 65535"),
    "port_string.toml": ("db_port", "valid integer"),
    "port_float.toml": ("db_port", "fractional part"),
    "port_list.toml": ("db_port", "valid integer"),
    "port_bool.toml": ("db_port", "expected a number, got a boolean"),
    "host_int.toml": ("db_host", "valid string"),
    "name_date.toml": ("db_name", "valid string"),
    "nats_url_table.toml": ("nats_url", "valid string"),
    "fixtures_dir_int.toml": ("fixtures_dir", "valid path"),
    "source_int.toml": ("source", "'database', 'fixtures' or 'auto'"),
    "source_unknown.toml": ("source", "'database', 'fixtures' or 'auto'"),
    "bool_string.toml": ("circuit_breaker_enabled", "valid boolean"),
    "interval_string.toml": ("sync_interval_seconds", "valid number"),
    "interval_infinite.toml": ("sync_interval_seconds", "Input should be a finite number"),
    "interval_nan.toml": ("sync_interval_seconds", "Input should be a finite number"),
    "error_rate_above_one.toml": ("circuit_breaker_error_rate_threshold", "less than or equal"),
    "cache_type_mnesia.toml": ("cache_type", "'mnesia' is not supported"),
    "cache_type_list.toml": ("cache_type", "'ets', 'memory'"),
    "database_url_mysql.toml": ("database_url", "must start with postgresql://"),
    "database_url_garbage.toml": ("database_url", "must start with postgresql://"),
    "database_url_broken_ipv6.toml": ("database_url", "Invalid IPv6 URL"),
    "database_url_port_99999.toml": ("database_url", URL_PORT),
    "database_url_port_not_a_number.toml": ("database_url", URL_PORT),
    "password_wrong_type_with_secret_number.toml": ("db_password", "valid string"),
    "nats_url_garbage.toml": ("nats_url", "must start with nats://"),
    "nats_url_port_99999.toml": ("nats_url", URL_PORT),
    "nats_url_http_scheme.toml": ("nats_url", "must start with nats:// (got scheme 'http')"),
}


@pytest.mark.parametrize("name", list(CONFIG_TOML))
def test_config_file_corpus(name: str) -> None:
    """Each bad TOML file gives a ConfigError that names the file, the key at fault (for a
    key problem) and what is wrong, and never shows a password."""
    tried("configuration", name)
    key, fragment = CONFIG_TOML[name]
    path = CONFIG_CORPUS / name
    environ = {} if key == "db_password" else {"EXTENSION_REGISTRY_DB_PASSWORD": SECRET}
    message = config_error(config_file=path, environ=environ)
    assert_has_all(message, str(path), fragment)
    if key is not None:
        assert_has_all(message, f"setting {key} from config file {path}: ")
    else:
        assert message.startswith(f"config file {path}"), message
    assert "7345987234" not in message


@dataclass(frozen=True)
class Numeric:
    kind: type
    low: float | None  # the lower bound, None when there is none
    strict: bool  # gt rather than ge

    @property
    def positive(self) -> bool:
        """Whether 0 is refused."""
        return self.low is not None and (self.low > 0 or (self.strict and self.low >= 0))


def _numeric_keys() -> dict[str, Numeric]:
    """Every int/float setting of Settings, with its lower bound, read from the model."""
    keys: dict[str, Numeric] = {}
    for name, info in Settings.model_fields.items():
        if info.annotation not in (int, float):
            continue
        low, strict = None, False
        for meta in info.metadata:
            if isinstance(meta, annotated_types.Ge):
                low, strict = float(cast(float, meta.ge)), False
            elif isinstance(meta, annotated_types.Gt):
                low, strict = float(cast(float, meta.gt)), True
        keys[name] = Numeric(float if info.annotation is float else int, low, strict)
    return keys


NUMERIC = _numeric_keys()
POSITIVE = sorted(k for k, n in NUMERIC.items() if n.positive)


def test_every_numeric_setting_has_a_lower_bound() -> None:
    """Every numeric setting refuses something below a bound of zero or more (no setting takes
    any negative number), and the contract's counts and sizes are among the positive ones."""
    tried("configuration", "numeric bounds")
    assert len(NUMERIC) >= 15, NUMERIC
    assert not [k for k, n in NUMERIC.items() if n.low is None or n.low < 0]
    for key in (
        "db_port",
        "sync_interval_seconds",
        "circuit_breaker_failure_threshold",
        "circuit_breaker_timeout_seconds",
        "circuit_breaker_half_open_max_requests",
        "circuit_breaker_window_seconds",
        "circuit_breaker_min_calls",
        "extension_max_payload_size",
        "extension_max_metadata_size",
        "extension_max_timeout_ms",
    ):
        assert key in POSITIVE, key


@pytest.mark.parametrize("origin", ["environment", "config file", "command line"])
@pytest.mark.parametrize("key", sorted(NUMERIC))
def test_negative_numbers_are_refused(tmp_path: Path, key: str, origin: str) -> None:
    """-1 for any numeric setting, from the environment, the TOML file or a flag, is a
    ConfigError naming the key as written in that layer and the layer."""
    tried("configuration", f"{key}=-1 from {origin}")
    if origin == "environment":
        message = config_error(
            environ={
                f"EXTENSION_REGISTRY_{key.upper()}": "-1",
                "EXTENSION_REGISTRY_DB_PASSWORD": SECRET,
            }
        )
        assert_has_all(message, f"setting EXTENSION_REGISTRY_{key.upper()} from environment: ")
    elif origin == "config file":
        path = tmp_path / "negative.toml"
        path.write_text(f"[extension_registry]\n{key} = -1\n", encoding="utf-8")
        message = config_error(config_file=path)
        assert_has_all(message, f"setting {key} from config file {path}: ")
    else:
        message = config_error(**{key: -1})
        assert_has_all(message, f"setting {key} from command line: ")
    assert_has_all(message, "greater than", "(got ")


@pytest.mark.parametrize("key", POSITIVE)
def test_zero_is_refused_where_positive_is_required(key: str) -> None:
    """0 for a setting that must be positive is a ConfigError naming the variable."""
    tried("configuration", f"{key}=0")
    message = config_error(environ={f"EXTENSION_REGISTRY_{key.upper()}": "0"})
    assert_has_all(
        message, f"setting EXTENSION_REGISTRY_{key.upper()} from environment: ", "greater than"
    )


FLOAT_KEYS = sorted(k for k, n in NUMERIC.items() if n.kind is float)
NON_FINITE = [
    pytest.param(key, value, id=f"{key}={value}")
    for key in FLOAT_KEYS
    for value in ("nan", "-inf", "inf")
]


@pytest.mark.parametrize(("key", "value"), NON_FINITE)
def test_non_finite_floats_are_refused(key: str, value: str) -> None:
    """nan, -inf and inf are refused for every float setting, naming the variable."""
    tried("configuration", f"{key}={value}")
    message = config_error(environ={f"EXTENSION_REGISTRY_{key.upper()}": value})
    assert_has_all(
        message,
        f"setting EXTENSION_REGISTRY_{key.upper()} from environment: ",
        "Input should be a finite number",
    )


@pytest.mark.parametrize("value", ["0", "-1", "70000", "abc", "", "5432.5", "0x10"])
@pytest.mark.parametrize("origin", ["environment", "command line"])
def test_bad_ports(origin: str, value: str) -> None:
    """A port that is 0, negative, above 65535 or not a whole number is refused, naming
    db_port as written in its layer (the TOML file cases are in the config corpus)."""
    tried("configuration", f"db_port={value!r} from {origin}")
    if origin == "environment":
        message = config_error(environ={"EXTENSION_REGISTRY_DB_PORT": value})
        assert_has_all(message, "setting EXTENSION_REGISTRY_DB_PORT from environment: ")
    else:
        message = config_error(db_port=value)
        assert_has_all(message, "setting db_port from command line: ")


NOT_POSTGRES = "must start with postgresql://"
BAD_DB_URLS = {  # case -> (url, what the message must say)
    "mysql": (f"mysql://reg:{SECRET}@db.example/reg", f"{NOT_POSTGRES} (got scheme 'mysql')"),
    "http": (f"http://reg:{SECRET}@db.example/reg", f"{NOT_POSTGRES} (got scheme 'http')"),
    "garbage": (f"reg:{SECRET}@db.example", NOT_POSTGRES),
    "empty": ("", NOT_POSTGRES),
    "spaces": ("   ", NOT_POSTGRES),
    "broken-ipv6": (f"postgresql://reg:{SECRET}@[::1/reg", "Invalid IPv6 URL"),
    "port-99999": (f"postgresql://reg:{SECRET}@127.0.0.1:99999/reg", URL_PORT),
    "port-abc": (f"postgresql://reg:{SECRET}@127.0.0.1:abc/reg", URL_PORT),
    "port-negative": (f"postgresql://reg:{SECRET}@127.0.0.1:-1/reg", URL_PORT),
    # libpq refuses port 0 ('invalid port number'), as db_port does (ge=1)
    "port-zero": (f"postgresql://reg:{SECRET}@127.0.0.1:0/reg", URL_PORT),
}


@pytest.mark.parametrize("origin", ["environment", "command line"])
@pytest.mark.parametrize("case", list(BAD_DB_URLS))
def test_bad_database_urls(case: str, origin: str) -> None:
    """A database_url that is not a usable postgresql:// URL is a ConfigError naming
    database_url and its layer and what is wrong, without the password it carries."""
    url, fragment = BAD_DB_URLS[case]
    tried("configuration", f"database_url {case} from {origin}")
    if origin == "environment":
        message = config_error(environ={"EXTENSION_REGISTRY_DATABASE_URL": url})
        assert_has_all(
            message, "setting EXTENSION_REGISTRY_DATABASE_URL from environment: ", fragment
        )
    else:
        message = config_error(database_url=url)
        assert_has_all(message, "setting database_url from command line: ", fragment)


@pytest.mark.parametrize(
    ("url", "fragment"),
    [
        ("not a url", "must start with nats:// (got scheme '')"),
        ("http://127.0.0.1:4222", "must start with nats:// (got scheme 'http')"),
        ("nats://127.0.0.1:99999", URL_PORT),
        ("nats://127.0.0.1:abc", URL_PORT),
        ("nats://127.0.0.1:0", URL_PORT),  # nothing listens on port 0
        ("nats://127.0.0.1:4222,http://127.0.0.1:4223", "must start with nats://"),  # a list
    ],
)
def test_bad_nats_urls(url: str, fragment: str) -> None:
    """A nats_url that is not a nats:// (or tls://, ws://) URL with a valid port, or a list
    holding one, is a ConfigError naming the variable and what is wrong."""
    tried("configuration", f"nats_url {url!r}")
    message = config_error(environ={"EXTENSION_REGISTRY_NATS_URL": url})
    assert_has_all(message, "setting EXTENSION_REGISTRY_NATS_URL from environment: ", fragment)


@pytest.mark.parametrize(
    ("environ", "overrides", "parts"),
    [
        pytest.param(
            {"EXTENSION_REGISTRY_DB_PROT": "5432"},
            {},
            ("setting EXTENSION_REGISTRY_DB_PROT from environment: unknown setting",),
            id="env-typo",
        ),
        pytest.param(
            {"EXTENSION_REGISTRY_CACHETYPE": "ets"},
            {},
            ("setting EXTENSION_REGISTRY_CACHETYPE from environment: unknown setting",),
            id="env-missing-underscore",
        ),
        pytest.param(
            {},
            {"colour": "blue"},
            ("setting colour from command line: unknown setting",),
            id="flag-unknown",
        ),
        pytest.param(
            {"EXTENSION_REGISTRY_": "x"},
            {},
            ("environment variable EXTENSION_REGISTRY_ names no setting",),
            id="empty-env-key",
        ),
    ],
)
def test_unknown_keys(
    environ: dict[str, str], overrides: dict[str, str], parts: tuple[str, ...]
) -> None:
    """An unknown setting from the environment or a flag is refused, naming it as written in
    its layer and the layer (the TOML cases are in the config corpus)."""
    tried("configuration", f"unknown key {sorted(environ) or sorted(overrides)}")
    message = config_error(
        environ={**environ, "EXTENSION_REGISTRY_DB_PASSWORD": SECRET}, **overrides
    )
    assert_has_all(message, *parts)


@pytest.mark.parametrize(
    ("variable", "value", "fragment"),
    [
        ("CIRCUIT_BREAKER_ENABLED", "maybe", "valid boolean"),
        ("HEALTH_BASED_ROUTING_ENABLED", "2", "valid boolean"),
        ("DB_POOL_SIZE", "1.5", "valid integer"),
        ("EXTENSION_MAX_RETRIES", "ten", "valid integer"),
        ("SYNC_INTERVAL_SECONDS", "fast", "valid number"),
        ("CIRCUIT_BREAKER_ERROR_RATE_THRESHOLD", "50%", "valid number"),
        ("SOURCE", "postgres", "'database', 'fixtures' or 'auto'"),
        ("CACHE_TYPE", "redis", "'ets', 'memory'"),
        ("CACHE_TYPE", "mnesia", "'mnesia' is not supported"),
        ("DB_ENABLED", "sometimes", "valid boolean"),
    ],
)
def test_wrong_types_from_the_environment(variable: str, value: str, fragment: str) -> None:
    """Environment text that does not parse as the key's type is refused, naming the variable
    and saying what was expected."""
    tried("configuration", f"{variable}={value}")
    message = config_error(
        environ={f"EXTENSION_REGISTRY_{variable}": value, "EXTENSION_REGISTRY_DB_PASSWORD": SECRET}
    )
    assert_has_all(message, f"setting EXTENSION_REGISTRY_{variable} from environment: ", fragment)


@pytest.mark.parametrize(
    "kind",
    [
        "missing",
        "dangling-symlink",
        "empty-path-in-env",
        "directory",
    ],
)
def test_config_path_that_is_not_a_file(tmp_path: Path, kind: str) -> None:
    """--config naming something that is not a readable file is a ConfigError naming the
    path; an empty EXTENSION_REGISTRY_CONFIG means no file."""
    tried("configuration", f"config path {kind}")
    if kind == "empty-path-in-env":
        assert "beamline" == Settings.load(environ={"EXTENSION_REGISTRY_CONFIG": ""}).db_name
        return
    path = tmp_path / "extreg.toml"
    if kind == "dangling-symlink":
        path.symlink_to(tmp_path / "nowhere.toml")
    elif kind == "directory":
        path.mkdir()
    message = config_error(config_file=path)
    assert_has_all(
        message,
        f"config file {path} ",
        {
            "missing": "does not exist",
            "dangling-symlink": "does not exist",
            "directory": "is a directory",
        }[kind],
    )


def test_mnesia_from_every_layer(tmp_path: Path) -> None:
    """cache_type=mnesia is refused from the TOML file, the environment and a flag, each time
    naming the key, its layer and what to use instead."""
    path = tmp_path / "m.toml"
    path.write_text("[extension_registry]\ncache_type = 'mnesia'\n", encoding="utf-8")
    for kwargs, shown in (
        ({"config_file": path}, f"setting cache_type from config file {path}: "),
        (
            {"environ": {"EXTENSION_REGISTRY_CACHE_TYPE": "mnesia"}},
            "setting EXTENSION_REGISTRY_CACHE_TYPE from environment: ",
        ),
        ({"cache_type": "mnesia"}, "setting cache_type from command line: "),
    ):
        tried("configuration", f"mnesia {shown.split()[1]}")
        assert_has_all(config_error(**kwargs), shown, "'mnesia' is not supported", "'ets'")


@pytest.mark.parametrize("key", list(CLI_CONFIG))
def test_cli_bad_configuration(cli: dict[str, Future[Result]], key: str) -> None:
    """`extreg` with a bad config file, variable or flag exits 2 with exactly one line,
    'error: ...', naming the key and where it came from, without a traceback or a password.
    A flag that click itself range-checks (serve --port) gives click's usage error instead,
    naming the flag and the allowed range."""
    tried("configuration", f"cli {key}")
    case = CLI_CONFIG[key]
    result = finished(cli, f"config:{key}")
    assert 2 == result.returncode, outcome(result)
    assert "Traceback" not in result.stderr, outcome(result)
    assert SECRET not in result.stdout + result.stderr, outcome(result)
    if case.usage:
        assert result.stderr.startswith(f"Usage: extreg {case.args[0]} "), outcome(result)
        assert_has_all(result.stderr, *case.parts)
        return
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert 1 == len(lines), outcome(result)
    assert lines[0].startswith("error: "), outcome(result)
    assert_has_all(lines[0], *case.parts)


def test_no_secret_in_any_config_corpus_message() -> None:
    """The planted password appears in no ConfigError of the whole config corpus, also with a
    password and a database host set in the environment next to the bad file."""
    refused = 0
    for path in sorted(CONFIG_CORPUS.iterdir()):
        for environ in (
            {},
            {"EXTENSION_REGISTRY_DB_PASSWORD": SECRET, "EXTENSION_REGISTRY_DB_HOST": "db.example"},
        ):
            try:
                Settings.load(config_file=path, environ=environ)
            except ConfigError as exc:
                refused += 1
                assert SECRET not in str(exc), (path.name, str(exc))
    assert refused > 0
