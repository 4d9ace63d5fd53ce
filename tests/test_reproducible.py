"""Pretraining from scratch is reproducible: two processes with the same seed and thread count, each
training its own tokenizer, export bit-identical weights and tokenizers."""
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from safetensors.torch import load_file


@pytest.mark.slow  # two CLI runs: about 50 s on 2 cores
def test_two_pretraining_runs_give_bit_identical_weights(tmp_path, wikitext_small, nano, cli):
    def pretrain(name: str):
        work = tmp_path / name  # its own run dir, tokenizer cache and artifacts
        args = [a for a in nano(work, wikitext_small, "+experiment=pretrain_micro", "trainer.max_steps=4",
                                "trainer.val_check_interval=4", "trainer.limit_val_batches=1", "optim.warmup_steps=1",
                                "test=false") if not a.startswith("paths.output_dir")]
        return cli("tsparse.train", *args, f"hydra.run.dir={work / 'run'}"), work / "artifacts" / "nano-base"

    with ThreadPoolExecutor(2) as pool:  # two separate processes, side by side
        runs = list(pool.map(pretrain, ("a", "b")))
    for proc, _ in runs:
        assert proc.returncode == 0, proc.stderr[-2000:]
    (_, a), (_, b) = runs
    assert (a / "tokenizer.json").read_bytes() == (b / "tokenizer.json").read_bytes()
    wa, wb = load_file(a / "model.safetensors"), load_file(b / "model.safetensors")
    assert wa.keys() == wb.keys() and wa
    assert [k for k in wa if not torch.equal(wa[k], wb[k])] == []
