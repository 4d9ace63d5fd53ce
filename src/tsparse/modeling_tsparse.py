"""The augmented LLaMA as a Hugging Face model: `TsparseForCausalLM` over `TsparseConfig`.

The model is built from the Llama classes. Each decoder layer attaches the modules the registry places
there: with F the layer's residual branch,

    block(h) = out(layer(h + sum of input modules(h, input_ids)))   out(o) = o + sum of output modules(o)
    F(h) = block(h) - h

With several residual streams (mHC, variant=hyper) the residual state is [B, T, n, d]: copied after the
embedding, x <- m(x, F) at layers with a residual module and x <- x + F(mean(x)) elsewhere, reduced before
the final norm. The base keeps LLaMA's key names, so a plain Llama checkpoint loads into it with fresh
modules, and every module starts as an exact identity.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Iterator

import torch
from torch import Tensor, nn
from transformers import AutoModelForCausalLM, DynamicCache
from transformers.masking_utils import create_causal_mask
from transformers.modeling_outputs import BaseModelOutputWithPast
from transformers.models.llama.modeling_llama import (
    LlamaDecoderLayer, LlamaForCausalLM, LlamaModel, LlamaPreTrainedModel, LlamaRMSNorm, LlamaRotaryEmbedding,
)

from tsparse.configuration_tsparse import TsparseConfig
from tsparse.modules.streams import expand_streams, uniform_step
from tsparse.registry import ATTACH_POINTS, KINDS, SPARSE_MODULE_TYPES


class TsparseCache(DynamicCache):
    """The KV cache plus the generation state of the modules that keep one per sequence (a module with a
    `new_state()`, e.g. Engram's n-gram and conv history), which follows the KV cache under beam
    reordering, batch selection and cropping."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.module_states: dict[str, Any] = {}

    def module_state(self, key: str, module: nn.Module):
        return self.module_states.setdefault(key, module.new_state())

    def reset(self) -> None:
        super().reset()
        self.module_states.clear()

    def reorder_cache(self, beam_idx: Tensor) -> None:
        super().reorder_cache(beam_idx)
        for state in self.module_states.values():
            state.select(beam_idx)

    def batch_select_indices(self, indices: Tensor) -> None:
        super().batch_select_indices(indices)
        for state in self.module_states.values():
            state.select(indices)

    def batch_repeat_interleave(self, repeats: int) -> None:
        super().batch_repeat_interleave(repeats)
        for state in self.module_states.values():
            state.repeat_interleave(repeats)

    def crop(self, tokens_to_remove: int) -> None:
        super().crop(tokens_to_remove)
        for state in self.module_states.values():
            state.crop(tokens_to_remove)


class TsparseDecoderLayer(LlamaDecoderLayer):
    """A Llama decoder layer with the sparse modules the config places on it. Each kind's module is the
    attribute named after the kind (None where it is not attached), and `attached[point]` lists the
    kinds at each attach point ("input", "output", "residual"; see `registry.ModuleKind.attach`)."""

    def __init__(self, config: TsparseConfig, layer_idx: int):
        super().__init__(config, layer_idx)
        self.layer_idx = layer_idx
        self.num_streams = config.num_streams
        self.attached: dict[str, list[str]] = {point: [] for point in ATTACH_POINTS}
        specs = config.module_specs()
        for name, kind in KINDS.items():
            spec = specs.get(name)
            attached = spec is not None and layer_idx in spec.layers
            setattr(self, name, kind.build(spec, config, layer_idx) if attached else None)
            if attached:
                self.attached[kind.attach(spec)].append(name)

    def block(self, h: Tensor, input_ids: Tensor, **kwargs) -> Tensor:
        """Input modules, the Llama layer, then output modules."""
        cache = kwargs.get("cache")
        for name in self.attached["input"]:
            module = getattr(self, name)
            keeps_state = isinstance(cache, TsparseCache) and hasattr(module, "new_state")
            state = cache.module_state(f"{name}.L{self.layer_idx}", module) if keeps_state else None
            h = h + module(h, input_ids, state=state)
        out = super().forward(h, **kwargs)
        for name in self.attached["output"]:
            out = out + getattr(self, name)(out)
        return out

    def forward(self, hidden_states: Tensor, input_ids: Tensor | None = None, **kwargs) -> Tensor:
        if self.num_streams == 1:
            return self.block(hidden_states, input_ids, **kwargs)

        def branch(h: Tensor) -> Tensor:
            return self.block(h, input_ids, **kwargs) - h

        residual = self.attached["residual"]
        return getattr(self, residual[0])(hidden_states, branch) if residual else uniform_step(hidden_states, branch)


class _SparseModuleInit:
    """`_init_weights` for the sparse modules: their own init when fresh (a plain base loaded into
    the model), only their derived buffers when their weights were loaded."""

    def _initialize_weights(self, module: nn.Module, is_custom_code: bool = False) -> None:
        # transformers skips "custom code" modules whose direct parameters are all loaded, which would
        # also skip a sparse module that only has children (the adapter); _init_weights below checks
        # what was loaded itself, and the base's init functions are guarded, so no shortcut is needed.
        super()._initialize_weights(module, is_custom_code=False)

    def _init_weights(self, module: nn.Module) -> None:
        if isinstance(module, SPARSE_MODULE_TYPES):
            if any(getattr(p, "_is_hf_initialized", False) for p in module.parameters()):
                getattr(module, "reset_buffers", lambda: None)()
            else:
                module.reset_parameters()
        else:
            super()._init_weights(module)


# A plain base checkpoint has none of the module weights: they are initialised fresh by design.
MODULE_KEY_PATTERNS = [rf"\.{kind}\." for kind in KINDS] + [r"stream_reduce\."]


class TsparseModel(_SparseModuleInit, LlamaModel):
    """LlamaModel whose forward passes `input_ids` to every layer and carries the mHC streams."""

    config_class = TsparseConfig
    _no_split_modules = ["TsparseDecoderLayer"]
    _keys_to_ignore_on_load_missing = MODULE_KEY_PATTERNS

    def __init__(self, config: TsparseConfig):
        LlamaPreTrainedModel.__init__(self, config)
        self.padding_idx, self.vocab_size = config.pad_token_id, config.vocab_size
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, self.padding_idx)
        self.layers = nn.ModuleList([TsparseDecoderLayer(config, i) for i in range(config.num_hidden_layers)])
        self.norm = LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.rotary_emb = LlamaRotaryEmbedding(config=config)
        self.num_streams = config.num_streams
        self.stream_reduce = next((KINDS[name].reduce(spec) for name, spec in config.module_specs().items()
                                   if KINDS[name].streams(spec) > 1), None)
        self.reads_ids = any(layer.attached["input"] for layer in self.layers)
        self.keeps_state = any(hasattr(m, "new_state") for m in self.modules())
        self.gradient_checkpointing = False
        self.post_init()

    def forward(self, input_ids: Tensor | None = None, attention_mask: Tensor | None = None,
                position_ids: Tensor | None = None, cache=None, inputs_embeds: Tensor | None = None,
                use_cache: bool | None = None, **kwargs) -> BaseModelOutputWithPast:
        if input_ids is None and self.reads_ids:
            raise ValueError("modules on layer inputs read token ids: pass input_ids (inputs_embeds alone is not enough)")
        if inputs_embeds is None:
            inputs_embeds = self.embed_tokens(input_ids)
        use_cache = self.config.use_cache if use_cache is None else use_cache
        if use_cache and cache is None:
            cache = TsparseCache(config=self.config)
        if cache is not None and not isinstance(cache, TsparseCache) and self.keeps_state:
            raise TypeError("a sparse module keeps per-sequence state in the cache: pass a TsparseCache")
        if position_ids is None:
            past = cache.get_seq_length() if cache is not None else 0
            position_ids = (torch.arange(inputs_embeds.shape[1], device=inputs_embeds.device) + past).unsqueeze(0)
        mask = create_causal_mask(config=self.config, inputs_embeds=inputs_embeds, attention_mask=attention_mask,
                                  cache=cache, position_ids=position_ids)
        position_embeddings = self.rotary_emb(inputs_embeds, position_ids=position_ids)

        streams = self.num_streams
        x = expand_streams(inputs_embeds, streams) if streams > 1 else inputs_embeds   # [B, T, n, d] or [B, T, d]
        for layer in self.layers[: self.config.num_hidden_layers]:
            x = layer(x, input_ids=input_ids, attention_mask=mask, position_embeddings=position_embeddings,
                      position_ids=position_ids, cache=cache, use_cache=use_cache, **kwargs)
        hidden = self.stream_reduce(x) if streams > 1 else x
        return BaseModelOutputWithPast(last_hidden_state=self.norm(hidden), cache=cache)


class TsparseForCausalLM(_SparseModuleInit, LlamaForCausalLM):
    """LlamaForCausalLM over a `TsparseModel`: save_pretrained / from_pretrained / generate as usual."""

    config_class = TsparseConfig
    _no_split_modules = ["TsparseDecoderLayer"]
    _keys_to_ignore_on_load_missing = MODULE_KEY_PATTERNS

    def __init__(self, config: TsparseConfig):
        LlamaPreTrainedModel.__init__(self, config)
        self.model = TsparseModel(config)
        self.vocab_size = config.vocab_size
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def _prepare_cache_for_generation(self, generation_config, model_kwargs: dict, *args, **kwargs):
        """generate() builds a DynamicCache; use a TsparseCache, which also holds Engram's state."""
        super()._prepare_cache_for_generation(generation_config, model_kwargs, *args, **kwargs)
        if type(model_kwargs.get("cache")) is DynamicCache and not getattr(model_kwargs["cache"], "_is_user_defined", False):
            model_kwargs["cache"] = TsparseCache(config=self.config)

    def sparse_modules(self) -> dict[str, nn.Module]:
        """`{kind}.L{layer}` -> module, for every attached sparse module."""
        return {f"{kind}.L{i}": module for i, layer in enumerate(self.model.layers) for kind in KINDS
                if (module := getattr(layer, kind)) is not None}

    @contextmanager
    def bypassing(self, *kinds: str) -> Iterator[TsparseForCausalLM]:
        """This model without its `kinds` modules (the same weights, nothing copied): every layer skips them
        while the context lasts. Only modules on a layer's input or output can be left out; a residual
        module carries the streams."""
        layers = self.model.layers
        if any(kind in layer.attached["residual"] for layer in layers for kind in kinds):
            raise ValueError(f"{kinds}: a residual module cannot be bypassed (it carries the residual streams)")
        attached = [{point: list(names) for point, names in layer.attached.items()} for layer in layers]
        for layer in layers:
            for names in layer.attached.values():
                names[:] = [n for n in names if n not in kinds]
        try:
            yield self
        finally:
            for layer, saved in zip(layers, attached):
                layer.attached = saved


AutoModelForCausalLM.register(TsparseConfig, TsparseForCausalLM)

__all__ = ["TsparseCache", "TsparseConfig", "TsparseForCausalLM", "TsparseModel"]
