"""Expert-count benchmark (bench=ci|micro|tinyllama): params, memory, inference throughput and training-step
time vs PEER's expert count, at random init.

Models are built at random init (weights do not affect speed) for the no-PEER baseline, each
expert count, and each extra module set (`bench.module_sets`, inference only: per-module overhead).
Every inference is timed interleaved with the baseline's (`bench.pair_with`): a baseline model of its own
(`baseline`), or the same model with its modules bypassed (`bypass`: the same base weights, and no second
base in memory, which TinyLlama dims need). Every training step (forward, backward, clipping, optimizer
step; frozen base) is timed with the first expert count's (interleaved with `baseline`, unpaired with
`bypass`), on the row-sparse path (row-wise AdaGrad on the tables) and the dense path (dense grads,
AdamW): figures are medians of `iters` repeats after `warmup`, ratios and differences are medians of the
per-repeat pairs. The verdict on the seed's "throughput stays constant": the largest expert count keeps at
least `CONSTANT` of the smallest's paired tokens/s.
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

import torch
from omegaconf import DictConfig, open_dict

from tsparse.bench.timing import interleaved, paired, rss_bytes, spread
from tsparse.lit_module import compiled, next_token_loss
from tsparse.build import architecture_model
from tsparse.machine import describe, machine
from tsparse.optim import SparseAwareAdamW, grad_norm_and_clip_
from tsparse.registry import param_counts_by_kind, trainable_groups
from tsparse.report import csv_text


def build(cfg: DictConfig, modules: list[str], experts: int, sparse_grad: bool) -> torch.nn.Module:
    with open_dict(cfg):
        cfg.sparse.modules = modules
        cfg.peer.num_experts = experts
        cfg.peer.sparse_grad = sparse_grad
        cfg.peer.table_dtype = cfg.bench.table_dtype
    torch.manual_seed(cfg.seed)
    return architecture_model(cfg)


# "Throughput stays constant", read as: the largest expert count keeps >= 95% of the smallest's tokens/s
# (the seed's own figures give 26,262 / 26,521 = 0.990 from 16K to 803K, and 0.973 of the base).
CONSTANT = 0.95


def inference(model, ids, bypass: tuple[str, ...] = ()):
    """One forward over `ids` without a KV cache (bf16 autocast on CUDA), with the `bypass` modules left out."""
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=ids.is_cuda)

    @torch.inference_mode()
    def forward():
        with autocast, model.bypassing(*bypass):
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


def run(cfg: DictConfig, out_dir: Path) -> str:
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
    first_medians: dict[str, float] = {}  # the first count's training-step medians (unpaired steps are set against them)
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
        bypassed = modules and cfg.bench.pair_with == "bypass"
        times = timings(forward, cfg, inference(model, ids, tuple(modules)) if bypassed else base_forward)
        s, tokens = spread(times["this"]), ids.numel()
        base_median = base_median or s["median"]
        ratios = spread([b / t for b, t in zip(times["reference"], times["this"])]) if "reference" in times else None
        row.update(infer_tok_s=tokens / s["median"], infer_tok_s_q1=tokens / s["q3"], infer_tok_s_q3=tokens / s["q1"],
                   infer_vs_baseline=ratios["median"] if ratios else base_median / s["median"],
                   infer_vs_baseline_q1=ratios["q1"] if ratios else None,
                   infer_vs_baseline_q3=ratios["q3"] if ratios else None)
        if cfg.bench.pair_with == "baseline" and base_forward is None:
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
            reference = None  # the first count's step, kept alive (pair_with: baseline), else unpaired medians
            if cfg.bench.pair_with == "baseline" and first_steps.setdefault(path, step) is not step:
                reference = first_steps[path]
            times = timings(step, cfg, reference)
            s = spread(times["this"])
            first_s = first_medians.setdefault(path, s["median"])
            if reference:  # medians of the per-repeat pairs
                vs_first = paired(times, "this", "reference")
                minus_first = statistics.median(a - b for a, b in zip(times["this"], times["reference"]))
            else:  # against the first count's median
                vs_first, minus_first = s["median"] / first_s, s["median"] - first_s
            row.update({f"{path}_step_s": s["median"], f"{path}_step_s_q1": s["q1"], f"{path}_step_s_q3": s["q3"],
                        f"{path}_table_state_ratio": table_state_ratio(model, optimizer),
                        f"{path}_step_vs_first": vs_first, f"{path}_step_minus_first_s": minus_first})
            print(f"[bench] {label}: {path} training step {s['median'] * 1e3:.1f} ms "
                  f"({row[f'{path}_step_minus_first_s'] * 1e3:+.1f} ms vs the first count), table optimizer state "
                  f"{row[f'{path}_table_state_ratio']:.3f}x table memory", flush=True)
        model = forward = step = optimizer = reference = None  # nothing of this row stays alive in the next build
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
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "bench.csv").write_text(csv_text(rows))
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU ({torch.get_num_threads()} threads)"
    meta = {"preset": cfg.bench.name, "device": device, "pair_with": cfg.bench.pair_with, "machine": machine(),
            "batch_size": cfg.bench.batch_size,
            "seq_len": cfg.bench.seq_len, "warmup": cfg.bench.warmup, "iters": cfg.bench.iters,
            "table_dtype": cfg.bench.table_dtype, "torch": torch.__version__}
    verdict = constant_verdict(rows)
    (out_dir / "bench.json").write_text(json.dumps({"meta": meta, "rows": rows, "compile": compile_row,
                                                    "constant": verdict}, indent=2))
    table = markdown_table(rows, cfg.bench.train_paths, meta)
    if verdict:
        v = verdict
        table += (f"\nThroughput vs expert count, paired with the baseline: {v['last']} keeps {v['ratio']:.3f} of "
                  f"{v['first']}'s tokens/s ({v['last']} / baseline {v['last_vs_baseline']:.3f}, IQR "
                  f"{v['last_q1']:.3f}-{v['last_q3']:.3f}; {v['first']} / baseline {v['first_vs_baseline']:.3f}, "
                  f"IQR {v['first_q1']:.3f}-{v['first_q3']:.3f}). \"Throughput stays constant\" (>= {CONSTANT} "
                  f"of the smallest count's): **{'holds' if v['holds'] else 'does not hold'}** here.\n")
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


def constant_verdict(rows: list[dict]) -> dict | None:
    """The largest expert count's paired tokens/s over the smallest's (each against the baseline), judged
    against CONSTANT; None without two PEER counts."""
    peers = [r for r in rows if r["config"].startswith("peer-")]
    if len(peers) < 2:
        return None
    first, last = peers[0], peers[-1]
    ratio = last["infer_vs_baseline"] / first["infer_vs_baseline"]
    return {"first": first["config"], "last": last["config"], "ratio": ratio, "holds": ratio >= CONSTANT,
            "threshold": CONSTANT, **{f"{name}_vs_baseline": r["infer_vs_baseline"] for name, r in
                                      (("first", first), ("last", last))},
            **{f"{name}_{q}": r[f"infer_vs_baseline_{q}"] or r["infer_vs_baseline"] for name, r in
               (("first", first), ("last", last)) for q in ("q1", "q3")}}


def markdown_table(rows: list[dict], train_paths, meta: dict) -> str:
    head = ["config", "params", "weights GB", "measured GB", "infer tok/s (IQR)", "vs first", "vs baseline"]
    for path in train_paths:
        head += [f"{path} step ms (IQR)", f"{path} vs first", f"{path} − first ms", f"{path} opt state / tables"]
    paired_with = {"baseline": "a baseline model, training steps with the first expert count's",
                   "bypass": "the same model with its modules bypassed (same base weights); training steps are "
                             "unpaired, against the first expert count's median"}
    lines = [f"Bench `{meta['preset']}` on {describe(meta['machine'])}, batch "
             f"{meta['batch_size']} x {meta['seq_len']} tokens, median of {meta['iters']} after {meta['warmup']} "
             f"warm-up, tables {meta['table_dtype']}. Inference is timed interleaved with "
             f"{paired_with.get(meta['pair_with'], 'nothing (unpaired)')}; ratios and differences are medians of "
             "the per-repeat pairs. "
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
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
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
    peers = [r for r in sweep if r["config"].startswith("peer-")]
    x = [r["experts"] for r in peers]
    y = [r["infer_vs_baseline"] for r in peers]
    iqr = [[v - (r["infer_vs_baseline_q1"] or v) for v, r in zip(y, peers)],
           [(r["infer_vs_baseline_q3"] or v) - v for v, r in zip(y, peers)]]
    axes[2].errorbar(x, y, yerr=iqr, fmt="o-", capsize=3, label="PEER-N / reference (median, IQR of pairs)")
    if peers:
        axes[2].axhline(CONSTANT * y[0], ls="--", c="grey", label=f"{CONSTANT} x the smallest count")
    axes[2].set(xscale="log", xlabel="experts", ylabel="tokens/s vs the reference (paired)", title="Paired throughput ratio")
    axes[2].set_xticks(x, [f"{n:,}" for n in x], rotation=30, fontsize=8)
    axes[2].minorticks_off()
    axes[2].set_ylim(0, 1.1 * max(y + [1.0]))
    axes[2].legend(fontsize=8)
    for ax in axes:
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out_dir / "bench.png", dpi=100)
    plt.close(fig)
