"""Scale-out figures of a config, computed on the meta device (nothing is allocated): the bytes each rank
receives per step for the row-sparse tables (replicated: the dense all-gathers that average their row
gradients, `tsparse.distributed`; `tables=sharded`: the all_to_all exchanges of lookups, rows and row
gradients, `tsparse.sharding`), and a training checkpoint's size.

    python -m tsparse.scaleout model=tinyllama sparse=peer --experts 262144 802816 --world 2 8 --table-dtype float32 bfloat16
    python -m tsparse.scaleout model=tinyllama sparse=peer tables=sharded --experts 802816 --world 2 8
"""
from __future__ import annotations

import torch
from omegaconf import DictConfig

from tsparse.base_dtype import base_in_bf16, store_base_in_bf16
from tsparse.cli import ArgumentParser, one_line_errors, positive_int
from tsparse.distributed import row_sparse_tables
from tsparse.modules.tables import TABLE_DTYPES
from tsparse.config import set_table_dtype
from tsparse.registry import trainable_groups
from tsparse.sizing import add_sizing_arguments, meta_model, sized_configs

INDEX_BYTES = 8  # one int64 row index per gathered row


def table_traffic_bytes(cfg: DictConfig, world_size: int) -> int:
    """Bytes each rank receives per step for the tables. Replicated, at most: world x rows x (dim values +
    an int64 index) per table, where rows = the rank's tokens (data.batch_size x block_size) x lookups per
    token (the module's `rows_per_token`), capped by the table's rows. Sharded, on average over the ranks
    (each rank gets the lookups it owns): per module, per lookup of the rank's tokens, an int64 index per
    routing (PEER routes again in backward), a row per fetch (PEER fetches both tables again in backward)
    and an fp32 row gradient per table; the counts (world int64 per exchange) aside. Both are independent
    of the table's size below that cap; the sharded figure is independent of the world size too."""
    tokens = cfg.data.batch_size * cfg.data.block_size
    model = meta_model(cfg)
    sharded = world_size > 1 and cfg.tables.layout == "sharded"
    total = 0
    for name, p in row_sparse_tables(model).items():
        module = model.get_submodule(name.rsplit(".", 2)[0])
        lookups, _ = module.rows_per_token()
        if sharded:
            tables = len(module.table_parameters())
            passes = 2 if tables > 1 else 1  # PEER's fused mix routes and fetches in forward and in backward
            row = p[0].numel() * p.element_size()
            total += tokens * lookups * (passes * INDEX_BYTES / tables + passes * row + p[0].numel() * 4)
        else:
            rows = min(tokens * lookups, p.shape[0])
            total += world_size * rows * (p[0].numel() * p.element_size() + INDEX_BYTES)
    return int(total)


def checkpoint_bytes(cfg: DictConfig) -> int:
    """A training checkpoint's tensors: every parameter and buffer in its dtype (the base's projections at
    `optim.base_dtype`), plus the optimizer state of the trainable ones (`optim.SparseAwareAdamW`): AdamW's
    two fp32 moments per dense element (and an fp32 master copy if the param is not fp32), row-wise AdaGrad's
    one fp32 scalar per table row."""
    model = meta_model(cfg)
    if base_in_bf16(cfg.optim):
        store_base_in_bf16(model)
    sparse = {id(p) for p in row_sparse_tables(model).values()}
    size = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    for p in (p for params in trainable_groups(model, cfg.optim.base).values() for p in params):
        size += p.shape[0] * 4 if id(p) in sparse else p.numel() * (8 + 4 * (p.dtype != torch.float32))
    return size


def main(argv: list[str] | None = None) -> list[dict]:
    parser = ArgumentParser(prog="python -m tsparse.scaleout", description=__doc__.split("\n\n")[0])
    add_sizing_arguments(parser, "model=tinyllama sparse=peer")
    parser.add_argument("--world", type=positive_int, nargs="+", default=[2, 8], help="ranks (default: 2 8)")
    parser.add_argument("--table-dtype", nargs="+", choices=list(TABLE_DTYPES), default=["float32"],
                        help="every kind's table dtype, one row each (default: float32)")
    args = parser.parse_args(argv)
    rows = []
    with one_line_errors():
        for experts, config in sized_configs(args.overrides, args.experts):
            for dtype in args.table_dtype:
                set_table_dtype(config, dtype)
                rows.append({"experts": experts, "table_dtype": dtype, "checkpoint": checkpoint_bytes(config),
                             **{f"traffic@{w}": table_traffic_bytes(config, w) for w in args.world}})
    layout = "table exchanges" if config.tables.layout == "sharded" else "table all-gathers"
    print("| experts | tables | " + " | ".join(f"{layout} / step / rank, {w} ranks" for w in args.world)
          + " | checkpoint |")
    print("|---:|---|" + "---:|" * (len(args.world) + 1))
    for row in rows:
        print(f"| {'-' if row['experts'] is None else format(row['experts'], ',')} | {row['table_dtype']} | "
              + " | ".join(f"{row[f'traffic@{w}'] / 1e9:.2f} GB" for w in args.world)
              + f" | {row['checkpoint'] / 1e9:.2f} GB |")
    return rows


if __name__ == "__main__":
    main()
