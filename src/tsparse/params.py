"""Parameter counts per module group, computed on the meta device (nothing is allocated).

    python -m tsparse.params model=tinyllama sparse=peer --experts 16384 65536 262144 589824 802816
"""
from __future__ import annotations

import argparse
import sys

import torch
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig, open_dict

from tsparse.config import ConfigError, config_dir
from tsparse.models import architecture_model
from tsparse.registry import KINDS, params_by_group


def compose_config(overrides: list[str]) -> DictConfig:
    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
        cfg = compose("train", overrides=[*overrides, "run_name=params"])
    with open_dict(cfg):
        cfg.pop("hydra", None)
    return cfg


def count(cfg: DictConfig) -> dict[str, int]:
    """Parameters of the base and of each kind (its tables included), counted on the meta device."""
    with torch.device("meta"):
        groups = params_by_group(architecture_model(cfg))
    counts = {"base": sum(p.numel() for _, p in groups["base"])}
    counts.update({name: sum(p.numel() for g in kind.groups for _, p in groups[g]) for name, kind in KINDS.items()})
    counts["total"] = sum(counts.values())
    return counts


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(prog="python -m tsparse.params", description=__doc__.split("\n\n")[0])
    parser.add_argument("overrides", nargs="*", help="Hydra overrides, e.g. model=tinyllama sparse=peer")
    parser.add_argument("--experts", type=int, nargs="+", help="one row per PEER expert count")
    args = parser.parse_args(argv)
    try:
        cfg = compose_config(args.overrides)
        rows = []
        for experts in args.experts or [cfg.peer.num_experts]:
            with open_dict(cfg):
                cfg.peer.num_experts = experts
            rows.append({"experts": experts if "peer" in cfg.sparse.modules else None, **count(cfg)})
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        raise SystemExit(2) from None
    groups = ["base", *KINDS, "total"]
    print("| experts | " + " | ".join(groups) + " |")
    print("|---:|" + "---:|" * len(groups))
    for row in rows:
        print(f"| {row['experts'] or '-'} | " + " | ".join(f"{row[g]:,}" for g in groups) + " |")
    return rows


if __name__ == "__main__":
    main()
