"""Fixtures: a folder of JSON/YAML files, each one extension object or a list of them.

Strict and all-or-nothing: every problem in every file is collected and reported together,
and a folder with any problem yields no records at all, so a bad edit never half-replaces the
cache. Each problem names the file, the record and the field.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import msgspec
import yaml

from ..errors import FixtureError, InvalidRecord
from ..model import Extension, parse_extension

SUFFIXES = (".json", ".yaml", ".yml")
MAX_FILE_BYTES = 16 * 1024 * 1024  # a fixtures file is hand-written; beyond this it is a mistake

_YamlLoader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


def fixture_files(folder: Path) -> list[Path]:
    """The fixture files of a folder (not recursive), sorted by name for a stable order."""
    if not folder.is_dir():
        raise FixtureError([f"{folder}: fixtures folder does not exist or is not a folder"])
    return sorted(p for p in folder.iterdir() if p.suffix.lower() in SUFFIXES)


def load_fixtures(folder: Path, *, max_timeout_ms: int, max_retries: int) -> list[Extension]:
    """Every extension in `folder`, or `FixtureError` listing every problem found."""
    problems: list[str] = []
    records: list[Extension] = []
    first_seen: dict[str, str] = {}
    for path in fixture_files(folder):
        try:
            items = _read_items(path)
        except _FileProblem as exc:
            problems.append(f"{path.name}: {exc}")
            continue
        for index, item in enumerate(items):
            where = f"{path.name} record #{index + 1}"
            try:
                ext = parse_extension(item, max_timeout_ms=max_timeout_ms, max_retries=max_retries)
            except InvalidRecord as exc:
                problems += [
                    f"{where} ({exc.record}): field {field}: {message}"
                    for field, message in exc.problems
                ]
                continue
            if ext.id in first_seen:
                problems.append(
                    f"{where} ({ext.id}): field id: duplicate id, first defined in {first_seen[ext.id]}"
                )
                continue
            first_seen[ext.id] = where
            records.append(ext)
    if problems:
        raise FixtureError(problems)
    return records


class _FileProblem(Exception):
    pass


def _read_items(path: Path) -> list[Any]:
    try:
        if path.stat().st_size > MAX_FILE_BYTES:
            raise _FileProblem(f"file is larger than {MAX_FILE_BYTES // (1024 * 1024)} MiB")
        raw = path.read_bytes()
    except OSError as exc:
        raise _FileProblem(f"cannot read file: {exc.strerror or exc}") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise _FileProblem(f"not UTF-8 text (invalid byte at offset {exc.start})") from None
    if not text.strip():
        raise _FileProblem("file is empty")
    data = _parse_json(text) if path.suffix.lower() == ".json" else _parse_yaml(text)
    if isinstance(data, dict):
        return [data]
    if isinstance(data, list) and data:
        return data
    if isinstance(data, list):
        raise _FileProblem("file holds an empty list")
    raise _FileProblem(f"expected an extension object or a list of them, got {_kind(data)}")


def _parse_json(text: str) -> Any:
    try:
        return msgspec.json.decode(text)
    except msgspec.DecodeError as exc:
        raise _FileProblem(f"invalid JSON: {exc}") from None


def _parse_yaml(text: str) -> Any:
    try:
        return yaml.load(text, Loader=_YamlLoader)  # noqa: S506 - a safe loader
    except yaml.YAMLError as exc:
        raise _FileProblem(f"invalid YAML: {exc}".replace("\n", " ")) from None
    except RecursionError:
        raise _FileProblem("invalid YAML: nested too deeply") from None


def _kind(value: object) -> str:
    return {str: "a string", int: "a number", float: "a number", bool: "a boolean"}.get(
        type(value), "nothing" if value is None else type(value).__name__
    )
