"""Hydra resolvers, config location and value validation (one clear line per bad key)."""
from __future__ import annotations

import hashlib
import os
import re
from pathlib import Path
from typing import Iterator, get_args

from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, ListConfig, OmegaConf, open_dict

from tsparse.base_dtype import base_in_bf16
from tsparse.checks import (ConfigError, check_choice, check_count, check_min,  # noqa: F401 (ConfigError re-exported)
                            check_positive, is_int)
from tsparse.registry import EXPERTS_KEY, KINDS, check_specs, default_layers

PACKAGE_DIR = Path(__file__).resolve().parent
_CHECKOUT_ROOT = PACKAGE_DIR.parents[1]


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


MAX_RUN_NAME = 200  # bytes; filesystems allow 255 per path component
SEED_PART = re.compile(r"seed=\d+")   # a run name part that only changes the seed (tsparse.report groups by the rest)


def run_name(prefix: str, override_dirname: str) -> str:
    """A filesystem-safe run name from the experiment name and the command-line overrides. One longer than
    MAX_RUN_NAME keeps its start, then a hash of everything but its `seed=N` parts, then those parts: short,
    stable, unique, and the seeds of one cell still group together in the report."""
    overrides = re.sub(r"[^A-Za-z0-9_.,=+-]+", "_", override_dirname.replace("/", "."))
    name = f"{prefix},{overrides}" if overrides else prefix
    if len(name) > MAX_RUN_NAME:
        parts = name.split(",")
        seeds = ",".join(p for p in parts if SEED_PART.fullmatch(p))
        rest = ",".join(p for p in parts if not SEED_PART.fullmatch(p))
        tail = f",{hashlib.sha1(rest.encode()).hexdigest()[:12]}" + (f",{seeds}" if seeds else "")
        name = rest[:MAX_RUN_NAME - len(tail)] + tail
    return name


def register_resolvers() -> None:
    resolvers = (("tsparse_root", project_root), ("tsparse_run_name", run_name), ("tsparse_div", lambda a, b: int(a) // int(b)),
                 ("tsparse_mul", lambda a, b: int(a) * int(b)), ("tsparse_placement", default_layers))
    for name, fn in resolvers:
        if not OmegaConf.has_resolver(name):
            OmegaConf.register_new_resolver(name, fn)


register_resolvers()


def register_schemas() -> None:
    """Each module kind's spec dataclass is the schema of its config group (`<kind>/schema`), so a
    wrong type or an unknown key fails when Hydra composes the config; `sparse=<kind>` attaches the kind
    alone (`conf/sparse/*.yaml` hold the combinations); `module_kinds` (in the defaults of train.yaml
    and bench.yaml) selects `<kind>: default` for every kind of the registry."""
    store = ConfigStore.instance()
    for name, kind in KINDS.items():
        store.store(group=name, name="schema", node=kind.spec)
        store.store(group="sparse", name=name, node={"modules": [name]})
    store.store(name="module_kinds", node={"defaults": [{name: "default"} for name in KINDS]})


register_schemas()


def compose_config(overrides: list[str], config_name: str = "train") -> DictConfig:
    """The config `config_name` with `overrides`, without the `hydra` node (inside a running Hydra app too)."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    if GlobalHydra.instance().is_initialized():
        cfg = compose(config_name, overrides=overrides)
    else:
        with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
            cfg = compose(config_name, overrides=overrides)
    with open_dict(cfg):
        cfg.pop("hydra", None)
    return cfg


def expert_configs(cfg: DictConfig, experts: list[int] | None) -> Iterator[tuple[int | None, DictConfig]]:
    """`cfg` with `registry.EXPERTS_KEY` set to each count of `experts` (default: its own), in turn; the count
    is None when the kind that has experts is not attached (ConfigError if `experts` are given then)."""
    kind = EXPERTS_KEY.split(".")[0]
    if experts and kind not in cfg.sparse.modules:
        raise ConfigError(f"--experts sets {EXPERTS_KEY}, but {kind} is not attached (sparse.modules="
                          f"{list(cfg.sparse.modules)}); attach it, e.g. sparse={kind}, or drop --experts")
    for count in experts or [OmegaConf.select(cfg, EXPERTS_KEY)]:
        with open_dict(cfg):
            OmegaConf.update(cfg, EXPERTS_KEY, count)
        yield (count if kind in cfg.sparse.modules else None), cfg


def set_table_dtype(cfg: DictConfig, dtype: str) -> None:
    """Store every kind's tables in `dtype` (`<kind>.table_dtype`)."""
    with open_dict(cfg):
        for name, kind in KINDS.items():
            if kind.tables:
                OmegaConf.update(cfg, f"{name}.table_dtype", dtype)


def check_data(cfg: DictConfig) -> None:
    """The data sizes every run and sizing CLI depends on: positive integers, and `data.block_size` within the
    model context (`model.config.max_position_embeddings`, where the model config group gives it)."""
    for key, unit in (("block_size", "tokens"), ("batch_size", "sequences"), ("eval_batch_size", "sequences")):
        check_count(f"data.{key}", cfg.data[key], unit)
    context = OmegaConf.select(cfg, "model.config.max_position_embeddings")
    if context is not None and cfg.data.block_size > context:
        raise ConfigError(f"data.block_size={cfg.data.block_size} exceeds the model context ({context}); choose 1 to "
                          f"{context} (model.config.max_position_embeddings)")


def validate(cfg: DictConfig) -> None:
    """Check the values every run depends on, before anything is built or written."""
    if "study_steps" in cfg:  # named here, not as the trainer.max_steps a study derives from it
        check_count("study_steps", cfg.study_steps, "steps")
    check_choice("model.kind", cfg.model.kind, ["micro", "pretrained"])
    check_choice("data.source", cfg.data.source, ["hub", "local"])
    check_data(cfg)
    check_choice("optim.base", cfg.optim.base, ["frozen", "finetune", "lora"])
    base_in_bf16(cfg.optim)
    check_choice("optim.schedule", cfg.optim.schedule, ["constant", "cosine"])
    check_choice("optim.on_non_finite", cfg.optim.on_non_finite, ["stop", "skip"])
    check_positive("optim.grad_clip", cfg.optim.grad_clip, allow_zero=True)
    check_positive("optim.warmup_steps", cfg.optim.warmup_steps, allow_zero=True)
    check_positive("trainer.max_steps", cfg.trainer.max_steps)
    # the model config group gives the architecture (a base loaded from elsewhere is checked when it loads)
    check_specs(module_specs(cfg), cfg.model.config.num_hidden_layers)
    if cfg.ckpt_path is not None and not isinstance(cfg.ckpt_path, str):
        raise ConfigError(f"ckpt_path={cfg.ckpt_path!r} must be null, 'last', 'auto' or a path to a .ckpt file")
    if cfg.ckpt_path not in (None, "last", "auto") and Path(cfg.ckpt_path).is_dir():
        raise ConfigError(f"ckpt_path={cfg.ckpt_path} is a directory; pass a .ckpt file, or last / auto")


def module_specs(cfg: DictConfig) -> dict:
    """The typed spec of each kind in `cfg.sparse.modules` (checked by its `__post_init__`)."""
    specs = {}
    for name in cfg.sparse.modules:
        check_choice("sparse.modules[]", name, KINDS)
        specs[name] = KINDS[name].spec(**to_container(cfg[name]))
    return specs


def to_container(cfg: DictConfig) -> dict:
    return OmegaConf.to_container(cfg, resolve=True)  # type: ignore[return-value]


def check_trainer(trainer: DictConfig) -> None:
    """The values tsparse hands to `lightning.Trainer`, checked as Lightning would, but before a run dir exists."""
    from lightning.fabric.plugins.precision import precision

    check_choice("trainer.accelerator", trainer.get("accelerator", "auto"), ["cpu", "gpu", "cuda", "mps", "auto"])
    precisions = [v for t in ("_PRECISION_INPUT_STR", "_PRECISION_INPUT_STR_ALIAS", "_PRECISION_INPUT_INT")
                  for v in get_args(getattr(precision, t))]
    check_choice("trainer.precision", trainer.get("precision", "32-true"), precisions)
    devices = trainer.get("devices", "auto")
    ids = list(devices) if isinstance(devices, ListConfig) else None
    if not (devices == "auto" or devices == -1 or (is_int(devices) and devices >= 1)
            or (ids and all(is_int(i) and i >= 0 for i in ids) and len(set(ids)) == len(ids))):
        raise ConfigError(f"trainer.devices={devices!r} must be a device count >= 1, -1 (all), auto, or a list of "
                          "distinct device ids")
    interval = trainer.get("val_check_interval")
    if interval is not None and not ((is_int(interval) and interval >= 1)
                                     or (isinstance(interval, float) and 0 < interval <= 1)):
        raise ConfigError(f"trainer.val_check_interval={interval!r} must be a step count >= 1 or a fraction in (0, 1]")
    for key in ("limit_train_batches", "limit_val_batches", "limit_test_batches"):
        limit = trainer.get(key)
        if limit is not None and not ((is_int(limit) and limit >= 0) or (isinstance(limit, float) and 0 <= limit <= 1)):
            raise ConfigError(f"trainer.{key}={limit!r} must be null, a batch count >= 0 or a fraction in [0, 1]")
    for key in ("log_every_n_steps", "accumulate_grad_batches"):
        check_count(f"trainer.{key}", trainer.get(key, 1), "steps")
    check_min("trainer.max_epochs", trainer.get("max_epochs", -1), -1)
    if trainer.get("check_val_every_n_epoch") is not None:
        check_count("trainer.check_val_every_n_epoch", trainer.check_val_every_n_epoch, "epochs")
    if "num_sanity_val_steps" in trainer:
        check_min("trainer.num_sanity_val_steps", trainer.num_sanity_val_steps, -1)
