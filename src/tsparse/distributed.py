"""Data parallel with row-sparse tables through dense collectives only (all NCCL has).

DDP's reducer averages the dense gradients. The PEER/Engram tables with sparse gradients are kept out
of it (`_ddp_params_and_buffers_to_ignore`): `average_row_sparse_grads_` exchanges each table's touched
rows with dense all-gathers of row indices and row values, padded to the largest row count, sums them
on every rank in rank order and divides by the world size, as DDP averages. Each rank receives, per
table and step, world size x padded rows x (dim values + one int64 index), whatever the table's size.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor, nn

from tsparse.optim import coalesced
from tsparse.registry import params_by_group


def row_sparse_tables(model: nn.Module) -> dict[str, nn.Parameter]:
    """The table parameters (PEER experts, Engram hash tables) whose gradients are row-sparse, by name:
    those of an `nn.Embedding(sparse=True)`."""
    return {name: p for group, named in params_by_group(model).items() if group.endswith("_table")
            for name, p in named if getattr(model.get_submodule(name.rpartition(".")[0]), "sparse", False)}


def all_gather(tensor: Tensor) -> Tensor:
    """The dense `tensor` of every rank, stacked in rank order."""
    out = [torch.empty_like(tensor) for _ in range(dist.get_world_size())]
    dist.all_gather(out, tensor.contiguous())
    return torch.stack(out)


@torch.no_grad()
def broadcast_(params: list[nn.Parameter], src: int = 0) -> None:
    """Copy rank `src`'s values of `params` to every rank (DDP does so for the parameters it manages)."""
    for p in params:
        dist.broadcast(p.data, src)


@torch.no_grad()
def average_row_sparse_grads_(params: list[nn.Parameter]) -> None:
    """Replace each param's row-sparse grad (or None: no rows) by its average over ranks, through dense
    all-gathers only; every rank ends with the same coalesced grad (None where no rank touched a row).
    Every rank must pass the same params in the same order."""
    if not params:
        return
    world = dist.get_world_size()
    grads = [None if p.grad is None else coalesced(p.grad) for p in params]
    local_counts = torch.tensor([0 if g is None else g._nnz() for g in grads], device=params[0].device)
    counts = all_gather(local_counts)  # [world, params]
    for p, grad, count in zip(params, grads, counts.unbind(1)):
        padded = int(count.max())
        if padded == 0:
            p.grad = None
            continue
        rows = torch.zeros(padded, dtype=torch.long, device=p.device)
        values = torch.zeros(padded, *p.shape[1:], dtype=p.dtype, device=p.device)
        if grad is not None:
            rows[: grad._nnz()] = grad._indices()[0]
            values[: grad._nnz()] = grad._values()
        real = torch.arange(padded, device=p.device) < count.unsqueeze(1)  # [world, padded]
        # Rows come from the ranks' own grads, so they are in range: no invariant checks.
        summed = torch.sparse_coo_tensor(all_gather(rows)[real].unsqueeze(0), all_gather(values)[real].float(),
                                         p.shape, check_invariants=False).coalesce()
        p.grad = torch.sparse_coo_tensor(summed.indices(), summed.values().div_(world).to(p.dtype), p.shape,
                                         is_coalesced=True, check_invariants=False)


def shard_(model: nn.Module, mesh, tables: list[nn.Parameter]) -> list[nn.Parameter]:
    """FSDP2: shard each decoder layer and the rest of `model` over `mesh`. The row-sparse `tables` (FSDP
    has no sparse gradients) and the scalar params (mHC's gains; fully_shard refuses 0-d params) stay whole
    on every rank; returns the scalars, whose grads `average_dense_grads_` must average."""
    from torch.distributed.fsdp import fully_shard
    scalars = [p for p in model.parameters() if p.ndim == 0]
    ignored = set(tables) | set(scalars)
    for layer in model.model.layers:
        fully_shard(layer, mesh=mesh, ignored_params=ignored)
    fully_shard(model, mesh=mesh, ignored_params=ignored)
    return scalars


@torch.no_grad()
def average_dense_grads_(params: list[nn.Parameter]) -> None:
    """Average the dense grads of `params` over ranks with one all-reduce (None stays None). Every rank
    must pass the same params in the same order."""
    if not params:
        return
    flat = torch.cat([torch.zeros(p.numel(), device=p.device) if p.grad is None else p.grad.detach().float().reshape(-1)
                      for p in params])
    dist.all_reduce(flat)
    flat /= dist.get_world_size()
    for p, value in zip(params, flat.split([p.numel() for p in params])):
        if p.grad is not None:
            p.grad.copy_(value.view_as(p.grad))
