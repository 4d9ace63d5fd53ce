"""Logger helpers: W&B offline without an API key, and a CSV logger that survives resumes."""
from __future__ import annotations

import csv
import io
import netrc
import os

from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter

from tsparse.rundir import write_atomic


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
    """Keeps an existing metrics.csv and its columns; a resumed run appends to it."""

    def __init__(self, log_dir: str):
        super().__init__(log_dir)
        if os.path.isfile(self.metrics_file_path):
            with open(self.metrics_file_path, newline="") as f:
                self.metrics_keys = list(next(csv.reader(f), []))

    def _check_log_dir_exists(self) -> None:
        """Never delete previous rows."""


class ResumableCSVLogger(CSVLogger):
    """Lightning's CSVLogger deletes an existing metrics.csv; this one appends to it, after `drop_steps_from`
    removed the rows a resume runs again, so that each step is logged once (W&B, resumed with the same
    run id, ignores steps below its last one: it keeps the first run's rows of those steps)."""

    def drop_steps_from(self, step: int) -> None:
        """Remove the rows of steps >= `step` (the resumed checkpoint's global step) from metrics.csv."""
        path = os.path.join(self.log_dir, ExperimentWriter.NAME_METRICS_FILE)
        if not os.path.isfile(path):
            return
        with open(path, newline="") as f:
            rows = list(csv.reader(f))
        if not rows or "step" not in rows[0]:
            return
        column = rows[0].index("step")
        kept = [rows[0], *(r for r in rows[1:] if not r[column] or int(float(r[column])) < step)]
        if len(kept) < len(rows):
            out = io.StringIO()
            csv.writer(out).writerows(kept)
            write_atomic(path, out.getvalue())

    @property
    def experiment(self) -> ExperimentWriter:
        if self._experiment is None:
            os.makedirs(self.root_dir, exist_ok=True)
            self._experiment = _AppendingWriter(self.log_dir)
        return self._experiment
