"""Small helpers shared by the tests (fixtures live in conftest.py)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from extreg.settings import Settings


def make_settings(tmp_path: Path, **values: Any) -> Settings:
    """Settings isolated from the environment, with data under `tmp_path`."""
    values.setdefault("data_dir", tmp_path / "data")
    values.setdefault("sync_interval_seconds", 60)
    return Settings.load(environ={}, **values)


def record(ext_id: str, **values: Any) -> dict[str, Any]:
    """A valid plain extension record with `values` overriding the defaults."""
    base = {"id": ext_id, "type": "pre", "subject": f"beamline.ext.pre.{ext_id}.v1",
            "timeout_ms": 100}
    return {**base, **values}
