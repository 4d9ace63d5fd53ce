"""End-to-end: a real (short) training run, CSV metrics, export, eval CLI, resume guard, fresh starts
that set the old run aside, unsafe checkpoints."""
import csv
import json
import math

import pytest
import torch

import tsparse.train as train_mod
from tsparse import eval as eval_cli
from tsparse.checks import ConfigError
from tsparse.lit_module import CausalLMModule
from tsparse.report import read_metrics
from tsparse.train import run


def read_csv(path):
    with open(path) as f:
        return list(csv.DictReader(f))


def column(rows, key):
    return [float(r[key]) for r in rows if r.get(key)]


@pytest.mark.slow
def test_short_training_run_learns_and_logs(tmp_path, wikitext_small, compose, nano, cli, monkeypatch):
    modules = []
    monkeypatch.setattr(train_mod, "CausalLMModule", lambda *args, **kwargs: modules.append(
        CausalLMModule(*args, **kwargs)) or modules[-1])
    cfg = compose(nano(tmp_path, wikitext_small, "optim.base=finetune", "trainer.max_steps=40",
                                     "strategy.phases.0.lr.base=3e-3", f"export_dir={tmp_path / 'exported'}"))
    results = run(cfg)
    rows = read_csv(tmp_path / "run" / "csv" / "metrics.csv")
    losses = column(rows, "train/loss")
    assert len(losses) >= 6
    assert sum(losses[-3:]) / 3 < losses[0] - 0.5 and losses[-1] < math.log(512) - 1.0, losses
    val = column(rows, "val/loss")
    assert len(val) == 4 and val[-1] < val[0]
    assert column(rows, "lr-SparseAwareAdamW/base") and column(rows, "train/tokens_per_sec")
    # The test split's mean NLL per predicted token, recomputed with the trained weights, and its
    # tokens per whitespace-separated word counted here from the text.
    module, datamodule = modules[-1], modules[-1].trainer.datamodule
    blocks = datamodule.blocks["test"]
    with torch.no_grad():
        nll = sum(torch.nn.functional.cross_entropy(
            module.eval().model(input_ids=b, use_cache=False).logits[:, :-1].flatten(0, 1).float(), b[:, 1:].flatten(),
            reduction="sum").item() for b in blocks.split(64)) / blocks[:, 1:].numel()
    text = (wikitext_small / "test.txt").read_text()
    tokens_per_word = len(datamodule.tokenizer(text)["input_ids"]) / len(text.split())
    assert results["test/loss"] == pytest.approx(nll, rel=1e-5)
    assert results["test/ppl"] == pytest.approx(math.exp(nll), rel=1e-5)
    assert results["test/word_ppl"] == pytest.approx(math.exp(nll * tokens_per_word), rel=1e-5)
    assert results["global_step"] == 40
    assert (tmp_path / "run" / "checkpoints" / "last.ckpt").is_file()
    assert json.loads((tmp_path / "run" / "results.json").read_text())["global_step"] == 40
    assert (tmp_path / "exported" / "config.json").is_file() and (tmp_path / "exported" / "tokenizer.json").is_file()

    # A fresh run in the same run dir must not silently overwrite the checkpoints.
    with pytest.raises(ConfigError, match="ckpt_path=last to resume"):
        run(cfg)

    # The eval CLI on the exported HF dir (non-overlapping windows reproduce the block protocol).
    out = cli("tsparse.eval", str(tmp_path / "exported"), "--data-dir", str(wikitext_small), "--context", "64",
                  "--stride", "64", "--output", str(tmp_path / "eval.json"))
    assert out.returncode == 0, out.stderr
    ev = json.loads((tmp_path / "eval.json").read_text())
    assert ev["ppl"] == pytest.approx(results["test/ppl"], rel=0.05)
    overlapping = cli("tsparse.eval", str(tmp_path / "run"), "--context", "64", "--stride", "32")
    assert overlapping.returncode == 0, overlapping.stderr
    assert json.loads(overlapping.stdout)["ppl"] < ev["ppl"]  # more context per scored token


@pytest.mark.slow
def test_train_cli_runs_and_resumes(tmp_path, wikitext_small, nano, cli):
    args = [a for a in nano(tmp_path, wikitext_small, "trainer.max_steps=10", "optim.base=finetune")
            if not a.startswith("paths.output_dir")] + [f"hydra.run.dir={tmp_path / 'run'}"]
    first = cli("tsparse.train", *args)
    assert first.returncode == 0, first.stderr[-2000:]
    resumed = cli("tsparse.train", *[a.replace("max_steps=10", "max_steps=20") for a in args], "ckpt_path=last")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert json.loads((tmp_path / "run" / "results.json").read_text())["global_step"] == 20


def test_eval_cli_rejects_unknown_path(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        eval_cli.main([str(tmp_path)])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and str(tmp_path) in err


def steps(run_dir):
    return sorted(s for s, values in read_metrics(run_dir).items() if "train/loss" in values)


def test_resume_continues_and_a_fresh_start_sets_the_old_run_aside(tmp_path, wikitext_small, compose, nano):
    """Resume appends to the same CSV and keeps the W&B id; overwrite=true, and ckpt_path=auto over only
    damaged checkpoints, move the whole previous run to .replaced/ so two runs never mix."""
    args = nano(tmp_path, wikitext_small, "sparse=peer", "peer.num_experts=256", "peer.key_dim=16", "test=false",
                "trainer.max_steps=4", "trainer.val_check_interval=2", "trainer.log_every_n_steps=1")
    run_dir, trash = tmp_path / "run", tmp_path / ".replaced"
    run(compose(args))
    (run_dir / "wandb_id.txt").write_text("first-run")
    resumed = run(compose([*args, "trainer.max_steps=6", "ckpt_path=last"]))
    assert resumed["global_step"] == 6 and steps(run_dir) == list(range(6))
    assert (run_dir / "wandb_id.txt").read_text() == "first-run" and not trash.exists()

    fresh = run(compose([*args, "overwrite=true"]))
    assert fresh["global_step"] == 4 and steps(run_dir) == list(range(4))
    assert not (run_dir / "wandb_id.txt").exists()
    (old,) = trash.iterdir()
    assert steps(old) == list(range(6)) and (old / "wandb_id.txt").read_text() == "first-run"
    assert json.loads((old / "results.json").read_text())["global_step"] == 6

    (run_dir / "results.json").unlink()  # it crashed, and
    for ckpt in (run_dir / "checkpoints").glob("*.ckpt"):  # its checkpoints are damaged
        ckpt.write_bytes(b"damaged")
    assert run(compose([*args, "ckpt_path=auto"]))["global_step"] == 4
    assert len(list(trash.iterdir())) == 2 and steps(run_dir) == list(range(4))


def test_unsafe_checkpoint_is_refused_on_resume(tmp_path, wikitext_small, compose, nano, poison):
    args = nano(tmp_path, wikitext_small, "sparse=peer", "peer.num_experts=256", "peer.key_dim=16", "test=false",
                "trainer.max_steps=2", "trainer.val_check_interval=2")
    run(compose(args))
    last, marker = tmp_path / "run" / "checkpoints" / "last.ckpt", tmp_path / "created-by-the-pickle"
    poison(last, marker)
    for ckpt_path in (str(last), "last"):
        with pytest.raises(ConfigError, match=f"checkpoint {last} is refused: it holds more than weights"):
            run(compose([*args, "trainer.max_steps=4", f"ckpt_path={ckpt_path}"]))
    assert not marker.exists()
