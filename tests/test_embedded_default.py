"""The front door (SPEC.md "Configuration", issue 8): with nothing configured, the Python API
and the CLI in one folder use the same embedded database that `extreg serve` keeps there."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from extreg.registry import Registry
from extreg.settings import Settings

EXTREG = Path(sys.executable).parent / "extreg"


def clean_env(**extra: str) -> dict[str, str]:
    """The process environment without any EXTENSION_REGISTRY_* variable: nothing configured."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("EXTENSION_REGISTRY_")}
    env["COLUMNS"] = "400"
    return {**env, **extra}


def extreg(cwd: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(EXTREG), *args], cwd=cwd, env=clean_env(), capture_output=True,
                          text=True, timeout=120, check=False)


@pytest.fixture
def folder(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[Path]:
    """A fresh working folder with nothing configured, as a new user has it."""
    for name in list(os.environ):
        if name.startswith("EXTENSION_REGISTRY_"):
            monkeypatch.delenv(name)
    monkeypatch.chdir(tmp_path)
    yield tmp_path


# -- one database for the Python API and the CLI -------------------------------------------


async def test_python_api_and_cli_use_the_same_embedded_database(folder: Path) -> None:
    """`Registry.open(Settings())` with nothing configured serves the embedded database in
    data_dir (it used to serve fixtures), holding the samples; `extreg status` in the same
    folder names the same database, and a change made with the CLI reaches the script's cache."""
    async with Registry.open(Settings()) as reg:
        status = reg.status
        assert ("auto", "database", None) == (status.mode, status.source, status.fallback_reason)
        assert {"normalize_text", "pii_guard", "mask_pii", "test_provider"} <= {
            e.id for e in reg.all()}
        cli = await asyncio.to_thread(extreg, folder, "status", "--json")
        assert 0 == cli.returncode, cli.stderr
        assert (status.database, "database") == (
            json.loads(cli.stdout)["database"], json.loads(cli.stdout)["source"])
        disabled = await asyncio.to_thread(extreg, folder, "disable", "pii_guard")
        assert 0 == disabled.returncode, disabled.stderr
        deadline = time.monotonic() + 30
        while reg.get("pii_guard") is None or reg.get("pii_guard").enabled:  # type: ignore[union-attr]
            assert time.monotonic() < deadline, "the CLI's change never reached the script"
            await asyncio.sleep(0.05)
