"""LoRA adapters on the base's attention projections (via peft), for the `optim.base=lora` control."""
from __future__ import annotations

from torch import nn

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]


def add_lora(model: nn.Module, rank: int) -> None:
    """Inject rank-`rank` LoRA weights (names contain `lora_`) into the base attention, in place."""
    from peft import LoraConfig, inject_adapter_in_model

    inject_adapter_in_model(LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=TARGETS, lora_dropout=0.0), model)


def merge_lora(model: nn.Module) -> None:
    """Fold every LoRA adapter into its base weight and put the plain layer back (for export)."""
    from peft.tuners.lora import LoraLayer

    for name, module in list(model.named_modules()):
        if isinstance(module, LoraLayer):
            module.merge()
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, module.get_base_layer())
