"""Per-module diagnostics: output RMS ratios, PEER expert usage, Engram gates, mHC H_res distance."""
from __future__ import annotations

import lightning as L
import torch

from tsparse.modules.protocol import SparseModule
from tsparse.registry import RMS_COMPARISONS


def tracked_modules(model: torch.nn.Module) -> dict[str, SparseModule]:
    """`{kind}.L{layer}` -> module, for every attached sparse module (each records statistics: the module protocol)."""
    return model.sparse_modules()


class ModuleStats(L.Callback):
    """Every `every_n_steps` training steps, record the modules' stats for one batch and log them as
    `stats/{kind}.L{layer}/{name}`, plus `stats/{a}_to_{b}_rms` for each pair of `registry.RMS_COMPARISONS`
    (the mean output-RMS ratio of kind a over kind b, e.g. the seed's "Engram crowds out PEER"). PEER usage (share of experts hit, normalised usage entropy) accumulates over the
    sampled batches and is logged and reset at each validation."""

    def __init__(self, every_n_steps: int):
        self.every_n_steps = every_n_steps

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        active = trainer.global_step % self.every_n_steps == 0
        for module in tracked_modules(pl_module.model).values():
            module.track_stats = active

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        ratios: dict[str, list[float]] = {kind: [] for pair in RMS_COMPARISONS for kind in pair}
        for name, module in tracked_modules(pl_module.model).items():
            if not module.track_stats:
                continue
            module.track_stats = False
            for key, value in module.stats.items():
                pl_module.log(f"stats/{name}/{key}", float(value), on_step=True, on_epoch=False)
            kind = name.split(".")[0]
            if kind in ratios and "out_rms_ratio" in module.stats:
                ratios[kind].append(float(module.stats["out_rms_ratio"]))
        for a, b in RMS_COMPARISONS:
            if ratios[a] and ratios[b]:
                mean_a, mean_b = (sum(ratios[k]) / len(ratios[k]) for k in (a, b))
                pl_module.log(f"stats/{a}_to_{b}_rms", mean_a / max(mean_b, 1e-12), on_step=True, on_epoch=False)

    def on_validation_epoch_end(self, trainer, pl_module) -> None:
        if trainer.sanity_checking:
            return
        for name, module in tracked_modules(pl_module.model).items():
            for key, value in module.usage_summary().items():
                pl_module.log(f"stats/{name}/{key}", value)
            module.reset_usage()
