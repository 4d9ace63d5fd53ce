"""Attaching PEER, Engram and mHC to an HF Llama: identity at init, wiring, gradients, placement errors."""
import pytest
import torch
from omegaconf import OmegaConf
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

from tsparse.augment import AugmentedCausalLM, augment, param_groups, params_by_group
from tsparse.config import ConfigError

from conftest import compose_cfg, nano_overrides

MODULE_SETS = {"engram": ["engram"], "peer": ["peer"], "mhc": ["mhc"], "hybrid": ["engram", "peer"],
               "triple": ["engram", "peer", "mhc"]}


def base_lm(seed=0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=4,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64)
    return LlamaForCausalLM(config).eval()


def sparse_cfg(tmp_path, sparse: str, *extra: str):
    return compose_cfg(nano_overrides(tmp_path, tmp_path, f"sparse={sparse}", "peer.num_experts=64", "peer.top_k=4",
                                      "peer.key_dim=8", "engram.table_rows=101", "engram.dim_per_order=16",
                                      "engram.heads_per_order=2", *extra))


def build(tmp_path, sparse: str, *extra: str):
    lm = base_lm()
    reference = base_lm()
    model = augment(lm, sparse_cfg(tmp_path, sparse, *extra)).eval()
    return model, reference


IDS = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("sparse", list(MODULE_SETS))
def test_identity_at_init(sparse, tmp_path):
    model, reference = build(tmp_path, sparse)
    with torch.no_grad():
        torch.testing.assert_close(model(IDS).logits, reference(input_ids=IDS).logits, atol=1e-5, rtol=0)


def test_mhc_adapter_variant_is_identity_at_init(tmp_path):
    model, reference = build(tmp_path, "mhc", "mhc.variant=adapter")
    assert model.streams == 1
    with torch.no_grad():
        torch.testing.assert_close(model(IDS).logits, reference(input_ids=IDS).logits, atol=1e-5, rtol=0)


def perturb_(module: nn.Module, scale=0.5) -> None:
    """Make every zero-initialised output path non-zero."""
    with torch.no_grad():
        for p in module.parameters():
            if p.is_floating_point():
                p.add_(torch.randn_like(p) * scale * (p.abs().mean() + 0.1))


@pytest.mark.parametrize("kind", ["engram", "peer", "mhc"])
def test_each_module_changes_output_and_gets_gradients(kind, tmp_path):
    model, reference = build(tmp_path, "triple")
    targets = [m for layer in model.layers for m in [getattr(layer, kind, None)] if m is not None]
    assert targets, f"no {kind} attached"
    for m in targets:
        perturb_(m)
    logits = model(IDS).logits
    assert not torch.allclose(logits, reference(input_ids=IDS).logits, atol=1e-3)
    logits.float().pow(2).mean().backward()
    for group in ("engram", "peer", "mhc"):
        grads = [p.grad for _, p in params_by_group(model)[group]]
        assert any(g is not None and (g.coalesce().values() if g.is_sparse else g).abs().sum() > 0 for g in grads), group


class TupleLayer(nn.Module):
    """Mimics transformers < 4.54, whose decoder layers return a tuple."""

    def __init__(self, layer):
        super().__init__()
        self.inner = layer

    def forward(self, *args, **kwargs):
        return (self.inner(*args, **kwargs), None)


@pytest.mark.parametrize("sparse", ["peer", "triple"])
def test_tuple_returning_layers_keep_peer(sparse, tmp_path):
    """The original code indexed outputs[0] and silently dropped PEER; both return types must work."""
    model, _ = build(tmp_path, sparse)
    index = next(i for i, layer in enumerate(model.layers) if getattr(layer, "peer", None) is not None)
    wrapper = model.layers[index]
    perturb_(wrapper.peer)
    hidden = torch.randn(2, 16, 32 * model.streams)
    position_ids = torch.arange(16)[None]
    rope = model.lm.model.rotary_emb(hidden, position_ids)
    with torch.no_grad():
        as_tensor = wrapper(hidden, position_embeddings=rope, position_ids=position_ids)
        wrapper.peer.up.weight.zero_()
        without_peer = wrapper(hidden, position_embeddings=rope, position_ids=position_ids)
        perturb_(wrapper.peer)
        torch.manual_seed(0)
        wrapper.layer = TupleLayer(wrapper.layer)
        as_tuple = wrapper(hidden, position_embeddings=rope, position_ids=position_ids)
    assert isinstance(as_tensor, torch.Tensor) and isinstance(as_tuple, tuple) and as_tuple[1] is None
    assert not torch.allclose(as_tensor, without_peer, atol=1e-4)
    assert not torch.allclose(as_tuple[0], without_peer, atol=1e-4)


def test_param_groups_and_frozen_base(tmp_path):
    model, _ = build(tmp_path, "triple")
    groups = param_groups(model, "frozen")
    assert groups["base"] == [] and all(groups[k] for k in ("engram", "peer", "mhc"))
    assert not any(p.requires_grad for _, p in params_by_group(model)["base"])
    assert len(param_groups(model, "finetune")["base"]) == len(params_by_group(model)["base"])
    names = {n for n, _ in params_by_group(model)["mhc"]}
    assert any("stream_reduce" not in n for n in names)


@pytest.mark.parametrize("override,needle", [
    ("peer.layers=[9]", "peer.layers=[9] must be distinct layer indices in [0, 3]"),
    ("engram.layers=[1,1]", "engram.layers=[1, 1] must be distinct layer indices"),
    ("peer.num_experts=1000", "peer.num_experts=1000 must be a positive perfect square"),
    ("peer.num_experts=0", "peer.num_experts=0 must be a positive perfect square"),
    ("peer.num_experts=-4", "peer.num_experts=-4 must be a positive perfect square"),
    ("mhc.variant=ladder", "mhc.variant='ladder' is not allowed; choose one of ['hyper', 'adapter']"),
])
def test_bad_placement_is_a_config_error(override, needle, tmp_path):
    with pytest.raises(ConfigError) as err:
        augment(base_lm(), sparse_cfg(tmp_path, "triple", override))
    assert needle in str(err.value) and "\n" not in str(err.value)


def test_engram_needs_token_context(tmp_path):
    model, _ = build(tmp_path, "engram")
    with pytest.raises(RuntimeError, match="needs token ids"):
        model.lm(input_ids=IDS)


def test_state_dict_round_trip(tmp_path):
    model, _ = build(tmp_path, "triple")
    perturb_(model)
    path = tmp_path / "model.pt"
    torch.save(model.state_dict(), path)
    fresh, _ = build(tmp_path, "triple")
    fresh.load_state_dict(torch.load(path))
    with torch.no_grad():
        torch.testing.assert_close(fresh(IDS).logits, model(IDS).logits)


def test_engram_token_compression_merges_case_variants(tmp_path, wikitext_small):
    from tsparse.augment import compressed_token_map
    from tsparse.tokenizer import train_bpe

    tok = train_bpe((wikitext_small / "train.txt").read_text(), 400)
    token_map = compressed_token_map(tok, len(tok))
    vocab = tok.get_vocab()
    def lower(piece: str) -> str:  # lowercase the text, not ByteLevel's space marker "Ġ"
        return piece[0] + piece[1:].lower() if piece.startswith("Ġ") else piece.lower()

    def is_word(piece: str) -> bool:
        text = tok.decode([vocab[piece]]).strip()
        return text.isascii() and text.isalpha()

    pairs = [(vocab[w], vocab[lower(w)]) for w in vocab if is_word(w) and w != lower(w) and lower(w) in vocab]
    assert pairs, "the tokenizer should hold some case variants"
    assert all(token_map[a] == token_map[b] for a, b in pairs)
    assert token_map.max() < len(tok) and len(set(token_map.tolist())) < len(tok)
