"""Sparse modules: PEER, Engram, mHC, each with the typed spec (dataclass) that configures it."""
import torch
from torch import Tensor, nn

TABLE_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def rms_ratio(out: Tensor, ref: Tensor) -> Tensor:
    """RMS of `out` over RMS of `ref` (detached, fp32): a module's output size relative to the hidden state."""
    out, ref = out.detach().float(), ref.detach().float()
    return out.pow(2).mean().sqrt() / ref.pow(2).mean().sqrt().clamp_min(1e-12)


@torch.no_grad()
def perturb_(module: nn.Module, scale: float = 0.1) -> None:
    """Add scale * N(0, 1) * (mean |p| + 0.1) to every floating parameter, so that zero-initialised output
    paths do real work (benchmarks and tests of trained-like modules)."""
    for p in module.parameters():
        if p.is_floating_point():
            p.add_((torch.randn_like(p.float()) * scale * (p.float().abs().mean() + 0.1)).to(p.dtype))
