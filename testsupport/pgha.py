"""A PostgreSQL primary and its streaming standby on loopback, for failover tests and benches.

SPEC.md ("Scale: past one machine") promises that a multi-host URL with
`target_session_attrs=read-write` survives a failover: the primary dies, the standby is
promoted, lookups never fail, writes resume and the cache catches up. Proving that needs a
real pair, so this builds one from two `PostgresProcess`es: the primary is configured for
physical replication, the standby is a `pg_basebackup -R -X stream` copy of it (which writes
`standby.signal` and `primary_conninfo`) started on its own port. Both run as the same
unprivileged user as `PostgresProcess` when we are root.

The attributes keep their first roles: after `promote()`, `standby` is the writable server and
`primary` is whatever the test left of the old one (stopped or killed).
"""

from __future__ import annotations

import signal
import time
from collections.abc import Callable
from typing import Self

import psycopg

from .pgprocess import PostgresProcess

REPLICATION_SETTINGS = """
# testsupport.pgha: a primary that a streaming standby can follow
wal_level = replica
max_wal_senders = 4
wal_keep_size = '64MB'
hot_standby = on
"""


class PostgresPair:
    """A primary and a hot standby streaming from it; `start()` (or `with`) builds both."""

    def __init__(self, password: str | None = None) -> None:
        self.password = password
        self.primary = PostgresProcess(password=password)
        self.standby = PostgresProcess(password=password, initdb=False)
        self._configure_primary()

    def _configure_primary(self) -> None:
        """Replication settings, and a pg_hba line letting `postgres` replicate over
        127.0.0.1 (first, so it wins over initdb's defaults whatever they are)."""
        with open(self.primary.data / "postgresql.conf", "a") as conf:
            conf.write(REPLICATION_SETTINGS)
        hba = self.primary.data / "pg_hba.conf"
        method = "trust" if self.password is None else "scram-sha-256"
        hba.write_text(f"host replication postgres 127.0.0.1/32 {method}\n" + hba.read_text())

    def start(self, timeout: float = 30) -> None:
        """Start the primary, copy it into the standby with `pg_basebackup`, start the
        standby and wait until it streams."""
        self.primary.start(timeout)
        self.primary.run_program(
            "pg_basebackup",
            *("--pgdata", str(self.standby.data), "--dbname", self.primary.url()),
            "--write-recovery-conf",  # standby.signal + primary_conninfo
            *("--wal-method=stream", "--checkpoint=fast", "--no-sync"),
        )
        self.standby.start(timeout)
        _wait_for(
            lambda: bool(
                _query(
                    self.primary,
                    "SELECT count(*) FROM pg_stat_replication WHERE state = 'streaming'",
                )
            ),
            timeout,
            "the standby to stream from the primary",
        )

    def multi_host_url(self, dbname: str = "postgres") -> str:
        """Both servers in one URL; libpq tries them in order and keeps the first that
        accepts writes, which is the standby only once it has been promoted."""
        auth = self.primary.url().split("//", 1)[1].split("@", 1)[0]
        hosts = ",".join(f"127.0.0.1:{s.port}" for s in (self.primary, self.standby))
        return f"postgresql://{auth}@{hosts}/{dbname}?target_session_attrs=read-write"

    def wait_replayed(self, timeout: float = 30) -> None:
        """Wait until the standby has replayed everything the primary has written so far,
        so a read of the standby sees every commit made before this call."""
        lsn = _query(self.primary, "SELECT pg_current_wal_lsn()::text")
        _wait_for(
            lambda: bool(
                _query(self.standby, "SELECT pg_last_wal_replay_lsn() >= %s::pg_lsn", lsn)
            ),
            timeout,
            f"the standby to replay up to {lsn}",
        )

    def stop_primary(self) -> None:
        """A clean shutdown of the primary (SIGINT): it first sends the standby all its WAL."""
        self.primary.stop(signal.SIGINT)

    def kill_primary(self) -> None:
        """A crash of the primary (SIGKILL): commits it had not yet streamed are lost."""
        self.primary.stop(signal.SIGKILL)

    def promote(self, timeout: float = 30) -> None:
        """Make the standby a primary, and wait until it accepts writes."""
        _query(self.standby, "SELECT pg_promote(true, %s)", int(timeout))
        _wait_for(
            lambda: not _query(self.standby, "SELECT pg_is_in_recovery()"),
            timeout,
            "the promoted standby to leave recovery",
        )

    def cleanup(self) -> None:
        self.standby.cleanup()
        self.primary.cleanup()

    def __enter__(self) -> Self:
        try:
            self.start()
        except BaseException:
            self.cleanup()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.cleanup()


def _query(server: PostgresProcess, sql: str, *params: object) -> object:
    """The one value `sql` returns on `server`."""
    with psycopg.connect(server.url(), autocommit=True, connect_timeout=5) as conn:
        row = conn.execute(sql, params or None).fetchone()
    assert row is not None
    return row[0]


def _wait_for(condition: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(0.02)
