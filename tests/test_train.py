"""End-to-end: a real (short) training run, CSV metrics, export, eval CLI, resume guard."""
import csv
import json
import math

import pytest

from tsparse.config import ConfigError
from tsparse.train import run

from conftest import compose_cfg, nano_overrides, run_cli


def read_csv(path):
    with open(path) as f:
        return list(csv.DictReader(f))


def column(rows, key):
    return [float(r[key]) for r in rows if r.get(key)]


def test_short_training_run_learns_and_logs(tmp_path, wikitext_small):
    cfg = compose_cfg(nano_overrides(tmp_path, wikitext_small, "optim.base=finetune", "trainer.max_steps=40",
                                     "strategy.phases.0.lr.base=3e-3", f"export_dir={tmp_path / 'exported'}"))
    results = run(cfg)
    rows = read_csv(tmp_path / "run" / "csv" / "metrics.csv")
    losses = column(rows, "train/loss")
    assert len(losses) >= 6
    assert sum(losses[-3:]) / 3 < losses[0] - 0.5 and losses[-1] < math.log(512) - 1.0, losses
    val = column(rows, "val/loss")
    assert len(val) == 4 and val[-1] < val[0]
    assert column(rows, "lr-SparseAwareAdamW/base") and column(rows, "train/tokens_per_sec")
    assert math.isclose(results["test/ppl"], math.exp(results["test/loss"]), rel_tol=1e-4)
    assert results["test/word_ppl"] > results["test/ppl"]
    assert results["global_step"] == 40
    assert (tmp_path / "run" / "checkpoints" / "last.ckpt").is_file()
    assert json.loads((tmp_path / "run" / "results.json").read_text())["global_step"] == 40
    assert (tmp_path / "exported" / "config.json").is_file() and (tmp_path / "exported" / "tokenizer.json").is_file()

    # A fresh run in the same run dir must not silently overwrite the checkpoints.
    with pytest.raises(ConfigError, match="ckpt_path=last to resume"):
        run(cfg)

    # The eval CLI on the exported HF dir (non-overlapping windows reproduce the block protocol).
    out = run_cli("tsparse.eval", str(tmp_path / "exported"), "--data-dir", str(wikitext_small), "--context", "64",
                  "--stride", "64", "--output", str(tmp_path / "eval.json"))
    assert out.returncode == 0, out.stderr
    ev = json.loads((tmp_path / "eval.json").read_text())
    assert ev["ppl"] == pytest.approx(results["test/ppl"], rel=0.05)
    overlapping = run_cli("tsparse.eval", str(tmp_path / "run"), "--context", "64", "--stride", "32")
    assert overlapping.returncode == 0, overlapping.stderr
    assert json.loads(overlapping.stdout)["ppl"] < ev["ppl"]  # more context per scored token


def test_train_cli_runs_and_resumes(tmp_path, wikitext_small):
    args = [a for a in nano_overrides(tmp_path, wikitext_small, "trainer.max_steps=10", "optim.base=finetune")
            if not a.startswith("paths.output_dir")] + [f"hydra.run.dir={tmp_path / 'run'}"]
    first = run_cli("tsparse.train", *args)
    assert first.returncode == 0, first.stderr[-2000:]
    resumed = run_cli("tsparse.train", *[a.replace("max_steps=10", "max_steps=20") for a in args], "ckpt_path=last")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert json.loads((tmp_path / "run" / "results.json").read_text())["global_step"] == 20


def test_eval_cli_rejects_unknown_path(tmp_path):
    out = run_cli("tsparse.eval", str(tmp_path))
    assert out.returncode == 2
    assert "neither an HF model dir" in out.stderr.strip().splitlines()[-1]
