"""`python -m tsparse.bench bench=NAME`: check every key of the preset (one line per bad key), then run its family."""
from __future__ import annotations

from importlib import import_module
from pathlib import Path
from typing import Callable

from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, ListConfig

from tsparse.checks import ConfigError, check_choice, check_min, check_positive
from tsparse.cli import hydra_main, one_line_errors
from tsparse.config import config_dir
from tsparse.registry import KINDS

# bench.name -> the module of its family (each has `run(cfg, out_dir) -> markdown`).
FAMILIES = {"ci": "experts", "micro": "experts", "tinyllama": "experts", "peers": "references", "generate": "generate",
            "profile": "step_profile"}
_COUNTS = ("batch_size", "seq_len", "iters", "repeats", "tokens", "heads", "top_k", "key_dim", "prompt_tokens",
           "new_tokens", "optim_params")


def _check_list(key: str, value, check_item) -> None:
    if not isinstance(value, (list, ListConfig)):
        raise ConfigError(f"{key}={value!r} must be a list")
    for i, item in enumerate(value):
        check_item(f"{key}[{i}]", item)


def _check_counts(key: str, value) -> None:
    for name, item in value.items():
        check_min(f"{key}.{name}", item, 1)


def _check_kinds(key: str, value) -> None:
    _check_list(key, value, lambda k, kind: check_choice(k, kind, KINDS))


BENCH_KEYS: dict[str, Callable[[str, object], None]] = {
    "name": lambda k, v: check_choice(k, v, FAMILIES),
    **{key: lambda k, v: check_min(k, v, 1) for key in _COUNTS},
    "warmup": lambda k, v: check_min(k, v, 0),
    "pair_with": lambda k, v: check_choice(k, v, ["baseline", "bypass", "none"]),
    "threads": lambda k, v: v is None or check_min(k, v, 1),
    "bf16_table_bytes": check_positive,
    "table_dtype": lambda k, v: check_choice(k, v, ["float32", "bfloat16"]),
    **{key: lambda k, v: _check_list(k, v, lambda ki, i: check_min(ki, i, 1)) for key in ("experts", "dims", "batch_sizes")},
    "module_sets": lambda k, v: _check_list(k, v, _check_kinds),
    "compile": _check_kinds,
    "train_paths": lambda k, v: _check_list(k, v, lambda ki, i: check_choice(ki, i, ["sparse", "dense"])),
    "models": lambda k, v: _check_list(k, v, lambda ki, i: check_choice(ki, i, model_configs())),
    "mhc": lambda k, v: _check_counts(k, v),
}


def model_configs() -> list[str]:
    return sorted(p.stem for p in (config_dir() / "model").glob("*.yaml"))


def check(cfg: DictConfig) -> None:
    """Every key of the bench preset, one line each: unknown keys are refused, each known one checked."""
    for key, value in cfg.bench.items():
        if key not in BENCH_KEYS:
            raise ConfigError(f"bench.{key} is not a bench setting; allowed: {sorted(BENCH_KEYS)}")
        BENCH_KEYS[key](f"bench.{key}", value)
    if cfg.bench.name == "profile" and len(cfg.bench.experts) < 2:  # it compares the first count with the last
        raise ConfigError(f"bench.experts={list(cfg.bench.experts)} must list two or more expert counts for "
                          "bench=profile")


@hydra_main("bench", check)
def main(cfg: DictConfig) -> None:
    with one_line_errors():
        out_dir = Path(HydraConfig.get().runtime.output_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        print(import_module(f"tsparse.bench.{FAMILIES[cfg.bench.name]}").run(cfg, out_dir))
