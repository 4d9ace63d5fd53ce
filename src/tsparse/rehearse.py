"""Rehearsal at TinyLlama's real shape on CPU, offline: train -> export -> reload -> generate -> lm-eval.

    python -m tsparse.rehearse [--experts 262144] [--ranks 2] [--work DIR] [--keep]

The base is a random-init `LlamaForCausalLM` of TinyLlama's architecture (the `model=tinyllama` config)
saved with `save_pretrained`, with a BPE tokenizer trained on the local WikiText-2 (`random_base`). With the
seed placement it trains `+experiment=diff_lr` for 3 steps (batch 1 x 64, bf16 tables), exports the run,
greedy-generates 8 tokens from the run dir and from `AutoModelForCausalLM.from_pretrained(export)` (they
must agree), and runs `tsparse.lm_eval` on a local 2-document task. Each stage runs in its own process;
the table gives its wall time and peak RSS. The pieces are `tsparse.stages`, which `tsparse.gpu_check`
reuses.

`--ranks N` trains on N CPU ranks (`trainer=ddp tables=sharded optim.base_dtype=bfloat16`) and
exports at the end of training too (rank 0 gathers the tables); generation from that export must agree
with the run dir's checkpoint read whole in one process. A stage's peak RSS is its largest process's.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

from tsparse.cli import ArgumentParser, fail, positive_int
from tsparse.config import project_root
from tsparse.stages import Stage, call, in_work_dir, run_stage, stage_table, train_args

TASK = "rehearsal_mc"
TASK_DOCS = [{"question": "The capital of France is", "choices": ["Paris", "London"], "answer": 0},
             {"question": "Two plus two is", "choices": ["three", "four"], "answer": 1}]


def local_task(folder: Path) -> Path:
    """A 2-document multiple-choice lm-eval task `rehearsal_mc` over a local JSONL file, in `folder`."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "docs.jsonl").write_text("".join(json.dumps(d) + "\n" for d in TASK_DOCS))
    (folder / f"{TASK}.yaml").write_text(json.dumps({
        "task": TASK, "dataset_path": "json", "dataset_kwargs": {"data_files": {"test": str(folder / "docs.jsonl")}},
        "test_split": "test", "output_type": "multiple_choice", "doc_to_text": "{{question}}",
        "doc_to_choice": "{{choices}}", "doc_to_target": "answer",
        "metric_list": [{"metric": "acc", "aggregation": "mean", "higher_is_better": True}]}))
    return folder


def rehearse(work: Path, experts: int, data_dir: str, ranks: int = 1) -> list[Stage]:
    base, run_dir, out, gathered = work / "base", work / "run", work / "export", work / "export-at-end"
    stages = [run_stage("base (random init)", call("random_base", str(base), data_dir), work)]
    sharded = ("trainer=ddp", f"trainer.devices={ranks}", "tables=sharded", "optim.base_dtype=bfloat16",
               f"export_dir={gathered}") if ranks > 1 else ()
    train = train_args(work, base, run_dir, data_dir, "data.batch_size=1", "data.block_size=64",
                       f"peer.num_experts={experts}", "peer.table_dtype=bfloat16", "engram.table_dtype=bfloat16",
                       *sharded)
    on_ranks = f" on {ranks} ranks, tables sharded" if ranks > 1 else ""
    generate = [("reload + generate (the export at the end of training)",
                 call("compare_generation", str(run_dir), str(gathered)))] if ranks > 1 else []
    for name, args in ((f"train diff_lr 3 steps{on_ranks}", train),
                       ("export", ["-m", "tsparse.export", str(run_dir), str(out)]),
                       ("reload + generate", call("compare_generation", str(run_dir), str(out))),
                       *generate,
                       ("lm_eval --limit 2", ["-m", "tsparse.lm_eval", str(out), "--tasks", TASK, "--include-path",
                                              str(local_task(work / "tasks")), "--limit", "2", "--batch-size", "1",
                                              "--device", "cpu"])):
        if not stages[-1].ok:
            break
        stages.append(run_stage(name, args, work))
    return stages


def main(argv: list[str] | None = None) -> list[Stage]:
    parser = ArgumentParser(prog="python -m tsparse.rehearse", description=__doc__.split("\n\n")[0])
    parser.add_argument("--experts", type=positive_int, default=262144, help="PEER experts (a perfect square)")
    parser.add_argument("--ranks", type=positive_int, default=1, help="train on N CPU ranks with sharded tables")
    parser.add_argument("--work", type=Path, help="working folder (default: a temporary one, removed after)")
    parser.add_argument("--keep", action="store_true", help="keep the temporary working folder")
    parser.add_argument("--data-dir", default=str(Path(project_root()).parent / "shared" / "data" / "wikitext-2"))
    args = parser.parse_args(argv)
    if args.work is not None and args.work.exists() and not args.work.is_dir():
        fail(f"--work {args.work} is a file; name a folder")
    if not Path(args.data_dir, "train.txt").is_file():
        fail(f"--data-dir {args.data_dir} holds no train.txt (the local WikiText-2 copy)")
    start = time.perf_counter()
    stages = in_work_dir(args.work, "tsparse-rehearse-", args.keep,
                         lambda work: rehearse(work, args.experts, args.data_dir, args.ranks))
    layout = f", {args.ranks} ranks, sharded tables, bf16 base" if args.ranks > 1 else ""
    print(f"\nTinyLlama rehearsal, {args.experts:,} experts, bf16 tables{layout}, {time.perf_counter() - start:.0f} s in all:")
    print(stage_table(stages))
    if not all(s.ok for s in stages) or len(stages) < 5 + (args.ranks > 1):
        raise SystemExit(1)
    return stages


if __name__ == "__main__":
    main()
