"""tsparse.report on a real multirun tree: seed grouping, mean/std, deltas vs references, CSV de-duplication, plots;
on fake runs: which folders are runs, and that it replaces only the files it wrote."""
import csv
import hashlib
import io
import json
import shutil
import statistics

from pathlib import Path

import pytest
import torch
from matplotlib.image import imread
from omegaconf import OmegaConf

from helpers import one_error_line, write_run
from tsparse import report

EXPERIMENTS = ("baseline", "finetune_control", "engram")
SEEDS = (0, 1)


@pytest.fixture(scope="module")
def sweep(tmp_path_factory, wikitext_small, one_thread, tiny_run):
    """outputs/multirun/<experiment>/job,seed=<s> for each experiment and seed, as a multirun writes them."""
    root = tmp_path_factory.mktemp("outputs")
    for experiment in EXPERIMENTS:
        for seed in SEEDS:
            tiny_run(root, wikitext_small, root / "multirun" / experiment / f"job,seed={seed}",
                     f"+experiment={experiment}", f"seed={seed}", f"run_name='{experiment},seed={seed}'")
    return root / "multirun"


def results_of(sweep, experiment):
    return [json.loads((sweep / experiment / f"job,seed={s}" / "results.json").read_text()) for s in SEEDS]


def test_group_name_drops_only_the_seed():
    assert report.group_name("peer,peer=16k,seed=2,trainer.max_steps=5", "peer") == "peer,peer=16k,trainer.max_steps=5"
    assert report.group_name("peer,seed=10", "peer") == "peer"
    assert report.group_name(None, "engram") == "engram"


def test_report_groups_seeds_and_compares_to_references(sweep, tmp_path, capsys):
    out = tmp_path / "report"
    rows = report.main([str(sweep), "--out", str(out)])

    assert [r["group"] for r in rows] == ["baseline", "finetune_control", "engram"]
    by_group = {r["group"]: r for r in rows}
    for experiment in EXPERIMENTS:
        row, results = by_group[experiment], results_of(sweep, experiment)
        assert row["experiment"] == experiment and row["n_seeds"] == 2 and row["seeds"] == "0 1"
        for column, key in report.METRICS.items():
            values = [r[key] for r in results]
            assert row[f"{column}_mean"] == pytest.approx(statistics.mean(values))
            assert row[f"{column}_std"] == pytest.approx(statistics.stdev(values))
        assert row["total_params"] == sum(results[0]["params"].values())

    params = results_of(sweep, "engram")[0]["params"]
    assert by_group["engram"]["trainable_params"] == params["engram"] + params["engram_table"] > params["engram"] > 0
    assert by_group["finetune_control"]["trainable_params"] == params["base"]
    assert by_group["baseline"]["trainable_params"] == 0
    assert by_group["baseline"]["tokens_per_sec"] is None and by_group["engram"]["tokens_per_sec"] > 0
    recorded = results_of(sweep, "engram")[0]["machine"]  # every figure names the CPU and kernels it came from
    assert recorded["cpu"] and recorded["cpu_capability"] == torch.backends.cpu.get_cpu_capability()
    line = f"{recorded['cpu']} ({recorded['cpu_capability']}, {recorded['threads']} threads)"
    assert {r["machines"] for r in rows} == {line} and line in (out / "report.md").read_text()

    ppl = {e: by_group[e]["test_ppl_mean"] for e in EXPERIMENTS}
    for experiment in EXPERIMENTS:
        for reference in report.REFERENCES:
            delta = by_group[experiment][f"delta_test_ppl_vs_{reference}_pct"]
            assert delta == pytest.approx(100 * (ppl[experiment] - ppl[reference]) / ppl[reference])
            assert (delta > 0) == (ppl[experiment] > ppl[reference])
    assert by_group["baseline"]["delta_test_ppl_vs_baseline_pct"] == 0.0

    table = (out / "report.md").read_text().split("## Module diagnostics")[0]
    data_lines = [line for line in table.splitlines() if line.startswith("| `")]
    assert len(data_lines) == 3 and all(" ± " in line for line in data_lines)
    assert "Δ test ppl vs baseline" in table and "Δ test ppl vs finetune_control" in table
    assert data_lines[0] in capsys.readouterr().out

    with open(out / "report.csv", newline="") as f:
        written = list(csv.DictReader(f))
    assert [r["group"] for r in written] == [r["group"] for r in rows]
    assert float(written[2]["test_ppl_mean"]) == pytest.approx(rows[2]["test_ppl_mean"])
    assert float(written[2]["delta_test_ppl_vs_baseline_pct"]) == pytest.approx(rows[2]["delta_test_ppl_vs_baseline_pct"])

    for name in ("loss_curves.png", "lr_schedule.png"):
        image = imread(out / name)
        assert image.ndim == 3 and image.shape[0] > 300 and image.shape[1] > 400
        assert image[..., :3].std() > 0.01  # something was drawn


def test_module_diagnostics_are_the_last_logged_stats(sweep, tmp_path):
    report.main([str(sweep), "--out", str(tmp_path)])
    runs = [report.Run.load(sweep / "engram" / f"job,seed={s}") for s in SEEDS]
    finals = []
    for run in runs:
        last = {}
        for step in sorted(run.metrics):
            last.update({k: v for k, v in run.metrics[step].items() if k.endswith("/out_rms_ratio")})
        assert last and all(k.startswith("stats/engram.L") for k in last)
        finals.append(statistics.fmean(last.values()))
    assert all(f > 0 for f in finals)
    text = (tmp_path / "report.md").read_text().split("## Module diagnostics")[1]
    rows = [line for line in text.splitlines() if line.startswith("| `")]
    assert len(rows) == 1 and rows[0].startswith("| `engram` |")  # references log no module stats
    engram_rms = rows[0].split(" | ")[1]
    assert engram_rms == f"{statistics.mean(finals):.3g} ± {statistics.stdev(finals):.2g}"


def test_one_seed_is_reported_as_n_1(sweep, tmp_path):
    rows = report.main([str(sweep / "engram" / "job,seed=0"), "--out", str(tmp_path)])
    assert rows[0]["n_seeds"] == 1 and rows[0]["test_ppl_std"] is None
    assert rows[0]["delta_test_ppl_vs_baseline_pct"] is None
    line = next(line for line in (tmp_path / "report.md").read_text().splitlines() if line.startswith("| `"))
    assert "(n=1)" in line and " ± " not in line


def test_duplicate_steps_keep_the_last_value(sweep, tmp_path):
    """A resumed run appends rows for steps it logs again: the report keeps the last value per (step, column)."""
    resumed = tmp_path / "resumed"
    shutil.copytree(sweep / "engram" / "job,seed=0", resumed, ignore=shutil.ignore_patterns("checkpoints"))
    metrics = resumed / "csv" / "metrics.csv"
    with open(metrics, newline="") as f:
        header = next(csv.reader(f))
    before = report.read_metrics(resumed)
    with open(metrics, "a", newline="") as f:
        csv.DictWriter(f, header).writerow({"step": 1, "train/loss": 123.0})
    after = report.read_metrics(resumed)

    assert sorted(after) == sorted(before)
    assert after[1]["train/loss"] == 123.0 and before[1]["train/loss"] != 123.0
    assert after[1]["lr-SparseAwareAdamW/engram"] == before[1]["lr-SparseAwareAdamW/engram"]

    other = report.Run.load(sweep / "engram" / "job,seed=1")
    steps, losses = report.mean_curve([report.Run.load(resumed), other], "train/loss")
    assert steps == sorted(set(steps)) == sorted(s for s, values in other.metrics.items() if "train/loss" in values)
    assert losses[steps.index(1)] == pytest.approx((123.0 + other.metrics[1]["train/loss"]) / 2)


def test_no_runs_is_a_one_line_error(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        report.main([str(tmp_path / "empty")])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and str(tmp_path / "empty") in err


def test_compare_is_the_two_std_rule():
    assert report.compare((10.0, 0.1), (10.3, 0.1)) == "lower"      # gap 0.3 > 2 x 0.1
    assert report.compare((10.3, 0.1), (10.0, 0.05)) == "higher"
    assert report.compare((10.0, 0.2), (10.3, 0.1)) == "n.d."       # gap 0.3 <= 2 x the larger std 0.2
    assert report.compare((10.0, None), (10.3, 0.1)) == "lower"     # a reference without spread (the base)
    assert report.compare((10.0, None), (10.3, None)) == "-"
    assert report.compare((None, None), (10.3, 0.1)) == "-"


def test_versus_pairs_are_judged_and_unknown_names_refused(sweep, tmp_path, capsys):
    out = tmp_path / "report"
    rows = report.main([str(sweep), "--out", str(out), "--versus", "engram:finetune_control"])
    engram, control = (next(r for r in rows if r["experiment"] == e) for e in ("engram", "finetune_control"))
    verdict = report.compare(report.ppl_of(engram), report.ppl_of(control))
    line = next(l for l in (out / "report.md").read_text().splitlines() if l.startswith("- engram vs finetune_control"))
    assert line.endswith(f"**{verdict}**") and f"({engram['test_ppl_mean'] - control['test_ppl_mean']:+.2f})" in line
    for bad in ("engram:peer", "engram"):
        with pytest.raises(SystemExit):
            report.main([str(sweep), "--out", str(out), "--versus", bad])
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and f"--versus {bad}" in err and "baseline, engram, finetune_control" in err


def test_family_and_experts_of_a_run(sweep):
    run = report.Run.load(sweep / "engram" / "job,seed=0")
    assert (run.family, run.experts) == ("engram (joint)", None)


def test_setup_is_what_a_run_trains_but_its_expert_count():
    def setup(**changes):
        cfg = OmegaConf.create({"seed": 0, "run_name": "peer,seed=0", "paths": {"output_dir": "/runs/a"},
                                "sparse": {"modules": ["peer"]}, "peer": {"num_experts": 16384, "topk": 16},
                                "trainer": {"max_steps": 150, "default_root_dir": "/runs/a"}})
        for key, value in changes.items():
            OmegaConf.update(cfg, key, value)
        return report.Run(Path("/runs/a"), cfg, {}).setup

    same = [setup(), setup(**{"peer.num_experts": 262144}), setup(seed=1, run_name="peer_262k,seed=1"),
            setup(**{"engram.table_rows": 800}),  # a module that is not attached
            setup(**{"paths.output_dir": "/runs/b", "trainer.default_root_dir": "/runs/b"})]
    assert len(set(same)) == 1
    assert setup(**{"trainer.max_steps": 300}) != same[0] != setup(**{"peer.topk": 8})
    assert setup(**{"sparse.modules": ["peer", "engram"], "engram.table_rows": 800}) != setup(
        **{"sparse.modules": ["peer", "engram"]})


def test_expert_sweep_table_and_plot(tmp_path):
    def row(family, experts, ppl, std, setup="a"):
        return {"family": family, "experts": experts, "total_params": 1_000 * experts, "tokens_per_sec": 1e6 / experts,
                "test_ppl_mean": ppl, "test_ppl_std": std, "test_ppl_n": 3, "setup": setup,
                "experiment": f"{family.split()[0]}_{experts}"}
    rows = [row("peer (joint)", 16384, 95.0, 0.1), row("peer (joint)", 4096, 96.0, 0.1), row("peer (joint)", 65536, 94.9, 0.1),
            row("engram+peer+mhc (joint)", 16384, 83.0, 0.2), {**row("engram (joint)", 1, 80.0, 0.1), "experts": None}]
    sweeps = report.expert_sweeps(rows)
    assert list(sweeps) == ["peer (joint)"]  # one count is no sweep; no PEER, no count
    assert [r["experts"] for r in sweeps["peer (joint)"]] == [4096, 16384, 65536]
    lines = report.experts_table(sweeps).splitlines()
    assert lines[2].endswith("| 4,096 | 4,096,000 | 96.00 ± 0.10 | 244 |  |")
    assert lines[3].endswith("| lower |") and lines[4].endswith("| n.d. |")  # 95.0 vs 96.0; 94.9 vs 95.0
    assert lines[-1] == "- peer (joint): 65,536 experts vs 4,096: test ppl 94.90 ± 0.10 vs 96.00 ± 0.10: **lower**"
    image = imread(io.BytesIO(report.png(report.plot_experts(sweeps))))
    assert image.shape[1] > 1200 and image[..., :3].std() > 0.01  # a ppl panel, params, tokens/s


def test_an_expert_sweep_compares_only_runs_that_differ_in_the_count_alone(tmp_path):
    def row(experiment, experts, setup):
        return {"family": "peer (joint)", "experts": experts, "setup": setup, "experiment": experiment,
                "test_ppl_mean": 95.0, "test_ppl_std": 0.1}
    rows = [row("peer", 16384, "a"), row("peer_262k", 262144, "a"), row("peer_2x", 16384, "b"),
            row("peer_262k_2x", 262144, "b"), row("peer_262k_batchnorm", 262144, "c")]
    sweeps = report.expert_sweeps(rows)
    assert {label: [r["experiment"] for r in rows] for label, rows in sweeps.items()} == {
        "peer (joint): peer, peer_262k": ["peer", "peer_262k"],
        "peer (joint): peer_2x, peer_262k_2x": ["peer_2x", "peer_262k_2x"]}


def test_multirun_report_covers_only_the_sweeps_own_cells(sweep, tmp_path, capsys):
    """Studies share a sweep dir: the callback reports the cells its multirun ran, in reports/<study>/, and
    judges the study's pairs whose experiments both ran (a multirun over part of a study names the others)."""
    from types import SimpleNamespace
    from omegaconf import OmegaConf
    callback = report.ReportOnMultirunEnd(versus=["engram:engram", "engram:finetune_control"])
    for seed in SEEDS:
        run_dir = sweep / "engram" / f"job,seed={seed}"
        callback.on_job_end(OmegaConf.create(), SimpleNamespace(hydra_cfg=OmegaConf.create(
            {"hydra": {"runtime": {"output_dir": str(run_dir)}}})))
    config = OmegaConf.create({"hydra": {"sweep": {"dir": str(tmp_path)}, "runtime": {"choices": {"study": "experts"}}}})
    callback.on_multirun_end(config)
    callback.on_multirun_end(config)  # a re-run replaces the report it wrote
    with open(tmp_path / "reports" / "experts" / "report.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [(r["group"], r["n_seeds"]) for r in rows] == [("engram", "2")]  # not the references beside it
    assert "- engram vs engram: " in (tmp_path / "reports" / "experts" / "report.md").read_text()
    assert "warning: skipped --versus engram:finetune_control: " in capsys.readouterr().err


@pytest.fixture
def runs(tmp_path):
    """A folder holding one fake tsparse run, `peer/`: the report's default --out."""
    write_run(tmp_path / "runs" / "peer")
    return tmp_path / "runs"


def test_report_ignores_results_json_that_tsparse_did_not_write(runs, capsys):
    write_run(runs / "other", "other", results={"accuracy": 1})
    assert [r["group"] for r in report.main([str(runs)])] == ["peer"]
    assert capsys.readouterr().err == ""  # silently


def test_report_refuses_to_replace_a_users_file(runs, capsys):
    (runs / "report.md").write_text("my notes")
    err = one_error_line(capsys, lambda: report.main([str(runs)]))
    assert "report.md" in err and "--overwrite" in err
    assert (runs / "report.md").read_text() == "my notes"
    assert sorted(p.name for p in runs.iterdir()) == ["peer", "report.md"]  # nothing new written


def test_report_overwrite_moves_a_users_file_aside(runs):
    (runs / "report.md").write_text("my notes")
    report.main([str(runs), "--overwrite"])
    [aside] = runs.glob(".replaced/report.*/report.md")
    assert aside.read_text() == "my notes"
    assert (runs / "report.md").read_text().startswith("# Results: 1 runs")


def test_report_replaces_the_files_it_wrote(runs):
    for _ in range(2):
        report.main([str(runs)])
    recorded = json.loads((runs / report.MANIFEST).read_text())
    assert sorted(recorded) == ["loss_curves.png", "lr_schedule.png", "report.csv", "report.md"]
    assert all(hashlib.sha256((runs / name).read_bytes()).hexdigest() == h for name, h in recorded.items())
    assert not (runs / ".replaced").exists()


def test_report_refuses_to_replace_its_file_once_edited(runs, capsys):
    report.main([str(runs)])
    with open(runs / "report.md", "a") as f:
        f.write("my notes\n")
    err = one_error_line(capsys, lambda: report.main([str(runs)]))
    assert "report.md" in err and "report.csv" not in err and "--overwrite" in err
    assert (runs / "report.md").read_text().endswith("my notes\n")


def test_lr_schedules_are_the_configs_exact_phases_with_frozen_groups(compose, tmp_path):
    cfg = compose(["model=nano", "+experiment=staggered", "trainer.max_steps=150"])
    starts, lrs, frozen = report.scheduled_lrs(report.Run(tmp_path, cfg, {}))
    assert starts == [50, 100]  # exact, not the step of the next logged LR
    assert set(lrs) == {"engram", "engram_table", "peer", "peer_table", "mhc"}
    assert lrs["engram_table"][0] == 10.0 and lrs["peer"][149] == 1e-3
    assert frozen["peer_table"][:50] == [True] * 50 and not any(frozen["peer_table"][50:])
    assert frozen["engram"][50:100] == [True] * 50 and not any(frozen["engram"][:50] + frozen["engram"][100:])
    image = imread(io.BytesIO(report.png(report.plot_lr_schedules({("staggered", "staggered"): [report.Run(
        tmp_path, cfg, {})]}))))
    assert image[..., :3].std() > 0.01
