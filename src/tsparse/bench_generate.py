"""Generation speed: greedy tokens/s with the KV cache, the triple model against its plain base.

    python -m tsparse.bench bench=generate

For each model config in `bench.models` (micro, tinyllama) both models are built at
random init (weights do not change the speed), the sparse modules with their weights made non-zero.
Each repeat times one `generate()` of every (model, batch size) in turn, so background load hits
both sides alike; the table reports medians and the median of the paired per-repeat ratios.
"""
from __future__ import annotations

import statistics

import torch
from omegaconf import DictConfig, OmegaConf
from transformers import LlamaConfig

from tsparse.bench import interleaved, paired
from tsparse.config import config_dir
from tsparse.modeling import TsparseConfig, TsparseForCausalLM
from tsparse.modules.engram import EngramSpec
from tsparse.modules.mhc import MHCSpec
from tsparse.modules.peer import PEERSpec


def build(model_name: str, triple: bool, table_dtype: str) -> TsparseForCausalLM:
    """The dims of `conf/model/<model_name>.yaml`, plain or with its default triple placement."""
    m = OmegaConf.load(config_dir() / "model" / f"{model_name}.yaml")
    specs = {"engram": EngramSpec(layers=list(m.placement.engram), table_rows=m.engram_table_rows, table_dtype=table_dtype),
             "peer": PEERSpec(layers=list(m.placement.peer), num_experts=m.peer_experts, table_dtype=table_dtype),
             "mhc": MHCSpec(layers=list(m.placement.mhc))} if triple else {}
    base = LlamaConfig(**OmegaConf.to_container(m.config), bos_token_id=0, eos_token_id=0)
    return TsparseForCausalLM(TsparseConfig.from_base(base, specs))


def perturb_modules_(model) -> None:
    """Non-zero module outputs (zero-initialised paths included), so every module does real work."""
    with torch.no_grad():
        for module in model.sparse_modules().values():
            for p in module.parameters():
                if p.is_floating_point():
                    p.add_(torch.randn_like(p, dtype=torch.float32).mul_(0.02).to(p.dtype))


def greedy(model, ids: torch.Tensor, new_tokens: int):
    """One cached greedy generation of exactly `new_tokens` tokens, as a function to time."""
    @torch.inference_mode()
    def run():
        model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                       do_sample=False, use_cache=True, pad_token_id=0)
    return run


def run_generate(cfg: DictConfig) -> str:
    b = cfg.bench
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    lines = [f"Greedy generation with KV cache on {device.type}: prompt {b.prompt_tokens} tokens, {b.new_tokens} new "
             f"tokens, median of {b.repeats} interleaved repeats after {b.warmup} warm-up.", "",
             "| dims | batch | base tok/s | triple tok/s | triple / base (paired median) |", "|---|---:|---:|---:|---:|"]
    for dims in b.models:
        torch.manual_seed(cfg.seed)
        models = {name: build(dims, name == "triple", b.table_dtype).to(device).eval() for name in ("base", "triple")}
        perturb_modules_(models["triple"])
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
    return "\n".join(lines) + "\n"
