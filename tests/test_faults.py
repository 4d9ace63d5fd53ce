"""Faults a cluster run meets: preemption signals, a full disk, a kill during a write, a lost rank, a damaged
last.ckpt, a resume's repeated steps, and Trainer values that would fail only after the run dir exists."""
from __future__ import annotations

import errno
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import torch

from tsparse.callbacks.preemption import requeue_on_slurm
from tsparse.checkpoint import AtomicCheckpointIO, load_checkpoint
from tsparse.cli import EXIT_DISK_FULL, EXIT_LOST_RANK, EXIT_PREEMPTED, precheck
from tsparse.loading import load_run, run_checkpoint
from tsparse.loggers import ResumableCSVLogger
from tsparse.report import read_metrics
from tsparse.rundir import TEMP_SUFFIX, DiskFullError, atomic_file, remove_stale_temp_files
from tsparse.train import check as train_check, run

from helpers import logged_train_steps, one_error_line

ENV = {**os.environ, "WANDB_MODE": "offline", "HF_HUB_OFFLINE": "1"}


@pytest.fixture
def cli_args(nano, small_modules):
    """args(out, data_dir, *extra): a nano triple run into `out/run` (Hydra's run dir), every step logged."""
    def args(out, data_dir, *extra):
        return [a for a in nano(out, data_dir, "sparse=triple", *small_modules, "test=false", "trainer.max_steps=12",
                                "trainer.log_every_n_steps=1", "logger.csv.flush_logs_every_n_steps=1",
                                "trainer.val_check_interval=4", "callbacks.model_checkpoint.every_n_train_steps=100",
                                *extra)
                if not a.startswith("paths.output_dir")] + [f"hydra.run.dir={out / 'run'}"]

    return args


def train_process(args, repo, **popen) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "tsparse.train", *args], cwd=repo, env=ENV, text=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, **popen)


def wait_for_step(proc: subprocess.Popen, run_dir, step: int, timeout: float = 240) -> None:
    """Until `run_dir`'s metrics.csv holds train/loss at `step` (or the process ends)."""
    deadline = time.time() + timeout
    while "train/loss" not in read_metrics(run_dir).get(step, {}) and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    assert proc.poll() is None, f"the run ended before step {step}: {proc.stderr.read()[-2000:]}"


def train_losses(run_dir) -> dict[int, float]:
    return {step: row["train/loss"] for step, row in read_metrics(run_dir).items() if "train/loss" in row}


@pytest.mark.parametrize("sig", [signal.SIGTERM, pytest.param(signal.SIGUSR1, marks=pytest.mark.slow)])
def test_preemption_checkpoints_the_current_step_and_resumes_to_the_uninterrupted_losses(
        sig, tmp_path, wikitext_small, cli, cli_args, repo):
    """SIGTERM/SIGUSR1 at step ~5 with checkpoints only every 100 steps: exit 75 with one `preempted:` line,
    last.ckpt at the step the run stopped, no results.json; ckpt_path=auto resumes with no step lost or
    logged twice, to the uninterrupted run's losses."""
    full = cli("tsparse.train", *cli_args(tmp_path / "full", wikitext_small))
    assert full.returncode == 0, full.stderr[-2000:]

    out = tmp_path / "preempted"
    proc = train_process(cli_args(out, wikitext_small), repo)
    wait_for_step(proc, out / "run", 4)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == EXIT_PREEMPTED, err[-2000:]
    line = err.strip().splitlines()[-1]
    step = load_checkpoint(out / "run" / "checkpoints" / "last.ckpt")["global_step"]
    assert line.startswith(f"preempted: {sig.name} at step {step}: saved "), line
    assert max(train_losses(out / "run")) == step - 1  # the step it stopped after is logged and saved
    assert not (out / "run" / "results.json").exists()

    resumed = cli("tsparse.train", *cli_args(out, wikitext_small), "ckpt_path=auto")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    a, b = train_losses(tmp_path / "full" / "run"), train_losses(out / "run")
    assert sorted(b) == sorted(a) == list(range(12))
    assert max(abs(a[s] - b[s]) for s in a) < 1e-4
    assert sorted(logged_train_steps(out / "run")) == list(range(12))


@pytest.mark.slow
@pytest.mark.parametrize("trainer", ["ddp_nccl_rules", "fsdp2_nccl_rules"])
def test_preemption_of_one_rank_stops_every_rank_at_the_same_step(trainer, tmp_path, wikitext_small, cli, cli_args, repo):
    """2 ranks under NCCL's rules, SIGTERM to rank 0 only: both ranks stop after the same step (one dense
    all-reduce per step), rank 0 writes last.ckpt there and says so once; the resume matches."""
    ddp = (f"trainer={trainer}", "data.batch_size=4")
    full = cli("tsparse.train", *cli_args(tmp_path / "full", wikitext_small, *ddp), timeout=600)
    assert full.returncode == 0, full.stderr[-2000:]

    out = tmp_path / "preempted"
    proc = train_process(cli_args(out, wikitext_small, *ddp), repo)
    wait_for_step(proc, out / "run", 4, timeout=400)
    proc.send_signal(signal.SIGTERM)  # rank 0 only: rank 1 is its child, in the same session
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == EXIT_PREEMPTED, err[-2000:]
    assert len([line for line in err.splitlines() if line.startswith("preempted:")]) == 1
    step = load_checkpoint(out / "run" / "checkpoints" / "last.ckpt")["global_step"]
    assert max(train_losses(out / "run")) == step - 1

    resumed = cli("tsparse.train", *cli_args(out, wikitext_small, *ddp), "ckpt_path=auto", timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    a, b = train_losses(tmp_path / "full" / "run"), train_losses(out / "run")
    assert sorted(b) == sorted(a) == list(range(12))
    assert max(abs(a[s] - b[s]) for s in a) < 1e-4


@pytest.mark.slow
@pytest.mark.parametrize("killed", [0, 1])
def test_a_lost_rank_is_one_line_naming_it(killed, tmp_path, wikitext_small, cli_args, repo):
    """kill -9 of one of 2 DDP ranks: the survivor exits 76 within seconds, with one `error:` line naming
    the lost rank and how to resume (not gloo's traceback)."""
    out = tmp_path / "lost"
    proc = train_process(cli_args(out, wikitext_small, "trainer=ddp_nccl_rules", "data.batch_size=4",
                                  "trainer.max_steps=200"), repo, start_new_session=True)
    wait_for_step(proc, out / "run", 3, timeout=400)
    rank1 = int(subprocess.check_output(["pgrep", "-P", str(proc.pid)]).split()[0])
    victim, survivor = (proc.pid, rank1) if killed == 0 else (rank1, proc.pid)
    start = time.time()
    os.kill(victim, signal.SIGKILL)
    if killed == 0:  # rank 1 survives; its stderr is the same pipe
        while time.time() - start < 120 and subprocess.run(["kill", "-0", str(survivor)]).returncode == 0:
            time.sleep(0.1)
        err = proc.stderr.read()
    else:
        _, err = proc.communicate(timeout=120)
        assert proc.returncode == EXIT_LOST_RANK, err[-2000:]
    print(f"survivor exited {time.time() - start:.1f} s after the kill")
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert errors == [errors[0]] and errors[0].startswith(f"error: rank {killed} of 2 exited ("), err[-3000:]
    assert errors[0].endswith("; resume with ckpt_path=last")
    assert "Traceback" not in err


def test_a_full_disk_keeps_the_previous_checkpoint_and_the_run_resumes(tmp_path, wikitext_small, compose, nano,
                                                                       small_modules, monkeypatch):
    """ENOSPC injected into the second checkpoint write (after half its bytes): DiskFullError names the file
    and the bytes needed, last.ckpt is still the first checkpoint, no temp file is left, and once there
    is space the run resumes (ckpt_path=last) to the end."""
    args = nano(tmp_path, wikitext_small, "sparse=triple", *small_modules, "test=false", "trainer.max_steps=8",
                "trainer.val_check_interval=4", "callbacks.model_checkpoint.every_n_train_steps=4")
    save, calls = torch.save, []

    def fills_the_disk(obj, f, *a, **k):
        calls.append(f.name)
        if len(calls) > 2:  # the two files of the step-4 save fit, the step-8 save does not
            f.write(b"x" * 1000)
            raise OSError(errno.ENOSPC, "No space left on device")
        save(obj, f, *a, **k)

    monkeypatch.setattr(torch, "save", fills_the_disk)
    with pytest.raises(DiskFullError, match=r"no space left on device for .*/checkpoints/\w+.ckpt: it needs about [\d,]+ bytes"):
        run(compose(args))
    monkeypatch.setattr(torch, "save", save)
    ckpt_dir = tmp_path / "run" / "checkpoints"
    assert load_checkpoint(ckpt_dir / "last.ckpt")["global_step"] == 4
    assert not list(ckpt_dir.glob(f".*{TEMP_SUFFIX}"))
    assert run(compose([*args, "ckpt_path=last"]))["global_step"] == 8


def small_filesystem(path, megabytes: int):
    """Mount a `megabytes` tmpfs at `path` (root only); skip where mounting is not possible."""
    path.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={megabytes}m", "tmpfs", str(path)],
                                           capture_output=True).returncode:
        pytest.skip("cannot mount a small tmpfs here (needs root); the injected-ENOSPC test covers the logic")


def test_a_full_filesystem_is_one_line_and_exit_74(tmp_path, wikitext_small, cli, cli_args):
    """Checkpoints on a real 3 MB filesystem that fills: one `error:` line naming the file and the bytes
    needed, exit 74, the previous checkpoint intact; with room again, ckpt_path=last finishes the run."""
    disk = tmp_path / "disk"
    small_filesystem(disk, 3)  # one nano checkpoint (~2.3 MB) fits, not two
    try:
        args = [*cli_args(tmp_path, wikitext_small, "trainer.max_steps=8", "callbacks.model_checkpoint.save_last=false",
                          "callbacks.model_checkpoint.every_n_train_steps=4", "callbacks.model_checkpoint.monitor=null",
                          "callbacks.model_checkpoint.save_top_k=-1"), f"paths.ckpt_dir={disk}"]
        out = cli("tsparse.train", *args)
        assert out.returncode == EXIT_DISK_FULL, out.stderr[-2000:]
        line = out.stderr.strip().splitlines()[-1]
        assert line.startswith(f"error: no space left on device for {disk}/step000008.ckpt: it needs about "), line
        assert "the previous checkpoint is intact" in line and "Traceback" not in out.stderr
        assert load_checkpoint(disk / "step000004.ckpt")["global_step"] == 4
        assert sorted(p.name for p in disk.iterdir()) == ["step000004.ckpt"]
        subprocess.run(["mount", "-o", "remount,size=16m", str(disk)], check=True)
        resumed = cli("tsparse.train", *args, "ckpt_path=last")
        assert resumed.returncode == 0, resumed.stderr[-2000:]
    finally:
        subprocess.run(["umount", str(disk)])


KILLED_WRITER = textwrap.dedent("""
    import os, signal, sys
    from tsparse.rundir import atomic_file
    with atomic_file(sys.argv[1]) as f:
        f.write(b"new bytes, half written")
        f.flush()
        os.kill(os.getpid(), signal.SIGKILL)
""")


def test_a_kill_during_a_write_leaves_the_previous_file(tmp_path, repo):
    """SIGKILL in the middle of an atomic write: the target keeps its old bytes; the next run's cleanup
    removes the temp file (only tsparse's own temp names)."""
    target, foreign = tmp_path / "last.ckpt", tmp_path / ".users-file.tmp"
    target.write_bytes(b"previous checkpoint")
    foreign.write_text("not ours")
    proc = subprocess.run([sys.executable, "-c", KILLED_WRITER, str(target)], cwd=repo, env=ENV)
    assert proc.returncode == -signal.SIGKILL
    assert target.read_bytes() == b"previous checkpoint"
    assert len(list(tmp_path.glob(f".last.ckpt.*{TEMP_SUFFIX}"))) == 1
    remove_stale_temp_files(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == [".users-file.tmp", "last.ckpt"]


def test_checkpoints_are_written_in_their_own_folder_then_renamed(tmp_path, monkeypatch):
    """AtomicCheckpointIO stages in the checkpoint's folder (a rename never crosses filesystems) and fsyncs."""
    staged, synced = [], []
    replace, fsync = os.replace, os.fsync
    monkeypatch.setattr(os, "replace", lambda src, dst: (staged.append((src, dst)), replace(src, dst)))
    monkeypatch.setattr(os, "fsync", lambda fd: (synced.append(fd), fsync(fd)))
    AtomicCheckpointIO().save_checkpoint({"global_step": 3, "w": torch.ones(4)}, tmp_path / "ckpts" / "last.ckpt")
    (src, dst), = staged
    assert os.path.dirname(src) == str(tmp_path / "ckpts") and dst == tmp_path / "ckpts" / "last.ckpt"
    assert synced and load_checkpoint(dst)["global_step"] == 3


def test_last_is_the_newest_valid_checkpoint_for_every_command(tmp_path, wikitext_small, compose, nano, small_modules):
    """Damaged last.ckpt, step000006.ckpt and step000004.ckpt: export/eval/generate (`run_checkpoint`) pick
    step000002.ckpt as training's resume does; the resume logs steps 2-5 once more in place of their old
    rows, and writes last.ckpt again (never a last-v1.ckpt: step 2's state predates any last.ckpt)."""
    args = nano(tmp_path, wikitext_small, "sparse=peer", *small_modules, "test=false", "trainer.max_steps=6",
                "trainer.val_check_interval=2", "callbacks.model_checkpoint.every_n_train_steps=2",
                "callbacks.model_checkpoint.monitor=null", "callbacks.model_checkpoint.save_top_k=-1",
                "trainer.log_every_n_steps=1")
    run(compose(args))
    ckpt_dir = tmp_path / "run" / "checkpoints"
    for name in ("last.ckpt", "step000006.ckpt", "step000004.ckpt"):
        (ckpt_dir / name).write_bytes((ckpt_dir / name).read_bytes()[:1000])
    assert run_checkpoint(tmp_path / "run", "last") == ckpt_dir / "step000002.ckpt"
    load_run(tmp_path / "run", "last")

    run(compose([*args, "ckpt_path=last"]))
    assert sorted(logged_train_steps(tmp_path / "run")) == list(range(6))
    assert not list(ckpt_dir.glob("last-v*.ckpt"))
    assert run_checkpoint(tmp_path / "run", "last") == ckpt_dir / "last.ckpt"
    assert load_checkpoint(ckpt_dir / "last.ckpt")["global_step"] == 6


def test_a_resume_drops_the_rows_it_logs_again(tmp_path):
    """metrics.csv rows of steps >= the resumed checkpoint's step are removed, the others kept as they were."""
    logger = ResumableCSVLogger(save_dir=str(tmp_path), name="csv", version="")
    logger.log_metrics({"train/loss": 1.0}, step=0)
    for step in range(1, 8):
        logger.log_metrics({"train/loss": 1.0 / step, "lr": 0.1}, step=step)
    logger.save()
    logger.drop_steps_from(5)
    assert logged_train_steps(tmp_path) == [0, 1, 2, 3, 4]
    assert read_metrics(tmp_path)[4] == {"train/loss": 0.25, "lr": 0.1}


@pytest.mark.parametrize("override, needle", [
    ("trainer.val_check_interval=0", "trainer.val_check_interval=0 must be"),
    ("trainer.val_check_interval=1.5", "trainer.val_check_interval=1.5 must be"),
    ("trainer.precision=bogus", "trainer.precision='bogus' is not allowed"),
    ("trainer.devices=0", "trainer.devices=0 must be"),
    ("trainer.devices=abc", "trainer.devices='abc' must be"),
    ("trainer.accelerator=tpu", "trainer.accelerator='tpu' is not allowed"),
    ("trainer.limit_val_batches=-1", "trainer.limit_val_batches=-1 must be"),
    ("trainer.limit_test_batches=1.5", "trainer.limit_test_batches=1.5 must be"),
    ("trainer.log_every_n_steps=0", "trainer.log_every_n_steps=0 must be"),
    ("trainer.accumulate_grad_batches=0", "trainer.accumulate_grad_batches=0 must be"),
    ("trainer.max_epochs=-2", "trainer.max_epochs=-2 must be"),
])
def test_every_trainer_value_is_checked_before_the_run_dir(override, needle, tmp_path, wikitext_small, nano, capsys):
    args = nano(tmp_path, wikitext_small, "sparse=peer", override)
    assert needle in one_error_line(capsys, lambda: precheck("train", args, train_check))
    assert not (tmp_path / "run").exists()


def test_preemption_requeues_a_slurm_job(tmp_path, monkeypatch):
    """Under SLURM (a batch job) rank 0 runs `scontrol requeue <job>`, array tasks as <array>_<task>."""
    calls = tmp_path / "calls"
    scontrol = tmp_path / "scontrol"
    scontrol.write_text(f"#!/bin/sh\necho \"$@\" >> {calls}\n")
    scontrol.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}:{os.environ['PATH']}")
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    monkeypatch.setenv("SLURM_JOB_NAME", "train")
    requeue_on_slurm()
    monkeypatch.setenv("SLURM_ARRAY_JOB_ID", "77")
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "3")
    requeue_on_slurm()
    monkeypatch.setenv("SLURM_JOB_NAME", "interactive")  # srun --pty: nothing to requeue
    requeue_on_slurm()
    assert calls.read_text().splitlines() == ["requeue 4242", "requeue 77_3"]
