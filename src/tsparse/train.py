"""`python -m tsparse.train [+experiment=NAME] [overrides]`: build, train, test and export one run."""
from __future__ import annotations

import json
import logging
import os
import shutil
import sys
import tempfile
import time
import uuid
from pathlib import Path

import hydra
import lightning as L
from hydra.utils import instantiate
from lightning.pytorch.loggers import WandbLogger
from omegaconf import DictConfig, OmegaConf

from tsparse.augment import params_by_group
from tsparse.build import build_datamodule, build_model
from tsparse.callbacks import PhaseLRCallback, TokenThroughput, check_schedule_fits, parse_phases
from tsparse.checkpoint import check_checkpoint, newest_valid_checkpoint
from tsparse.config import ConfigError, config_dir, to_container, validate
from tsparse.hub import HubUnreachableError
from tsparse.lit_module import CausalLMModule, NonFiniteError
from tsparse.loggers import use_wandb_offline_without_key

log = logging.getLogger("tsparse")


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


def resolve_ckpt_path(cfg: DictConfig, ckpt_dir: Path) -> str | None:
    """`ckpt_path=last` -> the newest valid checkpoint of this run dir (last.ckpt unless damaged);
    `auto` -> the same if there is one, else a fresh start; refuse to silently start over on top of
    existing checkpoints."""
    existing = sorted(ckpt_dir.glob("*.ckpt")) if ckpt_dir.is_dir() else []
    if cfg.ckpt_path in ("last", "auto"):
        newest = newest_valid_checkpoint(ckpt_dir) if existing else None
        if newest is not None:
            return str(newest)
        if cfg.ckpt_path == "last":
            raise ConfigError(f"ckpt_path=last but {ckpt_dir} holds no valid checkpoint; run without ckpt_path first")
        if existing:
            shutil.rmtree(ckpt_dir)  # auto, and only damaged checkpoints: nothing to resume
        return None
    if cfg.ckpt_path is None:
        if existing and not cfg.overwrite:
            raise ConfigError(f"{ckpt_dir} already holds checkpoints; pass ckpt_path=last to resume, "
                              "overwrite=true to start over, or change the overrides")
        if existing:
            shutil.rmtree(ckpt_dir)
        return None
    check_checkpoint(cfg.ckpt_path)
    return str(cfg.ckpt_path)


def write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    tmp.replace(path)


def export_pretrained(model, tokenizer, target: str | Path) -> None:
    """save_pretrained into a staging dir, then swap it in, so `target` is never half-written."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}-"))
    model.save_pretrained(staging)
    tokenizer.save_pretrained(staging)
    if target.exists():
        old = target.with_name(f".{target.name}-old-{os.getpid()}")
        target.rename(old)
        staging.rename(target)
        shutil.rmtree(old)
    else:
        staging.rename(target)


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
    validate(cfg)
    phases = parse_phases(cfg.strategy.phases)
    check_schedule_fits(phases, cfg.trainer.max_steps)
    run_dir = Path(cfg.paths.output_dir)
    if (results := finished_results(cfg, run_dir)) is not None:
        log.info("%s already finished (ckpt_path=auto): keeping its results.json", run_dir)
        return results
    run_dir.mkdir(parents=True, exist_ok=True)
    ckpt_path = resolve_ckpt_path(cfg, Path(cfg.paths.ckpt_dir)) if cfg.train else None
    write_atomic(run_dir / "config.yaml", OmegaConf.to_yaml(cfg, resolve=True))
    L.seed_everything(cfg.seed, workers=True)

    datamodule = build_datamodule(cfg)
    model, tokenizer = build_model(cfg, datamodule)
    datamodule.setup()
    module = CausalLMModule(model, to_container(cfg.optim),
                            tokens_per_word={s: datamodule.tokens_per_word(s) for s in ("validation", "test")})
    log.info("trainable params: %s", {k: sum(p.numel() for p in v) for k, v in module.trainable_groups().items()})

    # The phase callback goes first so that LR monitors see this step's LRs.
    callbacks = [PhaseLRCallback(phases, cfg.optim.schedule, cfg.optim.warmup_steps,
                                 cfg.strategy.get("reset_optimizer", False))]
    callbacks += [instantiate(c) for c in (cfg.get("callbacks") or {}).values()]
    throughput = next((c for c in callbacks if isinstance(c, TokenThroughput)), None)
    trainer: L.Trainer = instantiate(cfg.trainer, callbacks=callbacks, logger=build_loggers(cfg, run_dir))

    start = time.perf_counter()
    if cfg.train:
        trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path)
    else:
        trainer.validate(module, datamodule=datamodule)
    results = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val/")}
    if cfg.test:
        trainer.test(module, datamodule=datamodule)
        results.update({k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("test/")})
    results.update(wall_seconds=time.perf_counter() - start, global_step=trainer.global_step,
                   skipped_steps=module.skipped_steps,
                   train_tokens_per_sec=throughput.average if throughput else None,
                   params={k: sum(p.numel() for _, p in v) for k, v in params_by_group(model).items()})
    if cfg.export_dir and trainer.is_global_zero:
        export_pretrained(model.lm, tokenizer, cfg.export_dir)
        log.info("exported the trained model to %s", cfg.export_dir)
    if trainer.is_global_zero:
        write_atomic(run_dir / "results.json", json.dumps(results, indent=2))
        log.info("results: %s", json.dumps(results))
    for logger in trainer.loggers:
        if isinstance(logger, WandbLogger):
            logger.experiment.finish()  # the next multirun job starts its own W&B run
    return results


@hydra.main(version_base="1.3", config_path=str(config_dir()), config_name="train")
def main(cfg: DictConfig) -> float | None:
    try:
        results = run(cfg)
    except (ConfigError, HubUnreachableError) as err:
        print(f"error: {err}", file=sys.stderr)
        raise SystemExit(2) from None
    except NonFiniteError as err:
        print(f"error: {err}", file=sys.stderr)
        raise SystemExit(3) from None
    return results.get("val/loss")


if __name__ == "__main__":
    main()
