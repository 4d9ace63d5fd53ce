"""Reference benchmark (bench=peers): tsparse against the reference implementations, which it names with their
versions in bench.md.

- PEER vs lucidrains' `peer-pytorch` (softmax gate, same weights: the tables are shared, query and
  sub-keys copied): forward, and a training step (tsparse: SparseAwareAdamW with clipping;
  reference: SparseAdam on its tables + Adam on the rest, no clipping). Beside each figure, the
  physical floor: the bytes of distinct table rows the step must read (and, training, write back),
  at this machine's measured copy bandwidth.
- mHC vs `hyper-connections`' manifold-constrained HC at the same dims (its H maps are per stream,
  so weights do not map): forward and forward + backward of one wrapped linear layer.
- The dense optimizer step: SparseAwareAdamW vs torch.optim.AdamW(fused=True).

Timings are interleaved (every contender once per repeat); figures are medians, ratios are medians
of the per-repeat ratios, so background load cancels out.
"""
from __future__ import annotations

import gc
import statistics
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import torch
from omegaconf import DictConfig
from torch import nn

from tsparse.bench.timing import interleaved, paired
from tsparse.modules.mhc import HyperConnection, MHCSpec
from tsparse.modules.peer import PEER, PEERSpec
from tsparse.optim import SparseAwareAdamW, grad_norm_and_clip_


def copy_bandwidth() -> float:
    """Bytes/s of a 256 MB copy (read + write), the best of 5."""
    src = torch.empty(64 << 20)
    dst = torch.empty_like(src)
    best = min(interleaved({"copy": lambda: dst.copy_(src)}, 1, 5)["copy"])
    return 2 * src.numel() * 4 / best


def reference_peer(peer: PEER):
    """peer-pytorch's PEER with this PEER's weights: tables shared, query rows reordered (p h d)."""
    from PEER_pytorch import PEER as RefPEER

    with torch.device("meta"):  # its own tables would double the memory
        ref = RefPEER(peer.dim, heads=peer.heads, num_experts=peer.num_experts, num_experts_per_head=peer.top_k,
                      dim_key=peer.key_dim, pre_rmsnorm=False, non_competing_scores=peer.gate == "relu")
    h, dk = peer.heads, peer.key_dim
    query = peer.query.weight.detach().view(h, 2, dk, -1).transpose(0, 1).reshape(2 * h * dk, -1)
    ref.to_queries[0].weight = nn.Parameter(query.clone())
    ref.keys = nn.Parameter(peer.keys.detach().clone())
    ref.weight_down_embed.weight, ref.weight_up_embed.weight = peer.down.weight, peer.up.weight
    ref.weight_down_embed.sparse = ref.weight_up_embed.sparse = peer.sparse_grad
    return ref


def distinct_rows(peer: PEER, x: torch.Tensor) -> int:
    with torch.no_grad():
        return peer.retrieve(x)[1].unique().numel()


def bench_peer(cfg: DictConfig, dim: int, experts: int, bandwidth: float) -> dict:
    b = cfg.bench
    big = experts * dim * 4 > b.bf16_table_bytes  # one fp32 table over the limit
    torch.manual_seed(0)
    peer = PEER(dim, PEERSpec(num_experts=experts, heads=b.heads, top_k=b.top_k, key_dim=b.key_dim,
                              input_norm=False, table_dtype="bfloat16" if big else "float32"))
    with torch.no_grad():
        peer.up.weight.copy_(peer.down.weight)  # non-zero outputs (a fresh normal_ takes seconds per GB)
    ref = reference_peer(peer)
    if big:
        ref.to(torch.bfloat16)  # its math runs in the table dtype
    x = torch.randn(b.tokens, dim)
    x_ref = x.to(peer.down.weight.dtype)[None]
    rows = distinct_rows(peer, x)
    row_bytes = rows * dim * peer.down.weight.element_size() * 2  # both tables
    row = {"dim": dim, "experts": experts, "table_dtype": str(peer.down.weight.dtype).removeprefix("torch."),
           "distinct_rows": rows, "fwd_floor_ms": row_bytes / bandwidth * 1e3,
           "train_floor_ms": 2 * row_bytes / bandwidth * 1e3}

    def forward(model, inp):
        def run():
            with torch.no_grad():
                model(inp)
        return run

    times = interleaved({"tsparse": forward(peer, x), "reference": forward(ref, x_ref)}, b.warmup, b.repeats)
    row.update(fwd_tsparse_ms=statistics.median(times["tsparse"]) * 1e3,
               fwd_reference_ms=statistics.median(times["reference"]) * 1e3,
               fwd_ratio=paired(times, "tsparse", "reference"))

    ts_opt = SparseAwareAdamW(peer.parameters(), lr=1e-4)

    def ts_step():
        ts_opt.zero_grad(set_to_none=True)
        peer(x).pow(2).mean().backward()
        grad_norm_and_clip_(list(peer.parameters()), 1.0)
        ts_opt.step()

    steps = {"tsparse": ts_step}
    if not big:
        tables = [ref.weight_down_embed.weight, ref.weight_up_embed.weight]
        sparse_adam = torch.optim.SparseAdam(tables, lr=1e-4)
        adam = torch.optim.Adam([ref.keys, ref.to_queries[0].weight], lr=1e-4)

        def ref_step():
            for opt in (sparse_adam, adam):
                opt.zero_grad(set_to_none=True)
            ref(x_ref).pow(2).mean().backward()
            sparse_adam.step()
            adam.step()
        steps["reference"] = ref_step
    times = interleaved(steps, b.warmup, b.repeats)
    row["train_tsparse_ms"] = statistics.median(times["tsparse"]) * 1e3
    if not big:
        row.update(train_reference_ms=statistics.median(times["reference"]) * 1e3,
                   train_ratio=paired(times, "tsparse", "reference"))
    return row


def bench_mhc(cfg: DictConfig) -> dict:
    from hyper_connections import mHC

    m = cfg.bench.mhc
    torch.manual_seed(0)
    branch = nn.Linear(m.dim, m.dim)
    ours = HyperConnection(m.dim, MHCSpec(streams=m.streams, sinkhorn_iters=m.sinkhorn_iters))
    ref = mHC(m.streams, dim=m.dim, branch=branch, layer_index=0, sinkhorn_iters=m.sinkhorn_iters)
    x = torch.randn(m.batch_size, m.seq_len, m.streams, m.dim)
    x_ref = x.transpose(1, 2).reshape(m.batch_size * m.streams, m.seq_len, m.dim)  # its (b s) n d layout

    def fwd(fn):
        def run():
            with torch.no_grad():
                fn()
        return run

    def train(fn, params):
        def run():
            for p in params:
                p.grad = None
            fn().pow(2).mean().backward()
        return run

    fns = {"fwd_tsparse": fwd(lambda: ours(x, branch)), "fwd_reference": fwd(lambda: ref(x_ref)),
           "train_tsparse": train(lambda: ours(x, branch), [*ours.parameters(), *branch.parameters()]),
           "train_reference": train(lambda: ref(x_ref), list(ref.parameters()))}
    times = interleaved(fns, cfg.bench.warmup, cfg.bench.repeats)
    row = {k + "_ms": statistics.median(v) * 1e3 for k, v in times.items()}
    row.update(fwd_ratio=paired(times, "fwd_tsparse", "fwd_reference"),
               train_ratio=paired(times, "train_tsparse", "train_reference"))
    return row


def bench_optimizer(cfg: DictConfig) -> dict:
    """Dense AdamW step over ~optim_params fp32 params (2048-wide matrices and norm vectors)."""
    def params():
        torch.manual_seed(0)
        ps = [nn.Parameter(torch.randn(2048, 1024)) for _ in range(cfg.bench.optim_params // (2048 * 1024))]
        ps += [nn.Parameter(torch.ones(2048)) for _ in range(len(ps))]
        for p in ps:
            p.grad = torch.randn_like(p) * 1e-3
        return ps
    ours, ref = params(), params()
    opts = {"tsparse": SparseAwareAdamW([{"name": "base", "params": ours}], lr=1e-4, weight_decay=0.1),
            "torch_fused": torch.optim.AdamW(ref, lr=1e-4, weight_decay=0.1, fused=True)}
    times = interleaved({k: o.step for k, o in opts.items()}, cfg.bench.warmup, cfg.bench.repeats)
    return {"params": sum(p.numel() for p in ours), **{k + "_ms": statistics.median(v) * 1e3 for k, v in times.items()},
            "ratio": paired(times, "tsparse", "torch_fused")}


def reference_names() -> tuple[str, str]:
    """"peer-pytorch <version>", "hyper-connections <version>": the packages bench=peers times against."""
    try:
        return tuple(f"{name} {version(name)}" for name in ("peer-pytorch", "hyper-connections"))
    except PackageNotFoundError as err:
        raise SystemExit(f"bench=peers needs the optional extra: pip install -e '.[bench]' ({err} is missing)") from None


def run(cfg: DictConfig, out_dir: Path) -> str:
    """Run every comparison, write bench.md and return it (rows are also printed as they come)."""
    peer_ref, mhc_ref = reference_names()
    b = cfg.bench
    if b.threads:
        torch.set_num_threads(b.threads)
    bandwidth = copy_bandwidth()
    lines = [f"Bench `peers` on CPU ({torch.get_num_threads()} threads), torch {torch.__version__}; medians of "
             f"{b.repeats} interleaved repeats after {b.warmup}; ratio = median of paired tsparse / {peer_ref} "
             f"(PEER), tsparse / {mhc_ref} (mHC). "
             f"Floor: distinct table rows x dim x bytes, both tables (x2 for training: read and write back), "
             f"at the measured copy bandwidth {bandwidth / 1e9:.1f} GB/s.", "",
             f"| PEER d | experts | tables | tokens | distinct rows | fwd tsparse ms | fwd {peer_ref} ms | fwd ratio "
             f"| fwd floor ms | train tsparse ms | train {peer_ref} + SparseAdam ms | train ratio | train floor ms |",
             "|" + "---|" * 13]
    print("\n".join(lines), flush=True)
    for dim in b.dims:
        for experts in b.experts:
            gc.collect()
            r = bench_peer(cfg, dim, experts, bandwidth)
            train_ref = (f"{r['train_reference_ms']:.1f} | {r['train_ratio']:.3f}" if "train_ratio" in r
                         else "skipped (SparseAdam state > RAM) | -")
            line = (f"| {dim} | {experts:,} | {r['table_dtype']} | {b.tokens} | {r['distinct_rows']:,} | "
                    f"{r['fwd_tsparse_ms']:.1f} | {r['fwd_reference_ms']:.1f} | {r['fwd_ratio']:.3f} | "
                    f"{r['fwd_floor_ms']:.2f} | {r['train_tsparse_ms']:.1f} | {train_ref} | {r['train_floor_ms']:.2f} |")
            print(line, flush=True)
            lines.append(line)
    m = bench_mhc(cfg)
    mc = b.mhc
    lines += ["", f"mHC, one wrapped Linear({mc.dim}) layer, {mc.streams} streams, {mc.batch_size}x{mc.seq_len} tokens: "
              f"forward {m['fwd_tsparse_ms']:.1f} ms vs {mhc_ref} {m['fwd_reference_ms']:.1f} ms "
              f"(ratio {m['fwd_ratio']:.3f}); forward+backward {m['train_tsparse_ms']:.1f} vs "
              f"{m['train_reference_ms']:.1f} ms (ratio {m['train_ratio']:.3f})."]
    o = bench_optimizer(cfg)
    lines.append(f"Dense optimizer step, {o['params'] / 1e6:.1f}M fp32 params: SparseAwareAdamW {o['tsparse_ms']:.1f} ms "
                 f"vs torch.optim.AdamW(fused=True) {o['torch_fused_ms']:.1f} ms (ratio {o['ratio']:.3f}).")
    report = "\n".join(lines) + "\n"
    (out_dir / "bench.md").write_text(report)
    return report
