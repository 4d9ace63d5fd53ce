"""Generation speed: greedy tokens/s with the KV cache, the triple model against its plain base.

    python -m tsparse.bench bench=generate

For each model config in `bench.models` (micro, tinyllama) both models are built at
random init (weights do not change the speed), the sparse modules with their weights made non-zero.
Each repeat times one `generate()` of every (model, batch size) in turn, so background load hits
both sides alike; the table reports medians and the median of the paired per-repeat ratios.
"""
from __future__ import annotations

import statistics
from pathlib import Path

import torch
from omegaconf import DictConfig

from tsparse.bench.timing import interleaved, paired
from tsparse.config import compose_config
from tsparse.modeling_tsparse import TsparseForCausalLM
from tsparse.build import architecture_model
from tsparse.modules.perturb import perturb_
from tsparse.registry import KINDS


def build(model_name: str, triple: bool, table_dtype: str) -> TsparseForCausalLM:
    """The dims of `conf/model/<model_name>.yaml`, plain or as `sparse=triple` with its default placement, tables in
    `table_dtype`, module weights perturbed so that every module does real work."""
    tables = [f"{name}.table_dtype={table_dtype}" for name, kind in KINDS.items() if kind.tables]
    model = architecture_model(compose_config([f"model={model_name}", f"sparse={'triple' if triple else 'none'}",
                                               *tables, "run_name=bench"]))
    for module in model.sparse_modules().values():
        perturb_(module)
    return model


def greedy(model, ids: torch.Tensor, new_tokens: int):
    """One cached greedy generation of exactly `new_tokens` tokens, as a function to time."""
    @torch.inference_mode()
    def run():
        model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                       do_sample=False, use_cache=True, pad_token_id=0)
    return run


def run(cfg: DictConfig, out_dir: Path) -> str:
    """Time every (model, batch size), write bench.md and return it."""
    b = cfg.bench
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    lines = [f"Greedy generation with KV cache on {device.type}: prompt {b.prompt_tokens} tokens, {b.new_tokens} new "
             f"tokens, median of {b.repeats} interleaved repeats after {b.warmup} warm-up.", "",
             "| dims | batch | base tok/s | triple tok/s | triple / base (paired median) |", "|---|---:|---:|---:|---:|"]
    for dims in b.models:
        torch.manual_seed(cfg.seed)
        models = {name: build(dims, name == "triple", b.table_dtype).to(device).eval() for name in ("base", "triple")}
        vocab = models["base"].config.vocab_size
        prompts = {n: torch.randint(1, vocab, (n, b.prompt_tokens), generator=torch.Generator().manual_seed(n)).to(device)
                   for n in b.batch_sizes}
        times = interleaved({f"{name}/{n}": greedy(models[name], prompts[n], b.new_tokens)
                             for name in models for n in prompts}, b.warmup, b.repeats)
        for n in prompts:
            base, triple = times[f"base/{n}"], times[f"triple/{n}"]
            ratio = paired(times, f"base/{n}", f"triple/{n}")
            rate = n * b.new_tokens
            lines.append(f"| {dims} | {n} | {rate / statistics.median(base):,.1f} | {rate / statistics.median(triple):,.1f} "
                         f"| {ratio:.3f} |")
            print(lines[-1], flush=True)
        del models
    report = "\n".join(lines) + "\n"
    (out_dir / "bench.md").write_text(report)
    return report
