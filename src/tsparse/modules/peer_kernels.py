"""Fused PEER autograd functions: sub-key top-k with a sparse backward, and the expert mix.

Both work in token chunks whose temporaries stay under `CHUNK_BYTES` (glibc maps blocks over 32 MB
afresh, so large fresh temporaries cost more than the arithmetic), never build a dense gradient over
all sub-keys, and the expert mix returns table gradients already coalesced (one sort of the indices).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

CHUNK_BYTES = 8 << 20


def token_chunks(tokens: int, bytes_per_token: int) -> list[slice]:
    """Slices of at most CHUNK_BYTES // bytes_per_token tokens (at least one)."""
    step = max(1, CHUNK_BYTES // max(1, bytes_per_token))
    return [slice(i, min(i + step, tokens)) for i in range(0, tokens, step)]


def gathered(table: Tensor, idx: Tensor):
    """(token slice, fp32 rows table[idx[slice]] [C, n, d]) over token chunks of idx [M, n]."""
    for c in token_chunks(len(idx), idx.shape[1] * table.shape[1] * 4):
        yield c, table.index_select(0, idx[c].reshape(-1)).float().view(*idx[c].shape, -1)


def row_dots(table: Tensor, idx: Tensor, y: Tensor) -> Tensor:
    """table[idx[m, j]] . y[m] in fp32: idx [M, n], y [M, d] -> [M, n]."""
    out = y.new_empty(idx.shape)
    for c, rows in gathered(table, idx):
        out[c] = torch.bmm(y[c, None, :], rows.transpose(1, 2))[:, 0]
    return out


def weighted_rows(table: Tensor, idx: Tensor, w: Tensor) -> Tensor:
    """sum_j w[m, j] * table[idx[m, j]] in fp32: idx, w [M, n] -> [M, d]."""
    if table.dtype == torch.float32:
        return F.embedding_bag(idx, table, mode="sum", per_sample_weights=w)
    out = w.new_empty(len(idx), table.shape[1])
    for c, rows in gathered(table, idx):
        out[c] = torch.bmm(w[c, None, :], rows)[:, 0]
    return out


def sorted_bags(idx: Tensor, num_rows: int | None = None) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """One sort of idx [M, n]: (rows, order, offsets, src) for embedding-bag reductions by row.

    rows are the distinct indices (sorted), or all num_rows when given (then empty bags give zeros);
    bag r sums the entries order[offsets[r]:offsets[r + 1]], which come from source row src = order // n.
    """
    flat, order = idx.reshape(-1).sort()
    if num_rows is None:
        rows, counts = torch.unique_consecutive(flat, return_counts=True)
    else:
        # index_add, not bincount: a static output shape, so torch.compile traces it
        rows, counts = None, torch.zeros(num_rows, dtype=flat.dtype, device=flat.device).index_add_(0, flat, torch.ones_like(flat))
    offsets = torch.cumsum(counts, 0) - counts
    return rows, order, offsets, order // idx.shape[1]


class SubKeyTopK(torch.autograd.Function):
    """q [M, h, 2, dk], keys [h, S, 2, dk] -> the top-k sub-key scores and indices, both [M, h, 2, k].

    The backward touches only the k selected sub-keys per (token, head, half): the query grad is an
    embedding bag of sub-key rows weighted by the score grads, the key grad one of query rows (one
    bag per sub-key, after one sort of the selected indices).
    """

    @staticmethod
    def forward(ctx, q: Tensor, keys: Tensor, k: int):
        m, h, _, dk = q.shape
        side = keys.shape[1]
        qt = q.reshape(m, 2 * h, dk).transpose(0, 1)                     # [2h, M, dk]
        kt = keys.permute(0, 2, 3, 1).reshape(2 * h, dk, side)          # [2h, dk, S]
        vals, idx = q.new_empty(2 * h, m, k), torch.empty(2 * h, m, k, dtype=torch.long, device=q.device)
        for c in token_chunks(m, 2 * h * side * q.element_size()):
            vals[:, c], idx[:, c] = torch.bmm(qt[:, c], kt).topk(k, dim=-1, sorted=False)  # the final top-k sorts
        vals, idx = (t.transpose(0, 1).reshape(m, h, 2, k).contiguous() for t in (vals, idx))
        ctx.save_for_backward(q, keys, idx)
        ctx.mark_non_differentiable(idx)
        return vals, idx

    @staticmethod
    def backward(ctx, grad_vals: Tensor, _):
        q, keys, idx = ctx.saved_tensors
        m, h, _, dk = q.shape
        side, k = keys.shape[1], idx.shape[-1]
        # Row (head, half, sub-key) of the flattened [2h*S, dk] sub-key table; bags of k per (token, head, half).
        flat = (idx + torch.arange(2 * h, device=idx.device).view(h, 2, 1) * side).view(-1, k)
        grad_vals = grad_vals.reshape(-1, k)
        grad_q = grad_keys = None
        if ctx.needs_input_grad[0]:
            keys_flat = keys.permute(0, 2, 1, 3).reshape(2 * h * side, dk)
            grad_q = F.embedding_bag(flat, keys_flat, mode="sum", per_sample_weights=grad_vals).view_as(q)
        if ctx.needs_input_grad[1]:
            _, order, offsets, src = sorted_bags(flat, 2 * h * side)
            grad_keys = F.embedding_bag(src, q.reshape(-1, dk), offsets, mode="sum",
                                        per_sample_weights=grad_vals.reshape(-1)[order])
            grad_keys = grad_keys.view(h, 2, side, dk).transpose(1, 2)
        return grad_q, grad_keys, None


class ExpertMix(torch.autograd.Function):
    """sum_n gate[m, n] * GELU(u[idx[m, n]] . x[m]) * v[idx[m, n]]: x [M, d] fp32, idx and gate [M, n].

    `down`/`up` are the N x d tables (any float dtype, math in fp32). Their grads are sparse COO over
    the touched rows, sorted and distinct (coalesced), when `sparse`, else dense, in the table dtype.
    """

    @staticmethod
    def forward(ctx, x: Tensor, idx: Tensor, gate: Tensor, down: Tensor, up: Tensor, sparse: bool):
        pre = row_dots(down, idx, x)
        out = weighted_rows(up, idx, F.gelu(pre) * gate)
        ctx.save_for_backward(x, idx, gate, pre, down, up)
        ctx.sparse = sparse
        return out

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        x, idx, gate, pre, down, up = ctx.saved_tensors
        grad_out = grad_out.contiguous()
        grad_act = row_dots(up, idx, grad_out)
        gelu = F.gelu(pre)
        grad_pre = torch.ops.aten.gelu_backward(grad_act * gate, pre)
        grad_x = weighted_rows(down, idx, grad_pre) if ctx.needs_input_grad[0] else None
        grad_down = grad_up = None
        if ctx.needs_input_grad[3] or ctx.needs_input_grad[4]:
            bags = sorted_bags(idx)
            grad_down = table_grad(down, bags, x, grad_pre, ctx.sparse) if ctx.needs_input_grad[3] else None
            grad_up = table_grad(up, bags, grad_out, gelu * gate, ctx.sparse) if ctx.needs_input_grad[4] else None
        return grad_x, None, grad_act * gelu, grad_down, grad_up, None


@torch.compiler.disable  # an eager region under torch.compile: inductor cannot build sparse grads
def mix_experts(x: Tensor, idx: Tensor, gate: Tensor, down: Tensor, up: Tensor, sparse: bool) -> Tensor:
    """`ExpertMix` (its table grads are sparse, so it always runs eagerly)."""
    return ExpertMix.apply(x, idx, gate, down, up, sparse)


def table_grad(table: Tensor, bags: tuple, source: Tensor, weights: Tensor, sparse: bool) -> Tensor:
    """Grad rows sum_(m, j: idx = r) weights[m, j] * source[m] over the touched rows r (`sorted_bags`),
    as a sparse COO tensor that is coalesced by construction, or dense; in the table's dtype."""
    rows, order, offsets, src = bags
    values = F.embedding_bag(src, source, offsets, mode="sum", per_sample_weights=weights.reshape(-1)[order])
    values = values.to(table.dtype)
    if sparse:
        return torch.sparse_coo_tensor(rows[None], values, table.shape, is_coalesced=True, check_invariants=False)
    return torch.zeros_like(table).index_put_((rows,), values)
