"""One optimizer for dense and sparse (table) gradients, and sparse-aware gradient clipping.

Dense gradients get AdamW. Sparse gradients (PEER/Engram tables built with `sparse_grad=True`) get
row-wise AdaGrad: one second-moment scalar per row and only the touched rows are read or written, so
a step costs the same for 16K or 803K rows and the state is ~1/dim of the table.
"""
from __future__ import annotations

import math
from typing import Iterable

import torch
from torch import Tensor
from torch.optim import Optimizer


class SparseAwareAdamW(Optimizer):
    """AdamW on dense grads; row-wise AdaGrad (lr * table_lr_scale, no weight decay) on sparse grads.

    Param groups carry a `name` (engram, peer, mhc, base) so LR monitors and phase schedules see them.
    Weight decay applies to dense matrices only (ndim >= 2), never to norms, biases or tables.
    """

    def __init__(self, params, lr: float = 1e-3, betas=(0.9, 0.95), eps: float = 1e-8,
                 weight_decay: float = 0.0, table_lr_scale: float = 1.0, table_eps: float = 1e-10):
        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay,
                        table_lr_scale=table_lr_scale, table_eps=table_eps)
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    self._rowwise_adagrad(p, group)
                else:
                    self._adamw(p, group)
        return loss

    def _adamw(self, p: Tensor, group: dict) -> None:
        state = self.state[p]
        if not state:
            state["step"] = 0
            state["exp_avg"] = torch.zeros_like(p, dtype=torch.float32)
            state["exp_avg_sq"] = torch.zeros_like(p, dtype=torch.float32)
        state["step"] += 1
        (beta1, beta2), lr, step = group["betas"], group["lr"], state["step"]
        grad = p.grad.float()
        state["exp_avg"].lerp_(grad, 1 - beta1)
        state["exp_avg_sq"].mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
        denom = (state["exp_avg_sq"] / (1 - beta2**step)).sqrt_().add_(group["eps"])
        update = state["exp_avg"] / denom * (lr / (1 - beta1**step))
        if group["weight_decay"] and p.ndim >= 2:
            update.add_(p.float(), alpha=lr * group["weight_decay"])
        p.sub_(update.to(p.dtype))

    def _rowwise_adagrad(self, p: Tensor, group: dict) -> None:
        state = self.state[p]
        if not state:
            state["row_sq_sum"] = torch.zeros(p.shape[0], dtype=torch.float32, device=p.device)
        grad = p.grad.coalesce()
        rows, values = grad.indices()[0], grad.values().float()
        sq = state["row_sq_sum"].index_add_(0, rows, values.pow(2).mean(dim=1))[rows]
        step = values / (sq.sqrt() + group["table_eps"]).unsqueeze(1)
        lr = group["lr"] * group["table_lr_scale"]
        p.index_add_(0, rows, (-lr * step).to(p.dtype))


def grad_norm_and_clip_(params: Iterable[Tensor], max_norm: float) -> Tensor:
    """Global L2 norm over dense and sparse grads (coalesced in place); scales them to `max_norm` if > 0.

    Returns the norm before clipping (non-finite if any grad is non-finite).
    """
    grads = []
    for p in params:
        if p.grad is None:
            continue
        if p.grad.is_sparse:
            p.grad = p.grad.coalesce()
            grads.append(p.grad.values())
        else:
            grads.append(p.grad)
    if not grads:
        return torch.zeros(())
    total = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g.float()) for g in grads]))
    if max_norm > 0 and math.isfinite(total.item()):
        scale = (max_norm / (total + 1e-6)).clamp(max=1.0)
        for g in grads:
            g.mul_(scale.to(g.dtype))
    return total
