"""Logger helpers: W&B offline without an API key, and a CSV logger that survives resumes."""
from __future__ import annotations

import csv
import netrc
import os

from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter


def use_wandb_offline_without_key() -> None:
    """Run W&B offline (never prompting) unless an API key is configured or WANDB_MODE is set."""
    try:
        has_key = bool(os.environ.get("WANDB_API_KEY")) or netrc.netrc().authenticators("api.wandb.ai") is not None
    except (FileNotFoundError, netrc.NetrcParseError):
        has_key = False
    if not has_key:
        os.environ.setdefault("WANDB_MODE", "offline")
    os.environ.setdefault("WANDB_SILENT", "true")


class _AppendingWriter(ExperimentWriter):
    """Keeps an existing metrics.csv and its columns; a resumed run appends to it. Steps logged again
    after a resume appear twice: readers keep the last row per step (see `tsparse.report`)."""

    def __init__(self, log_dir: str):
        super().__init__(log_dir)
        if os.path.isfile(self.metrics_file_path):
            with open(self.metrics_file_path, newline="") as f:
                self.metrics_keys = list(next(csv.reader(f), []))

    def _check_log_dir_exists(self) -> None:
        """Never delete previous rows."""


class ResumableCSVLogger(CSVLogger):
    """Lightning's CSVLogger deletes an existing metrics.csv; this one appends to it."""

    @property
    def experiment(self) -> ExperimentWriter:
        if self._experiment is None:
            os.makedirs(self.root_dir, exist_ok=True)
            self._experiment = _AppendingWriter(self.log_dir)
        return self._experiment
