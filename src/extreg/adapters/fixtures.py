"""Fixtures: a folder of JSON/YAML files, each one extension object or a list of them, and
routing policies the same way in its `policies/` subfolder.

Strict and all-or-nothing: every problem in every file is collected and reported together,
and a folder with any problem yields no records at all, so a bad edit never half-replaces the
cache. Each problem names the file, the record and the field. Policies are checked against the
folder's extensions (every id must name one of its stage's type).

Reading never blocks: a file is opened with O_NONBLOCK (so a FIFO or device opens at once
instead of waiting for a writer) and the *opened descriptor* must be a regular file before a
byte is read, so a FIFO renamed over a fixture between listing and opening is refused, not
waited on. Reads are bounded in size (`MAX_FILE_BYTES`); `read_fixtures`, the registry's entry
point, runs the whole load off the event loop with a time bound (`READ_TIMEOUT_S`).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import errno
import os
import stat
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import date, datetime
from pathlib import Path
from typing import Any, TypeVar

import yaml

from ..core import strictjson
from ..core.model import Extension, parse_extension
from ..core.policy import Policy, PolicyLimits, parse_policy, reference_problems
from ..errors import FixtureError, InvalidRecord, StrictJSONError, printable

SUFFIXES = (".json", ".yaml", ".yml")
POLICIES_FOLDER = "policies"  # beside the extension files
DEFAULT_POLICY_LIMITS = PolicyLimits()  # the settings' defaults
MAX_FILE_BYTES = 16 * 1024 * 1024  # a fixtures file is hand-written; beyond this it is a mistake
READ_TIMEOUT_S = 30.0  # a whole folder; only a stuck filesystem (NFS, FUSE) takes this long
_OPEN_FLAGS = os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC
NOT_REGULAR = "not a regular file (a device, FIFO or socket)"
DANGLING = "a symbolic link to nothing (dangling, or a loop)"
MAX_DEPTH = 64  # records are shallow; deeper nesting is a mistake or an attack

T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class FixtureSet:
    """What a fixtures folder holds: its extensions and its policies."""

    extensions: list[Extension]
    policies: list[Policy] = field(default_factory=list)


class _StrictYamlLoader(yaml.SafeLoader):
    """A safe loader that also refuses what JSON could not express or would hide: aliases
    (shared or self-referencing values, "billion laughs") and keys given twice."""

    def compose_node(self, parent: Any, index: Any) -> Any:
        if self.check_event(yaml.AliasEvent):
            event = self.peek_event()  # type: ignore[no-untyped-call]
            raise yaml.constructor.ConstructorError(
                None, None, "YAML aliases (*name) are not allowed in fixtures", event.start_mark
            )
        return super().compose_node(parent, index)

    def construct_mapping(self, node: Any, deep: bool = False) -> dict[Any, Any]:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"key {printable(str(key))} appears twice", key_node.start_mark
                )
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def fixture_files(folder: Path) -> list[Path]:
    """The fixture files of a folder (not recursive), sorted by name for a stable order."""
    if not folder.is_dir():
        raise FixtureError([f"{folder}: fixtures folder does not exist or is not a folder"])
    return sorted(p for p in folder.iterdir() if p.suffix.lower() in SUFFIXES)


async def read_fixtures(
    folder: Path,
    *,
    max_timeout_ms: int,
    max_retries: int,
    policy_limits: PolicyLimits = DEFAULT_POLICY_LIMITS,
    timeout_s: float = READ_TIMEOUT_S,
) -> FixtureSet:
    """`load_fixtures` for async callers: off the event loop, and `FixtureError` if it takes
    longer than `timeout_s`, so a stuck read can hold up neither the loop nor a shutdown."""
    try:
        return await _in_daemon_thread(
            lambda: load_fixtures(
                folder,
                max_timeout_ms=max_timeout_ms,
                max_retries=max_retries,
                policy_limits=policy_limits,
            ),
            timeout_s,
        )
    except TimeoutError:
        raise FixtureError(
            [
                f"{folder}: reading the fixtures took longer than {timeout_s:g} s (a stuck filesystem?)"
            ]
        ) from None


async def _in_daemon_thread(work: Callable[[], T], timeout_s: float) -> T:
    """`work()` in a daemon thread of its own, awaited for at most `timeout_s`. Not the default
    executor: a thread stuck in a system call cannot be stopped, and asyncio and the interpreter
    wait for executor threads on exit, while a daemon thread is simply left behind."""
    future: concurrent.futures.Future[T] = concurrent.futures.Future()

    def run() -> None:
        if not future.set_running_or_notify_cancel():  # given up on before it started
            return
        try:
            future.set_result(work())
        except BaseException as exc:  # handed to the awaiting task, which re-raises it
            future.set_exception(exc)

    threading.Thread(target=run, name="extreg-fixtures-read", daemon=True).start()
    return await asyncio.wait_for(asyncio.wrap_future(future), timeout_s)


def load_fixtures(
    folder: Path,
    *,
    max_timeout_ms: int,
    max_retries: int,
    policy_limits: PolicyLimits = DEFAULT_POLICY_LIMITS,
) -> FixtureSet:
    """Every extension and policy in `folder`, or `FixtureError` listing every problem found.
    Blocking, but never for long: see the module's docstring; async code calls `read_fixtures`."""
    problems: list[str] = []
    records: list[Extension] = []
    first_seen: dict[str, str] = {}
    for where, item in _items(fixture_files(folder), "extension", problems):
        try:
            ext = parse_extension(item, max_timeout_ms=max_timeout_ms, max_retries=max_retries)
        except InvalidRecord as exc:
            problems += _described(where, exc)
            continue
        if ext.id in first_seen:
            problems.append(
                f"{where} ({ext.id}): field id: duplicate id, first defined in {first_seen[ext.id]}"
            )
            continue
        first_seen[ext.id] = where
        records.append(ext)
    policies = _load_policies(folder / POLICIES_FOLDER, records, policy_limits, problems)
    if problems:
        raise FixtureError(problems)
    return FixtureSet(records, policies)


def _load_policies(
    folder: Path, extensions: list[Extension], limits: PolicyLimits, problems: list[str]
) -> list[Policy]:
    """The policies of the `policies/` subfolder (none when it does not exist), checked
    against the folder's extensions; problems are added to `problems`."""
    if not folder.is_dir():
        return []
    items = _items(fixture_files(folder), "policy", problems, f"{POLICIES_FOLDER}/")
    return _parse_policies(items, limits, problems, {e.id: e.type for e in extensions})


def load_policy_file(path: Path, *, policy_limits: PolicyLimits) -> list[Policy]:
    """The policies of one file (one object or a list), read and checked as strictly as a
    folder's `policies/` files, or `FixtureError` listing every problem with the file, the item
    and the field (`extreg policy apply`). References are the caller's to check."""
    try:
        items = _read_items(path, "policy")
    except _FileProblem as exc:
        raise FixtureError([f"{path}: {exc}"]) from None
    problems: list[str] = []
    policies = _parse_policies(
        ((f"{path} record #{index + 1}", item) for index, item in enumerate(items)),
        policy_limits,
        problems,
    )
    if problems:
        raise FixtureError(problems)
    return policies


def _parse_policies(
    items: Iterable[tuple[str, Any]],
    limits: PolicyLimits,
    problems: list[str],
    types: Mapping[str, str] | None = None,
) -> list[Policy]:
    """The policies of (where, item) pairs, each problem added to `problems` under its item's
    `where`, so a folder and a single file word them alike; with `types` (extension id ->
    type) their references are checked too. A policy_id met again is refused, naming where it
    was first."""
    policies: list[Policy] = []
    first_seen: dict[str, str] = {}
    for where, item in items:
        try:
            policy = parse_policy(item, limits=limits)
        except InvalidRecord as exc:
            problems += _described(where, exc)
            continue
        broken = [] if types is None else reference_problems(policy, types)
        if broken:
            problems += _described(where, InvalidRecord(policy.policy_id, broken, kind="policy"))
            continue
        if policy.policy_id in first_seen:
            problems.append(
                f"{where} ({policy.policy_id}): field policy_id: duplicate policy_id,"
                f" first defined in {first_seen[policy.policy_id]}"
            )
            continue
        first_seen[policy.policy_id] = where
        policies.append(policy)
    return policies


def _items(
    paths: list[Path], noun: str, problems: list[str], prefix: str = ""
) -> Iterator[tuple[str, Any]]:
    """(where, item) for every item of every readable file; file problems go to `problems`."""
    for path in paths:
        try:
            items = _read_items(path, noun)
        except _FileProblem as exc:
            problems.append(f"{prefix}{path.name}: {exc}")
            continue
        for index, item in enumerate(items):
            yield f"{prefix}{path.name} record #{index + 1}", item


def _described(where: str, exc: InvalidRecord) -> list[str]:
    return [
        f"{where} ({printable(exc.record)}): field {printable(field)}: {message}"
        for field, message in exc.problems
    ]


class _FileProblem(Exception):
    pass


def _read_items(path: Path, noun: str) -> list[Any]:
    raw = _read_bytes(path)
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise _FileProblem(f"not UTF-8 text (invalid byte at offset {exc.start})") from None
    if not text.strip():
        raise _FileProblem("file is empty")
    data = _parse_json(text) if path.suffix.lower() == ".json" else _parse_yaml(text)
    _check_plain(data, "", 0)
    if isinstance(data, dict):
        return [data]
    if isinstance(data, list) and data:
        return data
    if isinstance(data, list):
        raise _FileProblem("file holds an empty list")
    article = "an" if noun[0] in "aeiou" else "a"
    raise _FileProblem(f"expected {article} {noun} object or a list of them, got {_kind(data)}")


def _parse_json(text: str) -> Any:
    try:
        return strictjson.loads(text)
    except StrictJSONError as exc:
        raise _FileProblem(f"invalid JSON: {exc}") from None


def _parse_yaml(text: str) -> Any:
    try:
        return yaml.load(text, Loader=_StrictYamlLoader)
    except yaml.YAMLError as exc:
        raise _FileProblem("invalid YAML: " + _yaml_problem(exc)) from None
    except RecursionError:
        raise _FileProblem("invalid YAML: nested too deeply") from None


def _yaml_problem(exc: yaml.YAMLError) -> str:
    """What is wrong and where (line, column), without the file's text: PyYAML's own message
    quotes the offending line, which may hold a password."""
    if isinstance(exc, yaml.MarkedYAMLError):
        what = "; ".join(part for part in (exc.context, exc.problem) if part) or "syntax error"
        mark = exc.problem_mark or exc.context_mark
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark else ""
        return printable(" ".join(what.split()), 300) + where
    if isinstance(exc, yaml.reader.ReaderError):  # a character YAML does not allow
        return f"unacceptable character #x{exc.character:04x} (position {exc.position})"
    return type(exc).__name__


def _check_plain(value: Any, where: str, depth: int) -> None:
    """Only what JSON can hold (YAML timestamps aside), at most MAX_DEPTH levels deep."""
    if depth > MAX_DEPTH:
        raise _FileProblem(f"nested more than {MAX_DEPTH} levels deep at {where or 'top level'}")
    if isinstance(value, dict):
        for key, item in value.items():
            if not isinstance(key, str):
                raise _FileProblem(
                    f"key {printable(repr(key))} at {where or 'top level'} is not a string"
                )
            _check_plain(item, f"{where}.{printable(key)}" if where else printable(key), depth + 1)
    elif isinstance(value, list):
        for index, item in enumerate(value):
            _check_plain(item, f"{where}[{index}]", depth + 1)
    elif not isinstance(value, str | int | float | bool | datetime | date) and value is not None:
        raise _FileProblem(f"{type(value).__name__} value at {where or 'top level'} is not JSON")


def _read_bytes(path: Path) -> bytes:
    """The file's bytes, at most MAX_FILE_BYTES. What is checked is the descriptor opened, not
    the path, which can be replaced in between; O_NONBLOCK makes opening a FIFO return at once.
    Symbolic links are followed (mounted configuration is often a link to a regular file)."""
    try:
        fd = os.open(path, _OPEN_FLAGS)
    except OSError as exc:
        raise _FileProblem(_open_problem(path, exc)) from None
    try:
        mode = os.fstat(fd).st_mode
        if stat.S_ISDIR(mode):
            raise _FileProblem("a directory, not a file")
        if not stat.S_ISREG(mode):
            raise _FileProblem(NOT_REGULAR)
        with open(fd, "rb", closefd=False) as fh:
            raw = fh.read(MAX_FILE_BYTES + 1)
    except OSError as exc:
        raise _FileProblem(f"cannot read file: {exc.strerror or exc}") from None
    finally:
        os.close(fd)
    if len(raw) > MAX_FILE_BYTES:
        raise _FileProblem(f"file is larger than {MAX_FILE_BYTES // (1024 * 1024)} MiB")
    return raw


def _open_problem(path: Path, exc: OSError) -> str:
    if exc.errno == errno.ELOOP or (exc.errno == errno.ENOENT and path.is_symlink()):
        return DANGLING
    if exc.errno == errno.ENXIO:  # a socket, or a device with nothing behind it
        return NOT_REGULAR
    return f"cannot read file: {exc.strerror or exc}"


def _kind(value: object) -> str:
    return {str: "a string", int: "a number", float: "a number", bool: "a boolean"}.get(
        type(value), "nothing" if value is None else type(value).__name__
    )
