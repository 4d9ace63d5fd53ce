"""Export a run as a Hugging Face model, and load any model tsparse can name.

    python -m tsparse.export RUN_DIR OUT_DIR [--checkpoint best|last|FILE]

A run dir holds `model/` (the run's TsparseConfig and tokenizer, written when training starts) and
`checkpoints/`. The export is `save_pretrained` (safetensors) plus the tokenizer, staged and swapped
in so that OUT_DIR is never half-written; LoRA adapters are merged into the base weights. After
`import tsparse`, `AutoModelForCausalLM.from_pretrained(OUT_DIR)` loads it.
"""
from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from omegaconf import DictConfig, OmegaConf
from torch import nn

from tsparse.checks import ConfigError
from tsparse.checkpoint import load_checkpoint
from tsparse.cli import ArgumentParser, one_line_errors
from tsparse.hub import require_hub
from tsparse.modeling import TsparseForCausalLM

MODEL_SUBDIR = "model"


def save_model(model: nn.Module, tokenizer, target: str | Path) -> None:
    """save_pretrained + tokenizer into a staging dir next to `target`, then swap it in."""
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


def save_run_model_card(run_dir: Path, model: TsparseForCausalLM, tokenizer) -> None:
    """Write the run's config and tokenizer to RUN_DIR/model, so that the run exports without its base."""
    target = run_dir / MODEL_SUBDIR
    target.mkdir(parents=True, exist_ok=True)
    model.config.save_pretrained(target)
    tokenizer.save_pretrained(target)


def run_checkpoint(run_dir: Path, which: str = "last") -> Path:
    """The run's `last.ckpt`, its best (the `step*.ckpt` kept by ModelCheckpoint), or a given file."""
    ckpt_dir = run_dir / "checkpoints"
    if which == "last":
        path = ckpt_dir / "last.ckpt"
    elif which == "best":
        best = sorted(ckpt_dir.glob("step*.ckpt"))
        if not best:
            raise ConfigError(f"--checkpoint best: {ckpt_dir} holds no step*.ckpt")
        path = best[-1]
    else:
        path = Path(which)
    if not path.is_file():
        raise ConfigError(f"checkpoint {path} does not exist")
    return path


def run_config(run_dir: Path) -> DictConfig | None:
    """The run's resolved Hydra config (RUN_DIR/config.yaml), or None for a dir without one."""
    path = run_dir / "config.yaml"
    return OmegaConf.load(path) if path.is_file() else None


def load_run(run_dir: Path, which: str = "last"):
    """(model, tokenizer) of a run dir at one of its checkpoints, in eval mode, LoRA merged."""
    from transformers import AutoConfig, AutoTokenizer

    from tsparse.checkpoint import load_state_dict_strict

    card = run_dir / MODEL_SUBDIR
    if not (card / "config.json").is_file():
        raise ConfigError(f"{run_dir} is not a tsparse run dir (no {MODEL_SUBDIR}/config.json)")
    ckpt = run_checkpoint(run_dir, which)
    model = TsparseForCausalLM(AutoConfig.from_pretrained(card))
    run_cfg = run_config(run_dir)
    lora = run_cfg is not None and run_cfg.optim.base == "lora"
    if lora:
        from tsparse.lora import add_lora

        add_lora(model, run_cfg.optim.lora_rank)
    state = load_checkpoint(ckpt)["state_dict"]
    load_state_dict_strict(model, {k.removeprefix("model."): v for k, v in state.items() if k.startswith("model.")},
                           str(ckpt))
    if lora:
        from tsparse.lora import merge_lora

        merge_lora(model)
    return model.eval(), AutoTokenizer.from_pretrained(card)


def load_model(path: str | Path, which: str = "last"):
    """(model, tokenizer) from an HF model dir, a tsparse run dir (or a .ckpt inside one), or a hub id."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = Path(path)
    if (path / "config.json").is_file():
        return AutoModelForCausalLM.from_pretrained(path).eval(), AutoTokenizer.from_pretrained(path)
    if path.is_file() and path.suffix == ".ckpt":
        return load_run(path.parent.parent, str(path))
    if path.is_dir():
        return load_run(path, which)
    if str(path).startswith(("/", ".")) or path.suffix:
        raise ConfigError(f"{path} does not exist")
    require_hub(f"{path}", "a local HF model dir or a tsparse run dir")
    return AutoModelForCausalLM.from_pretrained(str(path)).eval(), AutoTokenizer.from_pretrained(str(path))


def main(argv: list[str] | None = None) -> None:
    parser = ArgumentParser(prog="python -m tsparse.export", description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--checkpoint", default="last", help="best, last (default) or a .ckpt path")
    args = parser.parse_args(argv)
    with one_line_errors(OSError):
        if args.out_dir.resolve() == args.run_dir.resolve():
            raise ConfigError("OUT_DIR must differ from RUN_DIR")
        model, tokenizer = load_run(args.run_dir, args.checkpoint)
        save_model(model, tokenizer, args.out_dir)
    print(f"exported {args.run_dir} ({args.checkpoint}) to {args.out_dir}")


if __name__ == "__main__":
    main()
