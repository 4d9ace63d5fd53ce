"""Where a PEER training step's time goes as the expert count grows (bench=profile).

Each of `bench.experts` gets its own model and sparse training step (bench.experts' `build` and
`train_step`). After `warmup` steps each, `repeats` rounds profile `iters` steps of every count in turn
(torch.profiler, CPU self time), so that the machine's drift falls on every count alike. Per op, the
median over rounds of its self time per step, and the largest count's step time over the smallest's as the
median of the per-round pairs. profile.md lists the ops whose time differs most between the smallest and
the largest count, growth first; profile.csv and profile.json have them all.
"""
from __future__ import annotations

import json
import statistics
import time
from pathlib import Path

import torch
from omegaconf import DictConfig
from torch.profiler import ProfilerActivity, profile

from tsparse.bench.experts import build, train_step
from tsparse.bench.timing import spread
from tsparse.machine import describe, machine
from tsparse.report import csv_text

TOP = 15  # ops listed in profile.md: the largest differences either way


def profiled(step, iters: int) -> tuple[dict[str, float], float]:
    """(self CPU ms per step by op, wall ms per step) over `iters` profiled steps."""
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        start = time.perf_counter()
        for _ in range(iters):
            step()
        wall = (time.perf_counter() - start) / iters
    return {e.key: e.self_cpu_time_total / iters / 1e3 for e in prof.key_averages()}, wall * 1e3


def run(cfg: DictConfig, out_dir: Path) -> str:
    """Profile every count's step in alternating rounds, write the outputs, return the markdown."""
    gen = torch.Generator().manual_seed(cfg.seed)
    ids = torch.randint(0, cfg.model.config.vocab_size, (cfg.bench.batch_size, cfg.bench.seq_len), generator=gen)
    counts = list(cfg.bench.experts)
    steps = {n: train_step(build(cfg, ["peer"], n, sparse_grad=True).train(), ids)[0] for n in counts}
    for n in counts:
        for _ in range(cfg.bench.warmup):
            steps[n]()
    rounds: dict[int, list[dict[str, float]]] = {n: [] for n in counts}  # per count: each round's ms by op
    walls: dict[int, list[float]] = {n: [] for n in counts}
    for _ in range(cfg.bench.repeats):
        for n in counts:
            by_op, wall = profiled(steps[n], cfg.bench.iters)
            rounds[n].append(by_op)
            walls[n].append(wall)
    keys = {key for n in counts for by_op in rounds[n] for key in by_op}
    rows = [{"op": key, **{f"ms_{n}": statistics.median(by_op.get(key, 0.0) for by_op in rounds[n]) for n in counts}}
            for key in keys]
    first, last = f"ms_{counts[0]}", f"ms_{counts[-1]}"
    for row in rows:
        row["difference_ms"] = row[last] - row[first]
    rows.sort(key=lambda r: -r["difference_ms"])
    meta = {"machine": machine(), "batch_size": cfg.bench.batch_size, "seq_len": cfg.bench.seq_len,
            "warmup": cfg.bench.warmup, "rounds": cfg.bench.repeats, "steps_per_round": cfg.bench.iters,
            "torch": torch.__version__, "wall_ms": {n: statistics.median(walls[n]) for n in counts},
            "wall_ratio": spread([b / a for a, b in zip(walls[counts[0]], walls[counts[-1]])]),
            "self_cpu_ms": {n: sum(r[f"ms_{n}"] for r in rows) for n in counts}}
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "profile.csv").write_text(csv_text(rows))
    (out_dir / "profile.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    table = markdown(rows, counts, meta)
    (out_dir / "profile.md").write_text(table)
    return table


def markdown(rows: list[dict], counts: list[int], meta: dict) -> str:
    head = ["op", *(f"{n:,} experts ms/step" for n in counts), "difference ms"]
    lines = [f"PEER sparse training step profiled on {describe(meta['machine'])}, batch {meta['batch_size']} x "
             f"{meta['seq_len']} tokens, {meta['rounds']} alternating rounds of {meta['steps_per_round']} profiled "
             f"steps after {meta['warmup']} warm-up; CPU self time per step, median over rounds. Profiled wall time "
             "per step: " + ", ".join(f"{n:,} experts {meta['wall_ms'][n]:.1f} ms" for n in counts) +
             f" ({counts[-1]:,} / {counts[0]:,}: {meta['wall_ratio']['median']:.3f}, IQR of the per-round pairs "
             f"{meta['wall_ratio']['q1']:.3f}-{meta['wall_ratio']['q3']:.3f}); self time summed over ops: " +
             ", ".join(f"{meta['self_cpu_ms'][n]:.1f} ms" for n in counts) + ".", "",
             "| " + " | ".join(head) + " |", "|---|" + "---:|" * (len(head) - 1)]
    shown = sorted(rows, key=lambda r: abs(r["difference_ms"]))[-TOP:]
    for r in sorted(shown, key=lambda r: -r["difference_ms"]):
        lines.append(f"| `{r['op']}` | " + " | ".join(f"{r[f'ms_{n}']:.1f}" for n in counts) +
                     f" | {r['difference_ms']:+.1f} |")
    return "\n".join(lines) + "\n"
