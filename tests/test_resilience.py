"""Crash safety: SIGKILL mid-phase then resume, damaged checkpoints, determinism."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest

from tsparse.checkpoint import check_checkpoint, newest_valid_checkpoint
from tsparse.checks import ConfigError
from tsparse.report import read_metrics
from tsparse.train import run

from helpers import logged_train_steps

SCHEDULE = ("strategy=diff_lr", "strategy.phase_steps=8", "trainer.max_steps=24", "trainer.val_check_interval=4",
            "callbacks.model_checkpoint.every_n_train_steps=4", "trainer.log_every_n_steps=1",
            "logger.csv.flush_logs_every_n_steps=1", "test=false")
LRS = [f"lr-SparseAwareAdamW/{g}" for g in ("engram", "peer", "mhc")]


@pytest.fixture
def common(small_modules):
    return ("sparse=triple", *small_modules, *SCHEDULE)


@pytest.fixture
def cli_args(nano, common):
    def args(tmp_path, data_dir, *extra):
        return [a for a in nano(tmp_path, data_dir, *common, *extra) if not a.startswith("paths.output_dir")] + [
            f"hydra.run.dir={tmp_path / 'run'}"]

    return args


@pytest.mark.slow
def test_sigkill_mid_phase_then_resume_matches_uninterrupted(tmp_path, wikitext_small, cli, cli_args, repo):
    full = cli("tsparse.train", *cli_args(tmp_path / "full", wikitext_small))
    assert full.returncode == 0, full.stderr[-2000:]

    killed_dir = tmp_path / "killed"
    env = {**os.environ, "WANDB_MODE": "offline", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "tsparse.train", *cli_args(killed_dir, wikitext_small)], cwd=repo,
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    ckpt = killed_dir / "run" / "checkpoints" / "step000012.ckpt"  # inside phase 2 (steps 8-15)
    deadline = time.time() + 240

    def step_11_logged():
        # Lightning logs a step's metrics after its on_train_batch_end hooks (where the checkpoint is
        # written), so a kill right after the step-12 checkpoint would lose step 11's CSV row.
        return "train/loss" in read_metrics(killed_dir / "run").get(11, {})

    while not (ckpt.exists() and step_11_logged()) and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert ckpt.exists(), "the run ended or timed out before its step-12 checkpoint"
    assert not (killed_dir / "run" / "results.json").exists()  # it really died mid-run

    resumed = cli("tsparse.train", *cli_args(killed_dir, wikitext_small), "ckpt_path=last")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    a, b = read_metrics(tmp_path / "full" / "run"), read_metrics(killed_dir / "run")
    assert max(b) == max(a) == 23
    assert sorted(logged_train_steps(killed_dir / "run")) == list(range(24))  # the re-run steps logged once
    for step in range(24):
        assert [a[step][k] for k in LRS] == [b[step][k] for k in LRS], step
        assert abs(a[step]["train/loss"] - b[step]["train/loss"]) < 1e-4, step


@pytest.mark.slow
@pytest.mark.parametrize("trainer", ["ddp_nccl_rules", "fsdp2_nccl_rules", "ddp_nccl_rules tables=sharded",
                                     "fsdp2_nccl_rules tables=sharded"])
def test_ddp_sigkill_mid_phase_then_resume_matches_uninterrupted(trainer, tmp_path, wikitext_small, cli, cli_args, repo):
    """2 ranks (DDP and FSDP2, under NCCL's rules; with sharded tables too, whose ranks write their rows):
    rank 0 writes the checkpoint files; SIGKILL both ranks after the step-8 checkpoint (inside phase 2, steps
    6-11), and every rank resumes from it to the uninterrupted run's losses."""
    ddp = (*f"trainer={trainer}".split(), "data.batch_size=4", "trainer.max_steps=12", "strategy.phase_steps=6",
           "callbacks.model_checkpoint.monitor=null", "callbacks.model_checkpoint.save_top_k=-1")  # keep every 4th step
    full = cli("tsparse.train", *cli_args(tmp_path / "full", wikitext_small, *ddp), timeout=600)
    assert full.returncode == 0, full.stderr[-2000:]

    killed_dir = tmp_path / "killed"
    env = {**os.environ, "WANDB_MODE": "offline", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "tsparse.train", *cli_args(killed_dir, wikitext_small, *ddp)],
                            cwd=repo, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)  # its own process group: rank 0 and the rank 1 it launches
    ckpt = killed_dir / "run" / "checkpoints" / "step000008.ckpt"
    deadline = time.time() + 400
    while not (ckpt.exists() and "train/loss" in read_metrics(killed_dir / "run").get(7, {})) \
            and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert ckpt.exists(), "the run ended or timed out before its step-8 checkpoint"
    assert not (killed_dir / "run" / "results.json").exists()  # it really died mid-run

    resumed = cli("tsparse.train", *cli_args(killed_dir, wikitext_small, *ddp), "ckpt_path=last", timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    a, b = read_metrics(tmp_path / "full" / "run"), read_metrics(killed_dir / "run")
    assert max(b) == max(a) == 11
    assert sorted(logged_train_steps(killed_dir / "run")) == list(range(12))
    for step in range(12):
        assert [a[step][k] for k in LRS] == [b[step][k] for k in LRS], step
        assert abs(a[step]["train/loss"] - b[step]["train/loss"]) < 1e-4, step


@pytest.mark.slow
def test_damaged_checkpoints_are_reported_and_skipped(tmp_path, wikitext_small, compose, nano, cli, small_modules):
    cfg_args = nano(tmp_path, wikitext_small, "sparse=triple", *small_modules, "trainer.max_steps=8",
                              "trainer.val_check_interval=4", "callbacks.model_checkpoint.every_n_train_steps=4",
                              "test=false")
    run(compose(cfg_args))
    ckpt_dir = tmp_path / "run" / "checkpoints"
    last = ckpt_dir / "last.ckpt"
    data = last.read_bytes()
    last.write_bytes(data[: len(data) // 2])  # truncated
    with pytest.raises(ConfigError, match="last.ckpt is corrupt or truncated"):
        check_checkpoint(last)
    fallback = newest_valid_checkpoint(ckpt_dir)
    assert fallback is not None and fallback.name.startswith("step")
    out = cli("tsparse.train", *[a for a in cfg_args if not a.startswith("paths.output_dir")],
                  f"hydra.run.dir={tmp_path / 'run'}", f"ckpt_path={last}")
    assert out.returncode == 2
    assert out.stderr.strip().splitlines()[-1].startswith(f"error: checkpoint {last} is corrupt or truncated")


def test_same_seed_same_losses(tmp_path, wikitext_small, compose, nano, common):
    losses = []
    for name in ("a", "b"):
        run(compose(nano(tmp_path / name, wikitext_small, *common, "trainer.max_steps=6")))
        metrics = read_metrics(tmp_path / name / "run")
        losses.append([metrics[s]["train/loss"] for s in range(6)])
    assert losses[0] == losses[1]


# Rank 0 kills both ranks (its process group) right after the ranks wrote their table rows for the 2nd checkpoint
# file, before that file is written.
KILL_IN_SECOND_SAVE = """
import os, signal
import tsparse.sharding as sharding
save, calls = sharding.dcp.save, []
def killing(*args, **kwargs):
    save(*args, **kwargs)
    calls.append(1)
    if len(calls) == 2 and sharding.dist.get_rank() == 0:
        os.killpg(os.getpgid(0), signal.SIGKILL)
sharding.dcp.save = killing
from tsparse.train import main
main()
"""


@pytest.mark.slow
def test_a_kill_during_a_sharded_save_keeps_the_previous_checkpoint(tmp_path, wikitext_small, cli, cli_args, repo):
    """tables=sharded on 2 ranks, killed (SIGKILL, every rank) after the ranks wrote their rows for the step-8
    checkpoint but before its file: the step-4 checkpoint stays whole and `last`; the unfinished rows folder
    is removed on resume, which reaches the uninterrupted run's losses."""
    ddp = ("trainer=ddp_nccl_rules", "tables=sharded", "data.batch_size=4", "trainer.max_steps=12",
           "strategy.phase_steps=6", "callbacks.model_checkpoint.monitor=null", "callbacks.model_checkpoint.save_top_k=-1",
           "callbacks.model_checkpoint.save_last=false")
    full = cli("tsparse.train", *cli_args(tmp_path / "full", wikitext_small, *ddp), timeout=600)
    assert full.returncode == 0, full.stderr[-2000:]
    killed_dir = tmp_path / "killed"
    script = tmp_path / "train.py"
    script.write_text(KILL_IN_SECOND_SAVE)
    env = {**os.environ, "WANDB_MODE": "offline", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, str(script), *cli_args(killed_dir, wikitext_small, *ddp)], cwd=repo, env=env,
                          capture_output=True, start_new_session=True, timeout=600)
    assert proc.returncode == -signal.SIGKILL
    ckpts = killed_dir / "run" / "checkpoints"
    assert sorted(p.name for p in ckpts.glob("*.ckpt")) == ["step000004.ckpt"]
    assert len(list(ckpts.glob(".tables-*.tsparse-tmp"))) == 1  # the rows written for step 8
    assert newest_valid_checkpoint(ckpts).name == "step000004.ckpt"

    resumed = cli("tsparse.train", *cli_args(killed_dir, wikitext_small, *ddp), "ckpt_path=last", timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert not list(ckpts.glob(".tables-*.tsparse-tmp"))
    a, b = read_metrics(tmp_path / "full" / "run"), read_metrics(killed_dir / "run")
    assert max(b) == max(a) == 11
    for step in range(12):
        assert abs(a[step]["train/loss"] - b[step]["train/loss"]) < 1e-4, step


@pytest.mark.slow
def test_a_sharded_two_rank_run_resumes_on_one_process_in_its_run_dir(tmp_path, wikitext_small, cli, cli_args):
    """`trainer=ddp_nccl_rules tables=sharded` for 4 steps, then `trainer=cpu ckpt_path=last` in the same run dir
    with the global batch on one process: the tables are read whole from the ranks' DCP folder and the run
    ends where the uninterrupted 2-rank run does (val loss within 1e-3: one process sums in another order)."""
    common = ("trainer.max_steps=8", "strategy.phase_steps=3", "callbacks.model_checkpoint.monitor=null")
    on_two = ("trainer=ddp_nccl_rules", "tables=sharded", "data.batch_size=4", *common)
    full = cli("tsparse.train", *cli_args(tmp_path / "full", wikitext_small, *on_two), timeout=600)
    assert full.returncode == 0, full.stderr[-2000:]
    run_dir = tmp_path / "split"
    first = cli("tsparse.train", *cli_args(run_dir, wikitext_small, *on_two, "trainer.max_steps=4"), timeout=600)
    assert first.returncode == 0, first.stderr[-2000:]
    assert list((run_dir / "run" / "checkpoints").glob("last.ckpt.tables-*"))
    # one process reads the global batch the two ranks shared (2 x 4 samples)
    resumed = cli("tsparse.train", *cli_args(run_dir, wikitext_small, "trainer=cpu", "tables=sharded", "data.batch_size=8",
                                             *common, "ckpt_path=last"), timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert sorted(logged_train_steps(run_dir / "run")) == list(range(8))
    a, b = (json.loads((d / "run" / "results.json").read_text()) for d in (tmp_path / "full", run_dir))
    assert a["global_step"] == b["global_step"] == 8
    assert a["val/loss"] == pytest.approx(b["val/loss"], abs=1e-3)
