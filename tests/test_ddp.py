"""Data parallelism on CPU (gloo, 2 processes) with sparse PEER/Engram tables."""
import json

import pytest

from conftest import nano_overrides, run_cli

ARGS = ("sparse=hybrid", "peer.num_experts=256", "peer.key_dim=16", "engram.dim_per_order=32",
        "engram.heads_per_order=2", "trainer.max_steps=4", "trainer.val_check_interval=4", "test=false",
        "optim.grad_clip=0")


def cli_args(tmp_path, data_dir, *extra):
    return [a for a in nano_overrides(tmp_path, data_dir, *ARGS, *extra) if not a.startswith("paths.output_dir")] + [
        f"hydra.run.dir={tmp_path / 'run'}"]


def test_ddp_two_processes_equal_one_process_with_the_global_batch(tmp_path, wikitext_small):
    """Rank r reads positions r, r+2, ... of the same step-indexed stream, so 2 ranks x batch 4 see the
    samples of 1 process x batch 8 and, with averaged (sparse) gradients, reach the same weights."""
    ddp = run_cli("tsparse.train", *cli_args(tmp_path / "ddp", wikitext_small, "trainer=ddp", "data.batch_size=4"))
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    single = run_cli("tsparse.train", *cli_args(tmp_path / "one", wikitext_small, "data.batch_size=8"))
    assert single.returncode == 0, single.stderr[-3000:]
    a, b = (json.loads((tmp_path / d / "run" / "results.json").read_text()) for d in ("ddp", "one"))
    assert a["global_step"] == b["global_step"] == 4
    assert a["val/loss"] == pytest.approx(b["val/loss"], abs=1e-4)
