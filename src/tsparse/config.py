"""Hydra resolvers, config location and value validation (one clear line per bad key)."""
from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, Iterable

from omegaconf import DictConfig, OmegaConf

PACKAGE_DIR = Path(__file__).resolve().parent
_CHECKOUT_ROOT = PACKAGE_DIR.parents[1]


class ConfigError(ValueError):
    """A bad config key or value; the message is one line naming the key and the allowed values."""


def config_dir() -> Path:
    """The Hydra config tree: `conf/` of a checkout, else the copy packaged as `tsparse.conf`."""
    checkout = _CHECKOUT_ROOT / "conf"
    return checkout if (checkout / "train.yaml").is_file() else PACKAGE_DIR / "conf"


def project_root() -> str:
    """`$TSPARSE_ROOT`, else the checkout holding this package, else the working directory."""
    if os.environ.get("TSPARSE_ROOT"):
        return os.environ["TSPARSE_ROOT"]
    if (_CHECKOUT_ROOT / "pyproject.toml").is_file():
        return str(_CHECKOUT_ROOT)
    return os.getcwd()


def run_name(prefix: str, override_dirname: str) -> str:
    """A filesystem-safe run name from the experiment name and the command-line overrides."""
    overrides = re.sub(r"[^A-Za-z0-9_.,=+-]+", "_", override_dirname.replace("/", "."))
    return f"{prefix},{overrides}" if overrides else prefix


def register_resolvers() -> None:
    resolvers = (("tsparse_root", project_root), ("tsparse_run_name", run_name), ("tsparse_div", lambda a, b: int(a) // int(b)))
    for name, fn in resolvers:
        if not OmegaConf.has_resolver(name):
            OmegaConf.register_new_resolver(name, fn)


register_resolvers()


def check_choice(key: str, value: Any, allowed: Iterable[Any]) -> None:
    allowed = list(allowed)
    if value not in allowed:
        raise ConfigError(f"{key}={value!r} is not allowed; choose one of {allowed}")


def check_positive(key: str, value: Any, *, allow_zero: bool = False) -> None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and (value >= 0 if allow_zero else value > 0)
    if not ok:
        raise ConfigError(f"{key}={value!r} must be a {'non-negative' if allow_zero else 'positive'} number")


def validate(cfg: DictConfig) -> None:
    """Check the values every run depends on, before anything is built or written."""
    check_choice("model.kind", cfg.model.kind, ["micro", "pretrained"])
    check_choice("data.source", cfg.data.source, ["hub", "local"])
    for key in ("block_size", "batch_size", "eval_batch_size"):
        check_positive(f"data.{key}", cfg.data[key])
    check_choice("optim.base", cfg.optim.base, ["frozen", "finetune", "lora"])
    check_choice("optim.schedule", cfg.optim.schedule, ["constant", "cosine"])
    check_choice("optim.on_non_finite", cfg.optim.on_non_finite, ["stop", "skip"])
    check_positive("optim.grad_clip", cfg.optim.grad_clip, allow_zero=True)
    check_positive("optim.warmup_steps", cfg.optim.warmup_steps, allow_zero=True)
    scale = cfg.optim.table_lr_scale
    for group, value in (scale.items() if isinstance(scale, DictConfig) else [(None, scale)]):
        if group is not None:
            check_choice("optim.table_lr_scale group", group, ["engram", "peer"])
        check_positive("optim.table_lr_scale" + (f".{group}" if group else ""), value)
    check_positive("trainer.max_steps", cfg.trainer.max_steps)
    if cfg.get("export_dir") and cfg.sparse.modules:
        raise ConfigError(f"export_dir saves a plain HF model, so it needs sparse=none (got sparse.modules="
                          f"{list(cfg.sparse.modules)})")
    if cfg.ckpt_path is not None and not isinstance(cfg.ckpt_path, str):
        raise ConfigError(f"ckpt_path={cfg.ckpt_path!r} must be null, 'last', 'auto' or a path to a .ckpt file")


def to_container(cfg: DictConfig) -> dict:
    return OmegaConf.to_container(cfg, resolve=True)  # type: ignore[return-value]
