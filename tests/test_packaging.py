"""The package works from a wheel: `tsparse.callbacks` imports and the packaged Hydra configs compose."""
import subprocess
import sys
import zipfile

import pytest

SCRIPT = """
import tsparse, tsparse.callbacks
from tsparse.config import config_dir
from hydra import compose, initialize_config_dir
assert "site" in str(config_dir()) or "target" in str(config_dir()), config_dir()
with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
    cfg = compose("train", overrides=["+experiment=diff_lr", "run_name=x"])
print(tsparse.__file__, config_dir(), cfg.strategy.name, tsparse.callbacks.PhaseLRCallback.__module__)
"""


@pytest.mark.slow
def test_wheel_ships_callbacks_and_configs(tmp_path, repo):
    build = subprocess.run([sys.executable, "-m", "pip", "wheel", str(repo), "--no-deps", "--no-build-isolation",
                            "-q", "-w", str(tmp_path / "dist")], capture_output=True, text=True)
    assert build.returncode == 0, build.stderr[-2000:]
    wheel = next((tmp_path / "dist").glob("tsparse-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    assert "tsparse/callbacks/phase_lr.py" in names and "tsparse/conf/train.yaml" in names
    assert "tsparse/conf/experiment/diff_lr.yaml" in names
    target = tmp_path / "target"
    zipfile.ZipFile(wheel).extractall(target)
    out = subprocess.run([sys.executable, "-c", SCRIPT], cwd=tmp_path, capture_output=True, text=True,
                         env={"PYTHONPATH": str(target), "PATH": "/usr/bin:/bin"})
    assert out.returncode == 0, out.stderr[-2000:]
    location, conf, strategy, module = out.stdout.split()
    assert location.startswith(str(target)) and conf.startswith(str(target))
    assert strategy == "diff_lr" and module == "tsparse.callbacks.phase_lr"
