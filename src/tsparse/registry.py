"""The module kinds tsparse can attach: one `ModuleKind` entry per kind, its only definition. The config,
the decoder layer, the optimizer groups, the phase schedules, the statistics, the report, the Hydra
schemas and the kind contract test all iterate `KINDS`.

A new kind needs its module file (a `tsparse.modules.protocol.SparseModule` and its spec dataclass, in
`tsparse.modules`), one entry here, `conf/<name>/default.yaml`, and an LR for each of its groups in the
strategy phases (docs/adding-a-kind.md).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Literal

from torch import nn

from tsparse.checks import ConfigError
from tsparse.modules.engram import Engram, EngramSpec, compressed_token_map, draw_multipliers
from tsparse.modules.mhc import GatedResidualAdapter, HyperConnection, MHCSpec
from tsparse.modules.peer import PEER, PEERSpec
from tsparse.modules.streams import StreamReduce

Attach = Literal["input", "output", "residual"]
ATTACH_POINTS: tuple[Attach, ...] = ("input", "output", "residual")


@dataclass(frozen=True)
class ModuleKind:
    """A kind of sparse module.

    name: its config group, its attribute on a decoder layer and its param group;
    spec: the dataclass that configures it (every hyperparameter and `layers`);
    build(spec, config, layer_idx): its module for one decoder layer (config: the TsparseConfig);
    attach(spec): where that module goes: "input" (h + m(h, input_ids, state=...) before the layer),
        "output" (o + m(o) after it) or "residual" (m(x, branch) around the layer's residual branch);
    modules: the nn.Module classes whose parameters belong to it;
    tables: names (inside those modules) of its row-sparse tables, which form the `<name>_table` group;
    stats: the statistics its modules report in `module.stats` or `usage_summary()`;
    example: a small spec (layers [1]) for the kind contract test;
    variations: for every other spec key, changes to `example` that must change the built module (the
        key with another value, plus any key it depends on), checked by the kind contract test;
    prepare(spec, base_config, tokenizer, seed): derived data saved in the config's `module_data[name]`
        when a model is first built (e.g. hash multipliers), or None;
    placement: its default layers per model (`model.name` -> layers; `conf/<name>/default.yaml` reads it
        through the `tsparse_placement` resolver); on a model not listed, `<name>.layers` must be set;
    streams(spec): residual streams the model carries (1: a plain residual; a "residual" kind needs >= 2);
    reduce(spec): the module that reduces those streams before the final norm.
    """

    name: str
    spec: type
    build: Callable[[Any, Any, int], nn.Module]
    attach: Callable[[Any], Attach]
    modules: tuple[type[nn.Module], ...]
    tables: tuple[str, ...]
    stats: tuple[str, ...]
    example: Callable[[], Any]
    variations: dict[str, dict[str, Any]]
    placement: dict[str, tuple[int, ...]]
    prepare: Callable[[Any, Any, Any, int], dict] | None = None
    streams: Callable[[Any], int] = lambda spec: 1
    reduce: Callable[[Any], nn.Module] | None = None

    @property
    def groups(self) -> tuple[str, ...]:
        return (self.name, f"{self.name}_table") if self.tables else (self.name,)


def _pad_id(config) -> int:
    return config.eos_token_id if isinstance(config.eos_token_id, int) else 0


def _engram_data(spec: EngramSpec, base, tokenizer, seed: int) -> dict:
    """Hash multipliers per Engram layer (drawn from `seed`), and the compressed-token map if asked for."""
    if spec.compress_tokens and tokenizer is None:
        raise ConfigError("engram.compress_tokens=true needs the tokenizer")
    return {"hash_seed": seed, "multipliers": [draw_multipliers(seed, i, max(spec.orders)) for i in spec.layers],
            "token_map": compressed_token_map(tokenizer, base.vocab_size) if spec.compress_tokens else None}


def _engram(spec: EngramSpec, config, layer: int) -> Engram:
    data = config.module_data["engram"]
    return Engram(config.hidden_size, spec, data["multipliers"][spec.layers.index(layer)], _pad_id(config),
                  data["token_map"], norm_eps=config.rms_norm_eps)


def _mhc(spec: MHCSpec, config, layer: int) -> nn.Module:
    if spec.variant == "hyper":
        return HyperConnection(config.hidden_size, spec, norm_eps=config.rms_norm_eps)
    return GatedResidualAdapter(config.hidden_size, spec.adapter_bottleneck)


KINDS: dict[str, ModuleKind] = {
    kind.name: kind for kind in (
        ModuleKind("engram", EngramSpec, _engram, lambda spec: "input", (Engram,), ("table.weight",),
                   ("out_rms_ratio", "gate_mean", "gate_std"),
                   example=lambda: EngramSpec(layers=[1], heads_per_order=2, dim_per_order=16, table_rows=101),
                   variations={"orders": {"orders": [2, 4]}, "heads_per_order": {"heads_per_order": 4},
                               "dim_per_order": {"dim_per_order": 8}, "table_rows": {"table_rows": 211},
                               "conv_kernel": {"conv_kernel": 2}, "compress_tokens": {"compress_tokens": True},
                               "table_dtype": {"table_dtype": "bfloat16"}, "sparse_grad": {"sparse_grad": False},
                               "init": {"init": "default"}},
                   placement={"nano": (0, 1), "micro": (1, 2), "tinyllama": (1, 5)},
                   prepare=_engram_data),
        ModuleKind("peer", PEERSpec, lambda spec, config, layer: PEER(config.hidden_size, spec, config.rms_norm_eps),
                   lambda spec: "output", (PEER,), ("down.weight", "up.weight"),
                   ("out_rms_ratio", "usage_fraction", "usage_entropy"),
                   example=lambda: PEERSpec(layers=[1], num_experts=64, heads=2, top_k=2, key_dim=8),
                   variations={"num_experts": {"num_experts": 100}, "heads": {"heads": 3}, "top_k": {"top_k": 4},
                               "key_dim": {"key_dim": 6}, "gate": {"gate": "relu"}, "query_batchnorm": {"query_batchnorm": True},
                               "input_norm": {"input_norm": False}, "table_dtype": {"table_dtype": "bfloat16"},
                               "sparse_grad": {"sparse_grad": False}, "init": {"init": "default"}},
                   placement={"nano": (2, 3), "micro": (6, 7), "tinyllama": (19, 21)}),
        ModuleKind("mhc", MHCSpec, _mhc, lambda spec: "residual" if spec.variant == "hyper" else "output",
                   (HyperConnection, GatedResidualAdapter, StreamReduce), (),
                   ("out_rms_ratio", "h_res_identity_dist", "h_post_std"),
                   example=lambda: MHCSpec(layers=[1], streams=3, reduce="learned"),
                   variations={"variant": {"variant": "adapter"}, "streams": {"streams": 2}, "reduce": {"reduce": "mean"},
                               "sinkhorn_iters": {"sinkhorn_iters": 3}, "alpha_init": {"alpha_init": 0.5},
                               "post_bias": {"post_bias": 0.3}, "res_diag_bias": {"res_diag_bias": 3.0},
                               "adapter_bottleneck": {"variant": "adapter", "adapter_bottleneck": 9}},
                   placement={"nano": (1, 2), "micro": (3, 5, 6), "tinyllama": (7, 13, 17)},
                   streams=lambda spec: spec.num_streams,
                   reduce=lambda spec: StreamReduce(spec.num_streams, spec.reduce)),
    )
}
PARAM_GROUPS: tuple[str, ...] = (*(g for kind in KINDS.values() for g in kind.groups), "base")
SPARSE_MODULE_TYPES: tuple[type[nn.Module], ...] = tuple(t for kind in KINDS.values() for t in kind.modules)
# The spec key an expert-count sweep sets (`--experts` of tsparse.params / plan / scaleout, the expert-count bench).
EXPERTS_KEY = "peer.num_experts"
# Output-RMS ratios logged between kinds: (numerator, denominator), e.g. the seed's "Engram crowds out PEER".
RMS_COMPARISONS: tuple[tuple[str, str], ...] = (("engram", "peer"),)


def default_layers(kind: str, model: str) -> list[int]:
    """The kind's default layers on the model named `model` (empty where the registry gives none)."""
    return list(KINDS[kind].placement.get(model, ()))


def check_specs(specs: dict[str, Any], num_layers: int) -> None:
    """The attached kinds' specs fit together and fit a model of `num_layers` decoder layers: each kind on
    at least one layer, all inside the model; at most one kind around the residual branch, and that
    kind carries several residual streams (with one stream the layer never calls it)."""
    for name, spec in specs.items():
        if not spec.layers:
            raise ConfigError(f"{name}.layers is empty: {name} is attached but placed on no layer; set "
                              f"{name}.layers=[...] (defaults exist for models {sorted(KINDS[name].placement)})")
        if bad := [i for i in spec.layers if i >= num_layers]:
            raise ConfigError(f"{name}.layers={list(spec.layers)}: {bad} outside this model's layers [0, {num_layers - 1}]")
    residual = [name for name, spec in specs.items() if KINDS[name].attach(spec) == "residual"]
    if len(residual) > 1:
        raise ConfigError(f"only one kind may wrap the residual branch; {residual} all do")
    for name in residual:
        if KINDS[name].streams(specs[name]) < 2:
            raise ConfigError(f"{name} wraps the residual branch (attach 'residual') but declares "
                              f"{KINDS[name].streams(specs[name])} residual stream; a residual kind needs streams >= 2, "
                              "or attach it at 'input' or 'output'")


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


def attached_groups(kinds, base: str = "frozen") -> list[str]:
    """The param groups a run with these attached kinds trains (each needs an LR in every phase)."""
    return [g for name in kinds for g in KINDS[name].groups] + ([] if base == "frozen" else ["base"])


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
