"""Statistics the modules record while `track_stats` is set (`SparseModule.stats`)."""
from torch import Tensor


def rms_ratio(out: Tensor, ref: Tensor) -> Tensor:
    """RMS of `out` over RMS of `ref` (detached, fp32): a module's output size relative to the hidden state."""
    out, ref = out.detach().float(), ref.detach().float()
    return out.pow(2).mean().sqrt() / ref.pow(2).mean().sqrt().clamp_min(1e-12)
