"""Parameter counts per module group, computed on the meta device (nothing is allocated).

    python -m tsparse.params model=tinyllama sparse=peer --experts 16384 65536 262144 589824 802816
"""
from __future__ import annotations

from omegaconf import DictConfig

from tsparse.cli import ArgumentParser, one_line_errors
from tsparse.registry import KINDS, param_counts_by_kind
from tsparse.sizing import add_sizing_arguments, meta_model, sized_configs


def count(cfg: DictConfig) -> dict[str, int]:
    """Parameters of the base and of each kind (its tables included), counted on the meta device."""
    counts = param_counts_by_kind(meta_model(cfg))
    counts["total"] = sum(counts.values())
    return counts


def main(argv: list[str] | None = None) -> list[dict]:
    parser = ArgumentParser(prog="python -m tsparse.params", description=__doc__.split("\n\n")[0])
    add_sizing_arguments(parser, "model=tinyllama sparse=peer")
    args = parser.parse_args(argv)
    with one_line_errors():
        rows = [{"experts": experts, **count(config)}
                for experts, config in sized_configs([*args.overrides, "run_name=params"], args.experts)]
    groups = ["base", *KINDS, "total"]
    print("| experts | " + " | ".join(groups) + " |")
    print("|---:|" + "---:|" * len(groups))
    for row in rows:
        print(f"| {row['experts'] or '-'} | " + " | ".join(f"{row[g]:,}" for g in groups) + " |")
    return rows


if __name__ == "__main__":
    main()
