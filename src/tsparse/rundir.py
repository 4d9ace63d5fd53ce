"""Safe writes to folders tsparse shares with the user: one process per run dir, atomic files, and moving
things aside (to `<parent>/.replaced/`) instead of deleting them."""
from __future__ import annotations

import errno
import fcntl
import os
import shutil
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO, Callable, Iterator

from tsparse.checks import ConfigError

LOCK_FILE = ".tsparse.lock"
TEMP_SUFFIX = ".tsparse-tmp"   # atomic_file's temp files
REPLACED = ".replaced"         # set_aside's folder
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


class DiskFullError(OSError):
    """A write that did not fit on its filesystem; the message is one line naming the path and the bytes needed."""


def fsync_tree(folder: Path) -> None:
    """fsync every file under `folder`, then the folder, so that a rename of it publishes complete files."""
    for path in folder.rglob("*"):
        if path.is_file():
            with open(path, "rb") as f:
                os.fsync(f.fileno())
    fsync_dir(folder)


def fsync_dir(folder: Path) -> None:
    """Make a rename inside `folder` durable (a no-op where directories cannot be opened)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextmanager
def atomic_file(path: str | Path, needed: Callable[[], int] | None = None) -> Iterator[BinaryIO]:
    """A binary file that becomes `path` all or nothing, on any filesystem: a temp file in `path`'s own
    folder, fsync, then `os.replace` (a rename within one filesystem). On any failure the temp file is
    removed and `path` is left as it was. A full disk raises DiskFullError naming the path and the bytes
    needed (`needed()`, about what will be written): before writing when they are not free, or when a
    write fails with ENOSPC or fails for want of them (torch's zip writer reports a short write as a
    RuntimeError)."""
    path = Path(path)
    size = needed() if needed else 0
    if size > (free := shutil.disk_usage(path.parent).free):
        raise DiskFullError(errno.ENOSPC, disk_full_message(path, size, free))
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=TEMP_SUFFIX)
    try:
        with os.fdopen(fd, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~current_umask())
        os.replace(tmp, path)
    except BaseException as err:
        written = Path(tmp).stat().st_size if Path(tmp).exists() else 0
        Path(tmp).unlink(missing_ok=True)
        free = shutil.disk_usage(path.parent).free
        if (isinstance(err, OSError) and err.errno == errno.ENOSPC) or (isinstance(err, Exception) and size > free):
            raise DiskFullError(errno.ENOSPC, disk_full_message(path, max(size, written), free)) from None
        raise
    fsync_dir(path.parent)


def disk_full_message(path: Path, needed: int, free: int) -> str:
    return f"no space left on device for {path}: it needs about {needed:,} bytes, {free:,} are free"


def write_atomic(path: str | Path, data: str | bytes) -> None:
    """Write `data` to `path` through `atomic_file`."""
    payload = data.encode() if isinstance(data, str) else data
    with atomic_file(path, needed=lambda: len(payload)) as f:
        f.write(payload)


def remove_stale_temp_files(folder: Path) -> None:
    """Remove the temp files `atomic_file` left in `folder` when its process was killed mid-write, and the
    table folders `sharding.save_tables` was writing (only names they make: `.<name>.<random>.tsparse-tmp`)."""
    for path in folder.glob(f".*{TEMP_SUFFIX}"):
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink(missing_ok=True)


def current_umask() -> int:
    """The process's umask (reading it means setting it, so it is set back at once)."""
    mask = os.umask(0)
    os.umask(mask)
    return mask


def set_aside(paths: list[Path], parent: Path, name: str) -> Path:
    """Move `paths` into a new `<parent>/.replaced/<name>.<time>.<random>/` folder (nothing is deleted)."""
    trash = parent / REPLACED
    trash.mkdir(exist_ok=True)
    aside = Path(tempfile.mkdtemp(dir=trash, prefix=f"{name}.{time.strftime('%Y%m%d-%H%M%S')}."))
    for path in paths:
        path.rename(aside / path.name)
    return aside
