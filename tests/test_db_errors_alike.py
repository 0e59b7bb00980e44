"""One translator of PostgreSQL errors (`extreg.adapters.postgres.translate`): a database
without extreg's tables fails every database command alike, records and tokens included."""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from extreg.errors import SourceUnavailable
from extreg.tokens import TokenStore
from testsupport.pgprocess import PostgresProcess

EXTREG = Path(sys.executable).parent / "extreg"


def run(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("EXTENSION_REGISTRY_")}
    env["EXTENSION_REGISTRY_DATA_DIR"] = str(tmp_path / "data")
    env["COLUMNS"] = "400"
    return subprocess.run(
        [str(EXTREG), *args], capture_output=True, text=True, env=env, timeout=60, check=False
    )


def test_unmigrated_database_token_list_exits_like_list(
    pg_server: PostgresProcess, tmp_path: Path
) -> None:
    """`extreg token list` on a database without extreg tables exits with the status of
    `extreg --source database list` (1, the database is unusable), both saying to migrate."""
    url = pg_server.create_database(f"bare_{uuid.uuid4().hex[:12]}")
    records = run(tmp_path, "--database-url", url, "--source", "database", "list")
    tokens = run(tmp_path, "--database-url", url, "token", "list")
    assert (1, 1) == (records.returncode, tokens.returncode), (records.stderr, tokens.stderr)
    for result in (records, tokens):
        assert "run `extreg migrate`" in result.stderr
        assert "Traceback" not in result.stderr


async def test_token_store_raises_source_unavailable_without_tables(
    pg_server: PostgresProcess,
) -> None:
    """The token store's errors are the records' errors: `SourceUnavailable` naming the fix."""
    url = pg_server.create_database(f"bare_{uuid.uuid4().hex[:12]}")
    with pytest.raises(SourceUnavailable, match="has no extreg tables: run `extreg migrate`"):
        await TokenStore(url).list_tokens()
