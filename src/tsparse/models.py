"""Build the run's `TsparseForCausalLM` and tokenizer: a fresh micro LLaMA (offline), TinyLlama, or
any local HF checkpoint as the base, with the configured sparse modules attached."""
from __future__ import annotations

from pathlib import Path
from typing import Callable

import torch
from omegaconf import DictConfig, OmegaConf
from transformers import LlamaConfig

from tsparse.checks import ConfigError, check_choice
from tsparse.hub import require_hub
from tsparse.loading import check_weights, hub_snapshot, read_config, read_tokenizer
from tsparse.modeling import TsparseConfig, TsparseForCausalLM
from tsparse.tokenizer import load_or_train_bpe

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def base_path(cfg: DictConfig) -> str:
    """`model.name_or_path`: a local HF dir, or a hub id (fails fast offline)."""
    path = str(cfg.name_or_path)
    if not Path(path).is_dir():
        if cfg.kind == "micro" or path.startswith(("/", ".")):
            raise ConfigError(
                f"model.name_or_path={path!r} does not exist; create it with "
                "`python -m tsparse.train +experiment=pretrain_micro` or point it at a local HF checkpoint"
            )
        require_hub(f"model.name_or_path={path!r}", "model=micro or model.name_or_path=<local HF checkpoint dir>")
    return path


def base_with_modules(cfg: DictConfig, specs: dict, hash_seed: int, train_text: Callable[[], str]):
    """(model, tokenizer): the base of `cfg` (the `model` group) with `specs` attached. A pretrained
    base is loaded with `from_pretrained`, so the modules start fresh and the model is an identity of
    it; `model.from_scratch` builds a micro LLaMA with a BPE tokenizer trained on `train_text()`."""
    check_choice("model.dtype", cfg.dtype, DTYPES)
    dtype = DTYPES[cfg.dtype]
    if cfg.from_scratch:
        if cfg.kind != "micro":
            raise ConfigError(f"model.from_scratch=true needs model=micro, got model.kind={cfg.kind!r}")
        tokenizer = load_or_train_bpe(train_text(), cfg.config.vocab_size, cfg.tokenizer_dir)
        base = LlamaConfig(**OmegaConf.to_container(cfg.config, resolve=True),
                           bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
        config = TsparseConfig.from_base(base, specs, hash_seed, tokenizer)
        return TsparseForCausalLM(config).to(dtype), tokenizer
    path = base_path(cfg)
    model_dir = Path(path) if Path(path).is_dir() else hub_snapshot(path)
    base = read_config(model_dir)
    check_weights(model_dir, base, allow_missing_modules=True)
    tokenizer = read_tokenizer(model_dir)
    config = TsparseConfig.from_base(base, specs, hash_seed, tokenizer)
    model = TsparseForCausalLM.from_pretrained(model_dir, config=config, dtype=dtype, trust_remote_code=False,
                                               use_safetensors=True)
    return model, tokenizer


def architecture_model(cfg: DictConfig) -> TsparseForCausalLM:
    """The architecture of `cfg.model.config` with the configured modules, at random init (nothing is
    downloaded); build it under `torch.device("meta")` to count parameters without allocating."""
    from tsparse.config import module_specs

    base = LlamaConfig(**OmegaConf.to_container(cfg.model.config, resolve=True))
    return TsparseForCausalLM(TsparseConfig.from_base(base, module_specs(cfg), cfg.seed))
