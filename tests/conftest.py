"""Shared fixtures: a small WikiText-2 folder cut from the real offline copy, config composition, CLI runs,
and the `requires_gpu` gate. The plain functions (`compose_cfg`, `nano_overrides`, `run_cli`) stay importable;
tests take them as the fixtures `compose`, `nano`, `cli`."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra import compose as hydra_compose, initialize_config_dir
from omegaconf import DictConfig, open_dict

from tsparse.config import config_dir, project_root

from helpers import make_tiny_model

SHARED_WIKITEXT = Path(project_root()).parent / "shared" / "data" / "wikitext-2"
REPO = Path(__file__).resolve().parents[1]
SMALL_MODULES = ("peer.num_experts=256", "peer.key_dim=16", "engram.table_rows=1009", "engram.dim_per_order=32",
                 "engram.heads_per_order=2")


def pytest_runtest_setup(item) -> None:
    if item.get_closest_marker("requires_gpu") and not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")


@pytest.fixture(scope="session")
def wikitext_small(tmp_path_factory) -> Path:
    """The first lines of each real split: enough text for a nano model, fast to tokenize (skips without
    the offline copy in ../shared/data)."""
    if not SHARED_WIKITEXT.is_dir():
        pytest.skip(f"needs the offline WikiText-2 copy in {SHARED_WIKITEXT}")
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
        cfg = hydra_compose("train", overrides=overrides)
    with open_dict(cfg):
        cfg.pop("hydra", None)
    return cfg


def run_cli(module: str, *args: str, cwd: Path = REPO, env: dict | None = None, timeout: int = 300):
    """Run `python -m module args...` and return the CompletedProcess (text output)."""
    full_env = {**os.environ, "WANDB_MODE": "offline", "HF_HUB_OFFLINE": "1", **(env or {})}
    return subprocess.run([sys.executable, "-m", module, *args], cwd=cwd, env=full_env, capture_output=True,
                          text=True, timeout=timeout)


@pytest.fixture(scope="session")
def compose():
    return compose_cfg


@pytest.fixture(scope="session")
def nano():
    return nano_overrides


@pytest.fixture(scope="session")
def cli():
    return run_cli


@pytest.fixture(scope="session")
def repo() -> Path:
    return REPO


@pytest.fixture(scope="session")
def small_modules() -> tuple[str, ...]:
    """Overrides that make PEER and Engram tiny."""
    return SMALL_MODULES


@pytest.fixture(scope="module")
def one_thread():
    """The CI box has 2 contended cores: one torch thread makes tiny runs several times faster."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def tiny_run():
    """run(tmp_path, data_dir, run_dir, *overrides): a 3-step nano run (2 val/test batches) into `run_dir`."""
    from tsparse.train import run

    def tiny(tmp_path, data_dir, run_dir, *extra):
        return run(compose_cfg(nano_overrides(
            tmp_path, data_dir, *SMALL_MODULES, "trainer.max_steps=3", "trainer.val_check_interval=3",
            "trainer.log_every_n_steps=1", "trainer.limit_val_batches=2", "trainer.limit_test_batches=2",
            "+trainer.num_sanity_val_steps=0", f"paths.output_dir='{run_dir}'", *extra)))

    return tiny


@pytest.fixture(scope="session")
def tiny_model():
    return make_tiny_model


@pytest.fixture(scope="session")
def tiny_export(tmp_path_factory, wikitext_small) -> Path:
    """An exported 2-layer LLaMA (128 positions) with PEER in layer 1, random init; copy it before changing it."""
    from tsparse.modules.peer import PEERSpec
    from tsparse.saving import save_model
    from tsparse.tokenizer import train_bpe

    tokenizer = train_bpe((wikitext_small / "train.txt").read_text(), 512)
    peer = PEERSpec(layers=[1], num_experts=64, top_k=4, key_dim=8)
    model = make_tiny_model({"peer": peer}, tokenizer=tokenizer, vocab_size=len(tokenizer), num_hidden_layers=2,
                            max_position_embeddings=128, bos_token_id=tokenizer.bos_token_id,
                            eos_token_id=tokenizer.eos_token_id, pad_token_id=None)
    out = tmp_path_factory.mktemp("model") / "tiny"
    save_model(model, tokenizer, out)
    return out


class _CreatesFile:
    """A pickle payload: unpickling it (weights_only=False) creates the file `path`."""

    def __init__(self, path: Path):
        self.path = str(path)

    def __reduce__(self):
        return open, (self.path, "w")


@pytest.fixture(scope="session")
def poison():
    """poison(ckpt, marker): add to the checkpoint file `ckpt` a payload whose unpickling would create `marker`."""
    def add(ckpt: Path, marker: Path) -> None:
        state = torch.load(ckpt, weights_only=True)
        state["payload"] = _CreatesFile(marker)
        torch.save(state, ckpt)

    return add
