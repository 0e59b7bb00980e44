"""Small helpers shared by the tests (fixtures live in conftest.py)."""

from __future__ import annotations

import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from extreg.settings import Settings


def make_settings(tmp_path: Path, **values: Any) -> Settings:
    """Settings isolated from the environment, with data under `tmp_path`."""
    values.setdefault("data_dir", tmp_path / "data")
    values.setdefault("sync_interval_seconds", 60)
    return Settings.load(environ={}, **values)


def record(ext_id: str, **values: Any) -> dict[str, Any]:
    """A valid plain extension record with `values` overriding the defaults."""
    base = {
        "id": ext_id,
        "type": "pre",
        "subject": f"beamline.ext.pre.{ext_id}.v1",
        "timeout_ms": 100,
    }
    return {**base, **values}


class CaseCounter:
    """Counts the bad-input cases a corpus module tries, by area, and prints the total when
    the module ends (issue 5: "the suite prints how many cases it tried")."""

    def __init__(self, title: str, areas: list[str], unit: str) -> None:
        self.title = title
        self.unit = unit
        self.cases: dict[str, set[str]] = {area: set() for area in areas}
        self.checks = 0

    def tried(self, area: str, case: str) -> None:
        self.cases[area].add(case)
        self.checks += 1

    def summary(self) -> str:
        total = sum(len(v) for v in self.cases.values())
        parts = ", ".join(f"{len(v)} {k}" for k, v in self.cases.items())
        return f"{self.title}: {total} cases tried ({parts}; {self.checks} {self.unit})"

    def fixture(self) -> Any:
        """A module-scoped autouse fixture printing the summary past pytest's capture."""

        @pytest.fixture(scope="module", autouse=True)
        def _print_case_count(request: pytest.FixtureRequest) -> Iterator[None]:
            yield
            capman = request.config.pluginmanager.getplugin("capturemanager")
            if capman is None:
                print(self.summary())
                return
            with capman.global_and_fixture_disabled():
                print(f"\n{self.summary()}")

        return _print_case_count


def stop_process(proc: subprocess.Popen[Any], timeout: float = 30) -> None:
    """Ctrl-C a server started by a test, killing it if it does not stop within `timeout`
    (for `finally` blocks: it never raises, so the test's own failure stays the one shown)."""
    proc.send_signal(signal.SIGINT)
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
