"""Count the SQL statements a PostgreSQL server received for one database, from its log.

Why: "no database statement per invocation" has to be counted, not assumed, and counted at the
server, so nothing in the client (a pool, a driver, a background task) can hide one.
pg_stat_statements is not in the binaries the `pgserver` package ships, and pg_stat_database
counters reach the views only when a backend flushes them (up to seconds later), so this uses
the server's own statement log: `log_statement = 'all'` is set on the database (it applies to
sessions opened afterwards), and statements are counted between two marker statements.

    counter = StatementCounter(server.root / "log", url)   # before the code under test connects
    start = counter.mark()
    ...                                                   # the work to measure
    assert 0 == counter.count_since(start)

For test and benchmark servers (`testsupport.pgprocess.PostgresProcess`, whose log is
`root / "log"`); the role in `conninfo` must be allowed to `ALTER DATABASE`.
"""

from __future__ import annotations

import re
import uuid
from pathlib import Path

import psycopg

_STATEMENT = re.compile(r"LOG:\s+(statement|execute [^:]*):")


class StatementCounter:
    """Counts logged statements of the database in `conninfo` between markers."""

    def __init__(self, log_path: Path, conninfo: str) -> None:
        self.log_path = log_path
        self.conninfo = conninfo
        with psycopg.connect(conninfo, autocommit=True) as conn:
            dbname = conn.info.dbname
            conn.execute(f"ALTER DATABASE \"{dbname}\" SET log_statement = 'all'")

    def mark(self) -> str:
        """Log a unique marker statement and return it."""
        marker = f"extreg-mark-{uuid.uuid4().hex}"
        with psycopg.connect(self.conninfo, autocommit=True) as conn:
            conn.execute(f"SELECT '{marker}'")
        return marker

    def count_since(self, start: str) -> int:
        """Statements logged after marker `start` (a closing marker is logged and excluded)."""
        end = self.mark()
        lines = self.log_path.read_text(encoding="utf-8", errors="replace").splitlines()
        begin = next(i for i, line in enumerate(lines) if start in line)
        finish = next(i for i, line in enumerate(lines) if end in line)
        return sum(1 for line in lines[begin + 1 : finish] if _STATEMENT.search(line))
