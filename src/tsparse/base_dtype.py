"""`optim.base_dtype=bfloat16`: the frozen base's projection weights stored in bf16, computed at the activations' dtype.

`store_base_in_bf16` casts the weight of every nn.Linear of the base (attention, MLP, lm_head) to bf16 in place
(same parameters, keys and shapes) and makes those layers `Bf16Linear`. Under autocast (bf16-mixed) that is a
plain nn.Linear; with fp32 activations (32-true) it multiplies by the weight upcast and saves only the bf16
weight for backward, upcasting it again there: `F.linear(x, w.float())` would keep an fp32 copy of every
weight the gradient flows through alive until backward. The weights are frozen and get no gradient. What
stays fp32: the RMSNorm weights and biases (vectors), the RoPE buffers, the sparse modules (tables per
`<kind>.table_dtype`), and the input embedding (a lookup, and the first parameter: `save_pretrained` records
its dtype as the model's, so an export reloads in fp32 and gives the trained model's logits).
"""
from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from tsparse.checks import ConfigError, check_choice
from tsparse.registry import params_by_group


def base_in_bf16(optim) -> bool:
    """Whether `optim.base_dtype` stores the base in bf16, or one ConfigError line (an unknown dtype, or
    bfloat16 for a base that trains)."""
    check_choice("optim.base_dtype", optim.base_dtype, ["float32", "bfloat16"])
    if optim.base_dtype == "bfloat16" and optim.base != "frozen":
        raise ConfigError(f"optim.base_dtype=bfloat16 needs optim.base=frozen (got optim.base={optim.base}): a "
                          "base that trains keeps fp32 weights; set optim.base_dtype=float32")
    return optim.base_dtype == "bfloat16"


class _UpcastLinear(torch.autograd.Function):
    """x @ weight.T + bias at x's dtype, saving only the (narrower) stored weight; no gradient for it."""

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        ctx.save_for_backward(weight)
        return F.linear(x, weight.to(x.dtype), bias)

    @staticmethod
    def backward(ctx, grad: Tensor):
        (weight,) = ctx.saved_tensors
        return grad @ weight.to(grad.dtype), None, None


class Bf16Linear(nn.Linear):
    """A frozen nn.Linear whose weight is stored in bf16 (see the module docstring)."""

    def forward(self, x: Tensor) -> Tensor:
        if x.dtype == self.weight.dtype or torch.is_autocast_enabled(x.device.type):
            return super().forward(x)
        return _UpcastLinear.apply(x, self.weight, self.bias)


@torch.no_grad()
def store_base_in_bf16(model: nn.Module) -> None:
    """Freeze the base's nn.Linear weights and store them in bf16 (all but one tied to the input embedding)."""
    base = {id(p) for _, p in params_by_group(model)["base"]}
    embedding = model.get_input_embeddings().weight
    for module in model.modules():
        if type(module) is nn.Linear and id(module.weight) in base and module.weight is not embedding:
            module.weight.requires_grad_(False)
            module.weight.data = module.weight.data.to(torch.bfloat16)
            module.__class__ = Bf16Linear
