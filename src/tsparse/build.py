"""Models from configs, the one path for train, params, plan and the benches: `build_model` (the run's base,
a fresh micro LLaMA, TinyLlama or any local HF checkpoint, with the configured sparse modules attached, and
its tokenizer), `architecture_model` (the configured architecture at random init, nothing loaded) and
`model_dtype` (the one check of `model.dtype`)."""
from __future__ import annotations

from functools import partial
from pathlib import Path
from typing import Callable

import torch
from omegaconf import DictConfig, OmegaConf
from torch.utils.checkpoint import checkpoint
from transformers import LlamaConfig

from tsparse.base_dtype import base_in_bf16, store_base_in_bf16
from tsparse.checks import ConfigError, check_choice
from tsparse.config import module_specs
from tsparse.hub import require_hub
from tsparse.loading import check_weights, hub_snapshot, read_config, read_tokenizer
from tsparse.configuration_tsparse import TsparseConfig
from tsparse.modeling_tsparse import TsparseForCausalLM
from tsparse.tokenizer import load_or_train_bpe

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def model_dtype(cfg: DictConfig) -> torch.dtype:
    """The torch dtype that `model.dtype` names (`cfg` is the `model` group), or one ConfigError line."""
    check_choice("model.dtype", cfg.dtype, DTYPES)
    return DTYPES[cfg.dtype]


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
    dtype = model_dtype(cfg)
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


def check_checkpointing(value) -> None:
    """`model.activation_checkpointing` is false, true or offload, else one ConfigError line."""
    if not (isinstance(value, bool) or value == "offload"):
        raise ConfigError(f"model.activation_checkpointing={value!r} is not allowed; choose one of [false, true, offload]")


def offloaded_checkpoint(function: Callable, hidden: torch.Tensor, *args, **kwargs):
    """A non-reentrant checkpoint whose saved input, the layer's hidden state (or mHC's streams), waits in
    host memory until backward recomputes the layer (its gradient goes back to the device); on a CPU the
    copy is a no-op."""
    device = hidden.device
    return checkpoint(lambda host, *a, **k: function(host.to(device), *a, **k), hidden.to("cpu"), *args,
                      use_reentrant=False, **kwargs)


def set_activation_checkpointing(model: TsparseForCausalLM, cfg: DictConfig) -> TsparseForCausalLM:
    """`model.activation_checkpointing` (`cfg` is the `model` group): each decoder layer, its modules and
    streams included, is one non-reentrant checkpoint in training (recomputed in backward); `offload` keeps
    the checkpoints' inputs in host memory (`offloaded_checkpoint`)."""
    mode = cfg.get("activation_checkpointing", False)
    check_checkpointing(mode)
    for layer in model.model.layers:
        layer.gradient_checkpointing = bool(mode)
        layer._gradient_checkpointing_func = (offloaded_checkpoint if mode == "offload"
                                              else partial(checkpoint, use_reentrant=False))
    return model


def architecture_model(cfg: DictConfig) -> TsparseForCausalLM:
    """The architecture of `cfg.model.config` with the configured modules (and activation checkpointing), at
    random init (nothing is downloaded); build it under `torch.device("meta")` to count parameters without
    allocating."""
    base = LlamaConfig(**OmegaConf.to_container(cfg.model.config, resolve=True))
    model = TsparseForCausalLM(TsparseConfig.from_base(base, module_specs(cfg), cfg.seed))
    return set_activation_checkpointing(model, cfg.model)


def build_model(cfg: DictConfig, datamodule) -> tuple[TsparseForCausalLM, object]:
    """The base with the configured modules (and LoRA adapters, or its weights in bf16 under
    `optim.base_dtype=bfloat16`), in train mode; gives the DataModule
    the tokenizer (a micro tokenizer is trained on the train split if needed)."""
    model, tokenizer = base_with_modules(cfg.model, module_specs(cfg), cfg.seed, lambda: datamodule.texts["train"])
    set_activation_checkpointing(model, cfg.model)
    max_context = model.config.max_position_embeddings
    if cfg.data.block_size > max_context:
        raise ConfigError(f"data.block_size={cfg.data.block_size} exceeds the model context ({max_context})")
    datamodule.tokenizer = tokenizer
    if base_in_bf16(cfg.optim):
        store_base_in_bf16(model)
    if cfg.optim.base == "lora":
        from tsparse.lora import add_lora

        add_lora(model, cfg.optim.lora_rank)
    return model.train(), tokenizer  # from_pretrained returns eval mode; Lightning keeps module modes as given
