"""LoRA adapters on the base's attention projections (via peft), for the `optim.base=lora` control."""
from __future__ import annotations

from tsparse.augment import AugmentedCausalLM

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]


def add_lora(model: AugmentedCausalLM, rank: int) -> None:
    """Inject rank-`rank` LoRA weights (names contain `lora_`) into the base attention, in place."""
    from peft import LoraConfig, inject_adapter_in_model

    inject_adapter_in_model(LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=TARGETS, lora_dropout=0.0),
                            model.lm)

