"""Saving Hugging Face models: `save_model` (save_pretrained + tokenizer + the export marker, staged beside the
target, fsynced and swapped in, so the target is never half-written), the target check that refuses to put
anything tsparse did not write at risk (`check_export_target`), and the run's own config + tokenizer
(`save_run_model_card`). Used by `tsparse.export` and by `tsparse.train` (export_dir)."""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

from torch import nn

from tsparse.checks import ConfigError
from tsparse.loading import MODEL_SUBDIR
from tsparse.modeling_tsparse import TsparseForCausalLM
from tsparse.rundir import current_umask, fsync_dir, fsync_tree, set_aside

EXPORT_MARKER = "tsparse_export.json"


def check_export_target(target: str | Path, run_dir: str | Path, overwrite: bool = False) -> None:
    """Refuse, in one line, an export target that would put anything tsparse did not write at risk."""
    target, run_dir = Path(target).resolve(), Path(run_dir).resolve()
    if target == run_dir or target in run_dir.parents or run_dir in target.parents:
        where = "is" if target == run_dir else "contains" if target in run_dir.parents else "lies inside"
        raise ConfigError(f"export target {target} {where} the run dir {run_dir}; export elsewhere")
    existing = next(p for p in (target, *target.parents) if p.exists())
    if existing != target and not existing.is_dir():
        raise ConfigError(f"export target {target}: {existing} is a file, not a folder")
    if existing == target and not target.is_dir():
        raise ConfigError(f"export target {target} is a file, not a folder")
    if (existing == target and any(target.iterdir()) and not (target / EXPORT_MARKER).is_file()
            and not overwrite):
        raise ConfigError(f"export target {target} holds files that are not a tsparse export; pick an empty or "
                          "new folder, or pass --overwrite (export_dir: overwrite=true) to move them aside")


def apply_umask(folder: Path) -> None:
    """Give `folder` and its files the user's normal modes (mkdtemp makes 0700, some writers 0600)."""
    umask = current_umask()
    folder.chmod(0o777 & ~umask)
    for path in folder.rglob("*"):
        path.chmod((0o777 if path.is_dir() else 0o666) & ~umask)


def save_model(model: nn.Module, tokenizer, target: str | Path, source: dict | None = None) -> None:
    """save_pretrained + tokenizer + the export marker into a staging dir next to `target`, then swap it in:
    an earlier export there is replaced, anything else (allowed by `check_export_target`) is moved aside."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}-"))
    try:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        (staging / EXPORT_MARKER).write_text(json.dumps(source or {}, indent=2))
        apply_umask(staging)
        fsync_tree(staging)
    except BaseException:
        shutil.rmtree(staging)  # a half-written staging dir of ours (a full disk, an interrupt)
        raise
    if target.exists() and (target / EXPORT_MARKER).is_file():
        old = target.with_name(f".{target.name}-old-{os.getpid()}")
        target.rename(old)
        staging.rename(target)
        fsync_dir(target.parent)
        shutil.rmtree(old)
        return
    if target.exists() and any(target.iterdir()):
        set_aside([target], target.parent, target.name)
    elif target.exists():
        target.rmdir()
    staging.rename(target)
    fsync_dir(target.parent)


def save_run_model_card(run_dir: Path, model: TsparseForCausalLM, tokenizer) -> None:
    """Write the run's config and tokenizer to RUN_DIR/model, so that the run exports without its base."""
    target = run_dir / MODEL_SUBDIR
    target.mkdir(parents=True, exist_ok=True)
    model.config.save_pretrained(target)
    tokenizer.save_pretrained(target)
