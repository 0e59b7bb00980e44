"""The sample records are written once (`extreg.local.samples.extensions`): the bundled
fixtures file, the default `fixtures_dir` and the embedded database's first records, is
generated from them."""

from __future__ import annotations

from extreg.adapters.fixtures import load_fixtures
from extreg.core.model import parse_extension
from extreg.local.samples.extensions import (
    BUNDLED_FIXTURES_FILE,
    BUNDLED_IDS,
    SAMPLES_BY_ID,
    bundled_fixtures_text,
)
from extreg.settings import BUNDLED_FIXTURES


def test_bundled_fixtures_file_is_generated_from_the_samples() -> None:
    """The file in the package is exactly what the samples' records render to; after a
    change to them, run `write_bundled_fixtures()` (see its docstring)."""
    assert bundled_fixtures_text() == BUNDLED_FIXTURES_FILE.read_text(encoding="utf-8")


def test_default_fixtures_dir_serves_the_sample_records() -> None:
    """The default fixtures folder loads as the four reference samples' records."""
    assert BUNDLED_FIXTURES == BUNDLED_FIXTURES_FILE.parent
    loaded = load_fixtures(BUNDLED_FIXTURES, max_timeout_ms=60_000, max_retries=10).extensions
    expected = [
        parse_extension(SAMPLES_BY_ID[i].record(), max_timeout_ms=60_000, max_retries=10)
        for i in BUNDLED_IDS
    ]
    assert sorted(expected, key=lambda e: e.id) == sorted(loaded, key=lambda e: e.id)
