"""Downstream evaluation through lm-evaluation-harness (`pip install -e ".[eval]"`).

    python -m tsparse.lm_eval PATH --tasks T1,T2 [--limit N] [--batch-size B] [--num-fewshot K]
        [--include-path DIR] [--output FILE] [--device cpu|cuda] [--checkpoint best|last|FILE]

PATH is an exported HF model dir, a tsparse run dir (its --checkpoint), a .ckpt inside a run dir or a hub
id. The loaded model goes to lm-eval's `HFLM` and `simple_evaluate`; --include-path adds a folder of task
YAMLs (when it holds every task asked for, lm-eval's own task index is not built). The results JSON
(default: PATH/lm_eval.json, RUN_DIR/lm_eval.json for a .ckpt; a hub id needs --output) holds each task's
metrics under lm-eval's `metric,filter` keys, its number of documents, and the settings of the run.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from tsparse.cli import ArgumentParser, one_line_errors, positive_int
from tsparse.config import ConfigError
from tsparse.export import load_model
from tsparse.generate import device_type

RESULTS_FILE = "lm_eval.json"


def non_negative_int(text: str) -> int:
    """argparse type: an integer >= 0."""
    if not text.isdigit():
        raise argparse.ArgumentTypeError(f"{text!r} is not a non-negative integer")
    return int(text)


def task_list(text: str) -> list[str]:
    """argparse type: comma-separated task names."""
    tasks = [t.strip() for t in text.split(",")]
    if not all(tasks):
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of task names")
    return tasks


def default_output(path: Path) -> Path:
    """lm_eval.json in the run or model dir (the run dir of a .ckpt in RUN_DIR/checkpoints)."""
    if path.is_file():
        return path.parent.parent / RESULTS_FILE
    if path.is_dir():
        return path / RESULTS_FILE
    raise ConfigError(f"{path} is not a local dir (for a hub id, name the results file with --output)")


def task_manager(tasks: list[str], include_path: Path | None):
    """lm-eval's TaskManager knowing `tasks`; only the include path is indexed when it holds them all."""
    from lm_eval.tasks import TaskManager

    if include_path is not None:
        if not include_path.is_dir():
            raise ConfigError(f"--include-path {include_path} is not a directory")
        local = TaskManager(include_path=str(include_path), include_defaults=False)
        if set(tasks) <= set(local.all_tasks):
            return local
    manager = TaskManager(include_path=None if include_path is None else str(include_path))
    unknown = [t for t in tasks if t not in manager.all_tasks]
    if unknown:
        raise ConfigError(f"unknown lm-eval task(s): {', '.join(unknown)} (list them with `lm-eval ls tasks`)")
    return manager


def evaluate(model, tokenizer, tasks: list[str], manager, limit: int | None = None, batch_size: int = 8,
             num_fewshot: int | None = None) -> dict:
    """simple_evaluate on an HFLM wrapping `model`: {"results": {task: {metric: value}}, "n_docs", "n_shot",
    "versions"}."""
    import lm_eval
    from lm_eval.models.huggingface import HFLM

    lm = HFLM(pretrained=model, tokenizer=tokenizer, backend="causal", batch_size=batch_size)
    out = lm_eval.simple_evaluate(model=lm, tasks=tasks, task_manager=manager, limit=limit,
                                  num_fewshot=num_fewshot, log_samples=False)
    return {
        "results": {task: {k: v for k, v in metrics.items() if k != "sample_len" and isinstance(v, (int, float))}
                    for task, metrics in out["results"].items()},
        "n_docs": {task: n["effective"] for task, n in out["n-samples"].items()},
        "n_shot": out["n-shot"],
        "versions": out["versions"],
    }


def main(argv: list[str] | None = None) -> dict:
    parser = ArgumentParser(prog="python -m tsparse.lm_eval", description=__doc__.split("\n\n")[0])
    parser.add_argument("path", type=Path, metavar="PATH")
    parser.add_argument("--tasks", type=task_list, required=True, help="comma-separated lm-eval task names")
    parser.add_argument("--limit", type=positive_int, help="at most this many documents per task")
    parser.add_argument("--batch-size", type=positive_int, default=8)
    parser.add_argument("--num-fewshot", type=non_negative_int, help="default: each task's own")
    parser.add_argument("--include-path", type=Path, help="a folder of extra task YAMLs")
    parser.add_argument("--output", type=Path, help=f"results JSON (default: PATH/{RESULTS_FILE})")
    parser.add_argument("--checkpoint", default="last", help="for a run dir: best, last (default) or a .ckpt path")
    parser.add_argument("--device", type=device_type, default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)
    try:
        import lm_eval
    except ImportError:
        parser.error('needs lm-evaluation-harness: pip install -e ".[eval]"')
    with one_line_errors(OSError, ValueError):
        output = args.output or default_output(args.path)
        if not output.parent.is_dir():
            raise ConfigError(f"--output {output}: folder {output.parent} does not exist")
        manager = task_manager(args.tasks, args.include_path)
        model, tokenizer = load_model(args.path, args.checkpoint)
    with one_line_errors(OSError):  # e.g. a hub task's dataset while offline
        scores = evaluate(model.to(args.device), tokenizer, args.tasks, manager, args.limit, args.batch_size,
                          args.num_fewshot)
    result = {"model": str(args.path), "checkpoint": args.checkpoint, "tasks": args.tasks, "limit": args.limit,
              "num_fewshot": args.num_fewshot, "batch_size": args.batch_size, "device": args.device,
              "lm_eval_version": lm_eval.__version__, **scores}
    output.write_text(json.dumps(result, indent=2))
    print(json.dumps(result["results"], indent=2))
    print(f"wrote {output}")
    return result


if __name__ == "__main__":
    main()
