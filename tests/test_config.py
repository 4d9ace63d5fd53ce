"""Every config file composes; bad values fail with one clear line."""
from functools import reduce

import pytest
from hydra.errors import ConfigCompositionException
from omegaconf import OmegaConf

from tsparse.checks import ConfigError
from tsparse.config import config_dir, validate

CONF = config_dir()
GROUPS = sorted(p.name for p in CONF.iterdir() if p.is_dir() and p.name not in ("hydra", "paths", "bench"))


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF / group).glob("*.yaml"))


def flatten(node: dict, prefix: str = "") -> dict:
    return {k: v for key, value in node.items()
            for k, v in (flatten(value, f"{prefix}{key}.") if isinstance(value, dict) else {prefix + key: value}).items()}


def file_config(group: str, option: str) -> dict:
    """What selecting `group/option` should compose, read from the YAML files: its defaults (same-group files
    or `override /g: o`; structured schemas have no file) merged under its own keys, at its package."""
    path = CONF / group / f"{option}.yaml"
    if not path.is_file():
        return {}
    own = OmegaConf.load(path)
    parts = [file_config(target.split("/")[-1], choice) for entry in own.pop("defaults", [])
             for target, choice in ([(group, entry)] if isinstance(entry, str) else entry.items()) if choice != "_self_"]
    own = own if "@package _global_" in path.read_text() else {group: own}
    return OmegaConf.to_container(OmegaConf.merge(*parts, own))


def assert_composed_from_files(cfg, group: str, option: str, skip=()) -> None:
    """Every key the option's files set has their value in `cfg` (interpolations unresolved), except under `skip`."""
    raw = OmegaConf.to_container(cfg)
    leaves = {k: v for k, v in flatten(file_config(group, option)).items()
              if not any(f"{k}.".startswith(f"{s}.") for s in ("hydra", *skip))}
    for key, value in leaves.items():
        assert reduce(lambda node, part: node[part], key.split("."), raw) == value, key
    assert leaves or raw[group] == {}, "an option that sets nothing must leave its group empty"


@pytest.mark.parametrize("group,option", [(g, o) for g in GROUPS for o in options(g)])
def test_every_config_file_composes(group, option, tmp_path, compose, nano):
    key = f"+{group}={option}" if group in ("experiment", "study") else f"{group}={option}"
    cfg = compose(nano(tmp_path, tmp_path, key))
    OmegaConf.to_container(cfg, resolve=True)  # every interpolation resolves
    # The option wins over the defaults; the rest of the command line (nano's overrides) wins over the option.
    assert_composed_from_files(cfg, group, option, skip={o.split("=")[0] for o in nano(tmp_path, tmp_path)} - {group})
    if group != "model":
        validate(cfg)


@pytest.mark.parametrize("option", options("bench"))
def test_every_bench_preset_composes(option):
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("bench", overrides=[f"bench={option}"])
    assert cfg.bench.name == option
    assert_composed_from_files(cfg, "bench", option)  # its bench keys and its model override (e.g. ci: nano)


def test_train_yaml_has_no_experiment_default():
    assert "experiment" not in (CONF / "train.yaml").read_text().split("defaults:")[1].split("\n\n")[0]


@pytest.mark.parametrize("override,needle", [
    ("optim.base=bogus", "optim.base='bogus' is not allowed; choose one of ['frozen', 'finetune', 'lora']"),
    ("optim.schedule=linear", "optim.schedule='linear' is not allowed"),
    ("sparse=triple peer.top_k=99", "peer.top_k=99 must be in [1, sqrt(num_experts)=32]"),
    ("sparse=triple peer.gate=sigmoid", "peer.gate='sigmoid' is not allowed; choose one of ['softmax', 'relu']"),
    ("sparse=triple engram.orders=[1]", "engram.orders=[1] must be distinct integers >= 2"),
    ("sparse=triple mhc.variant=ladder", "mhc.variant='ladder' is not allowed; choose one of ['hyper', 'adapter']"),
    ("data.block_size=0", "data.block_size=0 must be a positive number"),
    ("trainer.max_steps=-5", "trainer.max_steps=-5 must be a positive number"),
])
def test_bad_values_name_the_key(override, needle, tmp_path, compose, nano):
    with pytest.raises(ConfigError, match=None) as err:
        validate(compose(nano(tmp_path, tmp_path, *override.split())))
    assert needle in str(err.value)
    assert "\n" not in str(err.value)


def test_unknown_group_option_lists_choices(tmp_path, compose, nano):
    with pytest.raises(ConfigCompositionException) as err:
        compose(nano(tmp_path, tmp_path, "sparse=quadruple"))
    message = str(err.value)
    assert "Could not find 'sparse/quadruple'" in message
    listed = message.split("Available options in 'sparse':\n")[1].split("\nConfig search path")[0].split()
    assert set(options("sparse")) <= set(listed)  # the files, and the kinds the registry stores
    for choice in listed:  # each one listed is a valid choice
        validate(compose(nano(tmp_path, tmp_path, f"sparse={choice}")))


@pytest.mark.slow
def test_cli_bad_value_is_one_line_and_writes_nothing(tmp_path, cli):
    result = cli("tsparse.train", "model=nano", "optim.base=bogus", f"hydra.run.dir={tmp_path / 'run'}",
                     "logger=csv")
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1] == (
        "error: optim.base='bogus' is not allowed; choose one of ['frozen', 'finetune', 'lora']")
    assert not list((tmp_path / "run").glob("**/*.ckpt"))


@pytest.mark.slow
def test_cli_unknown_experiment_lists_choices(tmp_path, cli):
    result = cli("tsparse.train", "+experiment=nope", f"hydra.run.dir={tmp_path / 'run'}")
    assert result.returncode == 2
    assert "Could not find 'experiment/nope'" in result.stderr
    assert "pretrain_micro" in result.stderr  # the available options are listed


@pytest.mark.parametrize("override,needle", [
    ("strategy=zigzag", "Could not find 'strategy/zigzag'"),
    ("sparse=quad", "Could not find 'sparse/quad'"),
    ("peer=1m", "Could not find 'peer/1m'"),
])
@pytest.mark.slow
def test_cli_unknown_group_options_are_named(override, needle, tmp_path, cli):
    result = cli("tsparse.train", override, f"hydra.run.dir={tmp_path / 'run'}")
    assert result.returncode == 2 and needle in result.stderr
    assert "(available options in" in result.stderr.strip().splitlines()[-1]


def test_block_size_beyond_model_context_is_rejected(tmp_path, wikitext_small, compose, nano):
    from tsparse.train import run

    with pytest.raises(ConfigError, match=r"data.block_size=512 exceeds the model context \(256\)"):
        run(compose(nano(tmp_path, wikitext_small, "data.block_size=512", "optim.base=finetune")))
    assert not list(tmp_path.glob("**/results.json")) and not list(tmp_path.glob("**/*.ckpt"))


def test_a_long_command_line_gives_a_short_stable_run_name():
    """A run name over MAX_RUN_NAME (which the filesystem would refuse as a folder) keeps its start, a hash of
    the rest and its `seed=N` part: stable for the same overrides, different for others, and the seeds of
    one cell still form one report group."""
    from tsparse.config import MAX_RUN_NAME, run_name
    from tsparse.report import group_name

    overrides = ",".join(f"trainer.key{i}=value{i}" for i in range(30))
    name = run_name("diff_lr", overrides + ",seed=1")
    assert len(name) == MAX_RUN_NAME and name.startswith("diff_lr,trainer.key0=value0") and name.endswith(",seed=1")
    assert run_name("diff_lr", overrides + ",seed=1") == name != run_name("diff_lr", overrides + ",x=1,seed=1")
    assert group_name(name, "diff_lr") == group_name(run_name("diff_lr", overrides + ",seed=2"), "diff_lr")
    assert run_name("diff_lr", "seed=1") == "diff_lr,seed=1"
