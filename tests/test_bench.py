"""Benchmark (ci preset) and meta-device parameter counts."""
import csv
import json
import statistics

import matplotlib.image as mpimg
import pytest
from hydra import compose, initialize_config_dir

from tsparse.bench import experts, step_profile
from tsparse.bench.experts import run as run_bench
from tsparse.bench.timing import interleaved
from tsparse.config import config_dir
from tsparse.modules.peer import PEER
from tsparse.params import main as params_main


def test_bench_ci_writes_sane_outputs(tmp_path, monkeypatch):
    timed = []  # every timing the bench took, in order: each row's inference, then a PEER row's training paths

    def record(*args):
        timed.append(interleaved(*args))
        return timed[-1]

    monkeypatch.setattr(experts, "interleaved", record)
    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
        cfg = compose("bench", overrides=["bench=ci", "bench.iters=3", "bench.warmup=1"])
    table = run_bench(cfg, tmp_path)
    rows = json.loads((tmp_path / "bench.json").read_text())["rows"]
    assert [r["config"] for r in rows] == ["baseline", "peer-256", "peer-1024", "peer-4096", "engram+peer+mhc"]
    assert rows[-1]["params_engram"] > 0 and rows[-1]["params_mhc"] > 0 and "sparse_step_s" not in rows[-1]
    times, median = iter(timed), statistics.median
    for r in rows:  # each figure is the median of its own timings, each ratio that of the per-repeat pairs
        infer = next(times)
        assert r["infer_tok_s"] == pytest.approx(cfg.bench.batch_size * cfg.bench.seq_len / median(infer["this"]))
        assert r["infer_vs_baseline"] == pytest.approx(
            median(b / t for b, t in zip(infer["reference"], infer["this"])) if r is not rows[0] else 1.0)
        assert r["infer_vs_first"] == pytest.approx(r["infer_vs_baseline"] / rows[1]["infer_vs_baseline"])
        for path in cfg.bench.train_paths if r["config"].startswith("peer-") else []:
            step = next(times)
            assert r[f"{path}_step_s"] == pytest.approx(median(step["this"]))
            assert r[f"{path}_step_vs_first"] == pytest.approx(
                median(t / f for t, f in zip(step["this"], step["reference"])) if r is not rows[1] else 1.0)
    assert next(times, None) is None
    rows = rows[:4]
    base = rows[0]["params_total"]
    for r in rows[1:]:
        expected = 2 * PEER.param_count(64, r["experts"], heads=4, key_dim=64)  # nano: d=64, PEER on 2 layers
        assert r["params_peer"] == expected and r["params_total"] == base + expected
        assert r["sparse_table_state_ratio"] <= 1.25 and r["dense_table_state_ratio"] == pytest.approx(2.0)
    assert rows[1]["infer_vs_first"] == 1.0 and rows[0]["infer_vs_baseline"] == 1.0
    with open(tmp_path / "bench.csv") as f:
        assert len(list(csv.DictReader(f))) == 5
    assert table.count("\n| peer-") == 3 and (tmp_path / "bench.md").read_text() == table
    image = mpimg.imread(tmp_path / "bench.png")[..., :3]
    half = image.shape[1] // 2
    assert image[:, :half].std() > 0.01 and image[:, half:].std() > 0.01  # both panels have curves drawn


@pytest.mark.slow
def test_bench_compares_compiled_and_eager_steps(tmp_path):
    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
        cfg = compose("bench", overrides=["bench=ci", "bench.experts=[256]", "bench.module_sets=[]", "bench.train_paths=[]",
                                          "bench.compile=[mhc]", "bench.iters=3", "bench.warmup=1"])
    table = run_bench(cfg, tmp_path)
    result = json.loads((tmp_path / "bench.json").read_text())["compile"]
    assert result["modules"] == "mhc" and result["layers"] == 4 and result["graphs"] > 0
    assert result["ratio_q1"] <= result["ratio"] <= result["ratio_q3"] and result["eager_step_s"] > 0
    assert f"compiled / eager {result['ratio']:.3f}" in table


def test_profile_alternates_the_counts_and_ranks_ops_by_their_growth(tmp_path, monkeypatch):
    steps = []  # the step profiled at each call, in order

    def record(step, iters):
        steps.append(step)
        return profiled(step, iters)

    profiled = step_profile.profiled
    monkeypatch.setattr(step_profile, "profiled", record)
    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
        cfg = compose("bench", overrides=["bench=profile", "model=nano", "bench.experts=[256,4096]", "bench.seq_len=32",
                                          "bench.batch_size=2", "bench.warmup=1", "bench.repeats=2", "bench.iters=1"])
    table = step_profile.run(cfg, tmp_path)
    assert len(steps) == 4 and steps[0] is steps[2] and steps[1] is steps[3] and steps[0] is not steps[1]
    result = json.loads((tmp_path / "profile.json").read_text())
    rows, meta = result["rows"], result["meta"]
    assert [r["difference_ms"] for r in rows] == sorted((r["difference_ms"] for r in rows), reverse=True)
    assert all(r["difference_ms"] == pytest.approx(r["ms_4096"] - r["ms_256"]) for r in rows)
    by_op = {r["op"]: r for r in rows}
    assert by_op["aten::topk"]["ms_256"] > 0 and by_op["aten::bmm"]["ms_4096"] > 0  # PEER's routing was profiled
    assert 0 < meta["self_cpu_ms"]["256"] < 2 * meta["wall_ms"]["256"]
    assert meta["wall_ratio"]["q1"] <= meta["wall_ratio"]["median"] <= meta["wall_ratio"]["q3"]
    shown = [line.split("`")[1] for line in table.splitlines() if line.startswith("| `")]
    largest = sorted(rows, key=lambda r: abs(r["difference_ms"]))[-step_profile.TOP:]  # either way
    assert sorted(shown) == sorted(r["op"] for r in largest) and (tmp_path / "profile.md").read_text() == table


def test_params_cli_reproduces_the_seed_table(capsys):
    rows = params_main(["model=tinyllama", "sparse=peer", "--experts", "16384", "65536", "262144", "589824", "802816"])
    assert [r["total"] for r in rows] == [1_236_494_336, 1_639_278_592, 3_250_153_472, 5_934_770_176, 7_679_731_712]
    assert all(r["base"] == 1_100_048_384 for r in rows)
    assert "| 802816 |" in capsys.readouterr().out


def test_params_cli_rejects_non_square_experts(capsys):
    with pytest.raises(SystemExit) as exit_info:
        params_main(["model=tinyllama", "sparse=peer", "--experts", "1000"])
    assert exit_info.value.code == 2
    assert "peer.num_experts=1000 must be a positive perfect square" in capsys.readouterr().err
