"""One error tree: every exception extreg raises on purpose is a class of `extreg.errors`,
under `ExtregError`, drawn in the module's diagram, listed in the docs' "Errors" section, and
rebuilt by name by the API client. The source is scanned (AST) so a new `raise` of a class
outside the tree fails here unless it is allowed below, with the reason it is safe."""

from __future__ import annotations

import ast
import importlib
import inspect
import re
import typing
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from starlette.exceptions import HTTPException

import extreg
from extreg import errors
from extreg.api.errors import body_of, status_of
from extreg.client import ApiClient
from extreg.errors import (
    ExtensionError,
    ExtregError,
    FixtureError,
    InvalidRecord,
    ValidatorBlocked,
)
from extreg.registry import Registry
from extreg.settings import Settings
from testsupport.pgprocess import free_port

SRC = Path(extreg.__file__).parent
DOCS = SRC.parents[1] / "docs"

# Modules that are test harnesses, not the product: they may raise what suits a test.
HARNESSES = {
    "testsupport.cluster": "multi-node test harness; its ClusterError and ValueError reach test code only",
    "testsupport.pgprocess": "throwaway PostgreSQL for tests and benchmarks, never used by a command",
}

# Exception classes defined outside extreg.errors, and why each never reaches a user.
ALLOWED_CLASSES = {
    (
        "extreg.adapters.fixtures",
        "_FileProblem",
    ): "private signal of one file's problem, always caught in load_fixtures and reported "
    "inside FixtureError with the file's name",
    (
        "extreg.adapters.postgres",
        "LockTaken",
    ): "signal of `listen(lock=True)`, always caught in Registry._follow_feed: another node"
    " publishes the change feed",
}

# Inside the HTTP API, an HTTPException (raised, or returned by a helper and raised) is an
# answer with its status, rendered by FastAPI; it never reaches a caller of the Python API.
HTTP_PACKAGE = "extreg.api."

# `raise EXPR` outside the tree, by (module, the class raised or else EXPR as written), and
# why each is safe.
ALLOWED_RAISES = {
    ("extreg", "AttributeError"): "module __getattr__ protocol (lazy `extreg.Invoker`)",
    ("extreg.client", "self._error"): "returns an ExtregError rebuilt from the answer",
    ("extreg.adapters.nats_feed", "self.unavailable"): "returns a SourceUnavailable",
    ("extreg.adapters.nats_feed", "error"): "zlib.error of _inflate, caught with zlib's own",
    ("extreg.adapters.postgres", "LockTaken"): "see ALLOWED_CLASSES",
    (
        "extreg.api.connections",
        "TypeError",
    ): "programming-error guard: the protocol is only built by GuardedConfig's own server",
    ("extreg.cli", "Exit"): "typer.Exit: click's way to end a command with an exit status",
    ("extreg.invoke.invoker", "first"): "re-raises the ExtensionTimeout caught above",
    ("extreg.local.natsserver", "AssertionError"): "marks unreachable code after a loop",
    (
        "extreg.core.breaker",
        "ValueError",
    ): "argument check of BreakerConfig, built from Settings that validated the same values",
    (
        "extreg.core.health",
        "ValueError",
    ): "invariant guards and sketch parsing; sources.health catches and logs the parse error",
    (
        "extreg.local.samples.flaky",
        "TypeError",
    ): "control request check, answered as an error reply",
    (
        "extreg.local.samples.flaky",
        "ValueError",
    ): "control request check, answered as an error reply",
    (
        "extreg.settings",
        "ValueError",
    ): "pydantic validators: pydantic wraps it, Settings reports ConfigError",
    ("extreg.adapters.fixtures", "_FileProblem"): "see ALLOWED_CLASSES",
    (
        "extreg.adapters.fixtures",
        "ConstructorError",
    ): "raised inside the YAML loader; _parse_yaml turns every YAMLError into a file problem",
    (
        "extreg.adapters.postgres_health",
        "ValueError",
    ): "invariant guard (a sealed batch cannot grow)",
    (
        "extreg.adapters.postgres",
        "ValueError",
    ): "invariant guard: a write's change function returned a record of another id (a bug)",
}


def tree() -> list[type[BaseException]]:
    """Every exception class of `extreg.errors`, in definition order."""
    return [
        v
        for v in vars(errors).values()
        if isinstance(v, type) and issubclass(v, BaseException) and v.__module__ == errors.__name__
    ]


def modules() -> Iterator[tuple[str, ast.Module]]:
    """(dotted name, AST) of every product module except errors.py and the harnesses."""
    for path in sorted(SRC.rglob("*.py")):
        parts = path.relative_to(SRC.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        if name != errors.__name__ and name not in HARNESSES:
            yield name, ast.parse(path.read_text(), str(path))


def resolve(module: Any, expr: ast.expr) -> object:
    """What a `Name` or dotted `Attribute` means at the module's top level, or None."""
    if isinstance(expr, ast.Name):
        return vars(module).get(expr.id)
    if isinstance(expr, ast.Attribute):
        owner = resolve(module, expr.value)
        return getattr(owner, expr.attr, None) if owner is not None else None
    return None


def raised_class(value: object) -> object:
    """The class `raise value(...)` raises: `value` itself, or what the function returns."""
    if inspect.isfunction(value):
        return typing.get_type_hints(value).get("return")
    return value


def allowed(module: str, raised: object) -> bool:
    """In the tree, or an HTTPException inside the HTTP API."""
    if isinstance(raised, type) and issubclass(raised, ExtregError):
        return raised.__module__ == errors.__name__
    return (
        module.startswith(HTTP_PACKAGE)
        and isinstance(raised, type)
        and issubclass(raised, HTTPException)
    )


def test_every_class_of_the_errors_module_derives_from_extreg_error() -> None:
    """Nothing in extreg.errors escapes the tree's base."""
    outside = [cls.__name__ for cls in tree() if not issubclass(cls, ExtregError)]
    assert [] == outside
    assert len(tree()) > 20


def test_the_diagram_draws_every_class_under_its_parent() -> None:
    """The docstring's diagram names every class once, indented under its first base."""
    assert errors.__doc__ is not None
    drawn: dict[str, str] = {}
    stack: list[tuple[int, str]] = []
    for line in errors.__doc__.splitlines():
        match = re.match(r"^(    [│ ]*(?:[├└]── )?)([A-Z]\w+)", line)
        if not match:
            continue
        depth = len(match.group(1))
        while stack and stack[-1][0] >= depth:
            stack.pop()
        drawn[match.group(2)] = stack[-1][1] if stack else "Exception"
        stack.append((depth, match.group(2)))
    expected = {cls.__name__: cls.__bases__[0].__name__ for cls in tree()}
    assert expected == drawn


def test_every_class_is_listed_in_the_docs() -> None:
    """docs/usage.md's "Errors" section has one table row per class, with its parent."""
    text = (DOCS / "usage.md").read_text()
    section = text.split("\n## Errors\n", 1)[1].split("\n## ", 1)[0]
    rows = dict(re.findall(r"^\| `(\w+)` \| `(\w+)`", section, re.MULTILINE))
    expected = {cls.__name__: cls.__bases__[0].__name__ for cls in tree()}
    assert expected == rows


def test_no_exception_class_is_defined_outside_the_tree() -> None:
    """An exception class defined anywhere else in src/extreg fails, unless allowed."""
    found = set()
    for name, module_ast in modules():
        module = importlib.import_module(name)
        for node in ast.walk(module_ast):
            if isinstance(node, ast.ClassDef):
                value = vars(module).get(node.name)
                if isinstance(value, type) and issubclass(value, BaseException):
                    found.add((name, node.name))
    assert set(ALLOWED_CLASSES) == found


def test_every_raised_class_is_in_the_tree() -> None:
    """Every `raise X` / `raise X(...)` names a class of the tree, or an allowed case; an
    allowed case no longer in the source fails too, so the list stays true."""
    outside = set()
    for name, module_ast in modules():
        module = importlib.import_module(name)
        for node in ast.walk(module_ast):
            if isinstance(node, ast.Raise) and node.exc is not None:
                expr = node.exc.func if isinstance(node.exc, ast.Call) else node.exc
                raised = raised_class(resolve(module, expr))
                if not allowed(name, raised):
                    shown = raised.__name__ if isinstance(raised, type) else ast.unparse(expr)
                    outside.add((name, shown))
    assert set(ALLOWED_RAISES) == outside


async def test_invoker_open_against_a_dead_nats_raises_a_documented_class(tmp_path: Path) -> None:
    """`Invoker.open` with nothing listening on the NATS port raises NatsUnavailable, a class
    of the tree listed in the docs, naming the URL."""
    from extreg import Invoker

    url = f"nats://127.0.0.1:{free_port()}"
    settings = Settings(source="fixtures", fixtures_dir=tmp_path, nats_url=url)
    async with Registry.open(settings) as registry:
        with pytest.raises(ExtregError) as caught:
            async with Invoker.open(registry, settings):
                pass
    assert errors.NatsUnavailable is type(caught.value)
    assert url in str(caught.value)


def sample(cls: type[ExtregError]) -> ExtregError:
    """One instance of `cls`, built the way extreg builds it."""
    if issubclass(cls, ExtensionError):
        return cls("ext-1", "why it failed", 2)
    if issubclass(cls, InvalidRecord):
        return cls("ext-1", [("id", "must not be empty"), ("retry", "must be at least 0")])
    if issubclass(cls, FixtureError):
        return cls(["a.json: file is empty", "b.yaml record #1 (x): field id: duplicate id"])
    if issubclass(cls, ValidatorBlocked):
        return cls("support_en", "pii_guard", "pii_detected", {"found": "card"})
    return cls(f"{cls.__name__} happened")


@pytest.mark.parametrize("cls", tree(), ids=lambda cls: cls.__name__)
def test_the_client_rebuilds_each_class_by_name(cls: type[ExtregError]) -> None:
    """The answer the API sends for an error (its `body_of` and `status_of`) comes back out
    of the CLI's client as the same class with the same message and attributes."""
    sent = sample(cls)

    def answer(request: httpx.Request) -> httpx.Response:
        return httpx.Response(status_of(sent), json=body_of(sent))

    with (
        ApiClient("http://extreg.invalid", "t", transport=httpx.MockTransport(answer)) as client,
        pytest.raises(ExtregError) as caught,
    ):
        client.set_enabled("ext-1", False)
    got = caught.value
    assert (cls, str(sent)) == (type(got), str(got))
    for attribute in (
        "extension_id",
        "reason",
        "attempts",
        "record",
        "problems",
        "policy_id",
        "details",
    ):
        assert getattr(sent, attribute, None) == getattr(got, attribute, None)


def test_the_client_falls_back_to_api_error_for_an_unknown_name() -> None:
    """A name that is not a class of the tree (or not an error at all) is an ApiError."""
    for name in ("NoSuchError", "printable", "Exception"):

        def answer(request: httpx.Request, name: str = name) -> httpx.Response:
            return httpx.Response(500, json={"detail": "boom", "error": name})

        with (
            ApiClient(
                "http://extreg.invalid", "t", transport=httpx.MockTransport(answer)
            ) as client,
            pytest.raises(errors.ApiError, match="500: boom"),
        ):
            client.reload()
