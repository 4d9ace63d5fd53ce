"""Checkpoint files: atomic writes, validity checks, picking the newest valid one (what `last` means to every
command), loading with clear errors."""
from __future__ import annotations

import logging
import pickle
import re
import shutil
import uuid
import zipfile
from pathlib import Path

import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO

from tsparse.checks import ConfigError
from tsparse.rundir import atomic_file
from tsparse.sharding import KEY as SHARDED_TABLES, read_tables

log = logging.getLogger("tsparse")


def check_checkpoint(path: str | Path) -> None:
    """Raise a one-line ConfigError unless `path` is a complete torch checkpoint. tsparse writes checkpoints
    atomically (`AtomicCheckpointIO`); this catches files damaged or truncated otherwise (the zip central
    directory sits at the end of the file, so a truncated file fails here without reading the tensors)."""
    path = Path(path)
    if path.is_dir():
        raise ConfigError(f"checkpoint {path} is a directory; pass a .ckpt file")
    if not path.is_file():
        raise ConfigError(f"checkpoint {path} does not exist")
    try:
        with zipfile.ZipFile(path) as archive:
            if not any(name.endswith("data.pkl") for name in archive.namelist()):
                raise zipfile.BadZipFile("no data.pkl record")
    except (zipfile.BadZipFile, OSError) as err:
        raise ConfigError(f"checkpoint {path} is corrupt or truncated ({err})") from None


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's checkpoint writer, made atomic on any filesystem: `torch.save` into a temp file in the
    checkpoint's own folder, fsync, `os.replace` (`rundir.atomic_file`). Lightning's own writer stages in
    a temp dir and copies over the target when the two lie on different filesystems, so a full disk or a
    kill left a truncated last.ckpt. On a full disk the previous file stays intact and DiskFullError names
    the path and the bytes needed.

    Under `tables=sharded` every rank has already written its table rows into a DCP folder (`sharding.
    save_tables`); it is renamed to `<file name>.tables-<random>` and the file, written last, names it, so
    a kill at any point leaves the previous file and its folder whole. The file's older folders go after."""

    def save_checkpoint(self, checkpoint: dict, path, storage_options=None) -> None:
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__} takes no storage_options")
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        if (record := checkpoint.get(SHARDED_TABLES)) is not None:
            tables = f"{path.name}.tables-{uuid.uuid4().hex[:12]}"
            Path(record["dir"]).rename(path.parent / tables)
            record["dir"] = tables
        with atomic_file(path, needed=lambda: tensor_bytes(checkpoint)) as f:
            torch.save(checkpoint, f)
        remove_table_folders(path, keep=record["dir"] if record is not None else None)

    def load_checkpoint(self, path, map_location=None, weights_only=None) -> dict:
        return load_checkpoint(path)

    def remove_checkpoint(self, path) -> None:
        super().remove_checkpoint(path)
        remove_table_folders(Path(path))


def remove_table_folders(path: Path, keep: str | None = None) -> None:
    """Remove the table folders of checkpoint `path` (`<name>.tables-*`, which only tsparse writes), but `keep`."""
    for folder in path.parent.glob(f"{glob_escape(path.name)}.tables-*"):
        if folder.name != keep and folder.is_dir():
            shutil.rmtree(folder)


def glob_escape(name: str) -> str:
    return re.sub(r"([*?\[])", r"[\1]", name)


def tensor_bytes(obj) -> int:
    """Bytes of the tensors in a nested checkpoint dict (about the size `torch.save` writes)."""
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(tensor_bytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(tensor_bytes(v) for v in obj)
    return 0


class UnsafeCheckpointError(ConfigError):
    """A checkpoint whose pickle asks for more than weights: refused, never skipped for an older one."""


def newest_valid_checkpoint(ckpt_dir: Path) -> Path | None:
    """What `last` means to every command (train resume, export, eval, generate, lm_eval): last.ckpt if it
    is valid, else the most recent valid checkpoint in `ckpt_dir` (None if none). A damaged or incomplete
    one is skipped with a warning; an unsafe one (`UnsafeCheckpointError`) is refused."""
    if not ckpt_dir.is_dir():
        return None
    candidates = sorted(ckpt_dir.glob("*.ckpt"), key=lambda p: (p.name == "last.ckpt", p.stat().st_mtime), reverse=True)
    for path in candidates:
        try:
            load_checkpoint(path, mmap=True)
            return path
        except UnsafeCheckpointError:
            raise
        except ConfigError as err:
            log.warning("skipping %s", err)
    return None


def refused_global(err: pickle.UnpicklingError) -> str:
    """What torch's weights-only unpickler refused, e.g. "it wants the global posix.system" (never torch's
    advice to retry with weights_only=False)."""
    wanted = re.search(r"GLOBAL ([\w.]+)", str(err))
    if wanted:
        return f"it wants the global {wanted[1]}"
    reason = re.search(r"WeightsUnpickler error: ([^\n]*)", str(err))
    return reason[1].split(" Please use")[0].strip() if reason else "an object weights-only loading does not allow"


def load_checkpoint(path: str | Path, mmap: bool = False, tables: bool = False) -> dict:
    """`torch.load(weights_only=True)` a Lightning checkpoint on CPU: tensors and plain containers only, so
    nothing inside the file runs. A file whose pickle asks for more (a class, a function call) is refused,
    and a corrupt or truncated one reported, in one ConfigError line. `mmap` maps the tensors instead of
    reading them (a cheap safety check before Lightning loads the file). The tables folder of a sharded
    checkpoint must be complete; `tables` reads its whole tables into the state dict (one process)."""
    check_checkpoint(path)
    checkpoint = read_checkpoint(Path(path), mmap)
    if (record := checkpoint.get(SHARDED_TABLES)) is not None:
        record["dir"] = str(Path(path).parent / record["dir"])
        if not (Path(record["dir"]) / ".metadata").is_file():
            raise ConfigError(f"checkpoint {path} is incomplete: its tables folder {record['dir']} is missing or unfinished")
        if tables:
            read_tables(checkpoint)
    return checkpoint


def read_checkpoint(path: Path, mmap: bool) -> dict:
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as err:
        raise UnsafeCheckpointError(f"checkpoint {path} is refused: it holds more than weights ({refused_global(err)})") from None
    except Exception as err:  # torch raises RuntimeError, EOFError... on damaged files
        first = str(err).strip().splitlines()[0] if str(err).strip() else ""
        raise ConfigError(f"checkpoint {path} is corrupt or truncated ({type(err).__name__}: {first})") from None


def load_state_dict_strict(module: torch.nn.Module, state: dict, source: str) -> None:
    """`load_state_dict(strict=True)`, with a mismatch reported in one line: counts and the first keys."""
    own = module.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    if missing or unexpected:
        raise ConfigError(f"{source} does not match the model: {len(missing)} missing keys {missing[:3]}, "
                          f"{len(unexpected)} unexpected keys {unexpected[:3]}")
    try:
        module.load_state_dict(state)
    except RuntimeError as err:  # shape mismatches
        raise ConfigError(f"{source} does not match the model: {str(err).splitlines()[-1].strip()}") from None
