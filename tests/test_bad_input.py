"""Bad input that used to give a traceback or a misleading line: one `error:` line naming the key, exit 2,
nothing written."""
import sys

import pytest

from tsparse import params, plan, rehearse, scaleout, train
from tsparse.cli import precheck

from helpers import one_error_line

SIZING = {"plan": plan.main, "params": params.main, "scaleout": scaleout.main}


@pytest.mark.parametrize("cli,argv,needle", [
    ("plan", ["model=tinyllama", "+experiment=diff_lr", "data.batch_size=-8", "--device-gb", "1"],
     "data.batch_size=-8 must be a positive number of sequences (an integer >= 1)"),
    ("scaleout", ["model=tinyllama", "sparse=peer", "data.batch_size=-8"], "data.batch_size=-8 must be a positive"),
    ("params", ["sparse=peer", "data.block_size=0"], "data.block_size=0 must be a positive"),
    ("plan", ["sparse=peer", "data.block_size=-1"], "data.block_size=-1 must be a positive"),
    ("scaleout", ["model=tinyllama", "sparse=peer", "data.block_size=100000"],
     "data.block_size=100000 exceeds the model context (2048); choose 1 to 2048"),
])
def test_sizing_clis_check_the_data_sizes(cli, argv, needle, capsys):
    assert needle in one_error_line(capsys, lambda: SIZING[cli](argv))


@pytest.mark.parametrize("cli", SIZING)
def test_experts_without_peer_are_refused(cli, capsys):
    err = one_error_line(capsys, lambda: SIZING[cli](["sparse=engram", "--experts", "65536"]))
    assert "--experts" in err and "peer is not attached (sparse.modules=['engram'])" in err


@pytest.mark.parametrize("cli", SIZING)
def test_expert_count_has_an_upper_bound(cli, capsys):
    err = one_error_line(capsys, lambda: SIZING[cli](["sparse=peer", "--experts", str(10**40)]))
    assert f"peer.num_experts={10**40} must be a positive perfect square <= 1,099,511,627,776" in err


def test_rehearse_work_that_is_a_file_is_refused(tmp_path, capsys):
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "train.txt").write_text("text\n")
    work = tmp_path / "work"
    work.write_text("keep")
    err = one_error_line(capsys, lambda: rehearse.main(["--work", str(work), "--data-dir", str(tmp_path / "data")]))
    assert err == f"error: --work {work} is a file; name a folder"
    assert work.read_text() == "keep" and sorted(p.name for p in tmp_path.iterdir()) == ["data", "work"]


def train_error(tmp_path, capsys, *argv: str) -> str:
    """The one error line of the train precheck for `argv` (nano model, run and sweep dirs in tmp_path),
    which must leave no run or sweep dir."""
    dirs = [f"hydra.run.dir={tmp_path / 'run'}", f"hydra.sweep.dir={tmp_path / 'sweep'}"]
    err = one_error_line(capsys, lambda: precheck("train", [*argv, "model=nano", *dirs], train.check))
    assert not (tmp_path / "run").exists() and not (tmp_path / "sweep").exists()
    return err


def test_train_refuses_block_size_beyond_model_context(tmp_path, capsys):
    err = train_error(tmp_path, capsys, "+experiment=peer", "data.block_size=100000")
    assert "data.block_size=100000 exceeds the model context (256); choose 1 to 256" in err


@pytest.mark.parametrize("argv,needle", [
    (["-m", "+study=quality", "study_steps=-1"], "study_steps=-1 must be a positive number of steps (an integer >= 1)"),
    (["+study=quality", "study_steps=abc"], "study_steps='abc' must be a positive number of steps"),
])
def test_study_steps_is_named(argv, needle, tmp_path, capsys):
    assert needle in train_error(tmp_path, capsys, *argv)


def test_ckpt_path_directory_is_named(tmp_path, capsys):
    folder = tmp_path / "ckpts"
    folder.mkdir()
    err = train_error(tmp_path, capsys, "+experiment=peer", f"ckpt_path={folder}")
    assert err == f"error: ckpt_path={folder} is a directory; pass a .ckpt file, or last / auto"


@pytest.mark.parametrize("flags,needle", [
    (["-m", "--cfg", "job"], "--multirun and --cfg cannot be combined"),
    (["--resolve"], "--resolve needs --cfg"),
])
def test_conflicting_hydra_flags_are_one_line(flags, needle, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["tsparse.train", *flags, "+experiment=joint", "model=nano",
                                      f"hydra.run.dir={tmp_path / 'run'}", f"hydra.sweep.dir={tmp_path / 'sweep'}"])
    assert needle in one_error_line(capsys, train.main)
    assert not list(tmp_path.iterdir())
