"""Build a run's pieces from its config: the DataModule and the (augmented) model with its tokenizer."""
from __future__ import annotations

from omegaconf import DictConfig

from tsparse.augment import AugmentedCausalLM, augment
from tsparse.config import ConfigError, to_container
from tsparse.data import WikiText2DataModule
from tsparse.models import load_base


def build_datamodule(cfg: DictConfig, tokenizer=None) -> WikiText2DataModule:
    kwargs = {k: v for k, v in to_container(cfg.data).items() if k != "source"}
    return WikiText2DataModule(tokenizer, source=cfg.data.source, seed=cfg.seed, **kwargs)


def build_model(cfg: DictConfig, datamodule: WikiText2DataModule) -> tuple[AugmentedCausalLM, object]:
    """Load the base (training a micro tokenizer on the train split if needed), attach the sparse
    modules and LoRA adapters, and give the DataModule the tokenizer."""
    lm, tokenizer = load_base(cfg.model, lambda: datamodule.texts["train"])
    max_context = getattr(lm.config, "max_position_embeddings", None)
    if max_context and cfg.data.block_size > max_context:
        raise ConfigError(f"data.block_size={cfg.data.block_size} exceeds the model context ({max_context})")
    datamodule.tokenizer = tokenizer
    model = augment(lm, cfg, tokenizer)
    if cfg.optim.base == "lora":
        from tsparse.lora import add_lora

        add_lora(model, cfg.optim.lora_rank)
    return model.train(), tokenizer  # from_pretrained returns eval mode; Lightning keeps module modes as given
