"""The augmented LLaMA as a Hugging Face model: `TsparseConfig` and `TsparseForCausalLM`.

`TsparseConfig` is a `LlamaConfig` plus one spec per attached module kind (stored as dicts so that
config.json stays plain JSON), the Engram hash multipliers and the compressed-token map. The model
is built from the Llama classes. Per decoder layer, with F the layer's residual branch,

    block(h) = peer_out(layer(h + engram(h, input_ids)))      peer_out(o) = o + peer(o)
    F(h) = block(h) - h

With mHC (variant=hyper) the residual state is n streams [B, T, n, d]: copied after the embedding,
x <- H_res x + H_post^T F(H_pre x) at mHC layers and x <- x + F(mean(x)) elsewhere, reduced before
the final norm. The base keeps LLaMA's key names, so a plain Llama checkpoint loads into it with
fresh modules, and every module starts as an exact identity.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import torch
from torch import Tensor, nn
from transformers import AutoConfig, AutoModelForCausalLM, DynamicCache, LlamaConfig, LlamaForCausalLM
from transformers.masking_utils import create_causal_mask
from transformers.modeling_outputs import BaseModelOutputWithPast
from transformers.models.llama.modeling_llama import (
    LlamaDecoderLayer, LlamaModel, LlamaPreTrainedModel, LlamaRMSNorm, LlamaRotaryEmbedding,
)

from tsparse.checks import ConfigError, check_placement
from tsparse.modules.engram import Engram, EngramSpec, EngramState, compressed_token_map, draw_multipliers
from tsparse.modules.mhc import GatedResidualAdapter, HyperConnection, MHCSpec, StreamReduce, expand_streams, uniform_step
from tsparse.modules.peer import PEER, PEERSpec
from tsparse.registry import KINDS, SPARSE_MODULE_TYPES


class TsparseConfig(LlamaConfig):
    """A LlamaConfig plus the sparse modules: `engram`, `peer`, `mhc` are spec dicts (or None);
    `engram_multipliers[i]` are the hash multipliers of the i-th Engram layer (drawn from
    `engram_hash_seed` when not given); `engram_token_map` maps ids to compressed ids."""

    model_type = "tsparse_llama"

    engram: dict | None = None
    peer: dict | None = None
    mhc: dict | None = None
    engram_hash_seed: int = 0
    engram_multipliers: list | None = None
    engram_token_map: list | None = None

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        specs = self.module_specs()  # validates every spec
        check_placement(specs, self.num_hidden_layers)
        engram = specs.get("engram")
        if engram is not None and self.engram_multipliers is None:
            self.engram_multipliers = [draw_multipliers(self.engram_hash_seed, i, max(engram.orders))
                                       for i in engram.layers]
        if engram is not None and engram.compress_tokens and self.engram_token_map is None:
            raise ConfigError("engram.compress_tokens=true needs engram_token_map (TsparseConfig.from_base(..., tokenizer=))")

    def module_specs(self) -> dict[str, Any]:
        """The typed spec of every attached kind, e.g. {"peer": PEERSpec(...)}."""
        return {name: kind.spec(**getattr(self, name)) for name, kind in KINDS.items() if getattr(self, name)}

    @property
    def num_streams(self) -> int:
        return MHCSpec(**self.mhc).num_streams if self.mhc else 1

    @classmethod
    def from_base(cls, base: LlamaConfig, specs: dict[str, Any], hash_seed: int = 0, tokenizer=None) -> "TsparseConfig":
        """The base's architecture with the given module specs attached."""
        fields = {k: v for k, v in base.to_dict().items()
                  if k not in ("model_type", "architectures", *KINDS) and not k.startswith("engram_")}
        token_map = None
        engram = specs.get("engram")
        if engram is not None and engram.compress_tokens:
            if tokenizer is None:
                raise ConfigError("engram.compress_tokens=true needs the tokenizer")
            token_map = compressed_token_map(tokenizer, base.vocab_size)
        return cls(**fields, **{k: dataclasses.asdict(s) for k, s in specs.items()}, engram_hash_seed=hash_seed,
                   engram_token_map=token_map)


class TsparseCache(DynamicCache):
    """The KV cache plus each Engram layer's history (`EngramState`), which follows the KV cache
    under beam reordering, batch selection and cropping."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.engram: dict[int, EngramState] = {}

    def engram_state(self, layer_idx: int) -> EngramState:
        return self.engram.setdefault(layer_idx, EngramState())

    def reset(self) -> None:
        super().reset()
        self.engram.clear()

    def reorder_cache(self, beam_idx: Tensor) -> None:
        super().reorder_cache(beam_idx)
        for state in self.engram.values():
            state.select(beam_idx)

    def batch_select_indices(self, indices: Tensor) -> None:
        super().batch_select_indices(indices)
        for state in self.engram.values():
            state.select(indices)

    def batch_repeat_interleave(self, repeats: int) -> None:
        super().batch_repeat_interleave(repeats)
        for state in self.engram.values():
            state.repeat_interleave(repeats)

    def crop(self, tokens_to_remove: int) -> None:
        super().crop(tokens_to_remove)
        for state in self.engram.values():
            state.crop(tokens_to_remove)


class TsparseDecoderLayer(LlamaDecoderLayer):
    """A Llama decoder layer with its optional Engram (on the input), PEER (on the output) and mHC
    (around the residual branch)."""

    def __init__(self, config: TsparseConfig, layer_idx: int):
        super().__init__(config, layer_idx)
        self.layer_idx = layer_idx
        specs, dim = config.module_specs(), config.hidden_size
        engram, peer, mhc = specs.get("engram"), specs.get("peer"), specs.get("mhc")
        self.num_streams = config.num_streams
        self.engram = self.peer = self.mhc = None
        if engram is not None and layer_idx in engram.layers:
            pad_id = config.eos_token_id if isinstance(config.eos_token_id, int) else 0
            self.engram = Engram(dim, engram, config.engram_multipliers[engram.layers.index(layer_idx)], pad_id,
                                 config.engram_token_map, norm_eps=config.rms_norm_eps)
        if peer is not None and layer_idx in peer.layers:
            self.peer = PEER(dim, peer, norm_eps=config.rms_norm_eps)
        if mhc is not None and layer_idx in mhc.layers:
            self.mhc = (HyperConnection(dim, mhc, norm_eps=config.rms_norm_eps) if mhc.variant == "hyper"
                        else GatedResidualAdapter(dim, mhc.adapter_bottleneck))

    def block(self, h: Tensor, input_ids: Tensor, **kwargs) -> Tensor:
        """Engram on the input, the Llama layer, then PEER (and the seed's adapter) on its output."""
        if self.engram is not None:
            cache = kwargs.get("cache")
            state = cache.engram_state(self.layer_idx) if isinstance(cache, TsparseCache) else None
            h = h + self.engram(h, input_ids, state=state)
        out = super().forward(h, **kwargs)
        if self.peer is not None:
            out = out + self.peer(out)
        if isinstance(self.mhc, GatedResidualAdapter):
            out = out + self.mhc(out)
        return out

    def forward(self, hidden_states: Tensor, input_ids: Tensor | None = None, **kwargs) -> Tensor:
        if self.num_streams == 1:
            return self.block(hidden_states, input_ids, **kwargs)

        def branch(h: Tensor) -> Tensor:
            return self.block(h, input_ids, **kwargs) - h

        return self.mhc(hidden_states, branch) if self.mhc is not None else uniform_step(hidden_states, branch)


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
        self.stream_reduce = StreamReduce(self.num_streams, config.mhc["reduce"]) if self.num_streams > 1 else None
        self.gradient_checkpointing = False
        self.post_init()

    def forward(self, input_ids: Tensor | None = None, attention_mask: Tensor | None = None,
                position_ids: Tensor | None = None, cache=None, inputs_embeds: Tensor | None = None,
                use_cache: bool | None = None, **kwargs) -> BaseModelOutputWithPast:
        if input_ids is None and self.config.engram:
            raise ValueError("Engram hashes token ids: pass input_ids (inputs_embeds alone is not enough)")
        if inputs_embeds is None:
            inputs_embeds = self.embed_tokens(input_ids)
        use_cache = self.config.use_cache if use_cache is None else use_cache
        if use_cache and cache is None:
            cache = TsparseCache(config=self.config)
        if self.config.engram and cache is not None and not isinstance(cache, TsparseCache):
            raise TypeError("Engram keeps per-sequence n-gram state in the cache: pass a tsparse.modeling.TsparseCache")
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


AutoConfig.register(TsparseConfig.model_type, TsparseConfig)
AutoModelForCausalLM.register(TsparseConfig, TsparseForCausalLM)

__all__ = ["EngramSpec", "MHCSpec", "PEERSpec", "TsparseCache", "TsparseConfig", "TsparseForCausalLM", "TsparseModel"]
