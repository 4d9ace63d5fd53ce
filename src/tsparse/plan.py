"""Memory plan: bytes per device of one training step, from the run's config, with nothing allocated.

    python -m tsparse.plan model=tinyllama +experiment=diff_lr trainer=gpu --experts 16384 262144 802816
    python -m tsparse.plan model=tinyllama +experiment=diff_lr trainer=ddp_gpu trainer.devices=8 --device-gb 80
    python -m tsparse.plan model=tinyllama +experiment=diff_lr trainer=ddp_gpu trainer.devices=8 tables=sharded \
        model.activation_checkpointing=true optim.base_dtype=bfloat16 --experts 802816 --device-gb 24

The weights, gradients and optimizer state are counted exactly from the model built on the meta device
(`build.architecture_model`): the frozen base has no gradient and no optimizer state; dense trainable
parameters get a gradient of their dtype and AdamW's two fp32 moments (plus an fp32 master copy when they
are not fp32); row-sparse tables get a gradient over the rows a batch can touch (PEER: heads x top-k per
token, coalesced; Engram: one uncoalesced row per hash head and token) and row-wise AdaGrad's one fp32
scalar per row (`optim.SparseAwareAdamW`). `data.batch_size` is per device, as each rank loads its own
batch; under DDP every device holds the whole model, tables included, so per-device bytes equal one
device's, plus DDP's gradient buckets (a copy of the dense gradients) and the table rows all-gathered
from every rank. With `tables=sharded` a device holds ceil(rows / devices) rows of each row-sparse table
and their AdaGrad state, receives on average as many row gradients as it looks up (capped by its rows),
and keeps exchange buffers: one table's fp32 row-gradient sums and a token chunk of PEER's fetched rows
(`tsparse.sharding`); nothing grows with the device count at a fixed per-device batch.

Activations are the tensors autograd saves for backward, per token, from the layers' shapes (the
formulas of `saved_bytes` reproduce `torch.autograd.graph.saved_tensors_hooks` counts on CPU in fp32;
tests/test_plan.py checks them), times ACTIVATION_SLACK for the temporaries alive at the peak and the
allocator's retained blocks (calibrated on CPU training steps of the micro model). Under a 16-bit
precision, attention and MLP tensors are counted at 2 bytes; norms, the fp32 logits and the modules
at 4. Attention is counted as SDPA (no T x T scores); CUDA context and kernel workspaces are not.
With `model.activation_checkpointing=true` a layer that saves anything keeps only its input (d, or mHC's
n x d streams, in the embedding's dtype) for the step, and backward recomputes one layer at a time: the
largest layer's saved tensors, its input aside, are counted once more. With `offload` those inputs wait in
host memory: a line of their own, outside the device's total.
"""
from __future__ import annotations

from collections.abc import Iterable

import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn

from tsparse.base_dtype import base_in_bf16, store_base_in_bf16
from tsparse.build import model_dtype, offloaded_checkpoint
from tsparse.checks import ConfigError, check_choice, check_count
from tsparse.cli import ArgumentParser, one_line_errors
from tsparse.distributed import row_sparse_tables
from tsparse.registry import params_by_group, trainable_groups
from tsparse.sharding import CHUNK_BYTES
from tsparse.sizing import add_sizing_arguments, meta_model, sized_configs

GiB = 1 << 30
FP32 = 4
ACTIVATION_SLACK = 1.5   # peak activation memory / saved tensors, measured on CPU micro training steps
PRECISIONS = {"32-true": 4, "bf16-mixed": 2, "16-mixed": 2, "bf16-true": 2, "16-true": 2}
HALF_TRUE = {"bf16-true": torch.bfloat16, "16-true": torch.float16}
HOST = "host memory: offloaded layer inputs (not in the total)"


def world_size(trainer: DictConfig) -> int:
    """Devices of a single-device or DDP run (`trainer.devices`, `trainer.strategy`)."""
    devices, strategy = trainer.get("devices", 1), trainer.get("strategy") or "auto"
    check_count("trainer.devices", devices, "devices")
    name = str(strategy.get("_target_", "ddp") if isinstance(strategy, DictConfig) else strategy)
    if "ddp" not in name.lower() and not (name == "auto" and devices == 1):
        raise ConfigError(f"trainer.strategy={name!r} is not planned; choose auto (1 device) or ddp")
    return devices


def param_bytes(params: Iterable[nn.Parameter]) -> int:
    return sum(p.numel() * p.element_size() for p in params)


def saved_bytes(model: nn.Module, block: int, compute: int) -> tuple[int, int, int]:
    """(bytes per token, bytes per step, host bytes per token) of the tensors autograd saves in a training
    forward (host: the inputs `activation_checkpointing=offload` keeps in host memory): every
    decoder layer from the first one a gradient flows through (a layer with a module on its input or
    around its residual, the layer after one with a module on its output, layer 0 for a trainable base),
    each sparse module (its own `saved_bytes`), and the final norm with the fp32 log-softmax; for
    checkpointed layers (`layer.gradient_checkpointing`), their inputs and the largest one's recompute."""
    config = model.config
    d, inter, heads = config.hidden_size, config.intermediate_size, config.num_attention_heads
    kv = config.num_key_value_heads * (config.head_dim or d // heads)
    layers = model.model.layers
    base_trains = any(p.requires_grad for _, p in params_by_group(model)["base"])
    starts = [i + (not (layer.attached["input"] or layer.attached["residual"])) for i, layer in enumerate(layers)
              if any(layer.attached.values())]
    first = 0 if base_trains else min(starts, default=len(layers))
    kept = model.model.embed_tokens.weight.element_size() * d * model.model.num_streams  # a layer's input
    per_token = per_step = host = 0
    recomputed = (0, 0)
    for i, layer in enumerate(layers):
        token = step = 0
        if i >= first:  # two RMSNorms (fp32 input and 1/rms), SDPA's q, k, v, out and log-sum-exp, SiLU-gated MLP
            token += FP32 * (2 * (d + 1) + heads) + compute * (2 * d + 2 * kv + 3 * inter)
            token += compute * (4 * d + inter) if base_trains else 0  # inputs of trainable projections
        for name in (n for names in layer.attached.values() for n in names):
            module_token, module_step = getattr(layer, name).saved_bytes(block, grad_input=i >= first)
            token, step = token + module_token, step + module_step
        if layer.gradient_checkpointing and token:  # keeps its input; backward recomputes one layer at a time
            recomputed = max(recomputed, (token - kept, step))  # what it saves, its kept input aside
            offloaded = layer._gradient_checkpointing_func is offloaded_checkpoint
            token, step, host = (0, 0, host + kept) if offloaded else (kept, 0, host)
        per_token, per_step = per_token + token, per_step + step
    if first < len(layers) or base_trains:
        per_token += FP32 * (config.vocab_size + d + 1) + (2 * compute * d if base_trains else 0)
    return per_token + recomputed[0], per_step + recomputed[1], host


def memory_plan(cfg: DictConfig) -> dict[str, int]:
    """Bytes per device of each item of a training step of `cfg` (see the module docstring; the base's weights
    at `optim.base_dtype`), and the total."""
    precision = str(cfg.trainer.get("precision", "32-true"))
    check_choice("trainer.precision", precision, PRECISIONS)
    base_dtype = model_dtype(cfg.model)
    world = world_size(cfg.trainer)
    model = meta_model(cfg)
    if cfg.optim.base == "lora":
        from tsparse.lora import add_lora

        with torch.device("meta"):
            add_lora(model, cfg.optim.lora_rank)
    groups = params_by_group(model)
    tables = row_sparse_tables(model)
    table_ids = {id(p) for g, named in groups.items() if g.endswith("_table") for _, p in named}
    for p in model.parameters():  # model.dtype for all but the tables; a "-true" precision casts everything
        dtype = HALF_TRUE.get(precision) or (p.dtype if id(p) in table_ids else base_dtype)
        p.data = p.data.to(dtype)
    if base_in_bf16(cfg.optim):  # the frozen base's projections at 2 bytes (tsparse.base_dtype)
        store_base_in_bf16(model)
    trainable = [p for ps in trainable_groups(model, cfg.optim.base).values() for p in ps]
    sparse_ids = {id(p) for p in tables.values()}
    dense_trainable = [p for p in trainable if id(p) not in sparse_ids]

    items = {"base weights": param_bytes(p for _, p in groups["base"]),
             "module dense weights": param_bytes(p for g, named in groups.items() if g != "base"
                                                 and not g.endswith("_table") for _, p in named)}
    sharded = world > 1 and cfg.tables.layout == "sharded"
    held = {id(p): -(-p.shape[0] // world) if sharded and id(p) in sparse_ids else p.shape[0]  # rows on a device
            for g, named in groups.items() if g.endswith("_table") for _, p in named}
    for g, named in groups.items():
        for _, p in named if g.endswith("_table") else []:
            key = f"tables ({str(p.dtype).removeprefix('torch.')})"
            items[key] = items.get(key, 0) + held[id(p)] * p[0].numel() * p.element_size()
    tokens = cfg.data.batch_size * cfg.data.block_size
    table_grads = sums = 0
    for name, p in tables.items():
        lookups, coalesced = model.get_submodule(name.rsplit(".", 2)[0]).rows_per_token()
        if sharded:  # a shard receives, on average, as many row grads as its rank looks up; summed per row
            rows = min(tokens * lookups, held[id(p)])
            sums = max(sums, rows * (p[0].numel() * FP32 + 8))
        else:
            rows = tokens * lookups * world  # under DDP, every rank's rows are all-gathered
            rows = min(rows, p.shape[0]) if coalesced else rows
        table_grads += rows * (p[0].numel() * p.element_size() + 8)
    items["gradients: dense"] = param_bytes(dense_trainable)
    items["gradients: table rows"] = table_grads
    if sharded:  # one table's fp32 row-grad sums, and PEER's fetched rows: a token chunk of each table, in fp32
        items["table exchange buffers"] = sums + 2 * CHUNK_BYTES
    items["optimizer: AdamW moments + fp32 masters"] = sum(
        p.numel() * (2 * FP32 + (FP32 if p.dtype != torch.float32 else 0)) for p in dense_trainable)
    items["optimizer: row-wise AdaGrad"] = sum(held[id(p)] * FP32 for p in tables.values() if p.requires_grad)
    if world > 1:
        items["DDP gradient buckets"] = param_bytes(dense_trainable)
    per_token, per_step, host = saved_bytes(model, cfg.data.block_size, PRECISIONS[precision])
    items[f"activations ({cfg.data.batch_size} x {cfg.data.block_size} tokens)"] = int(
        ACTIVATION_SLACK * (per_token * tokens + per_step))
    items["total"] = sum(items.values())
    if host:
        items[HOST] = host * tokens
    return items


def verdict(items: dict[str, int], device_gb: float) -> str:
    """Whether the total fits in `device_gb` GiB, naming the largest item."""
    largest = max((k for k in items if k not in ("total", HOST)), key=items.__getitem__)
    total, largest_gb = items["total"] / GiB, items[largest] / GiB
    if total <= device_gb:
        return f"fits: {total:.2f} of {device_gb:g} GiB (largest: {largest}, {largest_gb:.2f} GiB)"
    return f"does not fit: {total:.2f} > {device_gb:g} GiB (largest: {largest}, {largest_gb:.2f} GiB)"


def table(columns: dict[str, dict[str, int]], markdown: bool) -> str:
    """Items as rows (GiB), one column per plan."""
    names = list(dict.fromkeys(k for items in columns.values() for k in items))
    rows = [["item", *columns]] + [[n, *(f"{c[n] / GiB:.2f}" if n in c else "-" for c in columns.values())]
                                   for n in names]
    if markdown:
        lines = ["| " + " | ".join(rows[0]) + " |", "|---|" + "---:|" * len(columns)]
        return "\n".join(lines + ["| " + " | ".join(f"**{c}**" if r[0] == "total" else c for c in r) + " |"
                                  for r in rows[1:]])
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))
                     for r in rows)


def main(argv: list[str] | None = None) -> dict[str, dict[str, int]]:
    parser = ArgumentParser(prog="python -m tsparse.plan", description=__doc__.split("\n\n")[0])
    add_sizing_arguments(parser, "model=tinyllama trainer=gpu", each="column")
    parser.add_argument("--device-gb", type=float, help="device memory in GiB: add a fits / does-not-fit verdict")
    parser.add_argument("--markdown", action="store_true", help="print a markdown table")
    args = parser.parse_args(argv)
    if args.device_gb is not None and not args.device_gb > 0:
        parser.error(f"argument --device-gb: {args.device_gb} is not a positive number")
    columns = {}
    with one_line_errors():
        for experts, cfg in sized_configs(args.overrides, args.experts):  # one config object, updated per row
            columns["no experts" if experts is None else f"{experts:,} experts"] = memory_plan(cfg)
    trainer = OmegaConf.to_container(cfg.trainer)
    print(f"{cfg.model.name}, sparse={'+'.join(cfg.sparse.modules) or 'none'}, {trainer.get('precision')}, "
          f"{world_size(cfg.trainer)} device(s), batch {cfg.data.batch_size} x {cfg.data.block_size} per device; "
          "GiB per device")
    print(table(columns, args.markdown))
    if args.device_gb is not None:
        for label, items in columns.items():
            print(f"{label}: {verdict(items, args.device_gb)}")
    return columns


if __name__ == "__main__":
    main()
