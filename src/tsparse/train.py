"""`python -m tsparse.train [+experiment=NAME] [overrides]`: build, train, test and export one run."""
from __future__ import annotations

import json
import logging
import os
import re
import shutil
import time
import uuid
from pathlib import Path

import lightning as L
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from lightning.pytorch.loggers import WandbLogger
from lightning.pytorch.utilities import rank_zero_only
from omegaconf import DictConfig, OmegaConf

from tsparse.cli import EXIT_DISK_FULL, EXIT_LOST_RANK, EXIT_NON_FINITE, EXIT_PREEMPTED, fail, hydra_main, one_line_errors
from tsparse.callbacks import (Preemption, PhaseLRCallback, TokenThroughput, check_phase_lrs, check_schedule_fits,
                               parse_phases)
from tsparse.checkpoint import AtomicCheckpointIO, load_checkpoint, newest_valid_checkpoint
from tsparse.checks import ConfigError, check_bool, check_choice, is_int
from tsparse.config import check_trainer, config_dir, module_specs, to_container, validate
from tsparse.saving import check_export_target, save_model, save_run_model_card
from tsparse.lit_module import CausalLMModule, NonFiniteError
from tsparse.data import build_datamodule
from tsparse.build import base_path, build_model, check_checkpointing
from tsparse.loggers import ResumableCSVLogger, use_wandb_offline_without_key
from tsparse.machine import machine
from tsparse.registry import attached_groups, params_by_group
from tsparse.sharding import gather_tables_
from tsparse.rundir import LOCK_FILE, REPLACED, DiskFullError, lock_run_dir, remove_stale_temp_files, set_aside, write_atomic

log = logging.getLogger("tsparse")


TABLE_LAYOUTS = ("replicated", "sharded")  # conf/tables/


class Preempted(Exception):
    """The run stopped on SIGTERM/SIGUSR1; the message says where it saved and how to resume."""


def build_loggers(cfg: DictConfig, run_dir: Path) -> list:
    """Instantiate the configured loggers; W&B goes offline without an API key and keeps one run id per run dir."""
    loggers = []
    for name, node in (cfg.get("logger") or {}).items():
        if name == "wandb":
            use_wandb_offline_without_key()
            id_file = run_dir / "wandb_id.txt"
            if not id_file.is_file():
                id_file.write_text(uuid.uuid4().hex[:12])
            loggers.append(instantiate(node, id=id_file.read_text().strip(), resume="allow"))
        else:
            loggers.append(instantiate(node))
    for logger in loggers:
        logger.log_hyperparams(to_container(cfg))
    return loggers


def resolve_ckpt_path(cfg: DictConfig, ckpt_dir: Path) -> tuple[str | None, int]:
    """The checkpoint to resume and its global step: `ckpt_path=last` -> the newest valid checkpoint of
    this run dir (`checkpoint.newest_valid_checkpoint`); `auto` -> the same if there is one, else a fresh
    start (None, 0); refuse to silently start over on top of existing checkpoints. The checkpoint to
    resume is safe-loaded first (`load_checkpoint`), so an unsafe one is refused in one line before
    Lightning reads it."""
    existing = sorted(ckpt_dir.glob("*.ckpt")) if ckpt_dir.is_dir() else []
    if cfg.ckpt_path in ("last", "auto"):
        newest = newest_valid_checkpoint(ckpt_dir) if existing else None
        if newest is None and cfg.ckpt_path == "last":
            raise ConfigError(f"ckpt_path=last but {ckpt_dir} holds no valid checkpoint; run without ckpt_path first")
    elif cfg.ckpt_path is None:
        if existing and not cfg.overwrite:
            raise ConfigError(f"{ckpt_dir} already holds checkpoints; pass ckpt_path=last to resume, "
                              "overwrite=true to start over, or change the overrides")
        newest = None
    else:
        newest = Path(cfg.ckpt_path)
    if newest is None:
        return None, 0
    return str(newest), int(load_checkpoint(newest, mmap=True).get("global_step", 0))


def set_aside_previous_run(run_dir: Path, ckpt_dir: Path) -> list[Path]:
    """Before a fresh start, move what a previous run left in `run_dir` to `<parent>/.replaced/<run name>.<time>/`,
    so that the new run never appends to its metrics.csv, results.json or W&B run (wandb_id.txt). Kept: this
    invocation's Hydra files (`.hydra/`, and the job log, which Hydra holds open: its old lines are copied
    aside and it is emptied) and the run dir's lock. A `ckpt_dir` outside the run dir (maybe another
    filesystem, or a mount point) keeps its folder; its files go to `<ckpt_dir>/.replaced/`. Returns the
    folders things were moved to."""
    keep = {LOCK_FILE, *([HydraConfig.get().output_subdir] if HydraConfig.initialized() else [])}
    logs = {Path(h.baseFilename) for h in logging.getLogger().handlers if isinstance(h, logging.FileHandler)}
    old = [p for p in run_dir.iterdir() if p.name not in keep and not (p in logs and p.stat().st_size == 0)]
    folders = []
    if old:
        folders.append(aside := set_aside([p for p in old if p not in logs], run_dir.parent, run_dir.name))
        for path in (p for p in old if p in logs):
            shutil.copy2(path, aside / path.name)
            os.truncate(path, 0)
    if ckpt_dir.is_dir() and run_dir not in ckpt_dir.parents:
        if old_ckpts := [p for p in ckpt_dir.iterdir() if p.name != REPLACED]:
            folders.append(set_aside(old_ckpts, ckpt_dir, ckpt_dir.name))
    return folders


def experiments() -> list[str]:
    return sorted(p.stem for p in (config_dir() / "experiment").glob("*.yaml"))


def check(cfg: DictConfig) -> list:
    """Everything a run is refused for before anything is built or written, one line each; returns its phases."""
    validate(cfg)
    check_trainer(cfg.trainer)
    if not is_int(cfg.seed):
        raise ConfigError(f"seed={cfg.seed!r} must be an integer")
    for key in ("train", "test", "overwrite", "compile"):
        check_bool(key, cfg[key])
    check_checkpointing(cfg.model.get("activation_checkpointing", False))
    for key in ("paths.output_dir", "paths.ckpt_dir"):
        if not isinstance(value := OmegaConf.select(cfg, key), str) or not value:
            raise ConfigError(f"{key}={value!r} must be a directory path")
    phases = parse_phases(cfg.strategy.phases)
    check_phase_lrs(phases, attached_groups(cfg.sparse.modules, cfg.optim.base))
    if cfg.train and not cfg.sparse.modules and cfg.optim.base == "frozen":
        raise ConfigError(f"nothing to train (sparse=none, optim.base=frozen): pick an experiment with "
                          f"+experiment=NAME, one of {experiments()}, or set sparse=... or optim.base=finetune")
    strategy = str(cfg.trainer.get("strategy") or "")
    sparse = [f"{name}.sparse_grad" for name, spec in module_specs(cfg).items() if getattr(spec, "sparse_grad", False)]
    check_choice("tables", cfg.tables.get("layout"), TABLE_LAYOUTS)
    dense = [f"{name}.sparse_grad=false" for name, spec in module_specs(cfg).items()
             if hasattr(spec, "sparse_grad") and not spec.sparse_grad]
    if cfg.tables.layout == "sharded" and dense:
        raise ConfigError(f"tables=sharded shards row-sparse tables, but {', '.join(dense)} makes them dense: "
                          "drop it, or use tables=replicated")
    if strategy.startswith("fsdp") and sparse:
        raise ConfigError(f"trainer.strategy={strategy} cannot shard sparse gradients (FSDP has none): set "
                          f"{'=false '.join(sparse)}=false (dense tables, AdamW), or use trainer=fsdp2 (FSDP2, the "
                          "tables replicated) or trainer=ddp")
    if cfg.ckpt_path not in (None, "last", "auto"):
        load_checkpoint(cfg.ckpt_path, mmap=True)
    if cfg.export_dir is not None:
        if not isinstance(cfg.export_dir, str) or not cfg.export_dir:
            raise ConfigError(f"export_dir={cfg.export_dir!r} must be null or a directory path")
        check_export_target(cfg.export_dir, cfg.paths.output_dir, cfg.overwrite)
    if cfg.model.kind == "micro" and not cfg.model.from_scratch:
        base_path(cfg.model)  # the pretrained micro base must exist (a hub id is checked when it loads)
    return phases


def base_test_ppl(cfg: DictConfig, module: CausalLMModule, datamodule, run_dir: Path) -> float | None:
    """Test perplexity of the model before training: the base's when every module starts as an identity
    (`<kind>.init=default` does not); measured once per run dir and kept in base_results.json, so a
    resume reuses it."""
    path = run_dir / "base_results.json"
    if not path.is_file():
        if cfg.trainer.devices != 1:
            return None
        tester = L.Trainer(accelerator=cfg.trainer.accelerator, devices=1, precision=cfg.trainer.precision,
                           logger=False, enable_checkpointing=False, enable_progress_bar=False,
                           enable_model_summary=False, limit_test_batches=cfg.trainer.limit_test_batches)
        metrics = tester.test(module, datamodule=datamodule, verbose=False)[0]
        write_atomic(path, json.dumps({k: float(v) for k, v in metrics.items()}, indent=2))
    return json.loads(path.read_text()).get("test/ppl")


def package_versions() -> dict[str, str]:
    """Versions of the packages a run's numbers depend on (results.json), so that two clones can be compared."""
    from importlib.metadata import version

    return {name: version(name) for name in ("tsparse", "torch", "transformers", "tokenizers", "lightning", "datasets")}


def print_summary(cfg: DictConfig, results: dict) -> None:
    """The run's last line: its test perplexity, the base's and the change."""
    ppl, base = results.get("test/ppl"), results.get("base/test_ppl")
    if ppl is not None and base is not None:
        print(f"{cfg.experiment_name}: test ppl {ppl:.2f} vs base {base:.2f} ({100 * (ppl - base) / base:+.2f}%)", flush=True)


def finished_results(cfg: DictConfig, run_dir: Path) -> dict | None:
    """Under `ckpt_path=auto`, the results of this run dir if it already finished this config's
    step budget (so that re-running an interrupted sweep skips its done cells), else None."""
    path = run_dir / "results.json"
    if cfg.ckpt_path != "auto" or not path.is_file():
        return None
    results = json.loads(path.read_text())
    done = not cfg.train or results.get("global_step", 0) >= cfg.trainer.max_steps
    return results if done else None


def run(cfg: DictConfig) -> dict:
    phases = check(cfg)
    check_schedule_fits(phases, cfg.trainer.max_steps)
    run_dir = Path(cfg.paths.output_dir)
    if (results := finished_results(cfg, run_dir)) is not None:
        log.info("%s already finished (ckpt_path=auto): keeping its results.json", run_dir)
        print_summary(cfg, results)
        return results
    ckpt_dir = Path(cfg.paths.ckpt_dir)
    preemption = Preemption(ckpt_dir)
    preemption.install()
    try:
        return train_and_test(cfg, phases, run_dir, ckpt_dir, preemption)
    finally:
        preemption.restore()


def train_and_test(cfg: DictConfig, phases: list, run_dir: Path, ckpt_dir: Path, preemption: Preemption) -> dict:
    run_dir.mkdir(parents=True, exist_ok=True)
    if rank_zero_only.rank == 0:
        lock_run_dir(run_dir)
        if ckpt_dir.is_dir():
            remove_stale_temp_files(ckpt_dir)  # a write cut short by a kill
    ckpt_path, resume_step = resolve_ckpt_path(cfg, ckpt_dir) if cfg.train else (None, 0)
    if ckpt_path is None and rank_zero_only.rank == 0 and (aside := set_aside_previous_run(run_dir, ckpt_dir)):
        log.info("fresh start in a used run dir: moved the previous run to %s", ", ".join(map(str, aside)))
    write_atomic(run_dir / "config.yaml", OmegaConf.to_yaml(cfg, resolve=True))
    L.seed_everything(cfg.seed, workers=True)

    datamodule = build_datamodule(cfg)
    model, tokenizer = build_model(cfg, datamodule)
    save_run_model_card(run_dir, model, tokenizer)
    datamodule.setup()
    module = CausalLMModule(model, to_container(cfg.optim),
                            tokens_per_word={s: datamodule.tokens_per_word(s) for s in ("validation", "test")},
                            compile=cfg.compile, tables=cfg.tables.layout)
    base_ppl = base_test_ppl(cfg, module, datamodule, run_dir) if cfg.train and cfg.test and cfg.test_base else None
    log.info("trainable params: %s", {k: sum(p.numel() for p in v) for k, v in module.trainable_groups().items()})

    # The phase callback goes first so that LR monitors see this step's LRs.
    callbacks = [PhaseLRCallback(phases, cfg.optim.schedule, cfg.optim.warmup_steps,
                                 cfg.strategy.get("reset_optimizer", False)), preemption]
    callbacks += [instantiate(c) for c in (cfg.get("callbacks") or {}).values()]
    throughput = next((c for c in callbacks if isinstance(c, TokenThroughput)), None)
    loggers = build_loggers(cfg, run_dir)
    if ckpt_path is not None and rank_zero_only.rank == 0:
        for logger in loggers:
            if isinstance(logger, ResumableCSVLogger):
                logger.drop_steps_from(resume_step)  # they run again
    trainer: L.Trainer = instantiate(cfg.trainer, callbacks=callbacks, logger=loggers, plugins=[AtomicCheckpointIO()])

    start = time.perf_counter()
    if cfg.train:
        if preemption.received:
            raise Preempted(f"{preemption.signal_name} before training started; nothing new to save: "
                            "rerun with ckpt_path=auto")
        trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path, weights_only=True)
        if preemption.step is not None:
            raise Preempted(f"{preemption.signal_name} at step {preemption.step}: saved {preemption.saved}; "
                            "resume with ckpt_path=auto (same overrides)")
    else:
        trainer.validate(module, datamodule=datamodule)
    results = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val/")}
    if cfg.test:
        trainer.test(module, datamodule=datamodule)
        results.update({k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("test/")})
    results.update(wall_seconds=time.perf_counter() - start, global_step=trainer.global_step,
                   skipped_steps=module.skipped_steps,
                   train_tokens_per_sec=throughput.average if throughput else None, versions=package_versions(),
                   machine=machine(),
                   params={k: sum(p.numel() for _, p in v) for k, v in params_by_group(model).items()})
    if base_ppl is not None:
        results["base/test_ppl"] = base_ppl
    if trainer.is_global_zero:
        write_atomic(run_dir / "results.json", json.dumps(results, indent=2))
        log.info("results: %s", json.dumps(results))
        print_summary(cfg, results)
    if cfg.export_dir and module.sharded_tables:
        gather_tables_(model)  # rank 0 exports whole tables
    if cfg.export_dir and trainer.is_global_zero:
        export(cfg, model, tokenizer, run_dir)
    for logger in trainer.loggers:
        if isinstance(logger, WandbLogger):
            logger.experiment.finish()  # the next multirun job starts its own W&B run
    return results


def export(cfg: DictConfig, model, tokenizer, run_dir: Path) -> None:
    """Save the trained model to `export_dir`; a failure leaves the run (results, checkpoints) complete."""
    try:
        check_export_target(cfg.export_dir, run_dir, cfg.overwrite)
        if cfg.optim.base == "lora":
            from tsparse.lora import merge_lora

            merge_lora(model)
        save_model(model, tokenizer, cfg.export_dir, {"run_dir": str(run_dir.resolve()), "checkpoint": "end of training"})
    except (ConfigError, OSError) as err:
        raise ConfigError(f"the run finished (results.json and checkpoints are in {run_dir}), but export_dir="
                          f"{cfg.export_dir} failed: {err}; export it later with python -m tsparse.export") from None
    log.info("exported the trained model to %s", cfg.export_dir)


LOST_PEER = r"Connection (closed|reset) by peer|Broken pipe|Socket Timeout|NCCL communicator was aborted"


def lost_rank(err: BaseException) -> str | None:
    """The one-line message for a collective that failed because another rank died (gloo: the connection
    closed or reset), else None."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() < 2:
        return None
    text = str(err)
    if not isinstance(err, (dist.DistError, RuntimeError)) or not re.search(LOST_PEER, text):
        return None
    rank, world = dist.get_rank(), dist.get_world_size()
    who = f"rank {1 - rank}" if world == 2 else "a rank other than this one"
    line = next(line for line in text.splitlines() if re.search(LOST_PEER, line))
    reason = re.sub(r"^\[[^\]]*:\d+\]\s*", "", line.strip()).split(". ")[0]  # gloo's source-location prefix
    return f"{who} of {world} exited ({reason}); resume with ckpt_path=last"


@hydra_main("train", check, lock_run_dir=True)
def main(cfg: DictConfig) -> float | None:
    try:
        with one_line_errors():
            results = run(cfg)
    except NonFiniteError as err:
        fail(str(err), EXIT_NON_FINITE)
    except Preempted as err:
        if rank_zero_only.rank:
            raise SystemExit(EXIT_PREEMPTED) from None  # rank 0 says it, once
        fail(str(err), EXIT_PREEMPTED, prefix="preempted")
    except DiskFullError as err:
        fail(f"{err.strerror}; the previous checkpoint is intact: free space, then resume with ckpt_path=last",
             EXIT_DISK_FULL)
    except Exception as err:
        if (lost := lost_rank(err)) is None:
            raise
        fail(lost, EXIT_LOST_RANK)
    return results.get("val/loss")


if __name__ == "__main__":
    main()
