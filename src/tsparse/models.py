"""Load the base causal LM and its tokenizer: micro LLaMA (offline), TinyLlama, or any local HF dir."""
from __future__ import annotations

from pathlib import Path
from typing import Callable

import torch
from omegaconf import DictConfig, OmegaConf
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM, PreTrainedModel

from tsparse.config import ConfigError
from tsparse.hub import require_hub
from tsparse.tokenizer import load_or_train_bpe

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _dtype(cfg: DictConfig) -> torch.dtype:
    if cfg.dtype not in DTYPES:
        raise ConfigError(f"model.dtype={cfg.dtype!r} is not allowed; choose one of {list(DTYPES)}")
    return DTYPES[cfg.dtype]


def build_micro(cfg: DictConfig, train_text: Callable[[], str]):
    """A fresh micro LLaMA and a BPE tokenizer trained on the training split."""
    tokenizer = load_or_train_bpe(train_text(), cfg.config.vocab_size, cfg.tokenizer_dir)
    config = LlamaConfig(
        **OmegaConf.to_container(cfg.config, resolve=True),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    return LlamaForCausalLM(config).to(_dtype(cfg)), tokenizer


def load_pretrained(cfg: DictConfig) -> tuple[PreTrainedModel, object]:
    """`from_pretrained` on a local directory or a hub id (fails fast offline)."""
    path = str(cfg.name_or_path)
    if not Path(path).is_dir():
        if cfg.kind == "micro" or path.startswith(("/", ".")):
            raise ConfigError(
                f"model.name_or_path={path!r} does not exist; create it with "
                "`python -m tsparse.train +experiment=pretrain_micro` or point it at a local HF checkpoint"
            )
        require_hub(f"model.name_or_path={path!r}", "model=micro or model.name_or_path=<local HF checkpoint dir>")
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=_dtype(cfg))
    return model, tokenizer


def load_base(cfg: DictConfig, train_text: Callable[[], str]):
    """The (model, tokenizer) pair the run starts from; `train_text` is only called to train a tokenizer."""
    if cfg.from_scratch:
        if cfg.kind != "micro":
            raise ConfigError(f"model.from_scratch=true needs model=micro, got model.kind={cfg.kind!r}")
        return build_micro(cfg, train_text)
    return load_pretrained(cfg)
