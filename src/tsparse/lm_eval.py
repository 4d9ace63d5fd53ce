"""Downstream evaluation through lm-evaluation-harness (`pip install -e ".[eval]"`).

    python -m tsparse.lm_eval PATH --tasks T1,T2 [--limit N] [--batch-size B] [--num-fewshot K]
        [--include-path DIR] [--output FILE] [--device cpu|cuda] [--checkpoint best|last|FILE]

PATH is an exported HF model dir, a tsparse run dir (its --checkpoint), a .ckpt inside a run dir or a hub
id. The loaded model goes to lm-eval's `HFLM` and `simple_evaluate`; --include-path adds a folder of task
YAMLs (when it holds every task asked for, lm-eval's own task index is not built). An include path is code:
lm-eval runs the Python its YAMLs name with `!function`, so include only folders you trust. Every task's
documents are read and checked before the model is evaluated. The results JSON
(default: PATH/lm_eval.json, RUN_DIR/lm_eval.json for a .ckpt; a hub id needs --output) holds each task's
metrics under lm-eval's `metric,filter` keys, its number of documents, and the settings of the run.
"""
from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

import torch

from tsparse.checks import ConfigError
from tsparse.cli import ArgumentParser, device_type, non_negative_int, one_line, one_line_errors, positive_int
from tsparse.loading import LM_EVAL_RESULTS, load_model


def task_list(text: str) -> list[str]:
    """argparse type: comma-separated task names."""
    tasks = [t.strip() for t in text.split(",")]
    if not all(tasks):
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of task names")
    return tasks


def default_output(path: Path) -> Path:
    """lm_eval.json in the run or model dir (the run dir of a .ckpt in RUN_DIR/checkpoints)."""
    if path.is_file():
        return path.parent.parent / LM_EVAL_RESULTS
    if path.is_dir():
        return path / LM_EVAL_RESULTS
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


def check_output(output: Path) -> None:
    if output.is_dir():
        raise ConfigError(f"--output {output} is a folder; name a results file, e.g. {output / LM_EVAL_RESULTS}")
    if not output.parent.is_dir():
        raise ConfigError(f"--output {output}: folder {output.parent} does not exist")


def leaf_tasks(task_dict: dict) -> dict:
    """name -> Task of every task in lm-eval's (possibly grouped) task dict."""
    leaves = {}
    for key, value in task_dict.items():
        leaves.update(leaf_tasks(value) if isinstance(value, dict) else {getattr(key, "group", key): value})
    return leaves


def check_documents(tasks: list[str], manager) -> None:
    """Load every task and read each of its evaluation documents as lm-eval will: prompt, choices and a
    target among them; a broken file or document is one ConfigError line naming the task and document."""
    import datasets
    from lm_eval.tasks import get_task_dict

    datasets.disable_progress_bars()  # errors stay one line: ours, with the cause datasets would log
    datasets.utils.logging.set_verbosity(logging.CRITICAL)
    try:
        task_dict = get_task_dict(tasks, manager)
    except Exception as err:  # datasets and lm-eval raise ValueError, StopIteration, KeyError... on bad files
        raise ConfigError(f"lm-eval could not load {', '.join(tasks)} ({type(err).__name__}: {one_line(err)})") from None
    for name, task in leaf_tasks(task_dict).items():
        docs = list(task.eval_docs)
        if not docs:
            raise ConfigError(f"task {name} has no documents")
        for i, doc in enumerate(docs):
            try:
                task.doc_to_text(doc)
                target = task.doc_to_target(doc)
                if task.OUTPUT_TYPE == "multiple_choice":
                    choices = task.doc_to_choice(doc)
                    if isinstance(target, int) and not 0 <= target < len(choices):
                        raise ValueError(f"target {target} is not one of its {len(choices)} choices")
            except Exception as err:
                raise ConfigError(f"task {name}, document {i}: {type(err).__name__}: {err}") from None


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
    parser.add_argument("--output", type=Path, help=f"results JSON (default: PATH/{LM_EVAL_RESULTS})")
    parser.add_argument("--checkpoint", default="last", help="for a run dir: best, last (default) or a .ckpt path")
    parser.add_argument("--device", type=device_type, default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)
    try:
        import lm_eval
    except ImportError:
        parser.error('needs lm-evaluation-harness: pip install -e ".[eval]"')
    with one_line_errors(OSError, ValueError):
        output = args.output or default_output(args.path)
        check_output(output)
        manager = task_manager(args.tasks, args.include_path)
        check_documents(args.tasks, manager)
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
