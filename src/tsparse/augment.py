"""Attach PEER, Engram and mHC to a Hugging Face `LlamaForCausalLM` by config.

Every decoder layer is wrapped in an `AugmentedDecoderLayer`. Per layer, the block is

    block(h) = peer_out(layer(h + engram(h, ids)))      with  peer_out(o) = o + peer(o)

and its residual branch is F(h) = block(h) - h. With mHC the residual state is n streams
([B, T, n*d] between layers): mHC layers apply x <- H_res x + H_post^T F(H_pre x), the others read
the stream mean and write F to every stream. Streams are copied at the embedding and reduced before
the final norm. Token ids reach Engram through a per-forward `TokenContext`, never a stale attribute.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch
from omegaconf import DictConfig
from torch import Tensor, nn

from tsparse.config import ConfigError, check_choice
from tsparse.modules.engram import Engram
from tsparse.modules.mhc import GatedResidualAdapter, HyperConnection, StreamReduce, expand_streams, uniform_step
from tsparse.modules.peer import PEER

MODULE_TYPES = ("engram", "peer", "mhc")
TABLE_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


class TokenContext:
    """Holds the input ids of the forward pass in progress; reading outside one is an error."""

    def __init__(self):
        self._ids: Tensor | None = None

    @contextmanager
    def bind(self, input_ids: Tensor) -> Iterator[None]:
        previous, self._ids = self._ids, input_ids
        try:
            yield
        finally:
            self._ids = previous

    @property
    def input_ids(self) -> Tensor:
        if self._ids is None:
            raise RuntimeError("Engram needs token ids: call the AugmentedCausalLM, not the inner HF model")
        return self._ids


class AugmentedDecoderLayer(nn.Module):
    """A decoder layer with its optional Engram (before), PEER (after) and mHC (around the residual)."""

    def __init__(self, layer: nn.Module, streams: int, tokens: TokenContext, engram: Engram | None = None,
                 peer: PEER | None = None, mhc: HyperConnection | GatedResidualAdapter | None = None):
        super().__init__()
        self.layer, self.streams, self.engram, self.peer, self.mhc = layer, streams, engram, peer, mhc
        self._tokens = tokens

    def _block(self, h: Tensor, args, kwargs) -> tuple[Tensor, tuple]:
        if self.engram is not None:
            h = h + self.engram(h, self._tokens.input_ids)
        out = self.layer(h, *args, **kwargs)
        # transformers >= 4.54 returns a tensor, older versions a tuple: keep PEER on the hidden state either way.
        hidden, rest = (out[0], tuple(out[1:])) if isinstance(out, tuple) else (out, None)
        if self.peer is not None:
            hidden = hidden + self.peer(hidden)
        if isinstance(self.mhc, GatedResidualAdapter):
            hidden = hidden + self.mhc(hidden)
        return hidden, rest

    def forward(self, hidden_states: Tensor, *args, **kwargs):
        if self.streams == 1:
            hidden, rest = self._block(hidden_states, args, kwargs)
        else:
            rest = None

            def branch(h: Tensor) -> Tensor:
                nonlocal rest
                out, rest = self._block(h, args, kwargs)
                return out - h

            x = hidden_states.unflatten(-1, (self.streams, -1))
            x = self.mhc(x, branch) if isinstance(self.mhc, HyperConnection) else uniform_step(x, branch)
            hidden = x.flatten(-2)
        return hidden if rest is None else (hidden, *rest)


class AugmentedCausalLM(nn.Module):
    """An HF causal LM with sparse modules attached; `forward` takes the same arguments."""

    def __init__(self, lm: nn.Module, streams: int = 1, reduce: str = "mean"):
        super().__init__()
        self.lm, self.streams, self.tokens = lm, streams, TokenContext()
        self.stream_reduce = StreamReduce(streams, reduce) if streams > 1 else None
        if streams > 1:  # every layer must act on the streams
            for i in range(len(self.layers)):
                self.wrap(i)
            decoder = lm.get_decoder()
            decoder.embed_tokens.register_forward_hook(self._expand)
            decoder.norm.register_forward_pre_hook(self._reduce)

    def wrap(self, index: int) -> AugmentedDecoderLayer:
        """The wrapper of decoder layer `index`, created on first use (unwrapped layers keep HF's keys)."""
        layer = self.layers[index]
        if not isinstance(layer, AugmentedDecoderLayer):
            layer = self.layers[index] = AugmentedDecoderLayer(layer, self.streams, self.tokens)
        return layer

    def _expand(self, module, inputs, output: Tensor) -> Tensor:
        return expand_streams(output, self.streams).flatten(-2)

    def _reduce(self, module, inputs):
        return (self.stream_reduce(inputs[0].unflatten(-1, (self.streams, -1))), *inputs[1:])

    @property
    def layers(self) -> nn.ModuleList:
        return self.lm.get_decoder().layers

    @property
    def config(self):
        return self.lm.config

    def forward(self, input_ids: Tensor, **kwargs):
        with self.tokens.bind(input_ids):
            return self.lm(input_ids=input_ids, **kwargs)


def _construct(key: str, factory, *args, **kwargs):
    """Build a module, turning its ValueError on a bad setting into a one-line ConfigError naming `key`."""
    try:
        return factory(*args, **kwargs)
    except ValueError as err:
        message = str(err)
        raise ConfigError(message if message.startswith(key) else f"{key}: {message}") from None


def _check_layers(key: str, layers, num_layers: int) -> list[int]:
    layers = list(layers)
    bad = [i for i in layers if not isinstance(i, int) or not 0 <= i < num_layers]
    if bad or len(set(layers)) != len(layers):
        raise ConfigError(f"{key}={layers} must be distinct layer indices in [0, {num_layers - 1}] for this model")
    return layers


def augment(lm: nn.Module, cfg: DictConfig, tokenizer=None) -> AugmentedCausalLM:
    """Wrap `lm` and attach the modules listed in `cfg.sparse.modules`, configured by `cfg.engram/peer/mhc`."""
    modules = list(cfg.sparse.modules)
    for name in modules:
        check_choice("sparse.modules[]", name, MODULE_TYPES)
    config = lm.config
    dim, num_layers = config.hidden_size, config.num_hidden_layers
    use_streams = "mhc" in modules and cfg.mhc.variant == "hyper"
    if "mhc" in modules:
        check_choice("mhc.variant", cfg.mhc.variant, ["hyper", "adapter"])
    model = _construct("mhc", AugmentedCausalLM, lm, cfg.mhc.streams if use_streams else 1, cfg.mhc.reduce)
    if "engram" in modules:
        e = cfg.engram
        check_choice("engram.table_dtype", e.table_dtype, list(TABLE_DTYPES))
        token_map = compressed_token_map(tokenizer, config.vocab_size) if e.compress_tokens else None
        pad_id = config.eos_token_id if isinstance(config.eos_token_id, int) else 0
        for i in _check_layers("engram.layers", e.layers, num_layers):
            model.wrap(i).engram = _construct(
                "engram", Engram, dim, i, orders=tuple(e.orders), heads_per_order=e.heads_per_order, dim_per_order=e.dim_per_order,
                table_rows=e.table_rows, conv_kernel=e.conv_kernel, seed=cfg.seed, pad_id=pad_id,
                token_map=token_map, table_dtype=TABLE_DTYPES[e.table_dtype], sparse_grad=e.sparse_grad)
    if "peer" in modules:
        p = cfg.peer
        check_choice("peer.table_dtype", p.table_dtype, list(TABLE_DTYPES))
        for i in _check_layers("peer.layers", p.layers, num_layers):
            model.wrap(i).peer = _construct(
                "peer", PEER, dim, p.num_experts, heads=p.heads, top_k=p.top_k, key_dim=p.key_dim, gate=p.gate,
                query_batchnorm=p.query_batchnorm, input_norm=p.input_norm,
                table_dtype=TABLE_DTYPES[p.table_dtype], sparse_grad=p.sparse_grad)
    if "mhc" in modules:
        m = cfg.mhc
        for i in _check_layers("mhc.layers", m.layers, num_layers):
            model.wrap(i).mhc = (
                _construct("mhc", HyperConnection, dim, m.streams, sinkhorn_iters=m.sinkhorn_iters,
                           alpha_init=m.alpha_init, post_bias=m.post_bias, res_diag_bias=m.res_diag_bias)
                if use_streams else _construct("mhc", GatedResidualAdapter, dim, m.adapter_bottleneck))
    return model


def compressed_token_map(tokenizer, vocab_size: int) -> Tensor:
    """Map ids whose decoded text is equal after NFKC, lowercasing and stripping to one id (Engram's
    optional tokenizer compression)."""
    import unicodedata

    if tokenizer is None:
        raise ConfigError("engram.compress_tokens=true needs the tokenizer")
    canonical: dict[str, int] = {}
    ids = [canonical.setdefault(unicodedata.normalize("NFKC", tokenizer.decode([i])).lower().strip(), len(canonical))
           for i in range(vocab_size)]
    return torch.tensor(ids, dtype=torch.long)


def params_by_group(model: nn.Module) -> dict[str, list[tuple[str, nn.Parameter]]]:
    """Every (name, parameter) of the model under its group: engram, peer, mhc, or base (the rest)."""
    kinds = {"engram": (Engram,), "peer": (PEER,), "mhc": (HyperConnection, StreamReduce, GatedResidualAdapter)}
    owner: dict[int, str] = {}
    for group, types in kinds.items():
        for module in model.modules():
            if isinstance(module, types):
                owner.update({id(p): group for p in module.parameters()})
    groups: dict[str, list[tuple[str, nn.Parameter]]] = {name: [] for name in (*kinds, "base")}
    for name, p in model.named_parameters():
        groups[owner.get(id(p), "base")].append((name, p))
    return groups


def param_groups(model: nn.Module, base: str = "frozen") -> dict[str, list[nn.Parameter]]:
    """Trainable parameters by group; the base group is empty when frozen and holds only LoRA weights
    under `lora`. Frozen base parameters get `requires_grad=False`."""
    groups = {}
    for group, named in params_by_group(model).items():
        if group == "base":
            for name, p in named:
                p.requires_grad_(base == "finetune" or (base == "lora" and "lora_" in name))
            named = [(n, p) for n, p in named if p.requires_grad]
        groups[group] = [p for _, p in named]
    return groups
