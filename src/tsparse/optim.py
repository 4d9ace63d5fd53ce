"""One optimizer for dense and sparse (table) gradients, and sparse-aware gradient clipping.

Dense gradients get AdamW through torch's fused kernel. Sparse gradients (PEER/Engram tables built
with `sparse_grad=True`) get row-wise AdaGrad: one second-moment scalar per row and only the touched
rows are read or written, so a step costs the same for 16K or 803K rows and the state is ~1/dim of
the table.
"""
from __future__ import annotations

import math
from typing import Iterable

import torch
from torch import Tensor
from torch.distributed.tensor import DTensor
from torch.optim import Optimizer
from torch.optim.adamw import adamw


class SparseAwareAdamW(Optimizer):
    """AdamW on dense grads (torch's fused kernel); row-wise AdaGrad (group lr, no decay) on sparse grads.

    Param groups carry a `name` (engram, peer, mhc, base, ...) so LR monitors and phase schedules see
    them; change `group["lr"]` between steps. Weight decay applies to dense matrices only (ndim >= 2),
    never to norms or biases. The math is fp32: a non-fp32 param with a dense grad keeps an fp32
    master copy in its state (bf16 would round small updates away), written back after each step.
    """

    def __init__(self, params, lr: float = 1e-3, betas=(0.9, 0.95), eps: float = 1e-8,
                 weight_decay: float = 0.0, table_eps: float = 1e-10):
        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay, table_eps=table_eps)
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            dense = {True: [], False: []}  # decayed or not -> params with a dense grad
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    self._rowwise_adagrad(p, group)
                else:
                    dense[bool(group["weight_decay"]) and p.ndim >= 2].append(p)
            for decay, params in dense.items():
                if params:
                    self._adamw(params, group, group["weight_decay"] if decay else 0.0)
        return loss

    def _adamw(self, params: list[Tensor], group: dict, weight_decay: float) -> None:
        """One call of torch's fused (CPU/CUDA) or foreach AdamW over fp32 weights, grads and moments."""
        weights, grads, exp_avgs, exp_avg_sqs, steps = [], [], [], [], []
        for p in params:
            state = self.state[p]
            if not state:
                state["step"] = torch.zeros((), dtype=torch.float32, device=p.device)
                state["exp_avg"] = torch.zeros_like(p, dtype=torch.float32, memory_format=torch.preserve_format)
                state["exp_avg_sq"] = torch.zeros_like(state["exp_avg"])
                if p.dtype != torch.float32:
                    state["master"] = p.detach().float()
            weights.append(state.get("master", p))
            grads.append(p.grad if p.grad.dtype == torch.float32 else p.grad.float())
            exp_avgs.append(state["exp_avg"])
            exp_avg_sqs.append(state["exp_avg_sq"])
            steps.append(state["step"])
        fused = all(p.device.type in ("cpu", "cuda") for p in params)
        beta1, beta2 = group["betas"]
        adamw(weights, grads, exp_avgs, exp_avg_sqs, [], steps, foreach=not fused, fused=fused, amsgrad=False,
              beta1=beta1, beta2=beta2, lr=group["lr"], weight_decay=weight_decay, eps=group["eps"], maximize=False)
        for p in params:
            if "master" in self.state[p]:
                p.copy_(self.state[p]["master"])

    def _rowwise_adagrad(self, p: Tensor, group: dict) -> None:
        state = self.state[p]
        if not state:
            state["row_sq_sum"] = torch.zeros(p.shape[0], dtype=torch.float32, device=p.device)
        grad = p.grad = coalesced(p.grad)
        rows, values = grad.indices()[0], grad.values()
        mean_sq = torch.linalg.vector_norm(values, dim=1, dtype=torch.float32).square_().div_(values.shape[1])
        sq = state["row_sq_sum"].index_add_(0, rows, mean_sq)[rows]
        scale = sq.sqrt_().add_(group["table_eps"]).reciprocal_().mul_(-group["lr"])  # -lr / (sqrt(G) + eps)
        p.index_add_(0, rows, (values * scale.unsqueeze(1)).to(p.dtype))  # fp32 product, one rounding

    def load_state_dict(self, state_dict: dict) -> None:
        """torch casts loaded state to each param's dtype; keep the fp32 moments and masters of bf16 params fp32."""
        super().load_state_dict(state_dict)
        saved = [i for g in state_dict["param_groups"] for i in g["params"]]
        params = [p for g in self.param_groups for p in g["params"]]
        for i, p in zip(saved, params):
            for key, value in state_dict["state"].get(i, {}).items():
                if torch.is_tensor(value) and value.dtype == torch.float32 and key != "step":
                    self.state[p][key] = value.to(p.device, copy=True)


def coalesced(grad: Tensor) -> Tensor:
    """A sparse grad, coalesced, its repeated rows summed in fp32. Sorted distinct rows (PEER's fused grads)
    are only flagged as such: torch's AccumulateGrad drops the coalesced flag of the grad it stores; checking
    the rows is cheap. torch coalesces bf16 values in bf16, where a sum stalls (256 + 1 == 256), so
    low-precision grads are summed in fp32 and rounded once."""
    if grad.is_coalesced():
        return grad
    rows = grad._indices()
    if grad.sparse_dim() == 1 and bool((rows[0, 1:] > rows[0, :-1]).all()):
        return grad._coalesced_(True)
    if grad.dtype in (torch.bfloat16, torch.float16):
        return grad.float().coalesce().to(grad.dtype)
    return grad.coalesce()


def full(t: Tensor) -> Tensor:
    """A plain tensor: the whole value of a DTensor (FSDP2's sharded grads and their norms), else `t`."""
    return t.full_tensor() if isinstance(t, DTensor) else t


def local(t: Tensor) -> Tensor:
    """This rank's shard of a DTensor, else `t`: what an in-place scaling may touch."""
    return t.to_local() if isinstance(t, DTensor) else t


def grad_norm_and_clip_(params: Iterable[Tensor], max_norm: float, sharded: Iterable[Tensor] = (),
                        group=None) -> Tensor:
    """Global L2 norm over dense and sparse grads (coalesced in place); scales them to `max_norm` if > 0.
    `sharded`: params holding one rank's rows of a table (`tables=sharded`), whose squared norms are summed
    over the ranks of `group` (one all-reduce; every rank of it must call this).

    Returns the norm before clipping (non-finite if any grad is non-finite).
    """
    sharded_ids = {id(p) for p in sharded}
    grads, norms, sharded_sq = [], [], torch.zeros(())
    for p in params:
        if p.grad is None:
            continue
        if p.grad.is_sparse:
            p.grad = coalesced(p.grad)
        grads.append(p.grad.values() if p.grad.is_sparse else p.grad)
        norm = full(torch.linalg.vector_norm(grads[-1], dtype=torch.float32))
        if id(p) in sharded_ids:
            sharded_sq += norm.square()
        else:
            norms.append(norm)
    total = torch.linalg.vector_norm(torch.stack(norms)) if norms else torch.zeros(())
    if group is not None:
        torch.distributed.all_reduce(sharded_sq, group=group)
        total = (total.square() + sharded_sq).sqrt()
    if max_norm > 0 and math.isfinite(total.item()):
        scale = (max_norm / (total + 1e-6)).clamp(max=1.0)
        for g in grads:
            local(g).mul_(scale.to(g.dtype))
    return total
