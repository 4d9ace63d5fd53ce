"""Engram: hashed n-gram memory with a context gate (DeepSeek, "Conditional Memory via Scalable Lookup").

For each order n and each of K hash heads, the last n token ids are hashed into that head's own
table, whose size is a distinct prime, so heads of one order collide on different n-gram pairs.
The looked-up rows are concatenated into e_t, gated against the hidden state and passed through a
causal depthwise conv. The output projection and the conv start at zero, so y == 0 at init.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F
from tokenizers import Regex, normalizers
from torch import Tensor

from tsparse.checks import ConfigError, check_choice, check_layers, check_min, is_int
from tsparse.modules.protocol import INITS, SparseModule
from tsparse.modules.stats import rms_ratio
from tsparse.modules.tables import TABLE_DTYPES
from tsparse.sharding import sharded_lookup

# Multipliers are drawn below 2**31, so for ids below 2**32 every product fits in int64: no overflow.
_MULTIPLIER_BOUND = 2**31
# Floor under the gate's signed sqrt: keeps its gradient finite (<= 1 / (2 * sqrt(1e-6)) = 500) at s = 0.
_GATE_SQRT_FLOOR = 1e-6
# The DeepSeek Engram demo's token normaliser; the private-use sentinel carries a text that is exactly one
# space (after collapsing) past Strip.
_SPACE_SENTINEL = "\ue000"
_DEMO_NORMALIZER = normalizers.Sequence([
    normalizers.NFKC(), normalizers.NFD(), normalizers.StripAccents(), normalizers.Lowercase(),
    normalizers.Replace(Regex(r"[ \t\r\n]+"), " "), normalizers.Replace(Regex(r"^ $"), _SPACE_SENTINEL),
    normalizers.Strip(), normalizers.Replace(_SPACE_SENTINEL, " "),
])


@dataclass
class EngramSpec:
    """Engram hyperparameters and placement (the `engram` config group; seed defaults)."""

    layers: list[int] = field(default_factory=list)   # decoder layers whose input Engram is added to
    orders: list[int] = field(default_factory=lambda: [2, 3])
    heads_per_order: int = 8
    dim_per_order: int = 256
    table_rows: int = 100_000   # per head; each head uses its own distinct prime >= this
    conv_kernel: int = 4
    compress_tokens: bool = False  # hash normalised token ids (DeepSeek's compressed tokenizer)
    table_dtype: str = "float32"   # float32 | bfloat16 (storage only)
    sparse_grad: bool = True       # row-sparse table grads + row-wise AdaGrad; false: dense grads + AdamW
    init: str = "identity"         # identity (zero output at step 0) | default: PyTorch's init (not an identity)

    def __post_init__(self):
        check_layers("engram.layers", self.layers)
        check_choice("engram.init", self.init, INITS)
        orders = list(self.orders)
        if not orders or len(set(orders)) != len(orders) or any(
                not is_int(n) or n < 2 for n in orders):
            raise ConfigError(f"engram.orders={orders} must be distinct integers >= 2, e.g. [2, 3]")
        check_min("engram.heads_per_order", self.heads_per_order, 1)
        check_min("engram.dim_per_order", self.dim_per_order, 1)
        if self.dim_per_order % self.heads_per_order:
            raise ConfigError(f"engram.dim_per_order={self.dim_per_order} must be a multiple of "
                             f"engram.heads_per_order={self.heads_per_order}")
        check_min("engram.table_rows", self.table_rows, 2)
        check_min("engram.conv_kernel", self.conv_kernel, 1)
        check_choice("engram.table_dtype", self.table_dtype, TABLE_DTYPES)


def draw_multipliers(seed: int, layer: int, max_order: int) -> list[int]:
    """Odd hash multipliers of one Engram layer, from a local CPU generator (the global RNG is untouched)."""
    g = torch.Generator(device="cpu").manual_seed(seed * 1_000_003 + layer)
    return (torch.randint(0, _MULTIPLIER_BOUND, (max_order,), generator=g, device="cpu") | 1).tolist()


def normalize_token_text(text: str) -> str:
    """The Engram demo's compressed-tokenizer rule, run by the same `tokenizers` normalizers: NFKC, NFD,
    strip accents (all marks), lowercase, collapse runs of [ \\t\\r\\n] (only these) into one space, strip
    Unicode White_Space unless the whole text is that one space. So "\\t" and "\\r\\n" give " ", "\\x0b" gives ""."""
    return _DEMO_NORMALIZER.normalize_str(text)


def compressed_token_map(tokenizer, vocab_size: int) -> list[int]:
    """Map each id to a shared id per normalised token text. Tokens whose text contains U+FFFD (partial
    UTF-8 bytes) are keyed by their raw token string, and tokens normalising to "" keep their own text."""
    canonical: dict[str, int] = {}
    ids = []
    for i in range(vocab_size):
        text = tokenizer.decode([i])
        key = tokenizer.convert_ids_to_tokens(i) if "\ufffd" in text else (normalize_token_text(text) or text)
        ids.append(canonical.setdefault(key, len(canonical)))
    return ids


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



@torch.compiler.disable  # an eager region under torch.compile: inductor cannot build sparse grads
def lookup(table: nn.Embedding, idx: Tensor) -> Tensor:
    """table(idx) (its grad is sparse with `sparse_grad`, so it always runs eagerly)."""
    return table(idx)


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


@dataclass
class EngramState:
    """One Engram layer's history during cached generation: the token ids and conv inputs seen so
    far, per sequence ([B, t] and [B, t, dim]). Kept whole so that it follows the KV cache exactly
    under beam reordering, batch selection and cropping."""

    ids: Tensor | None = None
    conv: Tensor | None = None

    def extend(self, ids: Tensor, conv: Tensor) -> None:
        self.ids = ids if self.ids is None else torch.cat((self.ids, ids), 1)
        self.conv = conv if self.conv is None else torch.cat((self.conv, conv), 1)

    def select(self, index: Tensor) -> None:
        if self.ids is not None:
            self.ids, self.conv = self.ids[index], self.conv[index]

    def repeat_interleave(self, repeats: int) -> None:
        if self.ids is not None:
            self.ids, self.conv = self.ids.repeat_interleave(repeats, 0), self.conv.repeat_interleave(repeats, 0)

    def crop(self, tokens_to_remove: int) -> None:
        if self.ids is not None and tokens_to_remove:
            self.ids, self.conv = self.ids[:, : -abs(tokens_to_remove)], self.conv[:, : -abs(tokens_to_remove)]


class Engram(SparseModule):
    """Hashed n-gram memory with a context gate (DeepSeek Engram, 2026).

    Per token t, with e_t the concatenation of all heads' rows (len(orders) * dim_per_order):
        k = RMSNorm(W_K e),  q = RMSNorm(h),  s = <k, q> / sqrt(dim)
        alpha = sigmoid(sign(s) * sqrt(max(|s|, 1e-6)))    # differentiable signed sqrt
        v = alpha * W_V e,   y = v + SiLU(CausalDepthwiseConv(RMSNorm(v)))
    The caller adds y to the layer input. `multipliers` are the layer's hash multipliers
    (`draw_multipliers`), `token_map` the optional compressed-token map.
    """

    def __init__(self, dim: int, spec: EngramSpec, multipliers: Sequence[int], pad_id: int = 0,
                 token_map: Sequence[int] | None = None, norm_eps: float = 1e-5):
        super().__init__()
        check_min("dim", dim, 1)
        orders = tuple(spec.orders)
        if len(multipliers) < max(orders):
            raise ConfigError(f"engram multipliers: need {max(orders)}, got {len(multipliers)}")
        self.dim, self.orders, self.pad_id = dim, orders, pad_id
        self.heads_per_order, self.dim_per_order, self.table_rows = spec.heads_per_order, spec.dim_per_order, spec.table_rows
        self.num_heads = len(orders) * spec.heads_per_order
        self.head_dim = spec.dim_per_order // spec.heads_per_order
        self.sparse_grad, self.init = spec.sparse_grad, spec.init

        # Head j hashes order orders[j // heads_per_order] into rows offsets[j] .. offsets[j] + primes[j] - 1.
        # The hash buffers are derived (from the config), so they are not saved with the weights.
        self.primes_list = distinct_primes(spec.table_rows, self.num_heads)
        self._multipliers = list(multipliers)
        self._token_map = None if token_map is None else [int(i) for i in token_map]
        self.register_buffer("multipliers", torch.empty(len(multipliers), dtype=torch.long), persistent=False)
        self.register_buffer("primes", torch.empty(self.num_heads, dtype=torch.long), persistent=False)
        self.register_buffer("offsets", torch.empty(self.num_heads, dtype=torch.long), persistent=False)
        self.register_buffer("token_map", None if token_map is None else torch.empty(len(token_map), dtype=torch.long),
                             persistent=False)

        # nn.Embedding(sparse=...) so that DistributedDataParallel knows its grads are sparse.
        self.table = nn.Embedding(sum(self.primes_list), self.head_dim, sparse=spec.sparse_grad,
                                  dtype=TABLE_DTYPES[spec.table_dtype])
        e_dim = len(orders) * spec.dim_per_order
        self.key_proj = nn.Linear(e_dim, dim, bias=False)
        self.value_proj = nn.Linear(e_dim, dim, bias=False)
        self.norm_k = nn.RMSNorm(dim, eps=norm_eps)
        self.norm_q = nn.RMSNorm(dim, eps=norm_eps)
        self.norm_v = nn.RMSNorm(dim, eps=norm_eps)
        self.conv_pad = (spec.conv_kernel - 1) * max(orders)
        self.conv = nn.Conv1d(dim, dim, spec.conv_kernel, groups=dim, dilation=max(orders), bias=False)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Init weights (y == 0 exactly, unless `init` is default: every layer's own init) and fill the
        hash buffers."""
        self.key_proj.reset_parameters()
        if self.init == "default":  # nn.Embedding's N(0, 1) rows, nn.Linear's and nn.Conv1d's uniform
            for layer in (self.table, self.value_proj, self.conv):
                layer.reset_parameters()
        else:
            nn.init.normal_(self.table.weight, std=0.02)
            nn.init.zeros_(self.value_proj.weight)
            nn.init.zeros_(self.conv.weight)
        for norm in (self.norm_k, self.norm_q, self.norm_v):
            norm.reset_parameters()
        self.reset_buffers()

    @torch.no_grad()
    def reset_buffers(self) -> None:
        """Refill the derived hash buffers (after `to_empty` or a meta-device load)."""
        primes = torch.tensor(self.primes_list, dtype=torch.long)
        self.multipliers.copy_(torch.tensor(self._multipliers, dtype=torch.long))
        self.primes.copy_(primes)
        self.offsets.copy_(torch.cumsum(primes, 0) - primes)
        if self.token_map is not None:
            self.token_map.copy_(torch.tensor(self._token_map, dtype=torch.long))

    def rows_per_token(self) -> tuple[int, bool]:
        """(table rows one token touches, whether the table gradient is coalesced): one per hash head,
        nn.Embedding's uncoalesced gradient (tsparse.plan)."""
        return self.num_heads, False

    def saved_bytes(self, block: int, grad_input: bool) -> tuple[int, int]:
        """(bytes per token, bytes per step) autograd saves for this module in a training forward (tsparse.plan)."""
        e_dim = len(self.orders) * self.dim_per_order
        return 4 * (e_dim + 10 * self.dim + self.dim * (block + self.conv_pad) // block) + 8 * self.num_heads, 0

    def new_state(self) -> EngramState:
        """An empty generation history (TsparseCache keeps one per Engram layer)."""
        return EngramState()

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

    def forward(self, hidden: Tensor, input_ids: Tensor, return_gate: bool = False,
                state: EngramState | None = None) -> Tensor | tuple[Tensor, Tensor]:
        """Returns y [B, T, dim] to ADD to the layer input (and the gate alpha [B, T] if return_gate).

        With a `state` (cached generation) the T new tokens are hashed and convolved after the
        history it holds, exactly as inside the full sequence, and the history is extended.
        """
        B, T, _ = hidden.shape
        past_ids = state.ids[:, -(max(self.orders) - 1):] if state is not None and state.ids is not None else None
        ids = input_ids if past_ids is None else torch.cat((past_ids, input_ids), 1)
        idx = self.hash_indices(ids)[:, -T:]
        rows = lookup(self.table, idx) if self.shards is None else sharded_lookup(idx, self.table.weight, self.shards)
        e = rows.to(self.key_proj.weight.dtype).reshape(B, T, -1)  # [B, T, orders*dim_per_order]

        k, q = self.norm_k(self.key_proj(e)), self.norm_q(hidden)
        s = (k * q).sum(-1) / math.sqrt(self.dim)
        alpha = torch.sigmoid(torch.sign(s) * torch.sqrt(s.abs().clamp_min(_GATE_SQRT_FLOOR)))

        v = alpha.unsqueeze(-1) * self.value_proj(e)
        conv_in = self.norm_v(v)
        past_conv = state.conv[:, -self.conv_pad:] if state is not None and state.conv is not None and self.conv_pad else None
        if state is not None:
            state.extend(input_ids, conv_in)
        if past_conv is not None:
            conv_in = torch.cat((past_conv.to(conv_in.dtype), conv_in), 1)
        conv_in = F.pad(conv_in.transpose(1, 2), (self.conv_pad - (conv_in.shape[1] - T), 0))  # causal: left pad only
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
            f"dim={self.dim}, orders={self.orders}, "
            f"heads_per_order={self.heads_per_order}, head_dim={self.head_dim}, "
            f"primes={self.primes_list[0]}..{self.primes_list[-1]}, sparse_grad={self.sparse_grad}"
        )
