"""Efficiency benchmark: params, memory, inference throughput and training-step time vs expert count.

    python -m tsparse.bench bench=micro          # or bench=ci (seconds), bench=tinyllama
    python -m tsparse.bench bench=peers          # vs peer-pytorch / hyper-connections (extra `bench`)
    python -m tsparse.bench bench=generate       # greedy tokens/s with a KV cache, triple vs base

Models are built at random init (weights do not affect speed) for the no-PEER baseline, each
expert count, and each extra module set (`bench.module_sets`, inference only: per-module overhead).
Every inference is timed interleaved with the baseline's (`bench.interleave`), every training step (forward, backward,
clipping, optimizer step; frozen base) with the first expert count's, on the row-sparse path
(row-wise AdaGrad on the tables) and the dense path (dense grads, AdamW): figures are medians of
`iters` repeats after `warmup`, ratios and differences are medians of the per-repeat pairs.
`bench.compile` (a module set) times that set's training step eagerly and with `compile: true`,
interleaved. Writes bench.csv, bench.json, bench.md and PNG plots into the run directory.
"""
from __future__ import annotations

import gc
import json
import statistics
import time
from functools import partial
from pathlib import Path
from typing import Callable

from hydra.core.hydra_config import HydraConfig
import torch
from omegaconf import DictConfig, ListConfig, open_dict

from tsparse.checks import ConfigError, check_bool, check_choice, check_min, check_positive
from tsparse.cli import hydra_main, one_line_errors
from tsparse.lit_module import compiled, next_token_loss
from tsparse.models import architecture_model
from tsparse.config import config_dir
from tsparse.registry import KINDS, param_counts_by_kind, trainable_groups
from tsparse.optim import SparseAwareAdamW, grad_norm_and_clip_


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * (1 << 12)


def build(cfg: DictConfig, modules: list[str], experts: int, sparse_grad: bool) -> torch.nn.Module:
    with open_dict(cfg):
        cfg.sparse.modules = modules
        cfg.peer.num_experts = experts
        cfg.peer.sparse_grad = sparse_grad
        cfg.peer.table_dtype = cfg.bench.table_dtype
    torch.manual_seed(cfg.seed)
    return architecture_model(cfg)


def interleaved(fns: dict[str, Callable[[], object]], warmup: int, repeats: int) -> dict[str, list[float]]:
    """Seconds per call of each fn, timed in turn within each repeat (CUDA synchronised)."""
    sync = torch.cuda.synchronize if torch.cuda.is_available() else lambda: None
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            sync()
            start = time.perf_counter()
            fn()
            sync()
            times[name].append(time.perf_counter() - start)
    return times


def paired(times: dict[str, list[float]], num: str, den: str) -> float:
    return statistics.median(a / b for a, b in zip(times[num], times[den]))


def spread(times: list[float]) -> dict[str, float]:
    q = statistics.quantiles(times, n=4) if len(times) > 1 else [times[0]] * 3
    return {"median": statistics.median(times), "q1": q[0], "q3": q[2]}


def inference(model, ids):
    """One forward over `ids` without a KV cache (bf16 autocast on CUDA)."""
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=ids.is_cuda)

    @torch.inference_mode()
    def forward():
        with autocast:
            model(input_ids=ids, use_cache=False)

    return forward


def timings(fn, cfg, reference=None) -> dict[str, list[float]]:
    """Times of fn ("this"), interleaved with those of `reference` when given, so that their paired ratio
    cancels this machine's background load."""
    fns = {"this": fn} if reference is None else {"reference": reference, "this": fn}
    return interleaved(fns, cfg.bench.warmup, cfg.bench.iters)


def train_step(model, ids, compile: bool = False):
    """(step, optimizer): one training step of `model` on `ids` (forward, backward, clipping, optimizer
    step; frozen base), with the loss under torch.compile if `compile`."""
    groups = [{"name": n, "params": p} for n, p in trainable_groups(model, "frozen").items() if p]
    optimizer = SparseAwareAdamW(groups, lr=1e-3)
    loss_fn = compiled(partial(next_token_loss, model)) if compile else partial(next_token_loss, model)

    def step():
        optimizer.zero_grad(set_to_none=True)
        loss_fn(ids).backward()
        grad_norm_and_clip_([p for g in groups for p in g["params"]], 1.0)
        optimizer.step()

    return step, optimizer


def table_state_ratio(model, optimizer) -> float:
    """Optimizer state of the tables / their memory (AdamW's scalar step count left out)."""
    tables = [t for m in model.modules() if hasattr(m, "table_parameters") for t in m.table_parameters()]
    state = sum(v.numel() * v.element_size() for t in tables for k, v in optimizer.state[t].items()
                if torch.is_tensor(v) and k != "step")
    table_bytes = sum(t.numel() * t.element_size() for t in tables)
    return state / table_bytes if table_bytes else 0.0


def bench_compile(cfg: DictConfig, ids) -> dict:
    """The `bench.compile` module set's training step, eager vs `compile: true` (same weights),
    interleaved: medians, the paired ratio, the first compiled step (compilation) and graph count."""
    from torch._dynamo.utils import counters

    modules = list(cfg.bench.compile)
    eager, _ = train_step(build(cfg, modules, cfg.peer.num_experts, sparse_grad=True).to(ids.device).train(), ids)
    model = build(cfg, modules, cfg.peer.num_experts, sparse_grad=True).to(ids.device).train()
    compiled_step, _ = train_step(model, ids, compile=True)
    counters.clear()
    start = time.perf_counter()
    compiled_step()
    compile_s = time.perf_counter() - start
    times = interleaved({"eager": eager, "compiled": compiled_step}, cfg.bench.warmup, cfg.bench.iters)
    ratios = spread([c / e for c, e in zip(times["compiled"], times["eager"])])  # its median is the paired ratio
    return {"modules": "+".join(modules), "layers": len(model.model.layers),
            "eager_step_s": statistics.median(times["eager"]), "compiled_step_s": statistics.median(times["compiled"]),
            "ratio": ratios["median"], "ratio_q1": ratios["q1"], "ratio_q3": ratios["q3"],
            "first_step_s": compile_s, "graphs": counters["stats"]["unique_graphs"]}


def run_bench(cfg: DictConfig, out_dir: Path) -> str:
    """Benchmark every configuration, write the outputs, return the markdown table."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    gen = torch.Generator().manual_seed(cfg.seed)
    ids = torch.randint(0, cfg.model.config.vocab_size, (cfg.bench.batch_size, cfg.bench.seq_len), generator=gen)
    ids = ids.to(device)
    # (label, modules, experts): the baseline, PEER at each expert count, then other module sets.
    specs = [("baseline", [], cfg.peer.num_experts)]
    specs += [(f"peer-{n}", ["peer"], n) for n in cfg.bench.experts]
    specs += [("+".join(m), list(m), cfg.peer.num_experts) for m in cfg.bench.module_sets]
    rows = []
    base_forward, base_median, first_steps = None, None, {}  # kept alive: rows are timed interleaved with them
    for label, modules, experts in specs:
        gc.collect()
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        before = rss_bytes()
        model = build(cfg, modules, experts, sparse_grad=True).to(device).eval()
        row = {"config": label, "experts": experts if "peer" in modules else 0}
        row.update({f"params_{kind}": n for kind, n in param_counts_by_kind(model).items()})
        row["params_total"] = sum(v for k, v in row.items() if k.startswith("params_"))
        forward = inference(model, ids)
        times = timings(forward, cfg, base_forward)
        s, tokens = spread(times["this"]), ids.numel()
        base_median = base_median or s["median"]
        row.update(infer_tok_s=tokens / s["median"], infer_tok_s_q1=tokens / s["q3"], infer_tok_s_q3=tokens / s["q1"],
                   infer_vs_baseline=paired(times, "reference", "this") if base_forward else base_median / s["median"])
        if cfg.bench.interleave and base_forward is None:
            base_forward = forward
        row["model_gb"] = sum(t.numel() * t.element_size() for t in (*model.parameters(), *model.buffers())) / 1e9
        row["memory_gb"] = (torch.cuda.max_memory_allocated() if device.type == "cuda" else rss_bytes() - before) / 1e9
        print(f"[bench] {label}: {row['params_total']:,} params, {row['model_gb']:.2f} GB of weights, "
              f"{row['memory_gb']:.2f} GB measured, {row['infer_tok_s']:,.0f} tok/s inference "
              f"({row['infer_vs_baseline']:.3f} of the baseline)", flush=True)
        for path in cfg.bench.train_paths if label.startswith("peer-") else []:
            if path == "dense":  # free the sparse model first (its closures too; first_steps keeps the first one)
                model = forward = step = optimizer = None
                gc.collect()
                model = build(cfg, modules, experts, sparse_grad=False).to(device)
            step, optimizer = train_step(model.train(), ids)
            first = first_steps.setdefault(path, step)
            times = timings(step, cfg, None if first is step else first)
            s = spread(times["this"])
            row.update({f"{path}_step_s": s["median"], f"{path}_step_s_q1": s["q1"], f"{path}_step_s_q3": s["q3"],
                        f"{path}_table_state_ratio": table_state_ratio(model, optimizer),
                        f"{path}_step_vs_first": 1.0 if first is step else paired(times, "this", "reference"),
                        f"{path}_step_minus_first_s": 0.0 if first is step else statistics.median(
                            a - b for a, b in zip(times["this"], times["reference"]))})
            print(f"[bench] {label}: {path} training step {s['median'] * 1e3:.1f} ms "
                  f"({row[f'{path}_step_minus_first_s'] * 1e3:+.1f} ms vs the first count), table optimizer state "
                  f"{row[f'{path}_table_state_ratio']:.3f}x table memory", flush=True)
        model = forward = step = optimizer = None  # nothing of this row stays alive during the next build
        rows.append(row)
    first = rows[1] if len(rows) > 1 else rows[0]
    for row in rows:
        row["infer_vs_first"] = row["infer_vs_baseline"] / first["infer_vs_baseline"]
    compile_row = None
    if cfg.bench.get("compile"):
        gc.collect()
        compile_row = bench_compile(cfg, ids)
        print(f"[bench] compile: {compile_row['modules']} training step {compile_row['compiled_step_s'] * 1e3:.1f} ms "
              f"vs eager {compile_row['eager_step_s'] * 1e3:.1f} ms", flush=True)
    return write_outputs(rows, cfg, out_dir, compile_row)


def write_outputs(rows: list[dict], cfg: DictConfig, out_dir: Path, compile_row: dict | None = None) -> str:
    import csv

    out_dir.mkdir(parents=True, exist_ok=True)
    keys = list(dict.fromkeys(k for row in rows for k in row))
    with open(out_dir / "bench.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=keys)
        writer.writeheader()
        writer.writerows(rows)
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU ({torch.get_num_threads()} threads)"
    meta = {"preset": cfg.bench.name, "device": device, "batch_size": cfg.bench.batch_size,
            "seq_len": cfg.bench.seq_len, "warmup": cfg.bench.warmup, "iters": cfg.bench.iters,
            "table_dtype": cfg.bench.table_dtype, "torch": torch.__version__}
    (out_dir / "bench.json").write_text(json.dumps({"meta": meta, "rows": rows, "compile": compile_row}, indent=2))
    table = markdown_table(rows, cfg.bench.train_paths, meta)
    if compile_row is not None:
        c = compile_row
        table += (f"\nTraining step of {c['modules']} with `compile: true` (torch.compile, inductor) vs eager, "
                  f"interleaved: {c['compiled_step_s'] * 1e3:.1f} vs {c['eager_step_s'] * 1e3:.1f} ms, "
                  f"**compiled / eager {c['ratio']:.3f}** (IQR of the paired ratios {c['ratio_q1']:.3f}-"
                  f"{c['ratio_q3']:.3f}); first step (compiling) {c['first_step_s']:.0f} s, {c['graphs']} graphs "
                  f"captured for {c['layers']} layers.\n")
    (out_dir / "bench.md").write_text(table)
    plot(rows, out_dir)
    return table


def markdown_table(rows: list[dict], train_paths, meta: dict) -> str:
    head = ["config", "params", "weights GB", "measured GB", "infer tok/s (IQR)", "vs first", "vs baseline"]
    for path in train_paths:
        head += [f"{path} step ms (IQR)", f"{path} vs first", f"{path} − first ms", f"{path} opt state / tables"]
    lines = [f"Bench `{meta['preset']}` on {meta['device']}, batch {meta['batch_size']} x {meta['seq_len']} tokens, "
             f"median of {meta['iters']} after {meta['warmup']} warm-up, tables {meta['table_dtype']}. Inference is "
             "timed interleaved with the baseline, training steps with the first expert count; ratios and "
             "differences are medians of the per-repeat pairs. "
             "Measured memory: CUDA peak on GPU; on CPU the RSS delta of building and running the model "
             "(untouched zero-initialised pages are not resident, so it can be below the weights).", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r["config"], f"{r['params_total']:,}", f"{r['model_gb']:.2f}", f"{r['memory_gb']:.2f}",
                 f"{r['infer_tok_s']:,.0f} ({r['infer_tok_s_q1']:,.0f}-{r['infer_tok_s_q3']:,.0f})",
                 f"{r['infer_vs_first']:.3f}", f"{r['infer_vs_baseline']:.3f}"]
        for path in train_paths:
            cells += ([f"{r[f'{path}_step_s'] * 1e3:.1f} ({r[f'{path}_step_s_q1'] * 1e3:.1f}-"
                       f"{r[f'{path}_step_s_q3'] * 1e3:.1f})", f"{r[f'{path}_step_vs_first']:.3f}",
                       f"{r[f'{path}_step_minus_first_s'] * 1e3:+.1f}",
                       f"{r[f'{path}_table_state_ratio']:.3f}"] if f"{path}_step_s" in r else ["-"] * 4)
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], out_dir: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sweep = [r for r in rows if r["config"] == "baseline" or r["config"].startswith("peer-")]
    others = [r for r in rows if r not in sweep]
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    panels = ((axes[0], "infer_tok_s", "inference tokens/s", "Throughput vs params"),
              (axes[1], "model_gb", "weights (GB)", "Memory vs params"))
    for ax, key, ylabel, title in panels:
        ax.plot([r["params_total"] / 1e6 for r in sweep], [r[key] for r in sweep], "o-", label="baseline, PEER-N")
        for r in others:
            ax.plot(r["params_total"] / 1e6, r[key], "s")
            ax.annotate(r["config"], (r["params_total"] / 1e6, r[key]), fontsize=7)
        ax.set(xlabel="total params (M)", ylabel=ylabel, title=title)
        ax.set_ylim(bottom=0)
    axes[1].plot([r["params_total"] / 1e6 for r in sweep], [r["memory_gb"] for r in sweep], "x--", label="measured")
    axes[1].legend(fontsize=8)
    for ax in axes:
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out_dir / "bench.png", dpi=100)
    plt.close(fig)


PRESETS = ("ci", "micro", "tinyllama", "peers", "generate")
_COUNTS = ("batch_size", "seq_len", "iters", "repeats", "tokens", "heads", "top_k", "key_dim", "prompt_tokens",
           "new_tokens", "optim_params")


def _check_list(key: str, value, check_item) -> None:
    if not isinstance(value, (list, ListConfig)):
        raise ConfigError(f"{key}={value!r} must be a list")
    for i, item in enumerate(value):
        check_item(f"{key}[{i}]", item)


def _check_kinds(key: str, value) -> None:
    _check_list(key, value, lambda k, kind: check_choice(k, kind, KINDS))


BENCH_KEYS: dict[str, Callable[[str, object], None]] = {
    "name": lambda k, v: check_choice(k, v, PRESETS),
    **{key: lambda k, v: check_min(k, v, 1) for key in _COUNTS},
    "warmup": lambda k, v: check_min(k, v, 0),
    "interleave": check_bool,
    "threads": lambda k, v: v is None or check_min(k, v, 1),
    "bf16_table_bytes": check_positive,
    "table_dtype": lambda k, v: check_choice(k, v, ["float32", "bfloat16"]),
    **{key: lambda k, v: _check_list(k, v, lambda ki, i: check_min(ki, i, 1)) for key in ("experts", "dims", "batch_sizes")},
    "module_sets": lambda k, v: _check_list(k, v, _check_kinds),
    "compile": _check_kinds,
    "train_paths": lambda k, v: _check_list(k, v, lambda ki, i: check_choice(ki, i, ["sparse", "dense"])),
    "models": lambda k, v: _check_list(k, v, lambda ki, i: check_choice(ki, i, model_configs())),
    "mhc": lambda k, v: [check_min(f"{k}.{key}", item, 1) for key, item in v.items()],
}


def model_configs() -> list[str]:
    return sorted(p.stem for p in (config_dir() / "model").glob("*.yaml"))


def check(cfg: DictConfig) -> None:
    """Every key of the bench preset, one line each: unknown keys are refused, each known one checked."""
    for key, value in cfg.bench.items():
        if key not in BENCH_KEYS:
            raise ConfigError(f"bench.{key} is not a bench setting; allowed: {sorted(BENCH_KEYS)}")
        BENCH_KEYS[key](f"bench.{key}", value)


@hydra_main("bench", check)
def main(cfg: DictConfig) -> None:
    with one_line_errors():
        out_dir = Path(HydraConfig.get().runtime.output_dir)
        if cfg.bench.name == "peers":  # tsparse vs the reference implementations
            from tsparse.bench_peers import run_peers

            out_dir.mkdir(parents=True, exist_ok=True)
            (out_dir / "bench.md").write_text(run_peers(cfg))
            return
        if cfg.bench.name == "generate":  # greedy tokens/s with KV cache, triple vs base
            from tsparse.bench_generate import run_generate

            out_dir.mkdir(parents=True, exist_ok=True)
            (out_dir / "bench.md").write_text(run_generate(cfg))
            return
        print(run_bench(cfg, out_dir))


if __name__ == "__main__":
    main()
