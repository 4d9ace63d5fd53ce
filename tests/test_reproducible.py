"""Pretraining from scratch is reproducible: two processes with the same seed and thread count, each
training its own tokenizer, export bit-identical weights and tokenizers; with the CPU kernels pinned
(`tsparse.machine.PINNED_KERNELS`), so do processes on an emulated AVX2-only machine."""
import json
import re
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from safetensors.torch import load_file

from tsparse.machine import PINNED_KERNELS

# An AVX2-only machine as far as MKL and oneDNN can be told (ATen's own cap is what the pin sets).
AVX2_MACHINE = {"MKL_ENABLE_INSTRUCTIONS": "AVX2", "ONEDNN_MAX_CPU_ISA": "AVX2"}


def pretrain_nano(work, data, nano, cli, env=None):
    """A 4-step nano pretraining in its own run dir, tokenizer cache and artifacts; returns (proc, base dir)."""
    args = [a for a in nano(work, data, "+experiment=pretrain_micro", "trainer.max_steps=4",
                            "trainer.val_check_interval=4", "trainer.limit_val_batches=1", "optim.warmup_steps=1",
                            "test=false") if not a.startswith("paths.output_dir")]
    return cli("tsparse.train", *args, f"hydra.run.dir={work / 'run'}", env=env), work / "artifacts" / "nano-base"


def weights(base):
    return load_file(base / "model.safetensors")


def differing(a: dict, b: dict) -> list[str]:
    assert a.keys() == b.keys() and a
    return [k for k in a if not torch.equal(a[k], b[k])]


@pytest.mark.slow  # two CLI runs: about 50 s on 2 cores
def test_two_pretraining_runs_give_bit_identical_weights(tmp_path, wikitext_small, nano, cli):
    with ThreadPoolExecutor(2) as pool:  # two separate processes, side by side
        runs = list(pool.map(lambda name: pretrain_nano(tmp_path / name, wikitext_small, nano, cli), ("a", "b")))
    for proc, _ in runs:
        assert proc.returncode == 0, proc.stderr[-2000:]
    (_, a), (_, b) = runs
    assert (a / "tokenizer.json").read_bytes() == (b / "tokenizer.json").read_bytes()
    assert differing(weights(a), weights(b)) == []


def test_pinned_kernels_give_the_same_bytes_on_an_avx2_only_machine(tmp_path, wikitext_small, nano, cli):
    envs = {"native": {}, "pinned": PINNED_KERNELS, "pinned_avx2": {**AVX2_MACHINE, **PINNED_KERNELS}}
    with ThreadPoolExecutor(3) as pool:
        runs = dict(zip(envs, pool.map(lambda n: pretrain_nano(tmp_path / n, wikitext_small, nano, cli, envs[n]),
                                       envs)))
    for proc, _ in runs.values():
        assert proc.returncode == 0, proc.stderr[-2000:]
    recorded = {n: json.loads((tmp_path / n / "run" / "results.json").read_text())["machine"] for n in envs}
    assert recorded["pinned"]["kernels_pinned"] and recorded["pinned"]["cpu_capability"] == "AVX2"
    assert not recorded["native"]["kernels_pinned"]
    assert differing(weights(runs["pinned"][1]), weights(runs["pinned_avx2"][1])) == []
    if recorded["native"]["cpu_capability"] != "AVX2":  # the pin reaches torch: it changes an AVX512 machine's bytes
        assert differing(weights(runs["native"][1]), weights(runs["pinned"][1]))


def test_the_makefile_pins_the_kernels_tsparse_records(repo):
    line = re.search(r"^PINNED \?= (.*)$", (repo / "Makefile").read_text(), re.M).group(1)
    assert dict(pair.split("=") for pair in line.split()) == PINNED_KERNELS
