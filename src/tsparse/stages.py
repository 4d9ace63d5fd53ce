"""Staged runs, shared by `tsparse.rehearse` and `tsparse.gpu_check`: each stage is `python ARGS` in its own
process (`run_stage`: wall time, peak RSS, the last line it printed), in a working folder (`in_work_dir`),
summed up in one table (`stage_table`). The stages both CLIs run: the random-init base (`random_base`), a short
`tsparse.train` run (`train_args`) and the greedy-generation comparison of a run and its export
(`compare_generation`), the Python ones through `call`.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from tsparse.config import project_root

BASE_TOKENIZER_VOCAB = 8192   # the tokenizer's ids all lie inside TinyLlama's 32,000-row embedding


@dataclass
class Stage:
    name: str
    seconds: float
    peak_rss: int      # bytes, of the stage's process (os.wait4)
    ok: bool
    note: str = ""


def in_work_dir(work: Path | None, prefix: str, keep: bool, stages: Callable[[Path], list[Stage]]) -> list[Stage]:
    """`stages(folder)` in `work`, or in a temporary folder it creates and then removes (unless `keep`)."""
    folder = work or Path(tempfile.mkdtemp(prefix=prefix))
    folder.mkdir(parents=True, exist_ok=True)
    try:
        return stages(folder)
    finally:
        if work is None and not keep:
            shutil.rmtree(folder, ignore_errors=True)


def run_stage(name: str, args: list[str], log_dir: Path, timeout: float = 3600) -> Stage:
    """Run `python ARGS` as one stage: its wall time, peak RSS, and the last line it printed (its note).
    Output goes to LOG_DIR/NAME.log."""
    log = log_dir / f"{name.replace(' ', '_')}.log"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "WANDB_MODE": "offline"}
    start = time.perf_counter()
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, *args], stdout=out, stderr=subprocess.STDOUT, env=env,
                                cwd=project_root())
        deadline = start + timeout
        while (waited := os.wait4(proc.pid, os.WNOHANG))[0] == 0:
            if time.perf_counter() > deadline:
                proc.kill()
            time.sleep(0.2)
    _, status, usage = waited
    lines = log.read_text().strip().splitlines() or [""]
    stage = Stage(name, time.perf_counter() - start, usage.ru_maxrss * 1024, os.waitstatus_to_exitcode(status) == 0,
                  lines[-1][:100])
    print(f"[{name}] {'ok' if stage.ok else 'FAILED'} in {stage.seconds:.0f} s, peak RSS "
          f"{stage.peak_rss / 2**30:.2f} GiB: {stage.note}", flush=True)
    if not stage.ok:
        print("\n".join(lines[-30:]), flush=True)
    return stage


def stage_table(stages: list[Stage]) -> str:
    lines = ["| stage | result | wall s | peak RSS GiB | last line |", "|---|---|---:|---:|---|"]
    lines += [f"| {s.name} | {'ok' if s.ok else 'FAILED'} | {s.seconds:.0f} | {s.peak_rss / 2**30:.2f} | "
              f"{s.note.replace('|', '/')} |" for s in stages]
    return "\n".join(lines)


def random_base(target: str, data_dir: str, dtype: str = "bfloat16") -> None:
    """Save a random-init LlamaForCausalLM of the `model=tinyllama` architecture (in `dtype`) and a BPE
    tokenizer trained on DATA_DIR/train.txt into `target`: a local stand-in for the hub checkpoint."""
    import torch
    from omegaconf import OmegaConf
    from transformers import LlamaConfig, LlamaForCausalLM

    from tsparse.build import DTYPES
    from tsparse.config import compose_config
    from tsparse.tokenizer import train_bpe

    tokenizer = train_bpe(Path(data_dir, "train.txt").read_text(), BASE_TOKENIZER_VOCAB)
    arch = OmegaConf.to_container(compose_config(["model=tinyllama"]).model.config, resolve=True)
    config = LlamaConfig(**arch, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    torch.manual_seed(0)
    with torch.device("cpu"):
        model = LlamaForCausalLM(config).to(DTYPES[dtype])
    model.save_pretrained(target)
    tokenizer.save_pretrained(target)
    print(f"random-init base: {sum(p.numel() for p in model.parameters()):,} params in {target}")


def compare_generation(run_dir: str, export_dir: str, max_new_tokens: int = 8, device: str = "cpu") -> None:
    """Greedy token ids from the run dir (KV cache), and from the export reloaded with
    `AutoModelForCausalLM.from_pretrained`, with and without the cache: all must agree, else exit 1. Ids, not
    text: a random-init 32,000-row model picks ids the stand-in tokenizer cannot decode."""
    import gc

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tsparse.loading import load_model

    def greedy(model, tokenizer, use_cache: bool = True) -> list[int]:
        ids = tokenizer(["The Tower of London"], return_tensors="pt").input_ids.to(device)
        with torch.no_grad():
            out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                                 min_new_tokens=max_new_tokens, do_sample=False, use_cache=use_cache,
                                 pad_token_id=tokenizer.eos_token_id)
        return out[0, ids.shape[1]:].tolist()

    model, tokenizer = load_model(Path(run_dir))
    before = greedy(model.to(device), tokenizer)
    del model
    gc.collect()
    model = AutoModelForCausalLM.from_pretrained(export_dir, dtype=torch.float32).to(device).eval()
    tokenizer = AutoTokenizer.from_pretrained(export_dir)
    after, uncached = greedy(model, tokenizer), greedy(model, tokenizer, use_cache=False)
    same = before == after == uncached and len(after) == max_new_tokens
    print(json.dumps({"run_dir": before, "reloaded": after, "reloaded_no_cache": uncached}))
    print(f"generation {'identical' if same else 'DIFFERS'}: {len(after)} token ids {after}")
    raise SystemExit(0 if same else 1)


def train_args(work: Path, base: Path, run_dir: Path, data_dir: str, *extra: str) -> list[str]:
    """`-m tsparse.train` arguments: +experiment=diff_lr at the seed placement on the random base, 3 steps,
    1 validation and test batch, CSV logging, only last.ckpt, everything under `work`."""
    return ["-m", "tsparse.train", "+experiment=diff_lr", "model=tinyllama", f"model.name_or_path={base}",
            f"data.data_dir={data_dir}", "data.eval_batch_size=1", "trainer.max_steps=3",
            "trainer.val_check_interval=3", "trainer.limit_val_batches=1", "trainer.limit_test_batches=1",
            "trainer.log_every_n_steps=1", "+trainer.num_sanity_val_steps=0", "trainer.enable_progress_bar=false",
            "callbacks.model_checkpoint.save_top_k=0", "logger=csv", f"paths.output_dir={run_dir}",
            f"hydra.run.dir={run_dir}", f"paths.cache_dir={work / 'cache'}", f"paths.artifact_dir={work / 'artifacts'}",
            *extra]


def call(function: str, *args: object) -> list[str]:
    """`python` arguments that run `tsparse.stages.<function>(*args)` in a fresh process."""
    return ["-c", f"from tsparse.stages import {function}; {function}(*{list(args)!r})"]
