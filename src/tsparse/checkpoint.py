"""Checkpoint files: validity checks, picking the newest valid one to resume, loading with clear errors."""
from __future__ import annotations

import logging
import pickle
import re
import zipfile
from pathlib import Path

import torch

from tsparse.checks import ConfigError

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


def refused_global(err: pickle.UnpicklingError) -> str:
    """What torch's weights-only unpickler refused, e.g. "it wants the global posix.system" (never torch's
    advice to retry with weights_only=False)."""
    wanted = re.search(r"GLOBAL ([\w.]+)", str(err))
    if wanted:
        return f"it wants the global {wanted[1]}"
    reason = re.search(r"WeightsUnpickler error: ([^\n]*)", str(err))
    return reason[1].split(" Please use")[0].strip() if reason else "an object weights-only loading does not allow"


def load_checkpoint(path: str | Path, mmap: bool = False) -> dict:
    """`torch.load(weights_only=True)` a Lightning checkpoint on CPU: tensors and plain containers only, so
    nothing inside the file runs. A file whose pickle asks for more (a class, a function call) is refused,
    and a corrupt or truncated one reported, in one ConfigError line. `mmap` maps the tensors instead of
    reading them (a cheap safety check before Lightning loads the file)."""
    check_checkpoint(path)
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as err:
        raise ConfigError(f"checkpoint {path} is refused: it holds more than weights ({refused_global(err)})") from None
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
