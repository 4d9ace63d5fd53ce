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
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from tsparse.checks import check_choice, check_layers, check_min
from tsparse.modules.protocol import SparseModule
from tsparse.modules.stats import rms_ratio
from tsparse.modules.streams import REDUCE_MODES, Branch

VARIANTS = ("hyper", "adapter")


@dataclass
class MHCSpec:
    """mHC hyperparameters and placement (the `mhc` config group). `variant=hyper` is real mHC (n
    residual streams, Sinkhorn H_res); `adapter` is the original seed's gated residual adapter."""

    layers: list[int] = field(default_factory=list)   # layers with a learnable H; the others read the mean
    variant: str = "hyper"
    streams: int = 4
    reduce: str = "mean"        # mean | learned: stream weights before the final norm
    sinkhorn_iters: int = 20
    alpha_init: float = 0.01
    post_bias: float = 1.0
    res_diag_bias: float = 1.0
    adapter_bottleneck: int = 64

    def __post_init__(self):
        check_layers("mhc.layers", self.layers)
        check_choice("mhc.variant", self.variant, VARIANTS)
        check_min("mhc.streams", self.streams, 2)
        check_choice("mhc.reduce", self.reduce, REDUCE_MODES)
        check_min("mhc.sinkhorn_iters", self.sinkhorn_iters, 1)
        check_min("mhc.adapter_bottleneck", self.adapter_bottleneck, 1)

    @property
    def num_streams(self) -> int:
        """Residual streams of the model: `streams` for real mHC, 1 for the adapter variant."""
        return self.streams if self.variant == "hyper" else 1


def _no_autocast(device_type: str):
    if torch.amp.is_autocast_available(device_type):
        return torch.autocast(device_type, enabled=False)
    return contextlib.nullcontext()


EXP_SPREAD = 30.0  # below this logit spread per matrix, exp() of the shifted logits cannot underflow fp32


def sinkhorn(logits: Tensor, iters: int = 20) -> Tensor:
    """Doubly-stochastic projection of ``[..., n, n]`` logits, in fp32 (also under autocast).

    ``exp`` then alternating row / column normalisation, batched over all matrices: in the exp
    domain (two reductions and two divisions an iteration) when every matrix's logit spread is
    under EXP_SPREAD, else in the log domain, so that large logits never underflow a whole row.
    Ends on the column step, so column sums are 1 to rounding (that is what preserves the stream mean).
    """
    with _no_autocast(logits.device.type):
        log_p = logits.float()
        log_p = log_p - log_p.amax(dim=(-2, -1), keepdim=True).detach()  # the result is shift-invariant
        # Compiled, the log domain fuses into a few kernels; eager, the exp domain is the cheap one.
        if not torch.compiler.is_compiling() and (log_p.is_meta or bool(log_p.amin() > -EXP_SPREAD)):
            p = log_p.exp()
            for _ in range(iters):
                p = p / p.sum(dim=-1, keepdim=True)  # rows
                p = p / p.sum(dim=-2, keepdim=True)  # columns
            return p
        for _ in range(iters):
            log_p = log_p - log_p.logsumexp(dim=-1, keepdim=True)  # rows
            log_p = log_p - log_p.logsumexp(dim=-2, keepdim=True)  # columns
        return log_p.exp()


class HyperConnection(SparseModule):
    """Manifold-constrained hyper-connection (DeepSeek mHC 2025) around one residual branch.

    With ``x~ = RMSNorm(flatten(x))``:
    ``H_pre = sigmoid(a_pre x~ phi_pre + b_pre)``,
    ``H_post = 2 sigmoid(a_post x~ phi_post + b_post)``,
    ``H_res = sinkhorn(a_res x~ phi_res + b_res)``.
    """

    def __init__(self, dim: int, spec: MHCSpec, norm_eps: float = 1e-5):
        super().__init__()
        check_min("dim", dim, 1)
        n = spec.streams
        self.dim, self.streams, self.sinkhorn_iters = dim, n, spec.sinkhorn_iters
        self.alpha_init, self.post_bias, self.res_diag_bias = spec.alpha_init, spec.post_bias, spec.res_diag_bias

        self.norm = nn.RMSNorm(n * dim, eps=norm_eps)
        self.phi_pre = nn.Parameter(torch.empty(n * dim, n))
        self.phi_post = nn.Parameter(torch.empty(n * dim, n))
        self.phi_res = nn.Parameter(torch.empty(n * dim, n * n))
        self.alpha_pre = nn.Parameter(torch.empty(()))
        self.alpha_post = nn.Parameter(torch.empty(()))
        self.alpha_res = nn.Parameter(torch.empty(()))
        self.b_pre = nn.Parameter(torch.empty(n))
        self.b_post = nn.Parameter(torch.empty(n))
        self.b_res = nn.Parameter(torch.empty(n, n))
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """phi = 0; sigmoid(b_pre) = 1/n (read the stream mean); b_post in +a_k / -a_k pairs, so that
        2 sigmoid(a) + 2 sigmoid(-a) = 2 gives mean H_post = 1 (odd n: one 0), with distinct a_k, else
        equal-bias streams stay identical forever; b_res a moderate diagonal (symmetric with equal row
        sums, hence already doubly stochastic)."""
        n = self.streams
        self.norm.reset_parameters()
        for phi in (self.phi_pre, self.phi_post, self.phi_res):
            nn.init.zeros_(phi)
        for alpha in (self.alpha_pre, self.alpha_post, self.alpha_res):
            nn.init.constant_(alpha, self.alpha_init)
        nn.init.constant_(self.b_pre, math.log(1.0 / (n - 1)))
        pairs = n // 2
        magnitudes = [self.post_bias * (pairs - k) / pairs for k in range(pairs)]
        b_post = [v for a in magnitudes for v in (a, -a)] + [0.0] * (n % 2)
        self.b_post.copy_(torch.tensor(b_post))
        self.b_res.copy_(self.res_diag_bias * torch.eye(n))

    def mixing(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Per-token ``H_pre [B,T,n]``, ``H_post [B,T,n]``, ``H_res [B,T,n,n]``, in fp32."""
        n = self.streams
        with _no_autocast(x.device.type):  # x~ phi in fp32, as DeepSeek computes it
            x_norm = F.rms_norm(x.flatten(-2).float(), (n * self.dim,), self.norm.weight.float(), self.norm.eps)
            phi = torch.cat((self.phi_pre, self.phi_post, self.phi_res), dim=-1).float()
            proj_pre, proj_post, proj_res = (x_norm @ phi).split((n, n, n * n), dim=-1)
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
            n, d = self.streams, self.dim  # x_new = H_res x + write, one batched kernel
            x_new = torch.baddbmm(write.reshape(-1, n, d), h_res.to(x.dtype).reshape(-1, n, n),
                                  x.reshape(-1, n, d)).view_as(x)
        if self.track_stats:
            self._record(x, h_post, h_res, write)
        return x_new

    def saved_bytes(self, block: int, grad_input: bool) -> tuple[int, int]:
        """(bytes per token, bytes per step) autograd saves for this module in a training forward (tsparse.plan)."""
        n, d, iters = self.streams, self.dim, self.sinkhorn_iters
        return 4 * (3 * n * d + d + (2 * iters + 4) * n * n + (2 * iters + 6) * n), 4 * n * d * (n * n + 2 * n)

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


class GatedResidualAdapter(SparseModule):
    """The ORIGINAL SEED's 'mHC' (not real mHC), kept only so the seed's numbers can be compared.

    A zero-initialised gated bottleneck adapter added to the hidden state:
    ``delta = sigmoid(gate(h)) * up(silu(down(h)))`` with ``up`` zero-initialised.
    """

    def __init__(self, dim: int, bottleneck: int = 64):
        super().__init__()
        check_min("dim", dim, 1)
        check_min("mhc.adapter_bottleneck", bottleneck, 1)
        self.down = nn.Linear(dim, bottleneck)
        self.up = nn.Linear(bottleneck, dim)
        self.gate = nn.Linear(dim, 1)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        self.down.reset_parameters()
        self.gate.reset_parameters()
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def saved_bytes(self, block: int, grad_input: bool) -> tuple[int, int]:
        """(bytes per token, bytes per step) autograd saves for this module in a training forward (tsparse.plan)."""
        return 4 * (2 * self.down.in_features + 2 * self.down.out_features), 0

    def forward(self, h: Tensor) -> Tensor:
        """Return the delta to add to ``h`` (zero at init)."""
        delta = torch.sigmoid(self.gate(h)) * self.up(F.silu(self.down(h)))
        if self.track_stats:
            self.stats = {"out_rms_ratio": rms_ratio(delta, h)}
        return delta
