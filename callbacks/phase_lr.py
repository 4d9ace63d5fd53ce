"""Phase schedules: per-group learning rates and freezing, derived from `global_step` (resume-safe)."""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Iterable, Sequence

import lightning as L
from lightning.pytorch.utilities import rank_zero_warn

from tsparse.checks import ConfigError, check_count, check_positive
from tsparse.registry import KINDS, PARAM_GROUPS


@dataclass(frozen=True)
class Phase:
    """`lr` per param group (`registry.PARAM_GROUPS`: a kind, its `<kind>_table`, `base`); `frozen`
    names groups or kinds (a frozen kind freezes its tables too)."""

    name: str
    steps: int
    lr: dict[str, float]
    frozen: tuple[str, ...] = field(default_factory=tuple)

    def freezes(self, group: str) -> bool:
        return group in self.frozen or group.removesuffix("_table") in self.frozen


def parse_phases(raw: Iterable[dict], key: str = "strategy.phases") -> list[Phase]:
    """Validate a YAML phase list: names, positive steps, known groups, non-negative LRs."""
    phases = []
    for i, p in enumerate(raw):
        p = dict(p)
        where = f"{key}[{i}]"
        unknown = set(p) - {"name", "steps", "lr", "frozen"}
        if unknown:
            raise ConfigError(f"{where} has unknown keys {sorted(unknown)}; allowed: ['name', 'steps', 'lr', 'frozen']")
        steps = p.get("steps")
        check_count(f"{where}.steps", steps, "steps")
        lr = dict(p.get("lr") or {})
        frozen = tuple(p.get("frozen") or ())
        for group in lr:
            if group not in PARAM_GROUPS:
                raise ConfigError(f"{where}.lr names unknown param group {group!r}; allowed: {list(PARAM_GROUPS)}")
        for group in frozen:
            if group not in (*PARAM_GROUPS, *KINDS):
                raise ConfigError(f"{where}.frozen names unknown param group {group!r}; allowed: {list(PARAM_GROUPS)}")
        for group, value in lr.items():
            check_positive(f"{where}.lr.{group}", value, allow_zero=True)
        phases.append(Phase(str(p.get("name", f"phase{i}")), steps, {g: float(v) for g, v in lr.items()}, frozen))
    if not phases:
        raise ConfigError(f"{key} is empty; give at least one phase")
    return phases


def check_phase_lrs(phases: Sequence[Phase], groups: Iterable[str]) -> None:
    """Every phase gives an LR for every param group the run trains."""
    for group in groups:
        missing = [p.name for p in phases if group not in p.lr]
        if missing:
            raise ConfigError(f"strategy.phases {missing} give no lr for param group {group!r}; "
                              f"add lr.{group} to every phase")


def check_schedule_fits(phases: Sequence[Phase], max_steps: int) -> None:
    """Warn about phases that start at or after `max_steps` (they never run in this invocation; a
    resumed run with a larger max_steps reaches them). The last phase runs on if the schedule is shorter."""
    start = 0
    for i, phase in enumerate(phases):
        if start >= max_steps:
            rank_zero_warn(f"strategy.phases[{i}] ({phase.name}) starts at step {start} but trainer.max_steps="
                           f"{max_steps}: it will not run unless the run is resumed with a larger max_steps")
        start += phase.steps


class PhaseLRCallback(L.Callback):
    """Before every batch, set each named param group's LR from the phase that `global_step` falls in.

    The LR is the phase LR times an optional warmup/cosine multiplier over the whole run. Groups listed
    in a phase's `frozen` get `requires_grad=False` for that phase. With `reset_optimizer`, optimizer
    state is cleared on the first step of every phase after the first. Nothing depends on callback
    state, so a resumed run sets exactly the LRs an uninterrupted one would. The last phase extends
    past its end if `max_steps` is longer than the schedule.
    """

    def __init__(self, phases: Sequence[dict] | Sequence[Phase], schedule: str = "constant",
                 warmup_steps: int = 0, reset_optimizer: bool = False):
        self.phases = [p if isinstance(p, Phase) else None for p in phases]
        if None in self.phases:
            self.phases = parse_phases(phases)
        self.schedule, self.warmup_steps, self.reset_optimizer = schedule, warmup_steps, reset_optimizer
        self.starts = [0]
        for p in self.phases[:-1]:
            self.starts.append(self.starts[-1] + p.steps)

    def phase_index(self, step: int) -> int:
        return max(i for i, start in enumerate(self.starts) if start <= step)

    def multiplier(self, step: int, total_steps: int) -> float:
        if step < self.warmup_steps:
            return (step + 1) / self.warmup_steps
        if self.schedule == "cosine":
            progress = (step - self.warmup_steps) / max(1, total_steps - self.warmup_steps)
            return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
        return 1.0

    def learning_rates(self, step: int, total_steps: int) -> dict[str, float]:
        phase = self.phases[self.phase_index(step)]
        scale = self.multiplier(step, total_steps)
        return {g: lr * scale for g, lr in phase.lr.items()}

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch, batch_idx: int) -> None:
        step = trainer.global_step
        index = self.phase_index(step)
        phase = self.phases[index]
        lrs = self.learning_rates(step, trainer.max_steps)
        for opt in trainer.optimizers:
            if self.reset_optimizer and index > 0 and step == self.starts[index]:
                opt.state.clear()
            for group in opt.param_groups:
                group["lr"] = lrs[group["name"]]
                for p in group["params"]:
                    p.requires_grad_(not phase.freezes(group["name"]))
        pl_module.log("train/phase", float(index), on_step=True, on_epoch=False)
