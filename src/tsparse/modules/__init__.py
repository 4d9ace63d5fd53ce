"""Sparse modules: PEER, Engram, mHC, each with the typed spec (dataclass) that configures it."""
import torch
from torch import Tensor

TABLE_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def rms_ratio(out: Tensor, ref: Tensor) -> Tensor:
    """RMS of `out` over RMS of `ref` (detached, fp32): a module's output size relative to the hidden state."""
    out, ref = out.detach().float(), ref.detach().float()
    return out.pow(2).mean().sqrt() / ref.pow(2).mean().sqrt().clamp_min(1e-12)
