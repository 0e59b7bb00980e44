"""`extreg --help` and docs/usage.md describe the same command line: every parameter of every
command has help text and a name for its value (ID, JSON, URL...), never the Python type
typer would print (`<bool>`, `<str>`), and the synopsis in docs/usage.md lists exactly the
options each command has. In process: nothing here touches a database or NATS."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import typer
from typer.core import TyperArgument, TyperGroup, TyperOption
from typer.testing import CliRunner

from extreg.cli import app

ROOT = Path(__file__).resolve().parents[1]
USAGE = ROOT / "docs" / "usage.md"
PYTHON_TYPES = re.compile(r"<(bool|str|int|float|path|file|dir|text)>")
OPTION = re.compile(r"(?<![\w-])(--?[a-z][a-z-]*)")

Path_ = tuple[str, ...]  # the words that name a command: ("policy", "run")


def commands() -> Iterator[tuple[Path_, Any]]:
    """Every command and group of the app, with the words that name it (root: ())."""

    def walk(path: Path_, command: Any) -> Iterator[tuple[Path_, Any]]:
        yield path, command
        for name, sub in getattr(command, "commands", {}).items():
            yield from walk((*path, name), sub)

    yield from walk((), typer.main.get_command(app))


def options_of(command: Any) -> set[str]:
    """Every option name of a command (`-v` and `--verbose` both), `--help` left out."""
    return {
        name
        for p in command.params
        if isinstance(p, TyperOption)
        for name in (*p.opts, *p.secondary_opts)
    }


def documented() -> dict[Path_, set[str]]:
    """The options of each command in the synopsis (the `text` block of docs/usage.md's
    "Command line" section), by the words that name the command."""
    section = USAGE.read_text(encoding="utf-8").split("\n## Command line\n", 1)[1]
    section = section.split("\n## ", 1)[0]
    block = section.split("```text\n", 1)[1].split("```", 1)[0]
    names = {path for path, _ in commands()}
    found: dict[Path_, set[str]] = {}
    for line in block.splitlines():
        words = line.split()
        assert "extreg" == words[0], line
        path: Path_ = ()
        for word in words[1:]:
            if (*path, word) not in names:
                break
            path = (*path, word)
        assert path not in found, f"{path} listed twice"
        found[path] = set(OPTION.findall(line))
    return found


@pytest.mark.parametrize(
    ("path", "command"), list(commands()), ids=lambda v: " ".join(v) if isinstance(v, tuple) else ""
)
def test_every_parameter_has_help_and_a_value_name(
    path: Path_, command: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each argument and option says what it is; an option that takes a value and every
    argument name it in capitals (a metavar), and the rendered help shows no Python type."""
    # In this process the CLI's global callback would point the logs at CliRunner's stderr,
    # which is closed once it returns: every later test's log line would then fail.
    monkeypatch.setattr("extreg.logs.configure", lambda *args, **kwargs: None)
    problems = []
    for p in command.params:
        if not (p.help or "").strip():
            problems.append(f"{p.name}: no help")
        takes_value = isinstance(p, TyperArgument) or not (p.is_flag or p.count)
        if takes_value and not (p.metavar and p.metavar == p.metavar.upper()):
            problems.append(f"{p.name}: metavar {p.metavar!r}, not a name in capitals")
    rendered = CliRunner().invoke(app, [*path, "--help"], env={"COLUMNS": "200"})
    assert 0 == rendered.exit_code, rendered.output
    problems += [f"help shows {m.group(0)}" for m in PYTHON_TYPES.finditer(rendered.output)]
    assert [] == problems, rendered.output


def test_the_usage_synopsis_lists_every_option_of_every_command() -> None:
    """docs/usage.md's synopsis names each command once, with exactly its options: none
    missing from the docs, none the command line does not have."""
    listed = documented()
    actual = {path: options_of(c) for path, c in commands() if not isinstance(c, TyperGroup)}
    actual[()] = options_of(typer.main.get_command(app))
    assert actual == {path: listed.get(path) for path in actual}
    assert set(actual) == set(listed)


def test_every_option_the_section_mentions_exists() -> None:
    """A long option named in the prose and table of the "Command line" section (its code
    spans, fenced examples aside) is an option of some command, or --help."""
    section = USAGE.read_text(encoding="utf-8").split("\n## Command line\n", 1)[1]
    prose = re.sub(r"```.*?```", "", section.split("\n## ", 1)[0], flags=re.S)
    known = {"--help"}.union(*(options_of(c) for _, c in commands()))
    mentioned = set(re.findall(r"--[a-z][a-z-]*", " ".join(re.findall(r"`([^`]*)`", prose))))
    assert set() == mentioned - known
