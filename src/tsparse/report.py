"""Seed-grouped results table and training plots for a set of run directories.

    python -m tsparse.report PATH... [--out DIR] [--versus A:B ...] [--overwrite]

Every directory under a PATH that holds config.yaml and a results.json written by tsparse.train (its
`versions` name tsparse) is a run; a folder holding someone else's results.json is ignored. Runs whose
`run_name` differs only by a `seed=N` part form a group (a run without `run_name` falls into the
group of its experiment). Each metric is the mean ± sample standard deviation over the group's
seeds; a single seed is marked "(n=1)", with no std. Δ test ppl compares group means with the
`baseline` and `finetune_control` experiments (pooled over all their runs), and a column judges each
group against the control with the study's 2-std rule (`compare`); `--versus A:B` adds that verdict for
experiment A against experiment B (a study's comparisons, e.g. `mhc_adapter:mhc`). Trainable params count
the engram, peer and mhc groups, plus the whole base unless `optim.base=frozen` (under `lora` that
overcounts: results.json does not split the adapters from the base).

report.md also gets the modules' final diagnostics (output/input RMS ratios, Engram/PEER RMS ratio,
Engram gate, PEER expert usage, mHC distance from identity). A run dir holding lm_eval.json
(`tsparse.lm_eval`) adds one column per lm-eval task/metric (stderr dropped), mean ± std over the seeds
that have it. Groups of one family (attached kinds + strategy) that differ in their PEER expert count
alone (the same `setup`) at two or more counts add an expert-count table and experts.png (test ppl,
params and tokens/s against the count). Writes report.md, report.csv, loss_curves.png (train/loss per
group, mean over seeds) and lr_schedule.png (LR per param group, one subplot per group, from its lowest
seed) into --out (default: the first PATH), each atomically, and prints the table. The sha256 of each
file it writes goes into --out's .tsparse-report.json: its own earlier files it replaces, but a file of
those names it did not record there (the user's own, or one edited since) makes it refuse, unless
--overwrite, which first moves such files to --out/.replaced/report.<time>.<random>/.
"""
from __future__ import annotations

import csv
import hashlib
import io
import json
import math
import os
import re
import statistics
import sys
import textwrap
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

from hydra.experimental.callback import Callback
from matplotlib.figure import Figure
import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from tsparse.callbacks import PhaseLRCallback, parse_phases
from tsparse.registry import KINDS, RMS_COMPARISONS
from tsparse.checks import ConfigError
from tsparse.cli import ArgumentParser, one_line, one_line_errors
from tsparse.config import SEED_PART
from tsparse.machine import describe
from tsparse.loading import LM_EVAL_RESULTS, read_json
from tsparse.rundir import set_aside, write_atomic

REFERENCES = ("baseline", "finetune_control")
METRICS = {"val_ppl": "val/ppl", "test_ppl": "test/ppl", "test_word_ppl": "test/word_ppl"}
LM_EVAL = "lm_eval/"  # prefix of the lm-eval columns: lm_eval/<task>/<metric>
MANIFEST = ".tsparse-report.json"  # in --out: name -> sha256 of each file the report wrote there
SETUP = ("model", "data", "sparse", *KINDS, "strategy", "optim", "tables", "trainer.max_steps")  # what a run trains


def group_name(run_name: str | None, experiment: str) -> str:
    """`run_name` without its `seed=N` part; the experiment name when nothing is left."""
    parts = [p for p in (run_name or "").split(",") if not SEED_PART.fullmatch(p)]
    return ",".join(parts) or experiment


def read_metrics(run_dir: Path) -> dict[int, dict[str, float]]:
    """csv/metrics.csv merged per step: the last value of each (step, column) wins, since a resumed
    run appends rows for steps it logs again."""
    path = run_dir / "csv" / "metrics.csv"
    merged: dict[int, dict[str, float]] = {}
    if not path.is_file():
        return merged
    with open(path, newline="") as f:
        for row in csv.DictReader(f):
            if row.get("step"):
                values = {k: float(v) for k, v in row.items() if k not in (None, "step") and v}
                merged.setdefault(int(row["step"]), {}).update(values)
    return merged


@dataclass
class Run:
    path: Path
    cfg: DictConfig
    results: dict = field(repr=False)

    @classmethod
    def load(cls, path: Path) -> Run | None:
        """The run in `path`; None if its results.json is not tsparse's, or (with a warning naming the file) if
        its config or results are unreadable."""
        try:
            results = read_json(path / "results.json")
            versions = results.get("versions")
            if not isinstance(versions, dict) or "tsparse" not in versions:
                return None
            return cls(path, OmegaConf.load(path / "config.yaml"), results)
        except (ConfigError, OmegaConfBaseException, yaml.YAMLError, OSError) as err:
            warn_skipped(path, err)
            return None

    @property
    def experiment(self) -> str:
        return str(self.cfg.get("experiment_name") or self.path.name)

    @property
    def group(self) -> str:
        return group_name(self.cfg.get("run_name"), self.experiment)

    @property
    def seed(self) -> int:
        return int(self.cfg.get("seed", 0))

    @property
    def modules(self) -> list[str]:
        """The attached module kinds (`sparse.modules`)."""
        return list(OmegaConf.select(self.cfg, "sparse.modules") or [])

    @property
    def family(self) -> str:
        """The attached module kinds and the strategy, e.g. `peer (joint)`: the cells an expert-count sweep compares."""
        return f"{'+'.join(self.modules) or 'none'} ({OmegaConf.select(self.cfg, 'strategy.name')})"

    @property
    def setup(self) -> str:
        """A short hash of what the run trains (`SETUP`, of the module kinds only those attached), its PEER
        expert count aside: the runs of one expert-count sweep share it."""
        values = {key: OmegaConf.select(self.cfg, key) for key in SETUP if key not in KINDS or key in self.modules}
        setup = {key: OmegaConf.to_container(v) if OmegaConf.is_config(v) else v for key, v in values.items()}
        (setup.get("peer") or {}).pop("num_experts", None)
        return hashlib.sha256(json.dumps(setup, sort_keys=True, default=str).encode()).hexdigest()[:12]

    @property
    def experts(self) -> int | None:
        """PEER's expert count, if PEER is attached."""
        return OmegaConf.select(self.cfg, "peer.num_experts") if "peer" in self.modules else None

    @property
    def total_params(self) -> int:
        return sum(self.results.get("params", {}).values())

    @property
    def trainable_params(self) -> int:
        params = self.results.get("params", {})
        trainable = [g for kind in KINDS.values() for g in kind.groups]
        trainable += ["base"] if OmegaConf.select(self.cfg, "optim.base") != "frozen" else []
        return sum(params.get(group, 0) for group in trainable)

    @cached_property
    def metrics(self) -> dict[int, dict[str, float]]:
        return read_metrics(self.path)

    @cached_property
    def lm_eval(self) -> dict[str, float]:
        """lm_eval/<task>/<metric> -> value from the run's lm_eval.json (the `,none` filter suffix dropped)."""
        path = self.path / LM_EVAL_RESULTS
        try:
            results = read_json(path).get("results", {}) if path.is_file() else {}
        except ConfigError as err:
            warn_skipped(path, err)
            results = {}
        return {f"{LM_EVAL}{task}/{key.removesuffix(',none')}": value for task, metrics in results.items()
                for key, value in metrics.items() if "_stderr" not in key}


def warn_skipped(path: Path, err: Exception) -> None:
    print(f"warning: skipped {path}: {one_line(err)}", file=sys.stderr)


def find_runs(paths: list[Path]) -> list[Run]:
    """Every tsparse run directory at or below `paths`, in path order; hidden folders (e.g. the `.replaced/` runs
    that a fresh start moved aside) are skipped."""
    found = {results.parent for root in paths for results in root.rglob("results.json")
             if (results.parent / "config.yaml").is_file()
             and not any(part.startswith(".") for part in results.relative_to(root).parts)}
    return [run for path in sorted(found) if (run := Run.load(path)) is not None]


def group_runs(runs: list[Run]) -> dict[tuple[str, str], list[Run]]:
    """(experiment, group) -> its runs by seed; reference experiments first, then by group name."""
    groups: dict[tuple[str, str], list[Run]] = defaultdict(list)
    for run in runs:
        groups[(run.experiment, run.group)].append(run)

    def order(key: tuple[str, str]):
        experiment, name = key
        return (REFERENCES.index(experiment) if experiment in REFERENCES else len(REFERENCES), name)

    return {key: sorted(groups[key], key=lambda r: r.seed) for key in sorted(groups, key=order)}


def mean_std(values: list[float]) -> tuple[float | None, float | None]:
    """Mean and sample std (None for fewer than two values)."""
    if not values:
        return None, None
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else None


def compare(a: tuple[float | None, float | None], b: tuple[float | None, float | None]) -> str:
    """The study's 2-std rule on two (mean, std) of test ppl: `lower` / `higher` (a vs b) when the gap exceeds
    twice the larger std, else `n.d.` (not distinguishable); `-` when a mean or both stds are missing."""
    (mean_a, std_a), (mean_b, std_b) = a, b
    stds = [s for s in (std_a, std_b) if s is not None]
    if mean_a is None or mean_b is None or not stds:
        return "-"
    if abs(mean_a - mean_b) <= 2 * max(stds):
        return "n.d."
    return "lower" if mean_a < mean_b else "higher"


def ppl_of(row: dict) -> tuple[float | None, float | None]:
    """A summary row's test ppl as (mean, std), what `compare` takes."""
    return row["test_ppl_mean"], row["test_ppl_std"]


def logged_values(runs: list[Run], key: str) -> list[float]:
    """results[key] of the runs that report it as non-zero (a run that did not train reports 0 tokens/s)."""
    return [r.results[key] for r in runs if r.results.get(key)]


def summarize(groups: dict[tuple[str, str], list[Run]]) -> list[dict]:
    """One row of numbers per group (the columns of report.csv)."""
    rows = []
    lm_eval_columns = sorted({c for runs in groups.values() for r in runs for c in r.lm_eval})
    for (experiment, name), runs in groups.items():
        row = {"group": name, "experiment": experiment, "n_seeds": len(runs),
               "seeds": " ".join(str(r.seed) for r in runs),
               "family": runs[0].family, "setup": runs[0].setup, "experts": runs[0].experts,
               "total_params": runs[0].total_params, "trainable_params": runs[0].trainable_params}
        for column, key in METRICS.items():
            values = logged_values(runs, key)
            row[f"{column}_mean"], row[f"{column}_std"] = mean_std(values)
            row[f"{column}_n"] = len(values)
        row["tokens_per_sec"] = mean_std(logged_values(runs, "train_tokens_per_sec"))[0]
        row["machines"] = "; ".join(sorted({describe(r.results.get("machine")) for r in runs}))
        for column in lm_eval_columns:
            values = [r.lm_eval[column] for r in runs if column in r.lm_eval]
            row[f"{column}_mean"], row[f"{column}_std"] = mean_std(values)
            row[f"{column}_n"] = len(values)
        rows.append(row)
    for reference in REFERENCES:
        pooled = [r for (experiment, _), runs in groups.items() if experiment == reference for r in runs]
        reference_ppl = mean_std(logged_values(pooled, "test/ppl"))
        for row in rows:
            ppl = row["test_ppl_mean"]
            row[f"delta_test_ppl_vs_{reference}_pct"] = (
                None if ppl is None or reference_ppl[0] is None else 100.0 * (ppl / reference_ppl[0] - 1.0))
            row[f"test_ppl_vs_{reference}"] = compare(ppl_of(row), reference_ppl)
    return rows


def _mean_std_cell(row: dict, column: str, fmt: str = ",.2f") -> str:
    mean, std, n = row[f"{column}_mean"], row[f"{column}_std"], row[f"{column}_n"]
    if mean is None:
        return "-"
    return f"{mean:{fmt}} ± {std:{fmt}}" if n > 1 else f"{mean:{fmt}} (n=1)"


def markdown_table(rows: list[dict]) -> str:
    lm_eval_columns = [k.removesuffix("_mean") for k in rows[0] if k.startswith(LM_EVAL) and k.endswith("_mean")]
    header = ["group", "experiment", "#seeds", "total params", "trainable params", "val ppl", "test ppl",
              "test word ppl", *(f"Δ test ppl vs {r}" for r in REFERENCES), f"vs {REFERENCES[-1]} (2 std)", "tokens/s",
              *(c.removeprefix(LM_EVAL) for c in lm_eval_columns)]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] * 2 + ["---:"] * (len(header) - 2)) + "|"]
    for row in rows:
        deltas = [row[f"delta_test_ppl_vs_{r}_pct"] for r in REFERENCES]
        cells = [f"`{row['group']}`", row["experiment"], str(row["n_seeds"]), f"{row['total_params']:,}",
                 f"{row['trainable_params']:,}", *(_mean_std_cell(row, c) for c in METRICS),
                 *("-" if d is None else f"{d:+.2f}%" for d in deltas), row[f"test_ppl_vs_{REFERENCES[-1]}"],
                 "-" if row["tokens_per_sec"] is None else f"{row['tokens_per_sec']:,.0f}",
                 *(_mean_std_cell(row, c, ".3f") for c in lm_eval_columns)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


# Module diagnostics: (column, metrics.csv column pattern, averaged over the matching layers).
DIAGNOSTICS = (
    *((f"{name} {stat}", re.compile(rf"stats/{name}\.L\d+/{stat}")) for name, kind in KINDS.items() for stat in kind.stats),
    *((f"{a}/{b} RMS", re.compile(rf"stats/{a}_to_{b}_rms")) for a, b in RMS_COMPARISONS),
)


def final_diagnostic(run: Run, pattern: re.Pattern) -> float | None:
    """The mean over layers of the last logged value of each column matching `pattern`."""
    last: dict[str, float] = {}
    for step in sorted(run.metrics):
        last.update({c: v for c, v in run.metrics[step].items() if pattern.fullmatch(c)})
    return statistics.fmean(last.values()) if last else None


def diagnostics_table(groups: dict[tuple[str, str], list[Run]]) -> str:
    """Final module stats (mean ± std over seeds) of every group that logged any: output-RMS ratios
    (does one module crowd out another?), Engram gate, PEER expert usage, mHC distance from identity."""
    header = ["group", *(name for name, _ in DIAGNOSTICS)]
    lines = []
    for (_, name), runs in groups.items():
        cells = []
        for _, pattern in DIAGNOSTICS:
            values = [v for v in (final_diagnostic(r, pattern) for r in runs) if v is not None]
            mean, std = mean_std(values)
            cells.append("-" if mean is None else f"{mean:.3g}" + ("" if std is None else f" ± {std:.2g}"))
        if any(c != "-" for c in cells):
            lines.append("| " + " | ".join([f"`{name}`", *cells]) + " |")
    if not lines:
        return ""
    return "\n".join(["| " + " | ".join(header) + " |", "|---" + "|---:" * len(DIAGNOSTICS) + "|", *lines])


def expert_sweeps(rows: list[dict]) -> dict[str, list[dict]]:
    """Sweep label -> its rows by expert count, for each setup measured at two or more expert counts. The label
    is the family, followed by the sweep's experiments where one family has several setups (e.g. budgets)."""
    sweeps: dict[tuple[str, str], dict[int, dict]] = defaultdict(dict)
    for row in rows:
        if row["experts"] is not None and row["test_ppl_mean"] is not None:
            sweeps[(row["family"], row["setup"])].setdefault(row["experts"], row)
    counted = {key: [by_count[n] for n in sorted(by_count)] for key, by_count in sweeps.items() if len(by_count) > 1}
    setups = Counter(family for family, _ in counted)
    return {family if setups[family] == 1 else f"{family}: {', '.join(r['experiment'] for r in rows)}": rows
            for (family, _), rows in sorted(counted.items(), key=lambda item: (item[0][0], item[1][0]["experiment"]))}


def experts_table(sweeps: dict[str, list[dict]]) -> str:
    """Test ppl, params and tokens/s against the expert count, each count judged against the previous one
    and the largest against the smallest (2-std rule)."""
    lines = ["| family | experts | total params | test ppl | tokens/s | vs previous count (2 std) |",
             "|---|---:|---:|---:|---:|---|"]
    verdicts = []
    for family, rows in sweeps.items():
        for previous, row in zip([None, *rows], rows):
            versus = "" if previous is None else compare(ppl_of(row), ppl_of(previous))
            tokens = "-" if row["tokens_per_sec"] is None else f"{row['tokens_per_sec']:,.0f}"
            lines.append(f"| {family} | {row['experts']:,} | {row['total_params']:,} | "
                         f"{_mean_std_cell(row, 'test_ppl')} | {tokens} | {versus} |")
        first, last = rows[0], rows[-1]
        verdict = compare(ppl_of(last), ppl_of(first))
        verdicts.append(f"- {family}: {last['experts']:,} experts vs {first['experts']:,}: test ppl "
                        f"{_mean_std_cell(last, 'test_ppl')} vs {_mean_std_cell(first, 'test_ppl')}: **{verdict}**")
    return "\n".join(lines + [""] + verdicts)


def versus_list(rows: list[dict], pairs: list[str]) -> str:
    """One line per `A:B` pair of experiments: A's test ppl against B's, with the 2-std verdict."""
    by_experiment = {row["experiment"]: row for row in rows}
    lines = []
    for pair in pairs:
        a, b = (by_experiment[name] for name in pair.split(":"))
        lines.append(f"- {a['experiment']} vs {b['experiment']}: test ppl {_mean_std_cell(a, 'test_ppl')} vs "
                     f"{_mean_std_cell(b, 'test_ppl')} ({a['test_ppl_mean'] - b['test_ppl_mean']:+.2f}): "
                     f"**{compare(ppl_of(a), ppl_of(b))}**")
    return "\n".join(lines)


def check_pairs(pairs: list[str], experiments: set[str]) -> None:
    """Each `--versus` pair names two experiments that have runs here."""
    for pair in pairs:
        names = pair.split(":")
        unknown = [n for n in names if n not in experiments]
        if len(names) != 2 or unknown:
            raise ConfigError(f"--versus {pair}: want A:B, two of the experiments here: {', '.join(sorted(experiments))}")


def plot_experts(sweeps: dict[str, list[dict]]) -> Figure:
    """Test ppl (mean ± 2 std over seeds, the bar of the 2-std rule; one panel per family, their scales differ),
    total params and training tokens/s (from zero) against the expert count (log x)."""
    fig = Figure(figsize=(4.3 * (len(sweeps) + 2), 4), dpi=100, layout="constrained")
    axes = fig.subplots(1, len(sweeps) + 2)
    for ax, (family, rows) in zip(axes, sweeps.items()):
        ax.errorbar([r["experts"] for r in rows], [r["test_ppl_mean"] for r in rows],
                    yerr=[2 * (r["test_ppl_std"] or 0) for r in rows], marker="o", capsize=3)
        ax.set(title=family, ylabel="test ppl (mean ± 2 std over seeds, the verdicts' bar)")
    for family, rows in sweeps.items():
        counts = [r["experts"] for r in rows]
        axes[-2].plot(counts, [r["total_params"] / 1e6 for r in rows], marker="o", label=family)
        axes[-1].plot(counts, [r["tokens_per_sec"] or float("nan") for r in rows], marker="o", label=family)
    axes[-2].set(yscale="log", ylabel="total params (M)")
    axes[-1].set(ylabel="training tokens/s")
    axes[-1].set_ylim(bottom=0)
    axes[-1].legend(fontsize="small")
    for ax in axes:
        ax.set_xscale("log", base=2)
        ax.set(xlabel="PEER experts per layer")
        ax.grid(alpha=0.3)
    return fig


def png(fig: Figure) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


def csv_text(rows: list[dict]) -> str:
    """The rows as CSV, one column per key of any row (blank where a row lacks it)."""
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(dict.fromkeys(k for row in rows for k in row)))
    writer.writeheader()
    writer.writerows(rows)
    return buf.getvalue()


def sha256(data: str | bytes) -> str:
    return hashlib.sha256(data.encode() if isinstance(data, str) else data).hexdigest()


def write_report(out: Path, files: dict[str, str | bytes], overwrite: bool) -> None:
    """Write `files` (name -> content) into `out`, each atomically, and record their sha256 in its MANIFEST.
    A file of those names there that the manifest does not vouch for (the user's own, or one edited since)
    is refused, or with `overwrite` moved to `out/.replaced/` first."""
    out.mkdir(parents=True, exist_ok=True)
    try:
        recorded = read_json(out / MANIFEST)
    except ConfigError:
        recorded = {}
    foreign = [out / name for name in files if os.path.lexists(out / name) and not (
        (out / name).is_file() and recorded.get(name) == sha256((out / name).read_bytes()))]
    if foreign and not overwrite:
        raise ConfigError(f"{out} holds {', '.join(p.name for p in foreign)}, not written by tsparse.report (or "
                          "edited since); pass --overwrite to move them to .replaced/ there and write the report")
    if foreign:
        set_aside(foreign, out, "report")
    for name, data in files.items():
        write_atomic(out / name, data)
    write_atomic(out / MANIFEST, json.dumps({**recorded, **{n: sha256(d) for n, d in files.items()}}, indent=2))


def mean_curve(runs: list[Run], column: str) -> tuple[list[int], list[float]]:
    """(steps, mean over runs) of a metrics.csv column, at every step where some run logged it."""
    per_step: dict[int, list[float]] = defaultdict(list)
    for run in runs:
        for step, values in run.metrics.items():
            if column in values:
                per_step[step].append(values[column])
    steps = sorted(per_step)
    return steps, [statistics.fmean(per_step[s]) for s in steps]


def plot_loss_curves(groups: dict[tuple[str, str], list[Run]]) -> Figure:
    fig = Figure(figsize=(9, 5.5), dpi=100, layout="constrained")
    ax = fig.add_subplot()
    for (_, name), runs in groups.items():
        steps, losses = mean_curve(runs, "train/loss")
        if steps:
            ax.plot(steps, losses, label=f"{name} (n={len(runs)})")
    if ax.lines:
        ax.legend(fontsize="small")
    else:
        ax.text(0.5, 0.5, "no train/loss logged", ha="center", va="center", transform=ax.transAxes)
    ax.set(xlabel="step", ylabel="train/loss (mean over seeds)", title="Training loss")
    ax.grid(alpha=0.3)
    return fig


def scheduled_lrs(run: Run) -> tuple[list[int], dict[str, list[float]], dict[str, list[bool]]]:
    """(phase starts, LR per trained param group at every step, whether the group is frozen at that step),
    from the run's config: its phases times the warmup/cosine multiplier, exactly as PhaseLRCallback sets
    them (the logged LRs are sampled every few steps, which moves the phase changes); nothing for a run
    without phases."""
    phases = OmegaConf.select(run.cfg, "strategy.phases")
    if not phases:
        return [], {}, {}
    optim = run.cfg.get("optim", {})
    schedule = PhaseLRCallback(parse_phases(OmegaConf.to_container(phases, resolve=True)), optim.get("schedule", "constant"),
                               optim.get("warmup_steps", 0))
    total = int(run.cfg.trainer.max_steps)
    trained = [g for kind in run.modules for g in KINDS[kind].groups]
    trained += ["base"] if OmegaConf.select(run.cfg, "optim.base") != "frozen" else []
    steps = range(total)
    lrs = {g: [schedule.learning_rates(s, total).get(g, math.nan) for s in steps] for g in trained}
    frozen = {g: [schedule.phases[schedule.phase_index(s)].freezes(g) for s in steps] for g in trained}
    return [s for s in schedule.starts if 0 < s < total], lrs, frozen


def plot_lr_schedules(groups: dict[tuple[str, str], list[Run]]) -> Figure:
    """Each experiment's LRs per param group (its first run's config, every step) on a log axis: solid while
    the group trains, dotted while it is frozen; dashed verticals at the phase changes."""
    first_runs = {name: runs[0] for (_, name), runs in groups.items()}
    schedules = {name: scheduled_lrs(run) for name, run in first_runs.items()}
    schedules = {name: s for name, s in schedules.items() if s[1]}
    cols = min(3, max(1, len(schedules)))
    rows = max(1, math.ceil(len(schedules) / cols))
    fig = Figure(figsize=(4.5 * cols, 3.5 * rows), dpi=100, layout="constrained")
    axes = fig.subplots(rows, cols, squeeze=False).ravel()
    for ax, (name, (starts, lrs, frozen)) in zip(axes, schedules.items()):
        for group, values in lrs.items():
            trained = [v if not f else math.nan for v, f in zip(values, frozen[group])]
            line, = ax.plot(trained, label=group, drawstyle="steps-post")
            if any(frozen[group]):
                ax.plot([v if f else math.nan for v, f in zip(values, frozen[group])], ls=":", c=line.get_color(),
                        drawstyle="steps-post", label=f"{group} (frozen)")
        for start in starts:
            ax.axvline(start, ls="--", c="grey", lw=0.8)
        ax.set_title("\n".join(textwrap.wrap(f"{name} (seed {first_runs[name].seed})", 40)), fontsize="small")
        ax.set(xlabel="step", ylabel="learning rate", yscale="log")
        ax.legend(fontsize="x-small")
    for ax in axes[len(schedules):]:
        ax.set_axis_off()
    if not schedules:
        axes[0].text(0.5, 0.5, "no trained param group", ha="center", va="center")
    return fig


def main(argv: list[str] | None = None) -> list[dict]:
    parser = ArgumentParser(prog="python -m tsparse.report", description=__doc__.split("\n\n")[0])
    parser.add_argument("paths", nargs="+", type=Path, metavar="PATH", help="run dirs or folders holding them")
    parser.add_argument("--out", type=Path, help="output folder (default: the first PATH)")
    parser.add_argument("--versus", nargs="+", default=[], metavar="A:B",
                        help="experiment pairs to judge with the 2-std rule (A against B)")
    parser.add_argument("--overwrite", action="store_true",
                        help="move same-named files the report did not write to OUT/.replaced/ instead of refusing")
    args = parser.parse_args(argv)
    with one_line_errors(OSError):
        if args.out is not None and args.out.exists() and not args.out.is_dir():
            raise ConfigError(f"--out {args.out} is a file; name a folder")
        runs = find_runs(args.paths)
        if not runs:
            raise ConfigError(f"no tsparse runs (config.yaml + tsparse's results.json) under {', '.join(map(str, args.paths))}")
        check_pairs(args.versus, {r.experiment for r in runs})
    groups = group_runs(runs)
    rows = summarize(groups)
    table = markdown_table(rows)
    diagnostics = diagnostics_table(groups)
    sweeps = expert_sweeps(rows)
    experts = (f"\n## Expert count\n\n{experts_table(sweeps)}\n\n![expert count](experts.png)\n" if sweeps else "")
    machines = "; ".join(sorted({m for row in rows for m in row["machines"].split("; ")}))
    versus = (f"\n## Comparisons (2 std)\n\n{versus_list(rows, args.versus)}\n" if args.versus else "")
    markdown = (
        f"# Results: {len(runs)} runs in {len(groups)} groups\n\n"
        "Mean ± sample std over seeds; Δ in % of the reference experiment's mean test ppl.\n\n"
        f"Machines (CPU, torch's CPU capability, threads): {machines}.\n\n"
        f"{table}\n"
        + (f"\n## Module diagnostics at the last logged step\n\nMean over layers, then mean ± std over seeds.\n\n"
           f"{diagnostics}\n" if diagnostics else "") + versus + experts)
    files = {"report.md": markdown, "report.csv": csv_text(rows), "loss_curves.png": png(plot_loss_curves(groups)),
             "lr_schedule.png": png(plot_lr_schedules(groups)), **({"experts.png": png(plot_experts(sweeps))} if sweeps else {})}
    with one_line_errors(OSError):
        write_report(args.out or args.paths[0], files, args.overwrite)
    print(table)
    return rows


class ReportOnMultirunEnd(Callback):
    """Hydra callback (`hydra.callbacks`): when a multirun ends, report its own cells (other studies' cells
    may share the sweep dir) into `<sweep dir>/reports/<study>` (`+study=NAME`; `sweep` without one),
    with the study's `versus` pairs judged. A multirun over part of a study judges the pairs it ran and
    names the others on stderr, rather than failing after its training."""

    def __init__(self, versus: list[str] | None = None) -> None:
        self.versus = list(versus or [])
        self.run_dirs: list[str] = []

    def on_job_end(self, config: DictConfig, job_return, **kwargs) -> None:
        self.run_dirs.append(str(job_return.hydra_cfg.hydra.runtime.output_dir))

    def on_multirun_end(self, config: DictConfig, **kwargs) -> None:
        if not self.run_dirs:
            return
        study = config.hydra.runtime.choices.get("study") or "sweep"
        ran = {run.experiment for run in find_runs([Path(d) for d in self.run_dirs])}
        pairs = [pair for pair in self.versus if set(pair.split(":")) <= ran]
        if skipped := [pair for pair in self.versus if pair not in pairs]:
            print(f"warning: skipped --versus {', '.join(skipped)}: not every experiment of them ran in "
                  f"this multirun", file=sys.stderr)
        versus = ["--versus", *pairs] if pairs else []
        main([*self.run_dirs, "--out", str(Path(config.hydra.sweep.dir) / "reports" / study), *versus])


if __name__ == "__main__":
    main()
