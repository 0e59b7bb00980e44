"""A URL that a running process publishes in its data_dir for other processes of the same
folder: how `Settings()` finds the NATS server of a running `extreg serve --demo`.

The demo runs NATS on a free port (a fixed one would clash with a NATS already on the machine,
or with a second demo); it writes the URL, with its own pid, to a small file in its data_dir,
which `Settings` reads when nothing else names `nats_url`. The pid makes a file left by a
killed process harmless: a URL whose publisher is gone is ignored.
"""

from __future__ import annotations

import contextlib
import json
import os
import stat
from collections.abc import Iterator
from pathlib import Path

_MAX_PUBLISHED = 4096


@contextlib.contextmanager
def published(path: Path, url: str) -> Iterator[None]:
    """Publish `url` in `path` (atomically) while the block runs; remove it afterwards."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps({"url": url, "pid": os.getpid()}) + "\n", encoding="utf-8")
    os.replace(tmp, path)
    try:
        yield
    finally:
        with contextlib.suppress(OSError):
            if _read_published(path) == (url, os.getpid()):
                path.unlink()


def published_url(path: Path) -> str | None:
    """The URL published in `path` by a process that is still alive, else None."""
    found = _read_published(path)
    if found is None or not _alive(found[1]):
        return None
    return found[0]


def _read_published(path: Path) -> tuple[str, int] | None:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)  # a FIFO in its place must not block
    except OSError:
        return None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return None
        data = json.loads(os.read(fd, _MAX_PUBLISHED))
    except (OSError, ValueError):
        return None
    finally:
        os.close(fd)
    if not isinstance(data, dict):
        return None
    url, pid = data.get("url"), data.get("pid")
    if not isinstance(url, str) or not isinstance(pid, int) or isinstance(pid, bool) or pid <= 0:
        return None
    return url, pid


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's process, alive
    except OverflowError:
        return False
    return True
