"""The last-known-good snapshot file: what lets `source=database` boot while PostgreSQL is down.

Layout: one header line of JSON (format, count, policy_count, written_at, the database the
records came from, sha256 of the body), then the body, a JSON object holding the list of
extensions and the list of routing policies. A file of the previous format (`/2`: no
policy_count, the body a list of extensions) is still read, with no policies, so an upgrade
can boot on the file its predecessor left while the database is down.

A file is served only for the database it came from: a boot against another database while
that one is down must not serve somebody else's records. The check is made while the database
is down, so it compares what the settings name (`Origin.location`: hosts, ports and database
name, never the password); the server's system identifier is recorded beside it for operators.

The file is written to a temporary name in the same folder, fsynced and renamed over the old
one, so a crash mid-write leaves the previous file intact; the checksum catches a file torn or
edited by anything else.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import msgspec

from ..core.model import Extension
from ..core.policy import Policy
from ..errors import SnapshotFileError

FORMAT = "extreg-snapshot/3"
FORMAT_2 = "extreg-snapshot/2"  # extensions only; still read


class Origin(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """The database a snapshot came from."""

    location: str  # host(s):port(s)/name as the settings name it, password-free
    name: str  # current_database()
    system_identifier: str  # pg_control_system().system_identifier


class Header(msgspec.Struct, forbid_unknown_fields=True):
    format: str
    count: int
    written_at: datetime
    database: Origin
    sha256: str
    policy_count: int = 0  # absent from /2 files


class Body(msgspec.Struct, forbid_unknown_fields=True):
    extensions: list[Extension]
    policies: list[Policy]


@dataclass(frozen=True, slots=True)
class SnapshotContents:
    """What a snapshot file holds."""

    extensions: list[Extension]
    policies: list[Policy]
    written_at: datetime


def write_snapshot_file(
    path: Path, records: list[Extension], origin: Origin, policies: Sequence[Policy] = ()
) -> None:
    """Atomically replace `path` with `records` and `policies`; raise `SnapshotFileError` if
    it cannot."""
    body = msgspec.json.encode(Body(records, list(policies)))
    header = Header(
        FORMAT,
        len(records),
        datetime.now(UTC),
        origin,
        hashlib.sha256(body).hexdigest(),
        len(policies),
    )
    data = msgspec.json.encode(header) + b"\n" + body
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        _remove_leftovers(path)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        try:
            with os.fdopen(fd, "wb") as fh:
                fh.write(data)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
    except OSError as exc:
        raise SnapshotFileError(
            f"cannot write snapshot file {path}: {exc.strerror or exc}"
        ) from None


def _remove_leftovers(path: Path, older_than_s: float = 60) -> None:
    """Delete temporary files that a process killed mid-write left behind (a fresh one may be
    another process's write in progress, so only old ones go)."""
    cutoff = time.time() - older_than_s
    for leftover in path.parent.glob(f".{path.name}.*.tmp"):
        with contextlib.suppress(OSError):
            if leftover.stat().st_mtime < cutoff:
                leftover.unlink()


def read_snapshot_file(path: Path, location: str) -> tuple[list[Extension], datetime]:
    """The extensions and write time of the snapshot file (`read_snapshot` has it all)."""
    found = read_snapshot(path, location)
    return found.extensions, found.written_at


def read_snapshot(path: Path, location: str) -> SnapshotContents:
    """The extensions, policies and write time of the snapshot file of the database at
    `location`; `SnapshotFileError` if it is not whole or came from another database."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise SnapshotFileError(f"no snapshot file at {path}") from None
    except OSError as exc:
        raise SnapshotFileError(
            f"cannot read snapshot file {path}: {exc.strerror or exc}"
        ) from None
    head, sep, body = data.partition(b"\n")
    try:
        header = msgspec.json.decode(head, type=Header)
    except msgspec.DecodeError:
        raise SnapshotFileError(f"snapshot file {path} has no valid header: refusing it") from None
    if not sep or header.format not in (FORMAT, FORMAT_2):
        raise SnapshotFileError(f"snapshot file {path} is not an {FORMAT} file: refusing it")
    if header.database.location != location:
        raise SnapshotFileError(
            f"snapshot file {path} holds the records of database {header.database.location},"
            f" not of {location}: refusing it"
        )
    if hashlib.sha256(body).hexdigest() != header.sha256:
        raise SnapshotFileError(
            f"snapshot file {path} is corrupt or half-written (checksum mismatch): refusing it"
        )
    try:
        if header.format == FORMAT_2:
            found = Body(msgspec.json.decode(body, type=list[Extension]), [])
        else:
            found = msgspec.json.decode(body, type=Body)
    except msgspec.DecodeError as exc:
        raise SnapshotFileError(f"snapshot file {path} holds invalid records: {exc}") from None
    if (len(found.extensions), len(found.policies)) != (header.count, header.policy_count):
        raise SnapshotFileError(f"snapshot file {path} is incomplete: refusing it")
    return SnapshotContents(found.extensions, found.policies, header.written_at)
