"""PEER: parameter-efficient expert retrieval (He, "Mixture of A Million Experts", 2024)."""

import math
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from tsparse.checks import ConfigError, check_choice, check_layers, check_min
from tsparse.modules.protocol import INITS, SparseModule
from tsparse.modules.stats import rms_ratio
from tsparse.modules.tables import TABLE_DTYPES
from tsparse.modules.peer_kernels import SubKeyTopK, mix_experts
from tsparse.sharding import sharded_mix_experts

GATES = ("softmax", "relu")
MAX_EXPERTS = 2**40  # (2**20)²: far beyond any table that fits, and keeps table sizes inside int64


def recomputing() -> bool:
    """Whether this forward is activation checkpointing's recompute (it runs inside backward): side effects
    (usage counts, BatchNorm running statistics) already happened in the first forward."""
    return torch._C._current_graph_task_id() != -1


def experts_side(num_experts: int) -> int:
    """sqrt(num_experts), or ConfigError if it is not a positive perfect square <= MAX_EXPERTS."""
    side = math.isqrt(num_experts) if 0 < num_experts <= MAX_EXPERTS else 0
    if side == 0 or side * side != num_experts:
        raise ConfigError(
            f"peer.num_experts={num_experts} must be a positive perfect square <= {MAX_EXPERTS:,} "
            "(e.g. 16384=128², 65536, 262144, 589824, 802816)"
        )
    return side


@dataclass
class PEERSpec:
    """PEER hyperparameters and placement (the `peer` config group; defaults of the paper)."""

    layers: list[int] = field(default_factory=list)   # decoder layers whose output PEER is added to
    num_experts: int = 16384    # a perfect square: 128² ... 896²
    heads: int = 4
    top_k: int = 8
    key_dim: int = 64
    gate: str = "softmax"       # softmax over the k scores (paper) | relu (non-competing, the seed's code)
    query_batchnorm: bool = False
    input_norm: bool = True     # parameter-free RMSNorm on PEER's input (the seed read the raw residual)
    table_dtype: str = "float32"  # float32 | bfloat16: storage only, gathered rows are computed in fp32
    sparse_grad: bool = True    # row-sparse table grads + row-wise AdaGrad; false: dense grads + AdamW
    init: str = "identity"      # identity (zero output at step 0) | default: PyTorch's init (not an identity)

    def __post_init__(self):
        check_layers("peer.layers", self.layers)
        check_choice("peer.init", self.init, INITS)
        side = experts_side(self.num_experts)
        check_min("peer.heads", self.heads, 1)
        check_min("peer.key_dim", self.key_dim, 1)
        check_min("peer.top_k", self.top_k, 1)
        if self.top_k > side:
            raise ConfigError(f"peer.top_k={self.top_k} must be in [1, sqrt(num_experts)={side}]")
        check_choice("peer.gate", self.gate, GATES)
        check_choice("peer.table_dtype", self.table_dtype, TABLE_DTYPES)

    @property
    def side(self) -> int:
        """sqrt(num_experts): the sub-keys per half-query (num_experts is checked a perfect square)."""
        return math.isqrt(self.num_experts)


class PEER(SparseModule):
    """Parameter-efficient expert retrieval (He 2024): product-key top-k over N single-neuron experts.

    Expert i is one neuron with a down vector u_i and an up vector v_i (two N x dim tables shared by
    all heads). Each head splits its query in two halves, scores each half against sqrt(N) sub-keys,
    and takes the top-k of the k^2 cartesian candidates (index i1*sqrt(N) + i2, score s1 + s2).
    Output per token: sum over heads and chosen experts of gate_i * GELU(u_i . x) * v_i (GELU as in
    the paper). The up table is zero-initialized, so the output is exactly zero at init; add it to
    the decoder layer's output.

    Parameters: exactly `param_count(...)`; query_batchnorm adds BatchNorm1d's 2 * (2*heads*key_dim)
    affine parameters (and its running-stat buffers). The input RMSNorm has no parameters.
    """

    def __init__(self, dim: int, spec: PEERSpec, norm_eps: float = 1e-5):
        super().__init__()
        check_min("dim", dim, 1)
        self.dim, self.num_experts, self.side = dim, spec.num_experts, spec.side
        self.heads, self.top_k, self.key_dim, self.init = spec.heads, spec.top_k, spec.key_dim, spec.init
        self.gate, self.input_norm, self.sparse_grad, self.norm_eps = spec.gate, spec.input_norm, spec.sparse_grad, norm_eps
        heads, key_dim, num_experts, side = spec.heads, spec.key_dim, spec.num_experts, self.side
        table_dtype = TABLE_DTYPES[spec.table_dtype]

        self.query = nn.Linear(dim, 2 * heads * key_dim, bias=False)
        self.query_norm = nn.BatchNorm1d(2 * heads * key_dim) if spec.query_batchnorm else None
        self.keys = nn.Parameter(torch.empty(heads, side, 2, key_dim))
        # nn.Embedding(sparse=...) so that DistributedDataParallel knows these grads are sparse.
        self.down = nn.Embedding(num_experts, dim, sparse=spec.sparse_grad, dtype=table_dtype)  # u_i
        self.up = nn.Embedding(num_experts, dim, sparse=spec.sparse_grad, dtype=table_dtype)    # v_i

        self.register_buffer("usage_counts", torch.zeros(num_experts, dtype=torch.long), persistent=False)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self):
        nn.init.normal_(self.keys, std=self.key_dim ** -0.5)
        if self.init == "default":  # nn.Linear's and nn.Embedding's own: N(0, 1) expert rows
            for layer in (self.query, self.down, self.up):
                layer.reset_parameters()
        else:
            nn.init.normal_(self.query.weight, std=self.dim ** -0.5)
            nn.init.normal_(self.down.weight, std=self.dim ** -0.5)
            nn.init.zeros_(self.up.weight)  # exact zero output at init
        if self.query_norm is not None:
            self.query_norm.reset_parameters()
        self.reset_buffers()

    def reset_buffers(self):
        """Refill the non-persistent buffers (after `to_empty` or a meta-device load)."""
        self.reset_usage()

    @staticmethod
    def param_count(dim: int, num_experts: int, heads: int = 4, key_dim: int = 64) -> int:
        """2*N*d (tables) + h*sqrt(N)*2*dk (sub-keys) + d*2*h*dk (query)."""
        side = experts_side(num_experts)
        return 2 * num_experts * dim + heads * side * 2 * key_dim + dim * 2 * heads * key_dim

    def rows_per_token(self) -> tuple[int, bool]:
        """(table rows one token touches, whether the table gradient is coalesced) (tsparse.plan)."""
        return self.heads * self.top_k, True

    def saved_bytes(self, block: int, grad_input: bool) -> tuple[int, int]:
        """(bytes per token, bytes per step) autograd saves for this module in a training forward (tsparse.plan)."""
        return 4 * ((self.dim if grad_input else 0) + self.dim + 2 * self.heads * self.key_dim
                    + 10 * self.heads * self.top_k), 0

    def table_parameters(self) -> list[nn.Parameter]:
        """The two N x dim expert tables (down u, up v): the sparsely touched parameters."""
        return [self.down.weight, self.up.weight]

    def _normed(self, x: Tensor) -> Tensor:
        x = x.reshape(-1, self.dim).float()
        return F.rms_norm(x, (self.dim,), eps=self.norm_eps) if self.input_norm else x

    def _retrieve(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """x [M, dim] (normed) -> raw scores and expert indices, both [M, heads, top_k]."""
        q, bn = self.query(x), self.query_norm
        if bn is not None and bn.training and recomputing():  # the batch statistics, running ones updated once
            q = F.batch_norm(q, bn.running_mean.clone(), bn.running_var.clone(), bn.weight, bn.bias, True, 0.0, bn.eps)
        elif bn is not None:
            q = bn(q)
        s, i = SubKeyTopK.apply(q.view(-1, self.heads, 2, self.key_dim), self.keys, self.top_k)  # [M, h, 2, k]
        cand_s = s[..., 0, :, None] + s[..., 1, None, :]              # [M, h, k, k]
        cand_i = i[..., 0, :, None] * self.side + i[..., 1, None, :]
        scores, best = cand_s.flatten(-2).topk(self.top_k, dim=-1)    # [M, h, k]
        return scores, cand_i.flatten(-2).gather(-1, best)

    def retrieve(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """x [..., dim] -> raw (un-gated) scores and expert indices, both [..., heads, top_k]."""
        scores, idx = self._retrieve(self._normed(x))
        shape = (*x.shape[:-1], self.heads, self.top_k)
        return scores.view(shape), idx.view(shape)

    def forward(self, x: Tensor) -> Tensor:
        """x [..., dim] -> the delta [..., dim] to add to the decoder layer's output. PEER computes in fp32,
        also under autocast (bf16-mixed): its fused kernels mix fp32 tables with the weights they compute."""
        with torch.autocast(x.device.type, enabled=False):
            h = self._normed(x)
            scores, idx = self._retrieve(h)
            gate = scores.softmax(dim=-1) if self.gate == "softmax" else F.relu(scores)
            idx, gate = idx.flatten(1), gate.flatten(1)                   # [M, h*k]
            if self.shards is None:
                out = mix_experts(h, idx, gate, self.down.weight, self.up.weight, self.sparse_grad)
            else:
                out = sharded_mix_experts(h, idx, gate, self.down.weight, self.up.weight, self.shards)

        if self.track_stats and not recomputing():
            with torch.no_grad():
                flat = idx.reshape(-1)
                self.usage_counts.index_add_(0, flat, torch.ones_like(flat))
                self.stats = {"out_rms_ratio": rms_ratio(out, x)}
        return out.view(*x.shape[:-1], self.dim).to(x.dtype)

    @torch.no_grad()
    def usage_summary(self) -> dict[str, float]:
        """Share of experts hit at least once, and normalized usage entropy in [0, 1]."""
        counts = self.usage_counts.float()
        total = counts.sum()
        if total == 0:
            return {}
        p = counts[counts > 0] / total
        entropy = -(p * p.log()).sum() / math.log(self.num_experts) if self.num_experts > 1 else p.new_zeros(())
        return {"usage_fraction": (counts > 0).float().mean().item(), "usage_entropy": entropy.clamp(0, 1).item()}

    def reset_usage(self) -> None:
        self.usage_counts.zero_()

    def extra_repr(self) -> str:
        return (f"dim={self.dim}, num_experts={self.num_experts}, heads={self.heads}, top_k={self.top_k}, "
                f"key_dim={self.key_dim}, gate={self.gate!r}, table_dtype={self.down.weight.dtype}, "
                f"sparse_grad={self.sparse_grad}")
