"""Fixtures folders (SPEC.md, "Fixtures"): JSON and YAML, one object or a list per file, strict,
all-or-nothing, every problem naming the file, the record and the field."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from extreg.errors import FixtureError
from extreg.model import Extension, parse_extension
from extreg.sources.fixtures import load_fixtures
from helpers import record

SUBJECT_RULE = (
    "must be a NATS subject: dot-separated non-empty tokens, at most 512 characters, "
    "no whitespace and no wildcards (* or >)"
)


def load(folder: Path) -> list[Extension]:
    return load_fixtures(folder, max_timeout_ms=60_000, max_retries=10)


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
    write(tmp_path, "1-single.yaml", """
id: yaml_one
type: post
subject: beamline.ext.post.yaml_one.v1
timeout_ms: 150
config: {mode: strict}
metadata:
  description: one object
""")
    write(tmp_path, "2-list.yml", """
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
""")
    expected = [
        parsed({"id": "yaml_one", "type": "post", "subject": "beamline.ext.post.yaml_one.v1",
                "timeout_ms": 150, "config": {"mode": "strict"},
                "metadata": {"description": "one object"}}),
        parsed({"id": "yaml_two", "type": "provider", "subject": "beamline.provider.yaml_two.v1",
                "retry": 2, "enabled": False,
                "versions": [{"version": "v2", "subject": "beamline.provider.yaml_two.v2",
                              "routing_rules": {"tenant_id": ["acme", "beta"]}}],
                "instances": [{"instance_id": "i1", "subject": "beamline.provider.yaml_two.i1",
                               "weight": 25, "health_status": "healthy"}]}),
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
        tmp_path)


def test_unknown_field_names_file_record_and_field(tmp_path: Path) -> None:
    """An unknown field in the second record of a YAML list names that record and field."""
    write(tmp_path, "list.yaml", "- {id: a, type: pre, subject: a.b}\n"
                                 "- {id: b, type: pre, subject: a.c, colour: blue}\n")
    assert ["list.yaml record #2 (b): field colour: unknown field"] == problems_of(tmp_path)


def test_bad_nested_field_names_its_path(tmp_path: Path) -> None:
    """A wildcard in a version's subject names versions[0].subject and explains the rule."""
    write(tmp_path, "ext.json", as_json(record("ext1", versions=[
        {"version": "v2", "subject": "a.*"}])))
    assert [f"ext.json record #1 (ext1): field versions[0].subject: {SUBJECT_RULE}"] == problems_of(
        tmp_path)


def test_limit_problem_names_the_limit(tmp_path: Path) -> None:
    """timeout_ms above the configured maximum is reported with the limit."""
    write(tmp_path, "ext.json", as_json(record("ext1", timeout_ms=60_001)))
    assert ["ext.json record #1 (ext1): field timeout_ms: "
            "60001 exceeds extension_max_timeout_ms 60000"] == problems_of(tmp_path)


def test_duplicate_id_across_two_files_names_both(tmp_path: Path) -> None:
    """The same id in two files is an error on the second naming where the first was."""
    write(tmp_path, "a.json", as_json(record("twice")))
    write(tmp_path, "b.yaml", "id: twice\ntype: post\nsubject: x.y\n")
    assert ["b.yaml record #1 (twice): field id: duplicate id, first defined in a.json record #1"
            ] == problems_of(tmp_path)


def test_duplicate_id_within_one_list(tmp_path: Path) -> None:
    """The same id twice in one list is an error on the later record."""
    write(tmp_path, "list.json", as_json([record("x"), record("y"), record("x")]))
    assert ["list.json record #3 (x): field id: duplicate id, first defined in list.json record #1"
            ] == problems_of(tmp_path)


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("empty.json", "", "file is empty"),
        ("blank.yaml", "  \n\n", "file is empty"),
        ("empty-list.json", "[]", "file holds an empty list"),
        ("empty-list.yaml", "[]\n", "file holds an empty list"),
        ("string.json", '"hello"', "expected an extension object or a list of them, got a string"),
        ("string.yaml", "just some words\n",
         "expected an extension object or a list of them, got a string"),
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
    assert ["list.json record #2 (<record without id>): field record: "
            "Expected a JSON object, got `str`"] == problems_of(tmp_path)


# -- all or nothing, everything reported ----------------------------------------------------


def test_one_bad_file_among_good_ones_fails_the_whole_folder(tmp_path: Path) -> None:
    """All-or-nothing: good files do not load when one file is bad; only the bad one is named."""
    write(tmp_path, "a.json", as_json(record("a")))
    write(tmp_path, "b.json", as_json([record("b1"), record("b2", type="bogus")]))
    write(tmp_path, "c.yaml", "id: c\ntype: pre\nsubject: c.d\n")
    assert ["b.json record #2 (b2): field type: Invalid enum value 'bogus'"] == problems_of(tmp_path)


def test_problems_from_several_files_are_reported_together(tmp_path: Path) -> None:
    """Every problem of every file is listed, in file order, in one FixtureError."""
    write(tmp_path, "1.json", "{not json")
    write(tmp_path, "2.json", as_json([record("r1", retry=-1), record("r2"),
                                       record("r3", subject="a b")]))
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
