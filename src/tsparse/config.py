"""Hydra resolvers, config location and value validation (one clear line per bad key)."""
from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Iterator

from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf, open_dict

from tsparse.checks import ConfigError, check_choice, check_placement, check_positive  # noqa: F401 (ConfigError re-exported)
from tsparse.registry import EXPERTS_KEY, KINDS

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


def run_name(prefix: str, override_dirname: str) -> str:
    """A filesystem-safe run name from the experiment name and the command-line overrides."""
    overrides = re.sub(r"[^A-Za-z0-9_.,=+-]+", "_", override_dirname.replace("/", "."))
    return f"{prefix},{overrides}" if overrides else prefix


def register_resolvers() -> None:
    resolvers = (("tsparse_root", project_root), ("tsparse_run_name", run_name), ("tsparse_div", lambda a, b: int(a) // int(b)),
                 ("tsparse_mul", lambda a, b: int(a) * int(b)))
    for name, fn in resolvers:
        if not OmegaConf.has_resolver(name):
            OmegaConf.register_new_resolver(name, fn)


register_resolvers()


def register_schemas() -> None:
    """Each module kind's spec dataclass is the schema of its config group (`<kind>/schema`), so a
    wrong type or an unknown key fails when Hydra composes the config; `module_kinds` (in the defaults
    of train.yaml and bench.yaml) selects `<kind>: default` for every kind of the registry."""
    store = ConfigStore.instance()
    for name, kind in KINDS.items():
        store.store(group=name, name="schema", node=kind.spec)
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
    is None when the kind that has experts is not attached."""
    kind = EXPERTS_KEY.split(".")[0]
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
    check_positive("trainer.max_steps", cfg.trainer.max_steps)
    # the model config group gives the architecture (a base loaded from elsewhere is checked when it loads)
    check_placement(module_specs(cfg), cfg.model.config.num_hidden_layers)
    if cfg.ckpt_path is not None and not isinstance(cfg.ckpt_path, str):
        raise ConfigError(f"ckpt_path={cfg.ckpt_path!r} must be null, 'last', 'auto' or a path to a .ckpt file")


def module_specs(cfg: DictConfig) -> dict:
    """The typed spec of each kind in `cfg.sparse.modules` (checked by its `__post_init__`)."""
    specs = {}
    for name in cfg.sparse.modules:
        check_choice("sparse.modules[]", name, KINDS)
        specs[name] = KINDS[name].spec(**to_container(cfg[name]))
    return specs


def to_container(cfg: DictConfig) -> dict:
    return OmegaConf.to_container(cfg, resolve=True)  # type: ignore[return-value]
