"""Checkpoint files: validity checks, picking the newest valid one to resume, loading with clear errors."""
from __future__ import annotations

import logging
import zipfile
from pathlib import Path

import torch

from tsparse.config import ConfigError

log = logging.getLogger("tsparse")


def check_checkpoint(path: str | Path) -> None:
    """Raise a one-line ConfigError unless `path` is a complete torch checkpoint. Lightning writes
    checkpoints atomically; this catches files damaged or truncated later (the zip central directory
    sits at the end of the file, so a truncated file fails here without reading the tensors)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"checkpoint {path} does not exist")
    try:
        with zipfile.ZipFile(path) as archive:
            if not any(name.endswith("data.pkl") for name in archive.namelist()):
                raise zipfile.BadZipFile("no data.pkl record")
    except (zipfile.BadZipFile, OSError) as err:
        raise ConfigError(f"checkpoint {path} is corrupt or truncated ({err})") from None


def newest_valid_checkpoint(ckpt_dir: Path) -> Path | None:
    """last.ckpt if it is valid, else the most recent valid checkpoint in `ckpt_dir` (None if none)."""
    candidates = sorted(ckpt_dir.glob("*.ckpt"), key=lambda p: (p.name == "last.ckpt", p.stat().st_mtime), reverse=True)
    for path in candidates:
        try:
            check_checkpoint(path)
            return path
        except ConfigError as err:
            log.warning("skipping %s", err)
    return None


def load_checkpoint(path: str | Path) -> dict:
    """`torch.load` a Lightning checkpoint on CPU; a corrupt or truncated file is a one-line ConfigError."""
    check_checkpoint(path)
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as err:  # torch raises RuntimeError, EOFError, UnpicklingError... on damaged files
        raise ConfigError(f"checkpoint {path} is corrupt or truncated ({type(err).__name__}: {err})") from None
