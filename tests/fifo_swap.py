"""An adversary for fixture reads: renames a FIFO over a fixture file at the worst moment.

The worst moment is right after the reader has looked at the path (`os.stat` / `os.lstat`,
which `Path.is_file` and friends use) and before it opens it: a reader that checks the path
and then opens it is then left opening a FIFO, which blocks until a writer comes. Waiting for
that window by chance takes thousands of tries; this hook makes it happen every time.

In this process: `install(target, fifo, armed)`. In a child process (`extreg serve`):
`subprocess_env(...)` puts a `sitecustomize` on PYTHONPATH that installs the same hook from
`EXTREG_TEST_FIFO_SWAP` ("target:fifo:armed"). The hook fires once each time the file `armed`
exists: it deletes `armed`, then swaps. A reader that never stats the path (it opens the file
and checks the descriptor) never triggers it.
"""

from __future__ import annotations

import os
import threading
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

ENV = "EXTREG_TEST_FIFO_SWAP"
_lock = threading.Lock()


def swap_in_fifo(fifo: Path, target: Path) -> None:
    """Rename a new name of `fifo` over `target` atomically; `fifo` keeps its own name, so a
    stuck reader can still be released by opening it for writing."""
    spare = fifo.with_name(f"{fifo.name}.{uuid.uuid4().hex}")
    os.link(fifo, spare)
    os.rename(spare, target)
    if spare.exists():  # target already was this FIFO: rename(2) left both names
        spare.unlink()


def install(target: Path, fifo: Path, armed: Path) -> Callable[[], None]:
    """Patch os.stat and os.lstat; returns the function that removes the patch."""
    real_stat, real_lstat = os.stat, os.lstat
    target_name = os.fspath(target)

    def wrap(real: Callable[..., Any]) -> Callable[..., Any]:
        def checked(path: Any, *args: Any, **kwargs: Any) -> Any:
            result = real(path, *args, **kwargs)
            if isinstance(path, str | os.PathLike) and os.fspath(path) == target_name:
                with _lock:
                    try:
                        os.unlink(armed)
                    except FileNotFoundError:
                        return result
                    swap_in_fifo(fifo, target)
            return result

        return checked

    os.stat, os.lstat = wrap(real_stat), wrap(real_lstat)

    def uninstall() -> None:
        os.stat, os.lstat = real_stat, real_lstat

    return uninstall


def subprocess_env(
    env: dict[str, str], folder: Path, target: Path, fifo: Path, armed: Path
) -> dict[str, str]:
    """`env` with the hook installed in every Python child started with it."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "sitecustomize.py").write_text(
        "import os\n"
        "from pathlib import Path\n"
        f"if os.environ.get({ENV!r}):\n"
        "    import fifo_swap\n"
        f"    fifo_swap.install(*(Path(p) for p in os.environ[{ENV!r}].split(':')))\n",
        encoding="utf-8",
    )
    here = str(Path(__file__).parent)
    path = os.pathsep.join(p for p in (str(folder), here, env.get("PYTHONPATH")) if p)
    return {**env, "PYTHONPATH": path, ENV: f"{target}:{fifo}:{armed}"}
