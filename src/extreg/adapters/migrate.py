"""Apply the plain-SQL migrations in `migrations/`, each once, in file-name order.

All of it runs in one transaction behind an advisory lock: a second `extreg migrate` started
at the same time waits, then finds nothing left to do; a failing file leaves no trace.
A dozen lines of our own instead of a migration framework, because the files are plain SQL
and the only state is a table of applied names.
"""

from __future__ import annotations

from importlib.resources import files

import psycopg

from .postgres import translate_for

LOCK_KEY = 0x65787472  # "extr": the advisory lock every migrating process takes


def migration_files() -> list[tuple[str, str]]:
    """(name, SQL) of every bundled migration, in order."""
    folder = files("extreg.adapters") / "migrations"
    paths = sorted((p for p in folder.iterdir() if p.name.endswith(".sql")), key=lambda p: p.name)
    return [(p.name, p.read_text(encoding="utf-8")) for p in paths]


def migrate(conninfo: str) -> list[str]:
    """Apply what is missing; return the names applied now (empty when up to date).
    psycopg's errors become ours in the adapter's one translator."""
    with translate_for(conninfo):
        return _migrate(conninfo)


def _migrate(conninfo: str) -> list[str]:
    applied_now = []
    with psycopg.connect(conninfo, autocommit=False, connect_timeout=5) as conn:
        conn.execute("SELECT pg_advisory_xact_lock(%s)", (LOCK_KEY,))
        conn.execute(
            "CREATE TABLE IF NOT EXISTS extreg_schema_migrations ("
            " name text PRIMARY KEY, applied_at timestamptz NOT NULL DEFAULT now())"
        )
        done = {row[0] for row in conn.execute("SELECT name FROM extreg_schema_migrations")}
        for name, sql in migration_files():
            if name in done:
                continue
            conn.execute(sql.encode())
            conn.execute("INSERT INTO extreg_schema_migrations (name) VALUES (%s)", (name,))
            applied_now.append(name)
        conn.commit()
    return applied_now
