"""NCCL's rules on CPU: a process group that runs its collectives on gloo but, like stock NCCL
(`ProcessGroupNCCL::allreduce_sparse` raises), refuses every sparse tensor. `trainer=ddp_nccl_rules`
runs DDP on it, so that CPU tests prove that a multi-rank run needs only collectives NCCL has."""
from __future__ import annotations

from datetime import timedelta

import torch
import torch.distributed as dist
from lightning.pytorch.strategies import DDPStrategy

BACKEND = "nccl_rules"


class SparseCollectiveError(RuntimeError):
    """A sparse tensor was handed to a collective of the NCCL-rules process group."""


def refuse_sparse(collective: str, *tensors) -> None:
    """Raise if any tensor (in nested lists) is not dense, as NCCL has no sparse collectives."""
    for t in tensors:
        if isinstance(t, (list, tuple)):
            refuse_sparse(collective, *t)
        elif t.layout != torch.strided:
            raise SparseCollectiveError(f"{collective} got a {t.layout} tensor; NCCL has no sparse collectives")


class NCCLRulesProcessGroup(dist.ProcessGroup):
    """The dense collectives DDP, Lightning and tsparse use, forwarded to a gloo group; sparse input raises."""

    def __init__(self, store: dist.Store, rank: int, size: int, timeout: timedelta):
        super().__init__(rank, size)
        self.gloo = dist.ProcessGroupGloo(store, rank, size, timeout)

    def allreduce(self, tensors, opts):
        refuse_sparse("allreduce", tensors)
        return self.gloo.allreduce(tensors, opts)

    def broadcast(self, tensors, opts):
        refuse_sparse("broadcast", tensors)
        return self.gloo.broadcast(tensors, opts)

    def allgather(self, output_tensors, input_tensors, opts):
        refuse_sparse("allgather", output_tensors, input_tensors)
        return self.gloo.allgather(output_tensors, input_tensors, opts)

    def barrier(self, opts):
        return self.gloo.barrier(opts)

    def getBackendName(self) -> str:
        return BACKEND


def register() -> None:
    """Make `init_process_group("nccl_rules")` available in this process (idempotent)."""
    if not hasattr(dist.Backend, BACKEND.upper()):
        dist.Backend.register_backend(BACKEND, NCCLRulesProcessGroup, devices=["cpu"])


def ddp_strategy(**kwargs) -> DDPStrategy:
    """Lightning's DDP on the NCCL-rules process group (what `conf/trainer/ddp_nccl_rules.yaml` builds)."""
    register()
    return DDPStrategy(process_group_backend=BACKEND, **kwargs)
