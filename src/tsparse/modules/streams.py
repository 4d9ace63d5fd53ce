"""Multi-stream residuals: the residual state as n streams [B, T, n, d], copied from the embedding and
reduced before the final norm. A layer without a learnable stream mix reads the stream mean and writes
its branch output to every stream (`uniform_step`), so with n streams the stream mean follows the
single-stream model exactly."""
from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor, nn


Branch = Callable[[Tensor], Tensor]
REDUCE_MODES = ("mean", "learned")


def expand_streams(h: Tensor, n: int) -> Tensor:
    """Copy the embedding ``[B, T, d]`` into ``n`` identical streams ``[B, T, n, d]``."""
    return h.unsqueeze(-2).expand(*h.shape[:-1], n, h.shape[-1]).contiguous()


class StreamReduce(nn.Module):
    """Reduce n streams to one before the final norm (built from a checked spec: n >= 2, mode in REDUCE_MODES).

    'mean' is fixed; 'learned' is a weighted sum with weights init 1/n, so equal to mean at init.
    """

    def __init__(self, streams: int, mode: str = "mean"):
        super().__init__()
        self.streams, self.mode = streams, mode
        self.weight = nn.Parameter(torch.empty(streams)) if mode == "learned" else None
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        if self.weight is not None:
            nn.init.constant_(self.weight, 1.0 / self.streams)

    def forward(self, x: Tensor) -> Tensor:
        if self.weight is None:
            return x.mean(dim=-2)
        return torch.einsum("...nd,n->...d", x, self.weight.to(x.dtype))

    def extra_repr(self) -> str:
        return f"streams={self.streams}, mode={self.mode!r}"


def uniform_step(x: Tensor, branch: Branch) -> Tensor:
    """Layers without a learnable mHC: read the stream mean m, write F(m) to every stream."""
    return x + branch(x.mean(dim=-2)).unsqueeze(-2)
