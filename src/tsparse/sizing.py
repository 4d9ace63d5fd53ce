"""What the sizing CLIs (`tsparse.plan`, `tsparse.params`, `tsparse.scaleout`) share: their arguments (Hydra
overrides and `--experts`), the configs they size (composed, data checked, one per expert count) and the
model they size (the configured architecture on the meta device, nothing allocated)."""
from __future__ import annotations

import argparse
from typing import Iterator

import torch
from omegaconf import DictConfig

from tsparse.build import architecture_model
from tsparse.cli import positive_int
from tsparse.config import check_data, compose_config, expert_configs
from tsparse.modeling_tsparse import TsparseForCausalLM


def add_sizing_arguments(parser: argparse.ArgumentParser, example: str, each: str = "row") -> None:
    """The positional Hydra overrides (`example`: a sample for the help) and `--experts` (one `each` per count)."""
    parser.add_argument("overrides", nargs="*", help=f"Hydra overrides, e.g. {example}")
    parser.add_argument("--experts", type=positive_int, nargs="+", help=f"one {each} per PEER expert count")


def sized_configs(overrides: list[str], experts: list[int] | None) -> Iterator[tuple[int | None, DictConfig]]:
    """(experts, config) rows: the config of `overrides`, its data sizes checked (`config.check_data`), with
    each count of `experts` in turn (`config.expert_configs`: the same config object, updated, each time)."""
    cfg = compose_config(overrides)
    check_data(cfg)
    yield from expert_configs(cfg, experts)


def meta_model(cfg: DictConfig) -> TsparseForCausalLM:
    """The architecture of `cfg` with its modules (`build.architecture_model`) on the meta device."""
    with torch.device("meta"):
        return architecture_model(cfg)
