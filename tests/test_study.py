"""The quality study (`+study=quality`): one multirun over experiments x seeds, a report at the end,
and a re-run that skips the finished cells."""
import csv
import json

import pytest
from omegaconf import OmegaConf


STUDY_ARGS = ("-m", "+study=quality", "model=nano", "data.block_size=64", "logger=csv",
              "trainer.enable_progress_bar=false", "trainer.val_check_interval=2", "trainer.limit_val_batches=2",
              "trainer.limit_test_batches=2", "trainer.log_every_n_steps=2", "+experiment=baseline,engram", "seed=0,1")


def run_study(cli, root, *extra):
    """The study CLI in a project root of its own (outputs/, .cache/ and ../shared/data under tmp)."""
    return cli("tsparse.train", *STUDY_ARGS, "trainer.max_steps=4", *extra, env={"TSPARSE_ROOT": str(root)}, timeout=600)


@pytest.fixture
def study_root(tmp_path, wikitext_small):
    (tmp_path / "shared" / "data").mkdir(parents=True)
    (tmp_path / "shared" / "data" / "wikitext-2").symlink_to(wikitext_small)
    (tmp_path / "project").mkdir()
    return tmp_path / "project"


def test_study_composes_every_experiment_and_seed(compose):
    from hydra import compose as hydra_compose, initialize_config_dir
    from tsparse.config import config_dir
    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
        cfg = hydra_compose("train", overrides=["+study=quality"], return_hydra_config=True)
    params = cfg.hydra.sweeper.params
    assert params["+experiment"].split(",") == ["baseline", "finetune_control", "engram", "peer", "mhc", "hybrid",
                                               "joint", "staggered", "diff_lr"]
    assert params.seed.split(",") == ["0", "1", "2"]
    assert cfg.ckpt_path == "auto" and cfg.trainer.max_steps == 150
    cell = compose(["+study=quality", "+experiment=peer", "seed=2"])
    lr = cell.strategy.phases[0].lr  # the validated table LRs are the experiments' own defaults
    assert cell.peer.num_experts == 16384 and (lr.engram_table, lr.peer_table) == (10.0, 0.1)
    assert compose(["+study=quality", "+experiment=peer", "model=tinyllama"]).peer.num_experts == 262144


def compose_study(study, *overrides):
    from hydra import compose as hydra_compose, initialize_config_dir
    from tsparse.config import config_dir
    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
        return hydra_compose("train", overrides=[f"+study={study}", *overrides], return_hydra_config=True)


@pytest.mark.parametrize("study", ["quality", "experts", "ablations", "schedule", "init", "routing", "bases",
                                   "bases_more", "proportions"])
def test_every_cell_of_a_study_composes_with_its_budget(study):
    """Each cell as the sweeper composes it: the sweep's overrides first, then the command line's."""
    experiments = compose_study(study).hydra.sweeper.params["+experiment"].split(",")
    assert {"baseline", "finetune_control"} < set(experiments)
    cells = {e: compose_study(study, f"+experiment={e}") for e in experiments}
    names = [c.experiment_name for c in cells.values()]
    assert len(set(names)) == len(names)
    versus = compose_study(study).hydra.callbacks.report.get("versus", [])
    assert {name for pair in versus for name in pair.split(":")} <= set(names)  # the report's pairs are cells
    for experiment, cell in cells.items():
        scale = {"_3x": 3, "_2x": 2}.get(experiment[-3:], 1)
        assert cell.trainer.max_steps == 150 * scale, experiment
    if study == "experts":
        counts = {(c.experiment_name, c.peer.num_experts) for c in cells.values() if "peer" in c.sparse.modules}
        assert counts == {("peer_4k", 4096), ("peer", 16384), ("peer_65k", 65536), ("peer_262k", 262144),
                          ("joint", 16384), ("triple_262k", 262144)}
        assert cells["experts/triple_262k"].sparse.modules == ["engram", "peer", "mhc"]
    if study == "init":
        inits = {(c.experiment_name, kind, c[kind].init) for c in cells.values() for kind in c.sparse.modules}
        assert inits == {("engram", "engram", "identity"), ("engram_default_init", "engram", "default"),
                         ("peer", "peer", "identity"), ("peer_default_init", "peer", "default")}
    if study == "routing":
        peers = {(c.experiment_name, c.peer.num_experts, c.peer.query_batchnorm, c.trainer.max_steps)
                 for c in cells.values() if "peer" in c.sparse.modules}
        assert peers == {("peer", 16384, False, 150), ("peer_262k", 262144, False, 150),
                         ("peer_262k_batchnorm", 262144, True, 150), ("peer_262k_2x", 262144, False, 300),
                         ("peer_2x", 16384, False, 300)}
    elif study == "schedule":
        assert cells["schedule/diff_lr_3x"].strategy.phase_steps == 150  # each phase = joint's whole budget
        assert [p.steps for p in cells["schedule/joint_3x"].strategy.phases] == [450]
    elif study == "ablations":
        assert cells["ablations/mhc_adapter"].mhc.variant == cells["ablations/joint_adapter"].mhc.variant == "adapter"
        assert cells["ablations/peer_batchnorm"].peer.query_batchnorm and not cells["peer"].peer.query_batchnorm
    elif study == "proportions":  # each module's share of the base is the seed's (architecture only, no weights)
        from tsparse.build import architecture_model
        from tsparse.registry import param_counts_by_kind
        seed_share = {"engram": 4.5, "mhc": 10.0, "peer": 195.0}
        for name in ("engram_prop", "mhc_prop", "peer_prop"):
            counts = param_counts_by_kind(architecture_model(cells[f"proportions/{name}"]))
            kind = name.removesuffix("_prop")
            assert abs(100 * counts[kind] / counts["base"] - seed_share[kind]) < 0.5, (name, counts)
        assert cells["proportions/joint_prop"].sparse.modules == cells["joint"].sparse.modules
        assert cells["proportions/joint_prop"].peer.num_experts == 14641 != cells["joint"].peer.num_experts
    elif study.startswith("bases"):  # quality's and init's cells on another base, in that base's own sweep dir
        other = compose_study(study, "+experiment=engram", "base_seed=2")
        assert cells["engram"].model.name_or_path.endswith("/micro-base-seed1")
        assert other.model.name_or_path.endswith("/micro-base-seed2") and other.hydra.sweep.dir.endswith("/micro-seed2")
        assert cells["engram"].hydra.sweep.dir == compose_study("bases", "+experiment=engram").hydra.sweep.dir
        more = {"hybrid", "staggered", "init/engram_default_init", "init/peer_default_init"}
        assert more < set(cells) if study == "bases_more" else not more & set(cells)
        quality = compose_study("quality", "+experiment=engram")
        assert cells["engram"].hydra.sweep.dir != quality.hydra.sweep.dir
        assert (OmegaConf.masked_copy(cells["engram"], ["sparse", "engram", "strategy", "optim", "trainer"]) ==
                OmegaConf.masked_copy(quality, ["sparse", "engram", "strategy", "optim", "trainer"]))
        return
    # A cell two studies share is the same run: same run dir, same config.
    shared = compose_study("quality", "+experiment=finetune_control", "seed=1")
    assert (compose_study(study, "+experiment=finetune_control", "seed=1").hydra.job.override_dirname ==
            shared.hydra.job.override_dirname)
    job = [OmegaConf.masked_copy(c, [k for k in c if k != "hydra"])
           for c in (compose_study(study, "+experiment=finetune_control"), shared)]
    assert OmegaConf.to_yaml(job[0]) == OmegaConf.to_yaml(job[1]).replace("seed: 1", "seed: 0")


def cell_dirs(study):
    """(experiment, seed) -> run dir of every finished cell."""
    found = {}
    for results in study.glob("*/results.json"):
        parts = results.parent.name.split(",")
        found[parts[0], next(p for p in parts if p.startswith("seed="))] = results.parent
    return found


@pytest.mark.slow
def test_study_runs_reports_and_skips_finished_cells(study_root, cli):
    first = run_study(cli, study_root)
    assert first.returncode == 0, first.stderr[-3000:]
    study = study_root / "outputs" / "study" / "nano"
    cells = cell_dirs(study)
    assert sorted(cells) == [("baseline", "seed=0"), ("baseline", "seed=1"), ("engram", "seed=0"), ("engram", "seed=1")]
    reports = study / "reports" / "quality"  # the study's own cells (a study shares its sweep dir with others)
    with open(reports / "report.csv") as f:
        rows = {r["experiment"]: r for r in csv.DictReader(f)}
    assert rows.keys() == {"baseline", "engram"} and rows["engram"]["n_seeds"] == "2"
    assert (reports / "loss_curves.png").stat().st_size > 0 and "| engram |" in (reports / "report.md").read_text()

    assert json.loads((cells["engram", "seed=0"] / "results.json").read_text())["skipped_steps"] == 0
    before = {c: (d / "results.json").read_text() for c, d in cells.items()}
    again = run_study(cli, study_root)
    assert again.returncode == 0, again.stderr[-3000:]
    assert (again.stdout + again.stderr).count("already finished (ckpt_path=auto)") == 4
    assert {c: (d / "results.json").read_text() for c, d in cells.items()} == before

    # A cell that trained but crashed before writing results.json resumes from its checkpoint.
    (cells["engram", "seed=1"] / "results.json").unlink()
    resumed = run_study(cli, study_root)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    log = resumed.stdout + resumed.stderr
    assert log.count("already finished (ckpt_path=auto)") == 3 and "Restored all states from the checkpoint" in log
    assert json.loads((cells["engram", "seed=1"] / "results.json").read_text())["global_step"] == 4
