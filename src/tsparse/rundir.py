"""Safe writes to folders tsparse shares with the user: one process per run dir, atomic files, and moving
things aside (to `<parent>/.replaced/`) instead of deleting them."""
from __future__ import annotations

import fcntl
import os
import tempfile
import time
from pathlib import Path

from tsparse.checks import ConfigError

LOCK_FILE = ".tsparse.lock"
_held: dict[Path, int] = {}  # run dir -> fd of the lock this process holds


def lock_run_dir(run_dir: str | Path) -> None:
    """Take the run dir's lock for the rest of this process (a no-op if it already holds it), or refuse in
    one line naming the holder's pid. The lock is an `flock`, which the kernel drops when its holder dies,
    so a lock left by a dead process is reclaimed by the next start."""
    run_dir = Path(run_dir).resolve()
    if run_dir in _held:
        return
    run_dir.mkdir(parents=True, exist_ok=True)
    fd = os.open(run_dir / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
        os.close(fd)
        raise ConfigError(f"run dir {run_dir} is in use by another tsparse process (pid {holder}); wait for it "
                          "or pick another run dir (hydra.run.dir=... or other overrides)") from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, str(os.getpid()).encode(), 0)
    _held[run_dir] = fd


def write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    tmp.replace(path)


def set_aside(paths: list[Path], parent: Path, name: str) -> Path:
    """Move `paths` into a new `<parent>/.replaced/<name>.<time>.<random>/` folder (nothing is deleted)."""
    trash = parent / ".replaced"
    trash.mkdir(exist_ok=True)
    aside = Path(tempfile.mkdtemp(dir=trash, prefix=f"{name}.{time.strftime('%Y%m%d-%H%M%S')}."))
    for path in paths:
        path.rename(aside / path.name)
    return aside
