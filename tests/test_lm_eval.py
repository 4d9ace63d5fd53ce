"""tsparse.generate and tsparse.lm_eval on a tiny PEER model, lm-eval on a local task offline, lm-eval columns in
tsparse.report."""
import json
import os
import socket
import subprocess
import sys

import pytest
import torch

from tsparse import generate, lm_eval, report

from helpers import write_run

pytest.importorskip("lm_eval", reason='needs lm-evaluation-harness: pip install -e ".[eval]"')

DOCS = [
    {"question": "The capital of France is", "choices": ["Paris", "London", "Berlin", "Rome"], "answer": 0},
    {"question": "The sky is", "choices": ["green", "blue", "red", "black"], "answer": 1},
    {"question": "Two plus two is", "choices": ["three", "five", "four", "one"], "answer": 2},
    {"question": "Water freezes at", "choices": ["ten", "fifty", "hundred", "zero"], "answer": 3},
    {"question": "The Tower of London is in", "choices": ["England", "Spain", "Peru", "Japan"], "answer": 0},
    {"question": "The river flows into the", "choices": ["desert", "sea", "sky", "forest"], "answer": 1},
]
TASK_YAML = """task: tiny_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: answer
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
"""


@pytest.fixture(scope="module")
def model_dir(tiny_export):
    return tiny_export


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory):
    """A multiple-choice lm-eval task `tiny_mc` over a local JSONL file."""
    folder = tmp_path_factory.mktemp("tasks")
    (folder / "docs.jsonl").write_text("".join(json.dumps(d) + "\n" for d in DOCS))
    (folder / "tiny_mc.yaml").write_text(TASK_YAML.format(data=folder / "docs.jsonl"))
    return folder


@pytest.fixture
def offline(monkeypatch):
    """HF offline switches on, and any network connection fails."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")

    def refuse(self, address):
        raise OSError(f"test is offline: connect to {address}")

    monkeypatch.setattr(socket.socket, "connect", refuse)


@torch.no_grad()
def reference_acc(model_dir) -> float:
    """Accuracy on DOCS by summed log-likelihood of " choice" after the question, computed here."""
    from tsparse.loading import load_model

    model, tokenizer = load_model(model_dir)
    correct = 0
    for doc in DOCS:
        context = tokenizer(doc["question"]).input_ids
        scores = []
        for choice in doc["choices"]:
            ids = tokenizer(doc["question"] + " " + choice).input_ids
            assert ids[:len(context)] == context
            logp = model(torch.tensor([ids])).logits[0].log_softmax(-1)
            scores.append(sum(logp[i - 1, ids[i]].item() for i in range(len(context), len(ids))))
        correct += scores.index(max(scores)) == doc["answer"]
    return correct / len(DOCS)


@torch.no_grad()
def greedy(path, prompt: str, new_tokens: int) -> str:
    """The argmax continuation of `prompt` by the model at `path`, one full forward per token (no cache)."""
    from tsparse.loading import load_model

    model, tokenizer = load_model(path)
    ids = prompt_ids = tokenizer(prompt, return_tensors="pt").input_ids
    for _ in range(new_tokens):
        ids = torch.cat([ids, model(ids).logits[:, -1:].argmax(-1)], dim=1)
    return tokenizer.decode(ids[0, prompt_ids.shape[1]:], skip_special_tokens=True)


def test_generate_batches_prompts_with_left_padding(model_dir, capsys):
    prompts = ["The Tower of London", "Hi", "In 1990 the band"]
    texts = generate.main([str(model_dir), *(a for p in prompts for a in ("--prompt", p)), "--max-new-tokens", "6"])
    out = capsys.readouterr().out
    assert len(texts) == 3 and all(texts) and all(p + t in out for p, t in zip(prompts, texts))
    model, tokenizer = generate.load_model(model_dir)
    assert [generate.generate(model, tokenizer, [p], 6)[0] for p in prompts] == texts
    assert generate.generate(model, tokenizer, prompts, 6, use_cache=False) == texts

    sampled = [generate.main([str(model_dir), "--prompt", "The", "--sample", "--top-p", "0.9", "--temperature", "1.5",
                              "--seed", "3", "--max-new-tokens", "8"]) for _ in range(2)]
    assert sampled[0] == sampled[1] != generate.generate(model, tokenizer, ["The"], 8)


@pytest.mark.parametrize("args, message", [
    (["/does/not/exist", "--prompt", "x"], "does not exist"),
    (["{model}"], "required: --prompt"),
    (["{model}", "--prompt", ""], "must not be empty"),
    (["{model}", "--prompt", "x", "--max-new-tokens", "0"], "not a positive integer"),
    (["{model}", "--prompt", "x", "--top-p", "1.5"], "not in (0, 1]"),
    (["{model}", "--prompt", "x", "--temperature", "nan"], "not a positive number"),
    (["{model}/model.safetensors", "--prompt", "x"], "does not exist"),
    (["{model}/..", "--prompt", "x"], "not a tsparse run dir"),
])
def test_generate_bad_input_is_one_line(model_dir, capsys, args, message):
    with pytest.raises(SystemExit) as exit_info:
        generate.main([a.format(model=model_dir) for a in args])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err.startswith("error: ") and err.count("\n") == 1 and message in err


def test_lm_eval_on_a_local_task_offline(model_dir, task_dir, offline, capsys):
    result = lm_eval.main([str(model_dir), "--tasks", "tiny_mc", "--include-path", str(task_dir), "--batch-size", "4"])
    written = json.loads((model_dir / "lm_eval.json").read_text())
    assert written == json.loads(json.dumps(result))
    acc = written["results"]["tiny_mc"]["acc,none"]
    assert 0 <= acc <= 1 and acc == pytest.approx(reference_acc(model_dir))
    assert 0 < written["results"]["tiny_mc"]["acc_stderr,none"] <= 0.5
    assert written["n_docs"] == {"tiny_mc": len(DOCS)} and written["n_shot"] == {"tiny_mc": 0}
    assert written["tasks"] == ["tiny_mc"] and written["model"] == str(model_dir)
    assert written["lm_eval_version"] == sys.modules["lm_eval"].__version__
    assert "acc,none" in capsys.readouterr().out


def test_lm_eval_limit_and_output(model_dir, task_dir, offline, tmp_path):
    output = tmp_path / "scores.json"
    lm_eval.main([str(model_dir), "--tasks", "tiny_mc", "--include-path", str(task_dir), "--limit", "3",
                  "--output", str(output)])
    written = json.loads(output.read_text())
    assert written["limit"] == 3 and written["n_docs"] == {"tiny_mc": 3}
    assert written["results"]["tiny_mc"]["acc,none"] in (0, 1 / 3, 2 / 3, 1)


@pytest.mark.parametrize("args, message", [
    (["some-org/some-model", "--tasks", "hellaswag"], "--output"),
    (["{model}", "--tasks", "tiny_mc", "--include-path", "/does/not/exist"], "is not a directory"),
    (["{model}", "--tasks", "tiny_mc,"], "comma-separated"),
    (["{model}", "--tasks", "tiny_mc", "--limit", "0"], "not a positive integer"),
    (["{model}", "--tasks", "tiny_mc", "--num-fewshot", "-1"], "non-negative"),
    (["{model}", "--tasks", "tiny_mc", "--output", "/does/not/exist/x.json"], "does not exist"),
    (["{model}", "--tasks", "tiny_mc", "--device", "tpu"], "not cpu or cuda"),
])
def test_lm_eval_bad_input_is_one_line(model_dir, capsys, args, message):
    with pytest.raises(SystemExit) as exit_info:
        lm_eval.main([a.format(model=model_dir) for a in args])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err.startswith("error: ") and err.count("\n") == 1 and message in err


def test_report_shows_lm_eval_columns(tmp_path):
    write_run(tmp_path / "runs" / "baseline", "baseline", 0)
    for seed, acc in ((0, 0.25), (1, 0.35)):
        write_run(tmp_path / "runs" / f"peer-{seed}", "peer", seed, acc)
    rows = {r["group"]: r for r in report.main([str(tmp_path / "runs"), "--out", str(tmp_path / "report")])}

    assert rows["peer"]["lm_eval/hellaswag/acc_mean"] == pytest.approx(0.30)
    assert rows["peer"]["lm_eval/hellaswag/acc_std"] == pytest.approx(0.0707107)
    assert rows["peer"]["lm_eval/hellaswag/acc_norm_mean"] == pytest.approx(0.40)
    assert rows["baseline"]["lm_eval/hellaswag/acc_mean"] is None and rows["baseline"]["lm_eval/hellaswag/acc_n"] == 0
    assert not any("stderr" in key for key in rows["peer"])
    table = (tmp_path / "report" / "report.md").read_text()
    assert "| hellaswag/acc | hellaswag/acc_norm |" in table
    assert "| 0.300 ± 0.071 | 0.400 ± 0.071 |" in table and "| - | - |" in table
    assert "lm_eval/hellaswag/acc_mean" in (tmp_path / "report" / "report.csv").read_text()


def test_lm_eval_on_a_run_dir_feeds_the_report(tmp_path, wikitext_small, task_dir, tiny_run, one_thread, offline):
    run_dir = tmp_path / "runs" / "peer"
    tiny_run(tmp_path, wikitext_small, run_dir, "+experiment=peer")
    [text] = generate.main([str(run_dir), "--prompt", "The Tower of London", "--max-new-tokens", "4"])
    assert text.strip() and text == greedy(run_dir, "The Tower of London", 4)
    lm_eval.main([str(run_dir), "--tasks", "tiny_mc", "--include-path", str(task_dir), "--checkpoint", "last"])
    acc = json.loads((run_dir / "lm_eval.json").read_text())["results"]["tiny_mc"]["acc,none"]
    [row] = report.main([str(run_dir), "--out", str(tmp_path / "report")])
    assert row["lm_eval/tiny_mc/acc_mean"] == pytest.approx(acc) and row["lm_eval/tiny_mc/acc_n"] == 1
    assert f"{acc:.3f} (n=1)" in (tmp_path / "report" / "report.md").read_text()


@pytest.mark.slow
def test_lm_eval_cli_and_the_stock_lm_eval_cli_agree(model_dir, task_dir, tmp_path, cli, repo):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    ours = cli("tsparse.lm_eval", str(model_dir), "--tasks", "tiny_mc", "--include-path", str(task_dir),
               "--output", str(tmp_path / "ours.json"), "--device", "cpu", env=env)
    assert ours.returncode == 0, ours.stderr
    acc = json.loads((tmp_path / "ours.json").read_text())["results"]["tiny_mc"]["acc,none"]

    # The stock lm-eval CLI loads an exported dir once `import tsparse` has registered the Auto classes.
    stock = subprocess.run(
        [sys.executable, "-c", "import tsparse; from lm_eval.__main__ import cli_evaluate; cli_evaluate()",
         "--model", "hf", "--model_args", f"pretrained={model_dir},trust_remote_code=False,backend=causal",
         "--tasks", "tiny_mc", "--include_path", str(task_dir), "--device", "cpu", "--output_path", str(tmp_path / "stock")],
        cwd=repo, env=env, capture_output=True, text=True, timeout=600)
    assert stock.returncode == 0, stock.stderr
    [results] = (tmp_path / "stock").rglob("results_*.json")
    assert json.loads(results.read_text())["results"]["tiny_mc"]["acc,none"] == pytest.approx(acc)

    bad = cli("tsparse.lm_eval", str(model_dir), "--tasks", "no_such_task", env=env)
    assert bad.returncode == 2 and bad.stderr.startswith("error: unknown lm-eval task(s): no_such_task")
