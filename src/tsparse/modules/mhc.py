"""Manifold-constrained hyper-connections (DeepSeek mHC, 2025) and the seed's gated adapter.

The residual stream is held as ``n`` streams ``x: [B, T, n, d]``. Each wrapped layer reads one
hidden state ``h = H_pre x`` from the streams, runs its residual branch ``F`` on it, and writes
back ``x <- H_res x + H_post^T F(h)`` with ``H_res`` doubly stochastic (Sinkhorn).

At init (phi = 0) ``H_pre`` is uniform, ``H_post`` has mean 1 over streams and ``H_res`` is
doubly stochastic, so the stream mean follows the base model exactly: ``m' = m + F(m)``.
"""

from __future__ import annotations

import contextlib
import math
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from tsparse.modules import rms_ratio

Branch = Callable[[Tensor], Tensor]

REDUCE_MODES = ("mean", "learned")


def _check_min(key: str, value: int, minimum: int) -> None:
    if not isinstance(value, int) or value < minimum:
        raise ValueError(f"{key} must be an integer >= {minimum}, got {value!r}")


def _no_autocast(device_type: str):
    if torch.amp.is_autocast_available(device_type):
        return torch.autocast(device_type, enabled=False)
    return contextlib.nullcontext()


def sinkhorn(logits: Tensor, iters: int = 20) -> Tensor:
    """Doubly-stochastic projection of ``[..., n, n]`` logits, in fp32 (also under autocast).

    Equivalent to ``exp`` then alternating row / column normalisation, carried out in the log
    domain so that large logits never underflow a whole row. Ends on the column step, so column
    sums are 1 to rounding (that is what preserves the stream mean).
    """
    _check_min("sinkhorn_iters", iters, 1)
    with _no_autocast(logits.device.type):
        log_p = logits.float()
        log_p = log_p - log_p.amax(dim=(-2, -1), keepdim=True)
        for _ in range(iters):
            log_p = log_p - log_p.logsumexp(dim=-1, keepdim=True)  # rows
            log_p = log_p - log_p.logsumexp(dim=-2, keepdim=True)  # columns
        return log_p.exp()


def expand_streams(h: Tensor, n: int) -> Tensor:
    """Copy the embedding ``[B, T, d]`` into ``n`` identical streams ``[B, T, n, d]``."""
    _check_min("streams", n, 1)
    return h.unsqueeze(-2).expand(*h.shape[:-1], n, h.shape[-1]).contiguous()


class StreamReduce(nn.Module):
    """Reduce n streams to one before the final norm.

    'mean' is fixed; 'learned' is a weighted sum with weights init 1/n, so equal to mean at init.
    """

    def __init__(self, streams: int, mode: str = "mean"):
        super().__init__()
        _check_min("streams", streams, 1)
        if mode not in REDUCE_MODES:
            raise ValueError(f"mode must be one of {REDUCE_MODES}, got {mode!r}")
        self.streams = streams
        self.mode = mode
        learned = mode == "learned"
        self.weight = nn.Parameter(torch.full((streams,), 1.0 / streams)) if learned else None

    def forward(self, x: Tensor) -> Tensor:
        if self.weight is None:
            return x.mean(dim=-2)
        return torch.einsum("...nd,n->...d", x, self.weight.to(x.dtype))

    def extra_repr(self) -> str:
        return f"streams={self.streams}, mode={self.mode!r}"


def uniform_step(x: Tensor, branch: Branch) -> Tensor:
    """Layers without a learnable mHC: read the stream mean m, write F(m) to every stream."""
    return x + branch(x.mean(dim=-2)).unsqueeze(-2)



class HyperConnection(nn.Module):
    """Manifold-constrained hyper-connection (DeepSeek mHC 2025) around one residual branch.

    With ``x~ = RMSNorm(flatten(x))``:
    ``H_pre = sigmoid(a_pre x~ phi_pre + b_pre)``,
    ``H_post = 2 sigmoid(a_post x~ phi_post + b_post)``,
    ``H_res = sinkhorn(a_res x~ phi_res + b_res)``.
    """

    track_stats: bool = False

    def __init__(
        self,
        dim: int,
        streams: int = 4,
        sinkhorn_iters: int = 20,
        alpha_init: float = 0.01,
        post_bias: float = 1.0,
        res_diag_bias: float = 1.0,
        norm_eps: float = 1e-5,
    ):
        super().__init__()
        _check_min("dim", dim, 1)
        _check_min("streams", streams, 2)  # n = 1 is a plain residual: use uniform_step
        _check_min("sinkhorn_iters", sinkhorn_iters, 1)
        n = streams
        self.dim, self.streams, self.sinkhorn_iters = dim, n, sinkhorn_iters
        self.stats: dict[str, Tensor] = {}

        self.norm = nn.RMSNorm(n * dim, eps=norm_eps)
        self.phi_pre = nn.Parameter(torch.zeros(n * dim, n))
        self.phi_post = nn.Parameter(torch.zeros(n * dim, n))
        self.phi_res = nn.Parameter(torch.zeros(n * dim, n * n))
        self.alpha_pre = nn.Parameter(torch.tensor(float(alpha_init)))
        self.alpha_post = nn.Parameter(torch.tensor(float(alpha_init)))
        self.alpha_res = nn.Parameter(torch.tensor(float(alpha_init)))

        # sigmoid(b_pre) = 1/n: read the stream mean
        self.b_pre = nn.Parameter(torch.full((n,), math.log(1.0 / (n - 1))))
        # +a_k / -a_k pairs: 2 sigmoid(a) + 2 sigmoid(-a) = 2, so mean H_post = 1 (odd n: one 0).
        # Distinct a_k, else equal-bias streams stay identical forever (permutation symmetry).
        pairs = n // 2
        b_post = torch.zeros(n)
        for k in range(pairs):
            b_post[2 * k] = post_bias * (pairs - k) / pairs
            b_post[2 * k + 1] = -b_post[2 * k]
        self.b_post = nn.Parameter(b_post)
        # moderate diagonal: symmetric with equal row sums, hence already doubly stochastic
        self.b_res = nn.Parameter(res_diag_bias * torch.eye(n))

    def mixing(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Per-token ``H_pre [B,T,n]``, ``H_post [B,T,n]``, ``H_res [B,T,n,n]``, in fp32."""
        n = self.streams
        x_norm = self.norm(x.flatten(-2))
        phi = torch.cat((self.phi_pre, self.phi_post, self.phi_res), dim=-1)
        proj = (x_norm @ phi.to(x_norm.dtype)).float()
        proj_pre, proj_post, proj_res = proj.split((n, n, n * n), dim=-1)
        h_pre = torch.sigmoid(self.alpha_pre * proj_pre + self.b_pre)
        h_post = 2 * torch.sigmoid(self.alpha_post * proj_post + self.b_post)
        res_logits = self.alpha_res * proj_res.unflatten(-1, (n, n)) + self.b_res
        return h_pre, h_post, sinkhorn(res_logits, self.sinkhorn_iters)

    def forward(self, x: Tensor, branch: Branch) -> Tensor:
        """x <- H_res x + H_post^T F(H_pre x); stream mixing stays in x's dtype under autocast."""
        h_pre, h_post, h_res = self.mixing(x)
        with _no_autocast(x.device.type):
            h = torch.einsum("...n,...nd->...d", h_pre.to(x.dtype), x)
        out = branch(h)
        with _no_autocast(x.device.type):
            write = h_post.to(x.dtype).unsqueeze(-1) * out.to(x.dtype).unsqueeze(-2)
            x_new = torch.einsum("...ij,...jd->...id", h_res.to(x.dtype), x) + write
        if self.track_stats:
            self._record(x, h_post, h_res, write)
        return x_new

    @torch.no_grad()
    def _record(self, x: Tensor, h_post: Tensor, h_res: Tensor, write: Tensor) -> None:
        eye = torch.eye(self.streams, device=h_res.device, dtype=h_res.dtype)
        self.stats = {
            "h_res_identity_dist": torch.linalg.matrix_norm(h_res - eye).mean(),
            "h_post_std": h_post.std(dim=-1).mean(),
            "out_rms_ratio": rms_ratio(write, x),
        }

    def extra_repr(self) -> str:
        return f"dim={self.dim}, streams={self.streams}, sinkhorn_iters={self.sinkhorn_iters}"


class GatedResidualAdapter(nn.Module):
    """The ORIGINAL SEED's 'mHC' (not real mHC), kept only so the seed's numbers can be compared.

    A zero-initialised gated bottleneck adapter added to the hidden state:
    ``delta = sigmoid(gate(h)) * up(silu(down(h)))`` with ``up`` zero-initialised.
    """

    def __init__(self, dim: int, bottleneck: int = 64):
        super().__init__()
        _check_min("dim", dim, 1)
        _check_min("bottleneck", bottleneck, 1)
        self.down = nn.Linear(dim, bottleneck)
        self.up = nn.Linear(bottleneck, dim)
        self.gate = nn.Linear(dim, 1)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, h: Tensor) -> Tensor:
        """Return the delta to add to ``h`` (zero at init)."""
        return torch.sigmoid(self.gate(h)) * self.up(F.silu(self.down(h)))
