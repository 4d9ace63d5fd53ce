"""Bad input to any CLI: one `error:` line on stderr, exit code 2, no traceback, nothing written."""
import pytest

from tsparse import eval as eval_cli
from tsparse import params, report, viz
from tsparse.cli import precheck
from tsparse.train import check

from helpers import one_error_line


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory) -> str:
    """`paths.artifact_dir` holding a (stand-in) pretrained micro base, as after +experiment=pretrain_micro."""
    root = tmp_path_factory.mktemp("artifacts")
    (root / "micro-base").mkdir()
    return f"paths.artifact_dir={root}"


@pytest.mark.parametrize("argv,needles", [
    ([], ["nothing to train", "+experiment=NAME", "'diff_lr'", "'pretrain_micro'"]),
    (["model=nope"], ["Could not find 'model/nope'", "micro, nano, tinyllama"]),
    (["+experiment=nope"], ["Could not find 'experiment/nope'", "baseline, diff_lr"]),
    (["foo.bar=1"], ["Could not override 'foo.bar'", "+foo.bar=1"]),
    (["/bad/override"], ["Error parsing override '/bad/override'"]),
    (["+experiment=peer", "seed=abc"], ["seed='abc' must be an integer"]),
    (["+experiment=peer", "trainer.max_steps=ten"], ["trainer.max_steps='ten' must be a positive number"]),
    (["+experiment=peer", "~optim.grad_clip"], ["optim.grad_clip"]),
    (["+experiment=peer", "seed=0,1"], ["Ambiguous value for argument 'seed=0,1'", "--multirun"]),
    (["-m", "+experiment=peer,nope"], ["Could not find 'experiment/nope'"]),
    (["-m", "+study=quality", "optim.base=bogus"], ["optim.base='bogus' is not allowed"]),
    (["--no-such-flag"], ["unrecognized arguments: --no-such-flag"]),
    (["+experiment=peer", "ckpt_path=/no/such.ckpt"], ["checkpoint /no/such.ckpt does not exist"]),
    (["+experiment=peer", "trainer=fsdp"], ["cannot shard sparse gradients", "peer.sparse_grad=false"]),
    (["+experiment=peer", "peer.layers=[9]"], ["peer.layers=[9]: [9] outside this model's layers [0, 7]"]),
])
def test_train_precheck_is_one_line_before_any_directory(argv, needles, tmp_path, capsys, artifacts):
    run_dir = tmp_path / "run"
    err = one_error_line(capsys, lambda: precheck("train", [*argv, f"hydra.run.dir={run_dir}", artifacts,
                                                            f"hydra.sweep.dir={tmp_path / 'sweep'}"], check))
    assert all(n in err for n in needles), err
    assert not list(tmp_path.iterdir())


def test_precheck_passes_good_command_lines(tmp_path, artifacts):
    for argv in (["+experiment=diff_lr"], ["-m", "+study=quality"], ["-m", "+experiment=peer", "peer=16k,65k"]):
        precheck("train", [*argv, f"hydra.run.dir={tmp_path}/run", f"hydra.sweep.dir={tmp_path}/sweep", artifacts], check)
    assert not list(tmp_path.iterdir())


def test_a_missing_micro_base_is_refused_before_any_directory(tmp_path, capsys):
    err = one_error_line(capsys, lambda: precheck("train", ["+experiment=diff_lr", f"hydra.run.dir={tmp_path}/run",
                                                            f"paths.artifact_dir={tmp_path}/none"], check))
    assert "micro-base' does not exist" in err and "+experiment=pretrain_micro" in err
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("main,argv,needle", [
    (eval_cli.main, [], "the following arguments are required: path"),
    (eval_cli.main, ["/no/such/dir"], "/no/such/dir"),
    (eval_cli.main, [".", "--context", "0"], "argument --context: '0' is not a positive integer"),
    (eval_cli.main, [".", "--output", "/no/such/dir/x.json"], "folder /no/such/dir does not exist"),
    (viz.main, [], "the following arguments are required: PATH"),
    (viz.main, [".", "--top", "x"], "argument --top: 'x' is not a positive integer"),
    (report.main, [], "the following arguments are required: PATH"),
    (report.main, ["/no/such/dir"], "no tsparse runs"),
    (params.main, ["/bad/override"], "Error parsing override '/bad/override'"),
    (params.main, ["model=nope"], "Could not find 'model/nope'"),
    (params.main, ["--experts", "-3"], "argument --experts: '-3' is not a positive integer"),
])
def test_argparse_clis_are_one_line(main, argv, needle, capsys):
    assert needle in one_error_line(capsys, lambda: main(argv))


@pytest.mark.slow
@pytest.mark.parametrize("module,args,needle", [
    ("tsparse.train", [], "+experiment=NAME"),
    ("tsparse.train", ["model=nope"], "Could not find 'model/nope'"),
    ("tsparse.train", ["+experiment=peer", "seed=[1,2"], "no viable alternative"),
    ("tsparse.train", ["+experiment=peer", "ckpt_path=/no/such.ckpt"], "checkpoint /no/such.ckpt does not exist"),
    ("tsparse.bench", ["bench=nope"], "Could not find 'bench/nope'"),
    ("tsparse.bench", ["bench=ci", "bench.iters=abc"], "bench.iters='abc' must be an integer >= 1"),
    ("tsparse.eval", [], "the following arguments are required: path"),
    ("tsparse.eval", ["/no/such/dir"], "/no/such/dir"),
    ("tsparse.viz", ["/no/such/dir"], "/no/such/dir"),
    ("tsparse.report", [], "the following arguments are required: PATH"),
    ("tsparse.params", ["/bad/override"], "Error parsing override"),
])
def test_every_cli_answers_bad_input_in_one_line(module, args, needle, tmp_path, cli):
    out = cli(module, *args, *([f"hydra.run.dir={tmp_path / 'run'}"] if module in ("tsparse.train", "tsparse.bench")
                               else []))
    assert out.returncode == 2, out.stderr[-2000:]
    assert "Traceback" not in out.stderr
    last = out.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and needle in last, last
    assert not (tmp_path / "run").exists()
