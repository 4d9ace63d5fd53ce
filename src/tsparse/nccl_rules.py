"""NCCL's rules on CPU: a process group that runs its collectives on gloo but, like stock NCCL
(`ProcessGroupNCCL::allreduce_sparse` raises), refuses every sparse tensor. `trainer=ddp_nccl_rules`
and `trainer=fsdp2_nccl_rules` run on it, so that CPU tests prove that a multi-rank run needs only
collectives NCCL has."""
from __future__ import annotations

from datetime import timedelta
from functools import partialmethod
from typing import Iterator

import torch
import torch.distributed as dist
from lightning.pytorch.strategies import DDPStrategy, ModelParallelStrategy

BACKEND = "nccl_rules"


class SparseCollectiveError(RuntimeError):
    """A sparse tensor was handed to a collective of the NCCL-rules process group."""


def tensors_in(args) -> Iterator[torch.Tensor]:
    """The tensors among a collective's arguments (in nested lists; options and ranks are skipped)."""
    for arg in args:
        if isinstance(arg, (list, tuple)):
            yield from tensors_in(arg)
        elif isinstance(arg, torch.Tensor):
            yield arg


def refuse_sparse(collective: str, *args) -> None:
    """Raise if any tensor among `args` is not dense, as NCCL has no sparse collectives."""
    for t in tensors_in(args):
        if t.layout != torch.strided:
            raise SparseCollectiveError(f"{collective} got a {t.layout} tensor; NCCL has no sparse collectives")


class NCCLRulesProcessGroup(dist.ProcessGroup):
    """Every collective that DDP, FSDP2 (`dist.*_single`, DTensor's functional collectives), Lightning and
    tsparse use, forwarded to a gloo group (`FORWARDED`); sparse input raises. `calls` counts them and
    `tensor_bytes` the bytes of the tensors handed to each (inputs and outputs).

    The gloo group is also registered as this group's CPU backend, because c10d keeps a group's name
    (which DeviceMesh and functional collectives look groups up by) in its backend."""

    def __init__(self, store: dist.Store, rank: int, size: int, timeout: timedelta):
        super().__init__(rank, size)
        self.gloo = dist.ProcessGroupGloo(store, rank, size, timeout)
        self._register_backend(torch.device("cpu"), dist.ProcessGroup.BackendType.CUSTOM, self.gloo)
        self.calls: dict[str, int] = {}
        self.tensor_bytes: dict[str, int] = {}

    def run_on_gloo(self, collective: str, *args):
        """Run `collective` on gloo (`FORWARDED` names its gloo method) after refusing sparse tensors."""
        refuse_sparse(collective, *args)
        self.calls[collective] = self.calls.get(collective, 0) + 1
        self.tensor_bytes[collective] = self.tensor_bytes.get(collective, 0) + sum(
            t.numel() * t.element_size() for t in tensors_in(args))
        return getattr(self.gloo, FORWARDED[collective])(*args)

    def run_pairs_on_gloo(self, collective: str, outputs, inputs, opts):
        """One gloo call per (output, input) pair; returns the last one's work, the others waited on."""
        works = [self.run_on_gloo(collective, out, inp, opts) for out, inp in zip(outputs, inputs)]
        for work in works[:-1]:
            work.wait()
        return works[-1]

    def barrier(self, opts):
        return self.gloo.barrier(opts)

    def getBackendName(self) -> str:
        return BACKEND


# Collectives taking (outputs, inputs, opts) lists -> the gloo method run on each pair.
COALESCED = {"allgather_into_tensor_coalesced": "_allgather_base", "reduce_scatter_tensor_coalesced": "_reduce_scatter_base"}
# This group's collective -> the gloo method that runs it.
FORWARDED = {**{name: name for name in ("allreduce", "allreduce_coalesced", "broadcast", "allgather", "allgather_coalesced",
                                        "_allgather_base", "reduce_scatter", "_reduce_scatter_base", "reduce", "gather",
                                        "scatter", "alltoall", "alltoall_base")},
             "all_gather_single": "_allgather_base", "reduce_scatter_single": "_reduce_scatter_base", **COALESCED}
for _name in FORWARDED:
    setattr(NCCLRulesProcessGroup, _name,
            partialmethod(NCCLRulesProcessGroup.run_pairs_on_gloo if _name in COALESCED else NCCLRulesProcessGroup.run_on_gloo,
                          _name))


def register() -> None:
    """Make `init_process_group("nccl_rules")` available in this process (idempotent)."""
    if not hasattr(dist.Backend, BACKEND.upper()):
        dist.Backend.register_backend(BACKEND, NCCLRulesProcessGroup, devices=["cpu"])


def ddp_strategy(**kwargs) -> DDPStrategy:
    """Lightning's DDP on the NCCL-rules process group (what `conf/trainer/ddp_nccl_rules.yaml` builds)."""
    register()
    return DDPStrategy(process_group_backend=BACKEND, **kwargs)


def fsdp2_strategy(**kwargs) -> ModelParallelStrategy:
    """Lightning's FSDP2 (ModelParallelStrategy) on the NCCL-rules process group (`trainer=fsdp2_nccl_rules`)."""
    register()
    return ModelParallelStrategy(process_group_backend=BACKEND, **kwargs)
