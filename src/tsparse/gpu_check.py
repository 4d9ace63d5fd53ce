"""GPU check at TinyLlama dims (random init, offline), in a few minutes on one GPU; prints one table.

    python -m tsparse.gpu_check [--experts 262144] [--work DIR]

Stages, each in its own process (`stages.run_stage`): 3 steps of `+experiment=diff_lr` with trainer=gpu
(bf16-mixed), eager and with `compile=true`; greedy generation from the eager run and its export, with and
without the KV cache (same tokens); 3 steps of 2-GPU DDP over NCCL when two GPUs are visible; and
`bench=tinyllama` with two expert counts and two repeats. Without CUDA it exits 2 with one `error:` line.
"""
from __future__ import annotations

import time
from pathlib import Path

import torch

from tsparse.cli import ArgumentParser, fail, positive_int
from tsparse.config import project_root
from tsparse.stages import call, in_work_dir, run_stage, stage_table, train_args


def gpu_check(work: Path, experts: int, data_dir: str) -> list:
    base = work / "base"
    stages = [run_stage("base (random init)", call("random_base", str(base), data_dir), work)]
    if not stages[0].ok:
        return stages

    def train(name: str, run: str, trainer: str, *extra: str):
        args = train_args(work, base, work / run, data_dir, f"trainer={trainer}", f"peer.num_experts={experts}", *extra)
        stages.append(run_stage(name, args, work))

    train("train eager", "eager", "gpu", f"export_dir={work / 'export'}")
    train("train compile=true", "compiled", "gpu", "compile=true")
    if stages[1].ok:
        stages.append(run_stage("generate cache vs no cache",
                                call("compare_generation", str(work / "eager"), str(work / "export"), 8, "cuda"), work))
    if torch.cuda.device_count() >= 2:
        train("train 2-GPU DDP (NCCL)", "ddp", "ddp_gpu", "trainer.devices=2")
    stages.append(run_stage("bench=tinyllama", ["-m", "tsparse.bench", "bench=tinyllama", "bench.iters=2",
                                                "bench.experts=[16384,262144]", f"hydra.run.dir={work / 'bench'}"], work))
    return stages


def main(argv: list[str] | None = None) -> list:
    parser = ArgumentParser(prog="python -m tsparse.gpu_check", description=__doc__.split("\n\n")[0])
    parser.add_argument("--experts", type=positive_int, default=262144, help="PEER experts (a perfect square)")
    parser.add_argument("--work", type=Path, help="working folder (default: a temporary one, removed after)")
    parser.add_argument("--data-dir", default=str(Path(project_root()).parent / "shared" / "data" / "wikitext-2"))
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        fail("tsparse.gpu_check needs a CUDA GPU and torch.cuda.is_available() is False")
    start = time.perf_counter()
    stages = in_work_dir(args.work, "tsparse-gpu-check-", False, lambda work: gpu_check(work, args.experts, args.data_dir))
    print(f"\nGPU check on {torch.cuda.get_device_name()} x {torch.cuda.device_count()}, {args.experts:,} experts, "
          f"{time.perf_counter() - start:.0f} s in all:")
    print(stage_table(stages))
    if not all(s.ok for s in stages):
        raise SystemExit(1)
    return stages


if __name__ == "__main__":
    main()
