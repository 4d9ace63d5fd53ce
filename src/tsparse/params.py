"""Parameter counts per module group, computed on the meta device (nothing is allocated).

    python -m tsparse.params model=tinyllama sparse=peer --experts 16384 65536 262144 589824 802816
"""
from __future__ import annotations


import torch
from omegaconf import DictConfig

from tsparse.cli import ArgumentParser, one_line_errors, positive_int
from tsparse.config import check_data, compose_config, expert_configs
from tsparse.models import architecture_model
from tsparse.registry import KINDS, param_counts_by_kind


def count(cfg: DictConfig) -> dict[str, int]:
    """Parameters of the base and of each kind (its tables included), counted on the meta device."""
    with torch.device("meta"):
        counts = param_counts_by_kind(architecture_model(cfg))
    counts["total"] = sum(counts.values())
    return counts


def main(argv: list[str] | None = None) -> list[dict]:
    parser = ArgumentParser(prog="python -m tsparse.params", description=__doc__.split("\n\n")[0])
    parser.add_argument("overrides", nargs="*", help="Hydra overrides, e.g. model=tinyllama sparse=peer")
    parser.add_argument("--experts", type=positive_int, nargs="+", help="one row per PEER expert count")
    args = parser.parse_args(argv)
    with one_line_errors():
        cfg = compose_config([*args.overrides, "run_name=params"])
        check_data(cfg)
        rows = [{"experts": experts, **count(config)} for experts, config in expert_configs(cfg, args.experts)]
    groups = ["base", *KINDS, "total"]
    print("| experts | " + " | ".join(groups) + " |")
    print("|---:|" + "---:|" * len(groups))
    for row in rows:
        print(f"| {row['experts'] or '-'} | " + " | ".join(f"{row[g]:,}" for g in groups) + " |")
    return rows


if __name__ == "__main__":
    main()
