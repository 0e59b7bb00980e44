"""Every code example in README.md and docs/*.md runs as written (issue 8), so the docs cannot
drift from the product again.

Each fenced block is handled by its tag:

- ```python: run as a script, in a working folder of the module's own;
- ```sh: run with bash (-e, pipefail) in that folder, `extreg` on PATH;
- ```toml: a settings file, which `Settings.load(config_file=...)` must accept;
- ```json: a sample document or shape, which must parse;
- ```text: output shown for reading, not run.

A block that cannot run here (a command that serves until Ctrl-C, the test suite itself, a
benchmark of minutes) is preceded by `<!-- docs-test: skip REASON -->`, and the reason is
required. An untagged fence, an unknown tag, an indented code block or a marker that precedes
no block fails the test, so a new example is either run or deliberately marked.

The folder is the embedded default, as a new user has it: nothing configured, `extreg serve
--demo` started there once for the whole module (its embedded PostgreSQL in `.extreg/`, shared
with every example's process through pgserver, and its NATS URL published where `Settings()`
finds it), stopped with Ctrl-C at the end.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from helpers import stop_process
from markdown_it import MarkdownIt

from extreg.local.natsserver import free_port
from extreg.settings import Settings

ROOT = Path(__file__).resolve().parent.parent
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
BIN = Path(sys.executable).parent
MARKER = re.compile(r"^<!--\s*docs-test:\s*(?P<kind>[\w-]+)(?P<reason>.*?)-->\s*$", re.S)
RUN = ("python", "sh")
CHECK = ("toml", "json")
READ = ("text",)
TAGS = RUN + CHECK + READ
EXAMPLE_TIMEOUT_S = 120


@dataclass(frozen=True)
class Block:
    """One code block of a document, with the marker that precedes it (if any)."""

    path: Path
    line: int
    kind: str  # "fence", "code_block" (indented) or "marker" (a marker before no block)
    info: str
    code: str
    marker: str | None = None
    reason: str = ""

    @property
    def where(self) -> str:
        return f"{self.path.relative_to(ROOT) if self.path.is_relative_to(ROOT) else self.path}:{self.line}"

    @property
    def tag(self) -> str:
        return self.info.split()[0] if self.info.split() else ""


def parse(path: Path, text: str) -> list[Block]:
    """The code blocks of one Markdown document, each with its preceding marker."""
    found: list[Block] = []
    pending: tuple[str, str, int] | None = None
    for token in MarkdownIt("commonmark").parse(text):
        line = token.map[0] + 1 if token.map else 0
        match = MARKER.match(token.content.strip()) if token.type == "html_block" else None
        if match:
            if pending is not None:
                found.append(Block(path, pending[2], "marker", "", "", pending[0], pending[1]))
            pending = (match["kind"], match["reason"].strip(), line)
            continue
        if token.type in ("fence", "code_block"):
            marker, reason = (pending[0], pending[1]) if pending else (None, "")
            found.append(
                Block(path, line, token.type, token.info.strip(), token.content, marker, reason)
            )
            pending = None
        elif pending is not None and token.nesting >= 0 and token.level == 0:
            found.append(Block(path, pending[2], "marker", "", "", pending[0], pending[1]))
            pending = None
    if pending is not None:
        found.append(Block(path, pending[2], "marker", "", "", pending[0], pending[1]))
    return found


def problem(block: Block) -> str | None:
    """Why this block can be neither run nor skipped, or None."""
    if block.kind == "marker":
        return f"a docs-test marker ({block.marker}) that precedes no code block"
    if block.marker is not None:
        if block.marker != "skip":
            return f"unknown docs-test marker {block.marker!r} (only 'skip REASON')"
        if not block.reason:
            return "a skip marker without a reason"
        return None
    if block.kind == "code_block":
        return "an indented code block: fence it and tag it (" + ", ".join(TAGS) + ")"
    if not block.tag:
        return "an untagged code block: tag it (" + ", ".join(TAGS) + ") or mark it skip"
    if block.tag not in TAGS:
        return f"unknown tag {block.tag!r}: use one of " + ", ".join(TAGS)
    return None


BLOCKS = [block for path in DOCS for block in parse(path, path.read_text(encoding="utf-8"))]


# -- the working folder --------------------------------------------------------------------


@dataclass
class Workspace:
    folder: Path
    env: dict[str, str]


def clean_env() -> dict[str, str]:
    """Nothing configured: no EXTENSION_REGISTRY_* and no EXTREG_URL/TOKEN; `extreg` on PATH."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith("EXTENSION_REGISTRY_") and k not in ("EXTREG_URL", "EXTREG_TOKEN")
    }
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
    env["COLUMNS"] = "200"
    return env


@pytest.fixture(scope="module")
def workspace() -> Iterator[Workspace]:
    """A fresh folder with `extreg serve --demo` running in it (a free port: 8080 may be
    taken on a shared machine), for every example of the module. Not under pytest's basetemp:
    pgserver (as root) opens the folder's parents to its own user, and a pytest session
    starting meanwhile would close `pytest-of-<user>` again under the server."""
    top = Path(tempfile.mkdtemp(prefix="extreg-docs-"))
    folder = top / "work"
    folder.mkdir()
    try:
        yield from serving_demo(folder, top)
    finally:
        shutil.rmtree(top, ignore_errors=True)


def serving_demo(folder: Path, top: Path) -> Iterator[Workspace]:
    env = clean_env()
    port = free_port()
    out, err = top / "serve.out", top / "serve.err"
    with out.open("w") as stdout, err.open("w") as stderr:
        proc = subprocess.Popen(
            [str(BIN / "extreg"), "serve", "--demo", "--port", str(port)],
            cwd=folder,
            env=env,
            stdout=stdout,
            stderr=stderr,
            text=True,
        )
    try:
        wait_for_demo(proc, out, err, f"http://127.0.0.1:{port}")
        yield Workspace(folder, env)
    finally:
        stop_process(proc)


def wait_for_demo(proc: subprocess.Popen[str], out: Path, err: Path, url: str) -> None:
    deadline = time.monotonic() + 90
    while True:
        try:
            if "demo NATS server:" in out.read_text() and (
                httpx.get(url + "/healthz", timeout=1).status_code == 200
            ):
                return
        except httpx.HTTPError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise AssertionError(f"extreg serve --demo did not start:\n{err.read_text()}")
        time.sleep(0.1)


def run_example(block: Block, ws: Workspace) -> subprocess.CompletedProcess[str]:
    if block.tag == "python":
        script = ws.folder / f"example_{block.path.stem}_{block.line}.py"
        script.write_text(block.code, encoding="utf-8")
        cmd = [sys.executable, str(script)]
    else:
        cmd = ["bash", "-e", "-o", "pipefail", "-c", block.code]
    return subprocess.run(
        cmd,
        cwd=ws.folder,
        env=ws.env,
        capture_output=True,
        text=True,
        timeout=EXAMPLE_TIMEOUT_S,
        check=False,
    )


# -- the tests -----------------------------------------------------------------------------


def test_the_docs_have_examples_of_every_runnable_kind() -> None:
    """The collection works: the docs hold Python and shell examples (none silently missed)."""
    tags = {b.tag for b in BLOCKS if b.marker is None}
    assert {"python", "sh"} <= tags, tags


@pytest.mark.parametrize("block", BLOCKS, ids=[b.where for b in BLOCKS])
def test_example(block: Block, request: pytest.FixtureRequest, tmp_path: Path) -> None:
    """Run (or check) one example as written; skip only what a marker says, with its reason."""
    reason = problem(block)
    assert reason is None, f"{block.where}: {reason}"
    if block.marker == "skip":
        pytest.skip(f"{block.where}: {block.reason}")
    if block.tag in READ:
        return
    if block.tag == "json":
        json.loads(block.code)
        return
    if block.tag == "toml":
        path = tmp_path / "settings.toml"
        path.write_text(block.code, encoding="utf-8")
        Settings.load(config_file=path, environ={})
        return
    ws: Workspace = request.getfixturevalue("workspace")
    result = run_example(block, ws)
    assert 0 == result.returncode, (
        f"{block.where} failed (exit {result.returncode}):\n{block.code}\n"
        f"stdout:\n{result.stdout}\nstderr:\n{result.stderr}"
    )


@pytest.mark.parametrize(
    ("markdown", "expected"),
    [
        ("```\nextreg list\n```\n", "untagged"),
        ("```bash-ish\nextreg list\n```\n", "unknown tag"),
        ("Text:\n\n    extreg list\n", "indented"),
        ("<!-- docs-test: skip -->\n```sh\nextreg serve\n```\n", "without a reason"),
        ("<!-- docs-test: skip serves forever -->\n\nSome text.\n", "precedes no code block"),
        (
            "<!-- docs-test: run-later why -->\n```sh\nextreg list\n```\n",
            "unknown docs-test marker",
        ),
        ("<!-- docs-test: skip serves until Ctrl-C -->\n```sh\nextreg serve\n```\n", None),
        ("```sh\nextreg list\n```\n", None),
    ],
    ids=[
        "untagged",
        "unknown-tag",
        "indented",
        "skip-without-reason",
        "orphan-marker",
        "unknown-marker",
        "skip-with-reason",
        "tagged",
    ],
)
def test_a_block_the_test_cannot_run_fails_it(markdown: str, expected: str | None) -> None:
    """A new untagged example (or a malformed marker) is reported, never silently ignored."""
    blocks = parse(ROOT / "new.md", markdown)
    reasons = [problem(b) for b in blocks]
    assert 1 == len(blocks), blocks
    if expected is None:
        assert [None] == reasons
    else:
        assert reasons[0] is not None and expected in reasons[0], reasons
