"""Build a run's pieces from its config: the DataModule and the model with its tokenizer."""
from __future__ import annotations

from omegaconf import DictConfig

from tsparse.checks import ConfigError
from tsparse.config import module_specs, to_container
from tsparse.data import WikiText2DataModule
from tsparse.modeling import TsparseForCausalLM
from tsparse.models import base_with_modules


def build_datamodule(cfg: DictConfig, tokenizer=None) -> WikiText2DataModule:
    kwargs = {k: v for k, v in to_container(cfg.data).items() if k != "source"}
    return WikiText2DataModule(tokenizer, source=cfg.data.source, seed=cfg.seed, **kwargs)


def build_model(cfg: DictConfig, datamodule: WikiText2DataModule) -> tuple[TsparseForCausalLM, object]:
    """The base with the configured modules (and LoRA adapters), in train mode; gives the DataModule
    the tokenizer (a micro tokenizer is trained on the train split if needed)."""
    model, tokenizer = base_with_modules(cfg.model, module_specs(cfg), cfg.seed, lambda: datamodule.texts["train"])
    max_context = model.config.max_position_embeddings
    if cfg.data.block_size > max_context:
        raise ConfigError(f"data.block_size={cfg.data.block_size} exceeds the model context ({max_context})")
    datamodule.tokenizer = tokenizer
    if cfg.optim.base == "lora":
        from tsparse.lora import add_lora

        add_lora(model, cfg.optim.lora_rank)
    return model.train(), tokenizer  # from_pretrained returns eval mode; Lightning keeps module modes as given
