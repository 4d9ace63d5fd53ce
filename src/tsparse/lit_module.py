"""LightningModule wrapping a (possibly augmented) causal LM: loss, perplexities, sparse-aware optimization."""
from __future__ import annotations

import math
from functools import partial
from pathlib import Path
from typing import Callable

import lightning as L
from lightning.pytorch.strategies import ModelParallelStrategy
from lightning.pytorch.utilities import rank_zero_warn
import torch
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel
from torchmetrics import MeanMetric

from tsparse.distributed import (average_dense_grads_, average_row_sparse_grads_, broadcast_, row_sparse_tables,
                                 shard_)
from tsparse.registry import trainable_groups
from tsparse.optim import SparseAwareAdamW, grad_norm_and_clip_
from tsparse.sharding import STATE, new_group, restore_tables, save_tables, shard_tables_


def next_token_loss(model: nn.Module, input_ids: Tensor) -> Tensor:
    """Mean next-token NLL over packed blocks (they carry no padding), from fp32 logits; no KV cache."""
    logits = model(input_ids=input_ids, use_cache=False).logits[:, :-1].float()
    return nn.functional.cross_entropy(logits.reshape(-1, logits.size(-1)), input_ids[:, 1:].reshape(-1))


def compiled(fn: Callable, **options) -> Callable:
    """`fn` under torch.compile (default backend: inductor, CPU or GPU). The sparse-table ops are eager
    regions (`torch.compiler.disable`); nested graph breaks (a process-wide dynamo setting) resume
    tracing inside the layer after them, so layers of one structure share compiled code."""
    torch._dynamo.config.nested_graph_breaks = True
    return torch.compile(fn, **options)


class NonFiniteError(FloatingPointError):
    """A non-finite loss or gradient under `optim.on_non_finite=stop`."""


class CausalLMModule(L.LightningModule):
    """Trains the named parameter groups (`registry.PARAM_GROUPS`: each kind, its tables, the base) on
    packed token blocks. `optim["base"]` says how the base is trained (frozen, finetune, lora).

    `tokens_per_word` maps a split to its token/word ratio so that word-level perplexity (comparable
    across tokenizers) is logged next to token-level perplexity. `compile` runs the training loss
    (forward and backward) under torch.compile; evaluation stays eager. `tables`: `replicated` (every rank
    holds every table) or `sharded` (on several devices, each rank holds its rows of them: `tsparse.sharding`).
    """

    def __init__(self, model: nn.Module, optim: dict, tokens_per_word: dict[str, float] | None = None,
                 compile: bool = False, tables: str = "replicated"):
        super().__init__()
        self.model = model
        self.compiled_loss = compiled(partial(next_token_loss, model)) if compile else None
        self.optim_cfg = dict(optim)
        self.tokens_per_word = dict(tokens_per_word or {})
        self.save_hyperparameters(ignore=["model"])
        self.val_nll, self.test_nll = MeanMetric(), MeanMetric()
        self.skipped_steps = 0
        self.skip_step = False
        self.frozen_now: list[nn.Parameter] = []
        self.tables = tables
        self.row_sparse_tables: list[nn.Parameter] = []  # replicated tables, averaged by dense all-gathers
        self.sharded_tables: list[nn.Parameter] = []     # this rank's rows of the tables under tables=sharded
        self.tables_group = None
        self.unsharded: list[nn.Parameter] = []  # under FSDP2: the dense params it leaves whole (averaged here)

    def forward(self, input_ids: Tensor) -> Tensor:
        return self.model(input_ids=input_ids, use_cache=False).logits

    def loss(self, input_ids: Tensor) -> Tensor:
        return next_token_loss(self.model, input_ids)

    def training_step(self, batch: Tensor, batch_idx: int) -> Tensor:
        loss = self.compiled_loss(batch) if self.compiled_loss else self.loss(batch)
        finite = torch.isfinite(loss)
        # One decision for all ranks (an all-reduce under DDP), so that they all stop or all skip.
        self.skip_step = bool(self.trainer.strategy.reduce((~finite).float(), reduce_op="max") > 0)
        if self.skip_step:
            self._non_finite(f"loss ({loss.item()})" if not finite else "loss on another rank")
            # Every rank still runs backward (where DDP syncs); configure_gradient_clipping drops the grads.
            return loss.nan_to_num(0.0, 0.0, 0.0) * 0.0
        self.log("train/loss", loss, prog_bar=True)
        return loss

    def setup(self, stage: str) -> None:
        """On several devices, the tables with row-sparse grads stay out of DDP's reducer (which would
        need a sparse all-reduce, absent from NCCL): `on_before_optimizer_step` averages them instead, or,
        under tables=sharded, each rank keeps its rows of them (once, whatever the stage)."""
        if self.trainer.world_size > 1:
            if self.tables == "sharded" and self.tables_group is None:
                self.tables_group = new_group()
                self.sharded_tables = shard_tables_(self.model, self.tables_group)
                self.strict_loading = not isinstance(self.trainer.strategy, ModelParallelStrategy)
            tables = list(row_sparse_tables(self.model).values())
            self.row_sparse_tables = [t for t in tables if not any(t is s for s in self.sharded_tables)]
            DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(
                self, [name for name, p in self.named_parameters() if any(p is t for t in tables)])

    def configure_model(self) -> None:
        """Under `trainer=fsdp2` (Lightning's ModelParallelStrategy), FSDP2 shards the base and the modules'
        dense weights; the row-sparse tables stay replicated and are averaged as under DDP."""
        if isinstance(self.trainer.strategy, ModelParallelStrategy):
            self.unsharded = shard_(self.model, self.trainer.strategy.device_mesh["data_parallel"],
                                    self.row_sparse_tables + self.sharded_tables)

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        """Under tables=sharded, every rank writes its table rows (DCP) and the file keeps the rest."""
        if self.sharded_tables:
            folder = Path(self.trainer.checkpoint_callback.dirpath if self.trainer.checkpoint_callback
                          else self.trainer.default_root_dir)
            save_tables(checkpoint, self, self.trainer.optimizers[0], folder, self.tables_group)

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        """The tables in this run's layout, whatever layout and number of ranks wrote them. FSDP2 loads the
        file before this hook (without the sharded tables: `strict_loading` is off for them), so under it
        the tables and their AdaGrad state are put in place here."""
        groups = [params for params in self.trainable_groups().values() if params]
        restored = restore_tables(checkpoint, self, groups, Path(self.trainer.ckpt_path).parent)
        if self.trainer.strategy.restore_checkpoint_after_setup:
            optimizer = self.trainer.optimizers[0] if self.trainer.optimizers else None
            with torch.no_grad():
                for p, rows, state in restored:
                    p.copy_(rows)
                    if state is not None and optimizer is not None:
                        optimizer.state[p][STATE] = state

    def on_fit_start(self) -> None:
        broadcast_(self.row_sparse_tables + self.unsharded)  # every rank starts from rank 0's, as DDP does for the rest

    def on_train_batch_start(self, batch: Tensor, batch_idx: int) -> None:
        """On several devices, a group frozen by the phase schedule keeps requires_grad (DDP registered its
        hooks for every param); its grads are dropped before the step instead, so the other groups get
        exactly the gradients of a single-device run."""
        self.frozen_now = []
        if self.trainer.world_size > 1:
            params = [p for opt in self.trainer.optimizers for g in opt.param_groups for p in g["params"]]
            self.frozen_now = [p for p in params if not p.requires_grad]
            for p in self.frozen_now:
                p.requires_grad_(True)

    def on_before_optimizer_step(self, optimizer) -> None:
        average_row_sparse_grads_([t for t in self.row_sparse_tables if not any(t is p for p in self.frozen_now)])
        average_dense_grads_(self.unsharded)
        for p in self.frozen_now:
            p.grad = None

    def _non_finite(self, what: str) -> None:
        """Stop (default) or skip the step, per `optim.on_non_finite`; nothing poisoned is ever stepped."""
        message = f"non-finite {what} at step {self.global_step}"
        if self.optim_cfg.get("on_non_finite", "stop") == "stop":
            raise NonFiniteError(f"{message}; stopped before the optimizer step, no checkpoint written "
                                 "(optim.on_non_finite=skip skips such steps instead)")
        self.skipped_steps += 1
        self.log("train/skipped_steps", float(self.skipped_steps))
        rank_zero_warn(f"{message}: step skipped")

    def _eval_step(self, batch: Tensor, metric: MeanMetric, split: str) -> None:
        loss = self.loss(batch)
        metric.update(loss, weight=batch[:, 1:].numel())
        self.log(f"{split}/loss", metric, prog_bar=split == "val")

    def validation_step(self, batch: Tensor, batch_idx: int) -> None:
        self._eval_step(batch, self.val_nll, "val")

    def test_step(self, batch: Tensor, batch_idx: int) -> None:
        self._eval_step(batch, self.test_nll, "test")

    def _log_perplexities(self, metric: MeanMetric, split: str, data_split: str) -> None:
        nll = metric.compute().item()
        self.log(f"{split}/ppl", math.exp(nll))
        if data_split in self.tokens_per_word:
            self.log(f"{split}/word_ppl", math.exp(nll * self.tokens_per_word[data_split]))

    def on_validation_epoch_end(self) -> None:
        self._log_perplexities(self.val_nll, "val", "validation")

    def on_test_epoch_end(self) -> None:
        self._log_perplexities(self.test_nll, "test", "test")

    def trainable_groups(self) -> dict[str, list[nn.Parameter]]:
        return trainable_groups(self.model, self.optim_cfg["base"])

    def configure_optimizers(self):
        cfg = self.optim_cfg
        groups = [{"name": name, "params": params} for name, params in self.trainable_groups().items() if params]
        # lr=0: PhaseLRCallback sets every group's LR from the phase schedule before each step.
        return SparseAwareAdamW(groups, lr=0.0, betas=cfg["betas"], eps=cfg["eps"], weight_decay=cfg["weight_decay"])

    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None) -> None:
        """Sparse-aware global-norm clipping (torch's clip_grad_norm_ rejects sparse grads)."""
        if self.skip_step:  # a non-finite loss under on_non_finite=skip: the step moves nothing
            optimizer.zero_grad(set_to_none=True)
            return
        params = [p for g in optimizer.param_groups for p in g["params"]]
        norm = grad_norm_and_clip_(params, self.optim_cfg["grad_clip"], self.sharded_tables, self.tables_group)
        if not torch.isfinite(norm):
            bad = sorted({g["name"] for g in optimizer.param_groups for p in g["params"] if p.grad is not None
                          and not torch.isfinite(p.grad.coalesce().values() if p.grad.is_sparse else p.grad).all()})
            self._non_finite(f"gradient in param groups {bad}")
            optimizer.zero_grad(set_to_none=True)  # the step then leaves every parameter untouched
            return
        self.log("train/grad_norm", norm)
