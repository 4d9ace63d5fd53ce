"""Data parallelism on CPU (gloo, 2 processes) with sparse PEER/Engram tables, and each combination
offered with it: staggered freezing, on_non_finite=skip and bf16 tables run; FSDP with sparse tables is
refused in one line."""
import json
import os
import subprocess
import sys

import pytest
import torch
from torch import nn

from tsparse.config import ConfigError
from tsparse.optim import SparseAwareAdamW
from tsparse.train import check

ARGS = ("sparse=hybrid", "peer.num_experts=256", "peer.key_dim=16", "engram.dim_per_order=32",
        "engram.heads_per_order=2", "trainer.max_steps=4", "trainer.val_check_interval=4", "test=false",
        "optim.grad_clip=0")


# Rank 1 sees a NaN loss at step 2 (the launcher re-runs this script for rank 1, so the patch holds there).
NAN_ON_RANK_1 = """
from tsparse.lit_module import CausalLMModule
loss = CausalLMModule.loss
def faulty(self, ids):
    out = loss(self, ids)
    return out * float("nan") if self.training and self.global_step == 2 and self.global_rank == 1 else out
CausalLMModule.loss = faulty
from tsparse.train import main
main()
"""


@pytest.fixture
def cli_args(nano):
    def args(tmp_path, data_dir, *extra):
        return [a for a in nano(tmp_path, data_dir, *ARGS, *extra) if not a.startswith("paths.output_dir")] + [
            f"hydra.run.dir={tmp_path / 'run'}"]

    return args


def results(tmp_path, name):
    return json.loads((tmp_path / name / "run" / "results.json").read_text())


@pytest.mark.slow
@pytest.mark.parametrize("extra", [(), ("sparse=triple", "strategy=staggered", "strategy.phase_steps=2")],
                         ids=["joint", "staggered"])
def test_ddp_two_processes_equal_one_process_with_the_global_batch(extra, tmp_path, wikitext_small, cli, cli_args):
    """Rank r reads positions r, r+2, ... of the same step-indexed stream, so 2 ranks x batch 4 see the
    samples of 1 process x batch 8 and, with averaged (sparse) gradients, reach the same weights; also
    when phases freeze groups after DDP registered its hooks (staggered: find_unused_parameters)."""
    ddp = cli("tsparse.train", *cli_args(tmp_path / "ddp", wikitext_small, *extra, "trainer=ddp", "data.batch_size=4"))
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    single = cli("tsparse.train", *cli_args(tmp_path / "one", wikitext_small, *extra, "data.batch_size=8"))
    assert single.returncode == 0, single.stderr[-3000:]
    a, b = results(tmp_path, "ddp"), results(tmp_path, "one")
    assert a["global_step"] == b["global_step"] == 4
    assert a["val/loss"] == pytest.approx(b["val/loss"], abs=1e-4)


@pytest.mark.slow
def test_ddp_skip_policy_skips_on_every_rank(tmp_path, wikitext_small, cli_args, repo):
    """A NaN loss on one rank only: both ranks skip the same step (no hang, nothing poisoned)."""
    script = tmp_path / "nan_on_rank_1.py"
    script.write_text(NAN_ON_RANK_1)
    env = {**os.environ, "WANDB_MODE": "offline", "HF_HUB_OFFLINE": "1"}
    out = subprocess.run([sys.executable, str(script), *cli_args(tmp_path / "ddp", wikitext_small, "trainer=ddp",
                          "data.batch_size=4", "optim.on_non_finite=skip")], cwd=repo, env=env, capture_output=True,
                         text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    got = results(tmp_path, "ddp")
    assert got["global_step"] == 4 and got["skipped_steps"] == 1 and got["val/loss"] == got["val/loss"]


@pytest.mark.slow
def test_ddp_bf16_tables_run(tmp_path, wikitext_small, cli, cli_args):
    out = cli("tsparse.train", *cli_args(tmp_path / "ddp", wikitext_small, "trainer=ddp", "data.batch_size=4",
                                          "peer.table_dtype=bfloat16", "engram.table_dtype=bfloat16"))
    assert out.returncode == 0, out.stderr[-3000:]
    assert results(tmp_path, "ddp")["global_step"] == 4


@pytest.mark.parametrize("tables", [("sparse=peer",), ("sparse=hybrid", "peer.sparse_grad=false")])
def test_fsdp_with_sparse_tables_is_refused_in_one_line(tables, tmp_path, compose, nano):
    with pytest.raises(ConfigError, match="cannot shard sparse gradients") as err:
        check(compose(nano(tmp_path, tmp_path, *tables, "trainer=fsdp")))
    assert "\n" not in str(err.value) and "sparse_grad=false" in str(err.value) and "trainer=ddp" in str(err.value)
    check(compose(nano(tmp_path, tmp_path, "sparse=hybrid", "peer.sparse_grad=false", "engram.sparse_grad=false",
                       "trainer=fsdp")))  # dense tables: allowed


def test_bf16_table_updates_are_rounded_to_bf16():
    """Documented behaviour: a bf16 table stores the row-wise AdaGrad update in bf16, so a row moves only
    if the update is at least half the bf16 spacing at its value (2**-8 at 1.0); a float32 table moves."""
    moved = {}
    for dtype, lr in ((torch.float32, 1e-3), (torch.bfloat16, 1e-3), (torch.bfloat16, 0.1)):
        table = nn.Embedding(4, 8, sparse=True, dtype=dtype)
        nn.init.ones_(table.weight)
        optimizer = SparseAwareAdamW([{"name": "peer", "params": [table.weight]}], lr=lr)
        table(torch.tensor([1])).sum().backward()
        optimizer.step()
        moved[dtype, lr] = (1.0 - table.weight[1].float()).mean().item()
    assert moved[torch.float32, 1e-3] == pytest.approx(1e-3, rel=1e-3)
    assert moved[torch.bfloat16, 1e-3] == 0.0  # 1 - 1e-3 rounds back to 1.0 in bf16
    assert moved[torch.bfloat16, 0.1] == pytest.approx(0.1, abs=2**-8)
