"""Model dirs, exports, run dirs and CLI inputs a careless user or an attacker could hand tsparse: nothing from
a file runs, nothing tsparse did not write is deleted, one process per run dir, and one `error:` line each."""
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch

from tsparse import generate, lm_eval, report
from tsparse.bench.cli import check as bench_check
from tsparse.checkpoint import load_checkpoint
from tsparse.checks import ConfigError
from tsparse.cli import precheck
from tsparse.export import main as export_main
from tsparse.rundir import LOCK_FILE, lock_run_dir
from tsparse.saving import EXPORT_MARKER, check_export_target
from tsparse.train import check as train_check

from helpers import one_error_line, write_run

CANARY_CODE = "import pathlib; pathlib.Path({path!r}).write_text('ran')\n"


@pytest.fixture
def model_copy(tiny_export, tmp_path):
    """A private copy of the tiny export, to tamper with."""
    return shutil.copytree(tiny_export, tmp_path / "model")


def edit_json(path, **changes):
    data = json.loads(path.read_text())
    data.update(changes)
    path.write_text(json.dumps(data))


# --- no code from any file ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("where", ["config.json", "tokenizer_config.json"])
def test_auto_map_code_never_runs_even_when_the_user_answers_yes(where, model_copy, tmp_path, cli):
    canary = tmp_path / "CANARY"
    (model_copy / "evil.py").write_text(CANARY_CODE.format(path=str(canary)))
    if where == "config.json":
        edit_json(model_copy / where, model_type="evil", auto_map={"AutoConfig": "evil.Config",
                                                                   "AutoModelForCausalLM": "evil.Model"})
    else:
        edit_json(model_copy / where, auto_map={"AutoTokenizer": ["evil.Tokenizer", None]})
    out = subprocess.run([sys.executable, "-m", "tsparse.generate", str(model_copy), "--prompt", "hi",
                          "--max-new-tokens", "2"], input="y\ny\n", capture_output=True, text=True, timeout=300,
                         env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert not canary.exists()
    if where == "config.json":
        assert out.returncode == 2 and "model_type='evil' is not allowed" in out.stderr, out.stderr[-2000:]
    else:
        assert out.returncode == 0, out.stderr[-2000:]
    assert "custom code" not in out.stdout + out.stderr


@pytest.mark.parametrize("model_type", ["evil", "bert"])
def test_model_types_other_than_llama_are_refused(model_type, model_copy, capsys):
    edit_json(model_copy / "config.json", model_type=model_type)
    err = one_error_line(capsys, lambda: generate.main([str(model_copy), "--prompt", "hi"]))
    assert f"model_type='{model_type}' is not allowed" in err and "tsparse_llama" in err


# --- model dirs checked before use -------------------------------------------------------------------------------

def drop_tensors(model_dir, pattern):
    from safetensors.torch import load_file, save_file

    tensors = load_file(model_dir / "model.safetensors")
    save_file({k: v for k, v in tensors.items() if pattern not in k}, model_dir / "model.safetensors",
              metadata={"format": "pt"})


def test_missing_module_weights_are_refused_unless_asked_for(model_copy, capsys):
    drop_tensors(model_copy, ".peer.")
    err = one_error_line(capsys, lambda: generate.main([str(model_copy), "--prompt", "hi"]))
    assert "weights of its attached modules are missing" in err and "--allow-missing-modules" in err
    texts = generate.main([str(model_copy), "--prompt", "hi", "--max-new-tokens", "2", "--allow-missing-modules"])
    assert len(texts) == 1


def test_missing_base_weights_are_refused(model_copy, capsys):
    drop_tensors(model_copy, "layers.0.mlp")
    err = one_error_line(capsys, lambda: generate.main([str(model_copy), "--prompt", "hi", "--allow-missing-modules"]))
    assert "base weights are missing" in err and "layers.0.mlp" in err


def test_pickle_weights_are_refused(model_copy, capsys):
    (model_copy / "model.safetensors").unlink()
    torch.save({"lm_head.weight": torch.zeros(1)}, model_copy / "pytorch_model.bin")
    err = one_error_line(capsys, lambda: generate.main([str(model_copy), "--prompt", "hi"]))
    assert "pickle weights (pytorch_model.bin)" in err


def test_truncated_safetensors_are_refused(model_copy, capsys):
    data = (model_copy / "model.safetensors").read_bytes()
    (model_copy / "model.safetensors").write_bytes(data[: len(data) // 2])
    err = one_error_line(capsys, lambda: generate.main([str(model_copy), "--prompt", "hi"]))
    assert "model.safetensors is unreadable or truncated" in err


@pytest.mark.parametrize("change,needle", [
    ({"bogus": 1}, "peer.bogus is not a PEERSpec key"),
    ({"num_experts": 10 ** 12}, "GB of memory available"),
    ({"num_experts": 256}, "has shape"),
])
def test_bad_specs_in_config_json_are_one_line(change, needle, model_copy, capsys):
    config = json.loads((model_copy / "config.json").read_text())
    edit_json(model_copy / "config.json", peer={**config["peer"], **change})
    assert needle in one_error_line(capsys, lambda: generate.main([str(model_copy), "--prompt", "hi"]))


def test_max_new_tokens_is_bounded_by_the_positions(tiny_export, capsys):
    err = one_error_line(capsys, lambda: generate.main([str(tiny_export), "--prompt", "hi", "--max-new-tokens",
                                                        "1000000"]))
    assert "exceeds the model's 128 positions" in err


def test_a_trapped_checkpoint_names_the_global_and_never_advises_weights_only_false(tmp_path):
    path = tmp_path / "trap.ckpt"
    torch.save({"state_dict": {}, "payload": shutil.rmtree}, path)
    with pytest.raises(ConfigError) as err:
        load_checkpoint(path)
    assert "it wants the global shutil.rmtree" in str(err.value)
    assert "weights_only" not in str(err.value)


# --- never delete what tsparse didn't write ----------------------------------------------------------------------

@pytest.fixture
def run_dir(tmp_path, wikitext_small, tiny_run):
    path = tmp_path / "par" / "run"
    tiny_run(tmp_path, wikitext_small, path, "sparse=peer")
    return path


def test_export_refuses_targets_around_the_run_dir(run_dir, capsys):
    (run_dir.parent / "unrelated.txt").write_text("keep me")
    for target, where in ((run_dir.parent, "contains"), (run_dir, "is"), (run_dir / "hf", "lies inside")):
        err = one_error_line(capsys, lambda: export_main([str(run_dir), str(target)]))
        assert f"{where} the run dir" in err
    assert (run_dir.parent / "unrelated.txt").read_text() == "keep me"
    assert (run_dir / "checkpoints" / "last.ckpt").is_file()


def test_export_keeps_a_foreign_folder_and_replaces_its_own_export(run_dir, tmp_path, capsys):
    keep = tmp_path / "keep"
    keep.mkdir()
    (keep / "notes.txt").write_text("mine")
    assert "not a tsparse export" in one_error_line(capsys, lambda: export_main([str(run_dir), str(keep)]))
    assert (keep / "notes.txt").read_text() == "mine"

    export_main([str(run_dir), str(keep), "--overwrite"])  # moved aside, never deleted
    assert (keep / EXPORT_MARKER).is_file()
    assert [p.read_text() for p in (tmp_path / ".replaced").rglob("notes.txt")] == ["mine"]
    export_main([str(run_dir), str(keep)])  # an earlier export is replaced without --overwrite
    assert (keep / EXPORT_MARKER).is_file()


def test_exports_get_the_users_file_modes(run_dir, tmp_path):
    old = os.umask(0o022)
    try:
        export_main([str(run_dir), str(tmp_path / "out")])
    finally:
        os.umask(old)
    assert (tmp_path / "out").stat().st_mode & 0o777 == 0o755
    assert (tmp_path / "out" / "model.safetensors").stat().st_mode & 0o777 == 0o644


def test_train_refuses_an_export_dir_around_its_run_dir_or_under_a_file(tmp_path, compose, nano, wikitext_small):
    (tmp_path / "afile").write_text("x")
    for export_dir, needle in ((tmp_path / "run", "is the run dir"), (tmp_path, "contains the run dir"),
                               (tmp_path / "afile" / "out", "is a file, not a folder")):
        cfg = compose(nano(tmp_path, wikitext_small, "+experiment=peer", "model.from_scratch=true",
                           f"export_dir={export_dir}"))
        with pytest.raises(ConfigError, match=needle):
            train_check(cfg)


def test_a_failed_export_leaves_the_run_complete(tmp_path, wikitext_small, tiny_run, monkeypatch):
    import tsparse.train

    def broken(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(tsparse.train, "save_model", broken)
    run = tmp_path / "run"
    with pytest.raises(ConfigError, match="disk full"):
        tiny_run(tmp_path, wikitext_small, run, "sparse=peer", f"export_dir={tmp_path / 'out'}")
    assert json.loads((run / "results.json").read_text())["global_step"] == 3
    assert (run / "checkpoints" / "last.ckpt").is_file()


def test_check_export_target_accepts_new_and_empty_folders(tmp_path):
    (tmp_path / "empty").mkdir()
    check_export_target(tmp_path / "empty", tmp_path / "run")
    check_export_target(tmp_path / "new" / "deeper", tmp_path / "run")
    assert not (tmp_path / "new").exists() and not any((tmp_path / "empty").iterdir())  # a check creates nothing
    (tmp_path / "empty" / "notes.txt").write_text("mine")
    with pytest.raises(ConfigError, match="holds files that are not a tsparse export"):  # accepted for being empty
        check_export_target(tmp_path / "empty", tmp_path / "run")


# --- one run per run dir -----------------------------------------------------------------------------------------

HOLD_LOCK = "import sys, time; from tsparse.rundir import lock_run_dir; lock_run_dir(sys.argv[1]); print('held', flush=True); time.sleep(600)"


def hold_lock(run_dir):
    proc = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(run_dir)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_a_second_process_is_refused_and_a_dead_holders_lock_is_reclaimed(tmp_path):
    holder = hold_lock(tmp_path / "run")
    try:
        with pytest.raises(ConfigError, match=f"in use by another tsparse process \\(pid {holder.pid}\\)"):
            lock_run_dir(tmp_path / "run")
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    lock_run_dir(tmp_path / "run")  # the kernel dropped the dead holder's lock
    assert (tmp_path / "run" / LOCK_FILE).read_text() == str(os.getpid())


def test_train_on_a_locked_run_dir_is_one_line_and_writes_nothing(tmp_path, wikitext_small, nano, cli):
    run_dir = tmp_path / "run"
    holder = hold_lock(run_dir)
    try:
        args = [a for a in nano(tmp_path, wikitext_small, "+experiment=peer", "model.from_scratch=true")
                if not a.startswith("paths.output_dir")]
        start = time.time()
        out = cli("tsparse.train", *args, f"hydra.run.dir={run_dir}")
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    assert out.returncode == 2, out.stderr[-2000:]
    assert out.stderr.strip().splitlines() == [out.stderr.strip()] and f"pid {holder.pid}" in out.stderr
    assert sorted(p.name for p in run_dir.iterdir()) == [LOCK_FILE]
    assert time.time() - start < 120


# --- one line for every bad input --------------------------------------------------------------------------------

@pytest.mark.parametrize("argv,needle", [
    (["bench=generate", "bench.models=[nope]"], "bench.models[0]='nope' is not allowed"),
    (["bench=generate", "bench.new_tokens=-1"], "bench.new_tokens=-1 must be an integer >= 1"),
    (["bench=peers", "bench.threads=-1"], "bench.threads=-1 must be an integer >= 1"),
    (["bench=micro", "+bench.bogus=1"], "bench.bogus is not a bench setting"),
    (["bench=micro", "bench.table_dtype=int8"], "bench.table_dtype='int8' is not allowed"),
    (["bench=profile", "bench.experts=[16384]"], "bench.experts=[16384] must list two or more expert counts"),
])
def test_every_bench_key_is_checked(argv, needle, capsys):
    assert needle in one_error_line(capsys, lambda: precheck("bench", argv, bench_check))


@pytest.fixture
def bad_task(tmp_path):
    """write(docs_text) -> an include path holding task `tiny_mc` over `docs_text`."""
    from test_lm_eval import TASK_YAML

    def write(text):
        (tmp_path / "docs.jsonl").write_text(text)
        (tmp_path / "tiny_mc.yaml").write_text(TASK_YAML.format(data=tmp_path / "docs.jsonl"))
        return tmp_path

    return write


GOOD_DOC = json.dumps({"question": "The sky is", "choices": ["blue", "red"], "answer": 0})


@pytest.mark.parametrize("docs,needle", [
    (GOOD_DOC + "\n{broken\n", "lm-eval could not load tiny_mc"),
    ("", "lm-eval could not load tiny_mc"),
    (GOOD_DOC + "\n" + json.dumps({"question": "q", "choices": ["a", "b"], "answer": 7}) + "\n",
     "task tiny_mc, document 1: ValueError: target 7 is not one of its 2 choices"),
    (json.dumps({"question": "q", "choices": ["a", "b"], "answer": 7}) + "\n", "lm-eval could not load tiny_mc"),
])
def test_lm_eval_checks_the_documents_before_it_evaluates(docs, needle, bad_task, tiny_export, tmp_path, capsys,
                                                          monkeypatch):
    pytest.importorskip("lm_eval")
    monkeypatch.setattr(lm_eval, "load_model", lambda *a, **k: pytest.fail("the model was loaded"))
    include = bad_task(docs)
    err = one_error_line(capsys, lambda: lm_eval.main([str(tiny_export), "--tasks", "tiny_mc", "--include-path",
                                                       str(include), "--output", str(tmp_path / "r.json")]))
    assert needle in err


def test_lm_eval_refuses_a_folder_as_output_before_it_evaluates(tiny_export, tmp_path, capsys, monkeypatch):
    pytest.importorskip("lm_eval")
    monkeypatch.setattr(lm_eval, "load_model", lambda *a, **k: pytest.fail("the model was loaded"))
    err = one_error_line(capsys, lambda: lm_eval.main([str(tiny_export), "--tasks", "tiny_mc", "--output",
                                                       str(tmp_path)]))
    assert "is a folder" in err


def test_report_skips_and_names_unreadable_json(tmp_path, capsys):

    write_run(tmp_path / "good", "peer", 0)
    write_run(tmp_path / "bad", "peer", 1)
    (tmp_path / "bad" / "results.json").write_text("{not json")
    write_run(tmp_path / "bad_lm", "peer", 2, acc=0.5)
    (tmp_path / "bad_lm" / "lm_eval.json").write_text("[")
    rows = report.main([str(tmp_path)])
    err = capsys.readouterr().err
    assert f"skipped {tmp_path / 'bad'}" in err and f"skipped {tmp_path / 'bad_lm' / 'lm_eval.json'}" in err
    assert rows[0]["n_seeds"] == 2


def test_report_refuses_a_file_as_out(tmp_path, capsys):

    write_run(tmp_path / "good", "peer", 0)
    (tmp_path / "afile").write_text("x")
    assert "is a file" in one_error_line(capsys, lambda: report.main([str(tmp_path), "--out", str(tmp_path / "afile")]))


def test_bench_peers_names_the_reference_packages_and_versions():
    pytest.importorskip("PEER_pytorch")
    from tsparse.bench.references import reference_names

    peer, mhc = reference_names()
    assert peer.startswith("peer-pytorch 0.") and mhc.startswith("hyper-connections 0.")
