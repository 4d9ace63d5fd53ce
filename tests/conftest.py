"""Shared fixtures: a small WikiText-2 folder cut from the real offline copy, and config composition."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig, open_dict

from tsparse.config import config_dir, project_root

SHARED_WIKITEXT = Path(project_root()).parent / "shared" / "data" / "wikitext-2"
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def wikitext_small(tmp_path_factory) -> Path:
    """The first lines of each real split: enough text for a nano model, fast to tokenize."""
    folder = tmp_path_factory.mktemp("wikitext-small")
    for split, lines in (("train", 1500), ("validation", 300), ("test", 300)):
        text = (SHARED_WIKITEXT / f"{split}.txt").read_text().splitlines(keepends=True)[:lines]
        (folder / f"{split}.txt").write_text("".join(text))
    return folder


def nano_overrides(tmp_path: Path, data_dir: Path, *extra: str) -> list[str]:
    """Overrides for a fast in-process run: nano model, small data, CSV logging into tmp_path."""
    return [
        "model=nano", f"data.data_dir={data_dir}", "data.block_size=64", "data.batch_size=8", "data.eval_batch_size=16",
        "logger=csv", f"paths.output_dir={tmp_path / 'run'}", f"paths.cache_dir={tmp_path / 'cache'}",
        f"paths.artifact_dir={tmp_path / 'artifacts'}", "run_name=test", "trainer.enable_progress_bar=false",
        "trainer.max_steps=20", "trainer.val_check_interval=10", "trainer.limit_val_batches=4",
        "trainer.log_every_n_steps=5", *extra,
    ]


def compose_cfg(overrides: list[str]) -> DictConfig:
    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
        cfg = compose("train", overrides=overrides)
    with open_dict(cfg):
        cfg.pop("hydra", None)
    return cfg


def run_cli(module: str, *args: str, cwd: Path = REPO, env: dict | None = None, timeout: int = 300):
    """Run `python -m module args...` and return the CompletedProcess (text output)."""
    full_env = {**os.environ, "WANDB_MODE": "offline", "HF_HUB_OFFLINE": "1", **(env or {})}
    return subprocess.run([sys.executable, "-m", module, *args], cwd=cwd, env=full_env, capture_output=True,
                          text=True, timeout=timeout)
