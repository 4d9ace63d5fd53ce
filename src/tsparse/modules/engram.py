"""Engram: hashed n-gram memory with a context gate (DeepSeek, "Conditional Memory via Scalable Lookup").

For each order n and each of K hash heads, the last n token ids are hashed into that head's own
table, whose size is a distinct prime, so heads of one order collide on different n-gram pairs.
The looked-up rows are concatenated into e_t, gated against the hidden state and passed through a
causal depthwise conv. The output projection and the conv start at zero, so y == 0 at init.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from tsparse.modules import rms_ratio

# Multipliers are drawn below 2**31, so for ids below 2**32 every product fits in int64: no overflow.
_MULTIPLIER_BOUND = 2**31
# Floor under the gate's signed sqrt: keeps its gradient finite (<= 1 / (2 * sqrt(1e-6)) = 500) at s = 0.
_GATE_SQRT_FLOOR = 1e-6


def ngram_hash_ids(input_ids: Tensor, multipliers: Tensor, order: int, pad_id: int) -> Tensor:
    """Multiplicative-XOR hash of the last `order` ids: x_t*m0 ^ x_{t-1}*m1 ^ ..., left-padded with pad_id.

    input_ids: LongTensor [B, T]; multipliers: LongTensor [>= order]. Returns a LongTensor [B, T].
    """
    T = input_ids.shape[-1]
    padded = F.pad(input_ids, (order - 1, 0), value=pad_id)
    hashed = torch.zeros_like(input_ids)
    for i in range(order):  # position i holds x_{t-i}
        start = order - 1 - i
        hashed = hashed ^ (padded[..., start : start + T] * multipliers[i])
    return hashed



def _is_prime(n: int) -> bool:
    if n < 4:
        return n >= 2
    if n % 2 == 0 or n % 3 == 0:
        return False
    f = 5
    while f * f <= n:
        if n % f == 0 or n % (f + 2) == 0:
            return False
        f += 6
    return True


def distinct_primes(start: int, count: int, exclude: Iterable[int] = ()) -> list[int]:
    """The next `count` primes >= start, skipping those in `exclude`."""
    skip = set(exclude)
    primes, n = [], start
    while len(primes) < count:
        if n not in skip and _is_prime(n):
            primes.append(n)
        n += 1
    return primes


def _check(ok: bool, key: str, allowed: str, value) -> None:
    if not ok:
        raise ValueError(f"engram: {key} must be {allowed}, got {value!r}")


class Engram(nn.Module):
    """Hashed n-gram memory with a context gate (DeepSeek Engram, 2026).

    Per token t, with e_t the concatenation of all heads' rows (len(orders) * dim_per_order):
        k = RMSNorm(W_K e),  q = RMSNorm(h),  s = <k, q> / sqrt(dim)
        alpha = sigmoid(sign(s) * sqrt(max(|s|, 1e-6)))    # differentiable signed sqrt
        v = alpha * W_V e,   y = v + SiLU(CausalDepthwiseConv(RMSNorm(v)))
    The caller adds y to the layer input. Set `track_stats = True` to record `self.stats`.
    """

    def __init__(
        self,
        dim: int,
        layer_index: int,
        orders: Sequence[int] = (2, 3),
        heads_per_order: int = 8,
        dim_per_order: int = 256,
        table_rows: int = 100_000,
        conv_kernel: int = 4,
        seed: int = 0,
        pad_id: int = 0,
        token_map: Tensor | None = None,
        table_dtype: torch.dtype = torch.float32,
        sparse_grad: bool = True,
        norm_eps: float = 1e-5,
    ):
        super().__init__()
        orders = tuple(orders)
        _check(dim >= 1, "dim", "an int >= 1", dim)
        _check(
            len(orders) > 0
            and all(isinstance(n, int) and not isinstance(n, bool) and n >= 2 for n in orders)
            and len(set(orders)) == len(orders),
            "orders", "a non-empty sequence of distinct ints >= 2, e.g. (2, 3)", orders,
        )
        _check(heads_per_order >= 1, "heads_per_order", "an int >= 1", heads_per_order)
        _check(
            dim_per_order >= 1 and dim_per_order % heads_per_order == 0,
            "dim_per_order", f"a positive multiple of heads_per_order={heads_per_order}", dim_per_order,
        )
        _check(table_rows >= 2, "table_rows", "an int >= 2", table_rows)
        _check(conv_kernel >= 1, "conv_kernel", "an int >= 1", conv_kernel)
        _check(
            token_map is None or (token_map.dim() == 1 and not token_map.is_floating_point()),
            "token_map", "None or a 1-D integer tensor [vocab]",
            None if token_map is None else token_map.shape,
        )

        self.dim, self.layer_index, self.orders = dim, layer_index, orders
        self.seed, self.pad_id = seed, pad_id
        self.heads_per_order, self.dim_per_order, self.table_rows = heads_per_order, dim_per_order, table_rows
        self.num_heads = len(orders) * heads_per_order
        self.head_dim = dim_per_order // heads_per_order
        self.sparse_grad = sparse_grad
        self.track_stats = False
        self.stats: dict[str, Tensor] = {}

        # Head j hashes order orders[j // heads_per_order] into rows offsets[j] .. offsets[j] + primes[j] - 1.
        self.primes_list = distinct_primes(table_rows, self.num_heads)
        self.register_buffer("multipliers", torch.empty(max(orders), dtype=torch.long))
        self.register_buffer("primes", torch.empty(self.num_heads, dtype=torch.long), persistent=False)
        self.register_buffer("offsets", torch.empty(self.num_heads, dtype=torch.long), persistent=False)
        self._token_map_src = None if token_map is None else token_map.detach().to("cpu", torch.long).clone()
        self.register_buffer(
            "token_map", None if token_map is None else torch.empty(len(token_map), dtype=torch.long)
        )

        # nn.Embedding(sparse=...) so that DistributedDataParallel knows its grads are sparse.
        self.table = nn.Embedding(sum(self.primes_list), self.head_dim, sparse=sparse_grad, dtype=table_dtype)
        e_dim = len(orders) * dim_per_order
        self.key_proj = nn.Linear(e_dim, dim, bias=False)
        self.value_proj = nn.Linear(e_dim, dim, bias=False)
        self.norm_k = nn.RMSNorm(dim, eps=norm_eps)
        self.norm_q = nn.RMSNorm(dim, eps=norm_eps)
        self.norm_v = nn.RMSNorm(dim, eps=norm_eps)
        self.conv_pad = (conv_kernel - 1) * max(orders)
        self.conv = nn.Conv1d(dim, dim, conv_kernel, groups=dim, dilation=max(orders), bias=False)
        self.reset_parameters()

    def _draw_multipliers(self) -> Tensor:
        # Local CPU generator: deterministic across processes and devices, global RNG untouched.
        g = torch.Generator(device="cpu").manual_seed(self.seed * 1_000_003 + self.layer_index)
        return torch.randint(0, _MULTIPLIER_BOUND, (max(self.orders),), generator=g, device="cpu") | 1

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Init weights and (re)fill the hash buffers: `to_empty()` + `reset_parameters()` after meta init."""
        primes = torch.tensor(self.primes_list, dtype=torch.long)
        self.multipliers.copy_(self._draw_multipliers())
        self.primes.copy_(primes)
        self.offsets.copy_(torch.cumsum(primes, 0) - primes)
        if self.token_map is not None:
            self.token_map.copy_(self._token_map_src)
        nn.init.normal_(self.table.weight, std=0.02)
        self.key_proj.reset_parameters()
        nn.init.zeros_(self.value_proj.weight)  # init rule: y == 0 exactly
        nn.init.zeros_(self.conv.weight)
        for norm in (self.norm_k, self.norm_q, self.norm_v):
            norm.reset_parameters()

    def table_parameters(self) -> list[nn.Parameter]:
        """The hash embedding table(s): large, sparsely touched, for a sparse/row-wise optimizer."""
        return [self.table.weight]

    def hash_indices(self, input_ids: Tensor) -> Tensor:
        """Row indices into the concatenated table, LongTensor [B, T, num_heads], per-head offsets included."""
        if self.token_map is not None:
            input_ids = self.token_map[input_ids]
        hashed = torch.stack(
            [ngram_hash_ids(input_ids, self.multipliers, n, self.pad_id) for n in self.orders], dim=-1
        ).repeat_interleave(self.heads_per_order, dim=-1)  # [B, T, num_heads]
        return torch.remainder(hashed, self.primes) + self.offsets

    def forward(
        self, hidden: Tensor, input_ids: Tensor, return_gate: bool = False
    ) -> Tensor | tuple[Tensor, Tensor]:
        """Returns y [B, T, dim] to ADD to the layer input (and the gate alpha [B, T] if return_gate)."""
        B, T, _ = hidden.shape
        rows = self.table(self.hash_indices(input_ids))
        e = rows.to(self.key_proj.weight.dtype).reshape(B, T, -1)  # [B, T, orders*dim_per_order]

        k, q = self.norm_k(self.key_proj(e)), self.norm_q(hidden)
        s = (k * q).sum(-1) / math.sqrt(self.dim)
        alpha = torch.sigmoid(torch.sign(s) * torch.sqrt(s.abs().clamp_min(_GATE_SQRT_FLOOR)))

        v = alpha.unsqueeze(-1) * self.value_proj(e)
        conv_in = F.pad(self.norm_v(v).transpose(1, 2), (self.conv_pad, 0))  # left pad only: causal
        y = v + F.silu(self.conv(conv_in).transpose(1, 2))

        if self.track_stats:
            with torch.no_grad():
                self.stats = {
                    "gate_mean": alpha.mean(),
                    "gate_std": alpha.std(correction=0),
                    "out_rms_ratio": rms_ratio(y, hidden),
                }
        return (y, alpha) if return_gate else y

    def extra_repr(self) -> str:
        return (
            f"dim={self.dim}, layer_index={self.layer_index}, orders={self.orders}, "
            f"heads_per_order={self.heads_per_order}, head_dim={self.head_dim}, "
            f"primes={self.primes_list[0]}..{self.primes_list[-1]}, sparse_grad={self.sparse_grad}"
        )
