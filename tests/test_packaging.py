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
    shipped = {n.removeprefix("tsparse/conf/") for n in names if n.startswith("tsparse/conf/") and n.endswith(".yaml")}
    assert shipped == {str(p.relative_to(repo / "conf")) for p in (repo / "conf").rglob("*.yaml")}  # new groups too
    target = tmp_path / "target"
    zipfile.ZipFile(wheel).extractall(target)
    out = subprocess.run([sys.executable, "-c", SCRIPT], cwd=tmp_path, capture_output=True, text=True,
                         env={"PYTHONPATH": str(target), "PATH": "/usr/bin:/bin"})
    assert out.returncode == 0, out.stderr[-2000:]
    location, conf, strategy, module = out.stdout.split()
    assert location.startswith(str(target)) and conf.startswith(str(target))
    assert strategy == "diff_lr" and module == "tsparse.callbacks.phase_lr"


def module_imports(path) -> set[str]:
    """The tsparse modules a source file imports at module level (function-level imports are deferred)."""
    import ast

    tree = ast.parse(path.read_text())
    found = set()
    for node in tree.body:
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("tsparse"):
            found.add(node.module)
            found.update(f"{node.module}.{a.name}" for a in node.names)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("tsparse"))
    return found


def test_no_import_cycles(repo):
    """Module-level imports between tsparse's modules form no cycle (the package's layering)."""
    roots = {"tsparse": repo / "src" / "tsparse", "tsparse.callbacks": repo / "callbacks"}
    files = {}
    for prefix, root in roots.items():
        for path in root.rglob("*.py"):
            parts = path.relative_to(root).with_suffix("").parts
            name = ".".join((prefix, *parts)).removesuffix(".__init__").removesuffix(".__main__")
            if not (prefix == "tsparse" and parts[0] == "callbacks"):
                files[name] = path
    graph = {name: {m for m in module_imports(path) if m in files and m != name}
             for name, path in files.items()}

    def visit(node, stack):
        if node in stack:
            return stack[stack.index(node):] + [node]
        for dep in sorted(graph[node]):
            if (cycle := visit(dep, stack + [node])) is not None:
                return cycle
        return None

    cycles = [c for name in sorted(graph) if (c := visit(name, [])) is not None]
    assert not cycles, f"import cycle: {' -> '.join(cycles[0])}"
    assert len(graph) > 30 and graph["tsparse.train"], "the graph covers the package"
