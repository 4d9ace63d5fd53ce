"""The module kinds tsparse can attach: one entry per kind, iterated by the model, the optimizer
groups, the phase schedules, the module statistics, the report and the viz."""
from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from tsparse.modules.engram import Engram, EngramSpec
from tsparse.modules.mhc import GatedResidualAdapter, HyperConnection, MHCSpec, StreamReduce
from tsparse.modules.peer import PEER, PEERSpec


@dataclass(frozen=True)
class ModuleKind:
    """A kind of sparse module.

    name: its config group, its attribute on a decoder layer and its param group;
    spec: the dataclass that configures it;
    modules: the nn.Module classes whose parameters belong to it;
    tables: names (inside those modules) of its row-sparse tables, which form the `<name>_table` group;
    stats: the per-module statistics its modules report in `module.stats` or `usage_summary()`.
    """

    name: str
    spec: type
    modules: tuple[type[nn.Module], ...]
    tables: tuple[str, ...]
    stats: tuple[str, ...]

    @property
    def groups(self) -> tuple[str, ...]:
        return (self.name, f"{self.name}_table") if self.tables else (self.name,)


KINDS: dict[str, ModuleKind] = {
    kind.name: kind for kind in (
        ModuleKind("engram", EngramSpec, (Engram,), ("table.weight",), ("out_rms_ratio", "gate_mean", "gate_std")),
        ModuleKind("peer", PEERSpec, (PEER,), ("down.weight", "up.weight"),
                   ("out_rms_ratio", "usage_fraction", "usage_entropy")),
        ModuleKind("mhc", MHCSpec, (HyperConnection, GatedResidualAdapter, StreamReduce), (),
                   ("out_rms_ratio", "h_res_identity_dist", "h_post_std")),
    )
}
PARAM_GROUPS: tuple[str, ...] = (*(g for kind in KINDS.values() for g in kind.groups), "base")
SPARSE_MODULE_TYPES: tuple[type[nn.Module], ...] = tuple(t for kind in KINDS.values() for t in kind.modules)


def kind_of(module: nn.Module) -> ModuleKind | None:
    return next((kind for kind in KINDS.values() if isinstance(module, kind.modules)), None)


def params_by_group(model: nn.Module) -> dict[str, list[tuple[str, nn.Parameter]]]:
    """Every (name, parameter) of the model under its group (see PARAM_GROUPS): a kind's table
    parameters under `<kind>_table`, its other parameters under `<kind>`, everything else under `base`."""
    owner: dict[int, str] = {}
    for module in model.modules():
        if (kind := kind_of(module)) is not None:
            owner.update({id(p): kind.name for p in module.parameters()})
            owner.update({id(module.get_parameter(t)): f"{kind.name}_table" for t in kind.tables})
    groups: dict[str, list[tuple[str, nn.Parameter]]] = {name: [] for name in PARAM_GROUPS}
    for name, p in model.named_parameters():
        groups[owner.get(id(p), "base")].append((name, p))
    return groups


def trainable_groups(model: nn.Module, base: str = "frozen") -> dict[str, list[nn.Parameter]]:
    """Trainable parameters by group. The base group is empty when `frozen` and holds only the LoRA
    weights under `lora`; frozen base parameters get `requires_grad=False`."""
    groups = {}
    for group, named in params_by_group(model).items():
        if group == "base":
            for name, p in named:
                p.requires_grad_(base == "finetune" or (base == "lora" and "lora_" in name))
            named = [(n, p) for n, p in named if p.requires_grad]
        groups[group] = [p for _, p in named]
    return groups


def param_counts_by_kind(model: nn.Module) -> dict[str, int]:
    """Parameter counts of the base and of each kind, its tables included."""
    groups = params_by_group(model)
    counts = {"base": sum(p.numel() for _, p in groups["base"])}
    counts.update({name: sum(p.numel() for g in kind.groups for _, p in groups[g]) for name, kind in KINDS.items()})
    return counts
