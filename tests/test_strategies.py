"""Phase schedules: exact LRs at boundaries, frozen groups, resume equivalence, every experiment runs."""
import math
from pathlib import Path

import pytest
import torch

import tsparse.train as train_mod
from tsparse.callbacks import PhaseLRCallback, parse_phases
from tsparse.checks import ConfigError
from tsparse.config import config_dir
from tsparse.lit_module import CausalLMModule
from tsparse.report import read_metrics
from tsparse.train import run

EXPERIMENTS = sorted(p.stem for p in (Path(config_dir()) / "experiment").glob("*.yaml") if p.stem != "pretrain_micro")
GROUPS = ("engram", "engram_table", "peer", "peer_table", "mhc")


@pytest.fixture
def triple(compose, nano, small_modules, wikitext_small):
    """compose(...) of a nano triple-sparse run into tmp dir `root`, logging every step, no test."""
    def make(root, *extra):
        return compose(nano(root, wikitext_small, "sparse=triple", *small_modules, "trainer.log_every_n_steps=1",
                            "test=false", *extra))
    return make


def test_diff_lr_phase_boundaries_log_the_configured_lrs(tmp_path, triple):
    cfg = triple(tmp_path, "strategy=diff_lr", "trainer.max_steps=9", "trainer.val_check_interval=9")
    assert cfg.strategy.phase_steps == 3
    run(cfg)
    logged = read_metrics(tmp_path / "run")
    for index, phase in enumerate(cfg.strategy.phases):
        for step in range(3 * index, 3 * index + 3):
            got = {g: logged[step][f"lr-SparseAwareAdamW/{g}"] for g in GROUPS}
            assert got == pytest.approx({g: phase.lr[g] for g in GROUPS}, rel=1e-9), (step, got)
    assert logged[0]["lr-SparseAwareAdamW/engram_table"] == pytest.approx(10.0)  # the table LR itself, unscaled


def test_phase_callback_is_a_pure_function_of_step():
    cb = PhaseLRCallback([{"name": "a", "steps": 10, "lr": {"peer": 1.0}},
                          {"name": "b", "steps": 5, "lr": {"peer": 2.0}}], schedule="cosine", warmup_steps=2)
    assert [cb.phase_index(s) for s in (0, 9, 10, 14, 15, 99)] == [0, 0, 1, 1, 1, 1]
    assert cb.learning_rates(0, 20)["peer"] == pytest.approx(0.5)
    assert cb.learning_rates(2, 20)["peer"] == pytest.approx(1.0)
    assert cb.learning_rates(12, 20)["peer"] == pytest.approx(2.0 * 0.5 * (1 + torch.cos(torch.tensor(torch.pi * 10 / 18)).item()))


@pytest.mark.parametrize("phases,needle", [
    ([{"name": "x", "steps": 0, "lr": {"peer": 1e-3}}], "strategy.phases[0].steps=0 must be a positive number of steps"),
    ([{"name": "x", "steps": 5, "lr": {"brain": 1e-3}}], "unknown param group 'brain'"),
    ([{"name": "x", "steps": 5, "lr": {"peer": -1.0}}], "strategy.phases[0].lr.peer=-1.0 must be a non-negative number"),
    ([{"name": "x", "steps": 5, "lr": {"peer": True}}], "strategy.phases[0].lr.peer=True must be a non-negative number"),
    ([{"name": "x", "steps": True, "lr": {"peer": 1e-3}}], "strategy.phases[0].steps=True must be a positive number"),
    ([{"name": "x", "steps": 5, "lr": {}, "frozen": ["heart"]}], "unknown param group 'heart'"),
    ([{"name": "x", "steps": 5, "lr": {"mhc_table": 1.0}}], "unknown param group 'mhc_table'"),
    ([{"name": "x", "steps": 5, "speed": 3}], "unknown keys ['speed']"),
    ([], "strategy.phases is empty"),
])
def test_invalid_schedules_are_config_errors(phases, needle):
    with pytest.raises(ConfigError) as err:
        parse_phases(phases)
    assert needle in str(err.value)


def test_staggered_frozen_groups_do_not_move(tmp_path, triple):
    """Phase 1 freezes PEER (and its tables), phase 2 freezes Engram (and its tables) and mHC (2 steps each)."""
    cfg = triple(tmp_path, "strategy=staggered", "trainer.max_steps=6")
    snapshots = {}

    class Snapshot(PhaseLRCallback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            super().on_train_batch_start(trainer, pl_module, batch, batch_idx)
            groups = {g["name"]: g["params"] for g in trainer.optimizers[0].param_groups}
            snapshots[trainer.global_step] = {k: [p.detach().clone() for p in v] for k, v in groups.items()}

    original = train_mod.PhaseLRCallback
    train_mod.PhaseLRCallback = Snapshot
    try:
        run(cfg)
    finally:
        train_mod.PhaseLRCallback = original

    def moved(group, a, b):
        return any(not torch.equal(x, y) for x, y in zip(snapshots[a][group], snapshots[b][group]))

    assert not moved("peer", 0, 2) and not moved("peer_table", 0, 2)
    assert moved("engram", 0, 2) and moved("engram_table", 0, 2) and moved("mhc", 0, 2)
    assert moved("peer", 2, 4) and moved("peer_table", 2, 4)
    assert not moved("engram", 2, 4) and not moved("engram_table", 2, 4) and not moved("mhc", 2, 4)
    assert all(moved(g, 4, 5) for g in GROUPS)


def test_resume_mid_phase_matches_uninterrupted_run(tmp_path, triple):
    common = ("strategy=diff_lr", "strategy.phase_steps=4", "trainer.val_check_interval=3",
              "callbacks.model_checkpoint.every_n_train_steps=3")
    full = tmp_path / "full"
    run(triple(full, *common, "trainer.max_steps=12"))
    split = tmp_path / "split"
    run(triple(split, *common, "trainer.max_steps=6"))  # stops mid-phase 2
    run(triple(split, *common, "trainer.max_steps=12", "ckpt_path=last"))
    a, b = read_metrics(full / "run"), read_metrics(split / "run")
    for step in range(12):
        for group in GROUPS:
            assert a[step][f"lr-SparseAwareAdamW/{group}"] == b[step][f"lr-SparseAwareAdamW/{group}"]
        assert abs(a[step]["train/loss"] - b[step]["train/loss"]) < 1e-4, step


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_every_experiment_runs_a_few_steps(experiment, tmp_path, wikitext_small, compose, nano, small_modules,
                                           monkeypatch):
    modules = []
    monkeypatch.setattr(train_mod, "CausalLMModule", lambda *args, **kwargs: modules.append(
        CausalLMModule(*args, **kwargs)) or modules[-1])
    cfg = compose(nano(tmp_path, wikitext_small, f"+experiment={experiment}", *small_modules,
                       "trainer.max_steps=3", "trainer.val_check_interval=3", "test=false"))
    results = run(cfg)
    assert results["global_step"] == (3 if cfg.train else 0)
    # The mean NLL over every predicted token of the blocks validation saw, recomputed with the final weights.
    [module] = modules
    blocks = module.trainer.datamodule.blocks["validation"][:cfg.trainer.limit_val_batches * cfg.data.eval_batch_size]
    with torch.no_grad():
        logits = module.eval().model(input_ids=blocks, use_cache=False).logits[:, :-1].float()
    nll = torch.nn.functional.cross_entropy(logits.flatten(0, 1), blocks[:, 1:].flatten()).item()
    assert results["val/loss"] == pytest.approx(nll, rel=1e-5)
    assert results["val/ppl"] == pytest.approx(math.exp(nll), rel=1e-5)  # exp of the mean, not a mean of exps


def test_schedule_longer_than_the_run_warns(tmp_path, triple):
    cfg = triple(tmp_path, "strategy=diff_lr", "strategy.phase_steps=5", "trainer.max_steps=8")
    with pytest.warns(UserWarning, match=r"strategy.phases\[2\] \(coordinate\) starts at step 10 but "
                                         r"trainer.max_steps=8: it will not run"):
        results = run(cfg)
    assert results["global_step"] == 8
