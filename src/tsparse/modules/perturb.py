"""Noise on a module's weights, so that zero-initialised output paths do real work (`perturb_`)."""
import torch
from torch import nn


@torch.no_grad()
def perturb_(module: nn.Module, scale: float = 0.1) -> None:
    """Add scale * N(0, 1) * (mean |p| + 0.1) to every floating parameter, so that zero-initialised output
    paths do real work (benchmarks and tests of trained-like modules)."""
    for p in module.parameters():
        if p.is_floating_point():
            p.add_((torch.randn_like(p.float()) * scale * (p.float().abs().mean() + 0.1)).to(p.dtype))
