"""Preemption: SIGTERM or SIGUSR1 (a scheduler's stop or pre-timeout signal) finishes the current step,
checkpoints it to last.ckpt and stops the run, which then exits with `cli.EXIT_PREEMPTED`."""
from __future__ import annotations

import logging
import os
import re
import signal
import subprocess
import threading
from pathlib import Path

import lightning as L

log = logging.getLogger("tsparse")
SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class Preemption(L.Callback):
    """Records SIGTERM/SIGUSR1 from `install()` on, instead of dying or letting
    Lightning exit 0 without a checkpoint. After each training step every rank votes with one dense
    all-reduce, so all ranks stop at the same step even when only one got the signal; they then write
    `ckpt_dir/last.ckpt` at that step (rank 0 writes a DDP checkpoint) and stop. Under SLURM, rank 0
    requeues the job (`scontrol requeue`, as Lightning's SLURM environment does); the requeued command
    resumes with `ckpt_path=auto`. `restore` puts the previous handlers back."""

    def __init__(self, ckpt_dir: str | Path):
        self.ckpt_dir = Path(ckpt_dir)
        self.received: int | None = None   # the signal this process got
        self.saved: Path | None = None     # the checkpoint written on the stop
        self.step: int | None = None
        self._previous: dict[int, object] = {}

    def install(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return
        for sig in SIGNALS:
            self._previous.setdefault(sig, signal.getsignal(sig))
            signal.signal(sig, self._record)

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _record(self, signum: int, frame) -> None:
        self.received = self.received or signum  # only a flag: a handler may interrupt code that holds locks

    @property
    def signal_name(self) -> str:
        return signal.Signals(self.received).name if self.received else "a signal to another rank"

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.install()  # Lightning registered its own SIGTERM handler just before this hook

    def on_train_batch_end(self, trainer: L.Trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        if not trainer.strategy.reduce_boolean_decision(self.received is not None, all=False):
            return
        self.step, self.saved = trainer.global_step, self.ckpt_dir / "last.ckpt"
        log.info("%s: saving step %d to %s and stopping", self.signal_name, self.step, self.saved)
        trainer.save_checkpoint(self.saved, weights_only=False)  # the whole state: optimizer and loops too
        trainer.should_stop = True
        epoch_loop = trainer.fit_loop.epoch_loop
        if (epoch_loop.total_batch_idx + 1) % trainer.val_check_batch:
            # Lightning validates when a run stops early; skip it unless this step is a validation step anyway
            epoch_loop._skip_next_val = True
        if trainer.is_global_zero:
            requeue_on_slurm()


def requeue_on_slurm() -> None:
    """`scontrol requeue` this SLURM job (array task included), as Lightning's SLURM auto-requeue does;
    a no-op outside a SLURM batch job."""
    job = os.environ.get("SLURM_JOB_ID")
    if job is None or os.environ.get("SLURM_JOB_NAME") in ("bash", "interactive"):
        return
    if array := os.environ.get("SLURM_ARRAY_JOB_ID"):
        job = f"{array}_{os.environ['SLURM_ARRAY_TASK_ID']}"
    if not re.fullmatch(r"[0-9_]+", job):
        log.warning("not requeuing: SLURM job id %r is not a job id", job)
        return
    try:
        result = subprocess.run(["scontrol", "requeue", job], capture_output=True, text=True)
    except FileNotFoundError:
        log.warning("not requeuing SLURM job %s: scontrol is not on PATH", job)
        return
    if result.returncode:
        log.warning("scontrol requeue %s failed (%d): %s", job, result.returncode, result.stderr.strip())
    else:
        log.info("requeued SLURM job %s", job)
