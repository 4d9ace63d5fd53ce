"""Training throughput in tokens per second."""
from __future__ import annotations

import time

import lightning as L


class TokenThroughput(L.Callback):
    """Logs `train/tokens_per_sec` over each logging window and keeps the run-wide average."""

    def __init__(self, window: int = 10):
        self.window = window
        self.total_tokens = 0
        self.total_seconds = 0.0
        self._tokens = 0
        self._start: float | None = None
        self._batch_start = 0.0

    @property
    def average(self) -> float:
        return self.total_tokens / self.total_seconds if self.total_seconds else 0.0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._batch_start = time.perf_counter()
        if self._start is None:
            self._start = self._batch_start

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        tokens = batch.numel()
        self.total_tokens += tokens
        self.total_seconds += time.perf_counter() - self._batch_start
        self._tokens += tokens
        if trainer.global_step % self.window == 0:
            elapsed = time.perf_counter() - self._start
            pl_module.log("train/tokens_per_sec", self._tokens / elapsed, on_step=True, on_epoch=False)
            self._tokens, self._start = 0, time.perf_counter()
