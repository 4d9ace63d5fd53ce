"""Helpers shared by the tests (the fixtures in conftest.py wrap them): the one tiny LLaMA config factory
(`tiny_llama_config`, every test's tiny base), the tiny-model factory on it and its stand-in tokenizer, and the
one-error-line check of the CLIs; weights are perturbed with tsparse.modules.perturb.perturb_."""
from __future__ import annotations

import csv
import json

import pytest
import torch

TINY_ARCH = dict(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=2,
                 num_key_value_heads=1, max_position_embeddings=64)   # also a `model.config` node's form
TINY_BASE = dict(TINY_ARCH, eos_token_id=0, bos_token_id=0, pad_token_id=0)


class CaseTokenizer:
    """A stand-in tokenizer whose ids i and i + half differ only by case (so they share a compressed id)."""

    def __init__(self, half: int = 48):
        self.half = half

    def decode(self, ids):
        return f"tok{ids[0] % self.half}" if ids[0] < self.half else f"TOK{ids[0] % self.half}"

    def convert_ids_to_tokens(self, i):
        return self.decode([i])


def tiny_llama_config(**overrides):
    """The tests' tiny LLaMA: a LlamaConfig of TINY_BASE (3 layers, d=32, vocab 96, 64 positions, token ids 0)
    with keyword `overrides` (more layers or positions, a tokenizer's vocab and ids; None for HF's default)."""
    from transformers import LlamaConfig

    return LlamaConfig(**{**TINY_BASE, **overrides})


def make_tiny_model(specs: dict, seed: int = 0, perturb: float = 0.0, tokenizer=None, **base):
    """A random-init TsparseForCausalLM on `tiny_llama_config(**base)` with `specs` attached (their module data
    from `tokenizer`, default a CaseTokenizer), in eval mode; with `perturb`, every sparse module's weights
    get noise of that scale (see tsparse.modules.perturb.perturb_)."""
    from tsparse import TsparseConfig, TsparseForCausalLM
    from tsparse.modules.perturb import perturb_

    torch.manual_seed(seed)
    config = TsparseConfig.from_base(tiny_llama_config(**base), specs, tokenizer=CaseTokenizer() if tokenizer is None else tokenizer)
    model = TsparseForCausalLM(config).eval()
    if perturb:
        for module in model.sparse_modules().values():
            perturb_(module, perturb)
    return model


def one_error_line(capsys, call) -> str:
    """The one `error:` line (exit code 2) that `call()` must end with."""
    with pytest.raises(SystemExit) as exit_info:
        call()
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("error: "), err
    return err


def write_run(run_dir, experiment="peer", seed=0, acc=None, results=None):
    """A fake run dir as tsparse.report reads it: config.yaml, results.json (`results`, else a tsparse one whose
    test ppl is 100 + seed) and, with `acc`, lm_eval.json."""
    run_dir.mkdir(parents=True)
    (run_dir / "config.yaml").write_text(f"experiment_name: {experiment}\nrun_name: {experiment},seed={seed}\n"
                                         f"seed: {seed}\noptim: {{base: frozen}}\n")
    results = results or {"test/ppl": 100.0 + seed, "params": {"base": 10}, "versions": {"tsparse": "0.1.0"}}
    (run_dir / "results.json").write_text(json.dumps(results))
    if acc is not None:
        (run_dir / "lm_eval.json").write_text(json.dumps({"results": {"hellaswag": {
            "acc,none": acc, "acc_stderr,none": 0.01, "acc_norm,none": acc + 0.1, "acc_norm_stderr,none": 0.01}}}))


def logged_train_steps(run_dir) -> list[int]:
    """The step of every train/loss row of the run's csv/metrics.csv, repeats included."""
    with open(run_dir / "csv" / "metrics.csv", newline="") as f:
        return [int(r["step"]) for r in csv.DictReader(f) if r.get("train/loss")]


def autograd_saved_bytes(model, ids) -> int:
    """Bytes of the tensors autograd saves (parameters left out) in a training forward of `model` on `ids`."""
    from tsparse.lit_module import next_token_loss

    params = {p.untyped_storage()._cdata for p in model.parameters()}
    saved = {}

    def pack(t):
        if t.untyped_storage()._cdata not in params:
            saved[t.untyped_storage()._cdata] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        next_token_loss(model, ids)
    return sum(saved.values())
