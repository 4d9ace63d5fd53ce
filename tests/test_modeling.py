"""TsparseForCausalLM: identity over a plain base, wiring of every spec key, gradients, save/load."""
from __future__ import annotations

import dataclasses
import os
import subprocess
import sys

import pytest
import torch
from torch import nn
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from tsparse import TsparseConfig, TsparseForCausalLM
from tsparse.checks import ConfigError
from tsparse.modules.engram import EngramSpec, compressed_token_map, normalize_token_text
from tsparse.modules.mhc import GatedResidualAdapter, HyperConnection, MHCSpec
from tsparse.modules.peer import PEERSpec
from tsparse.registry import KINDS, params_by_group, trainable_groups

BASE = LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=2,
                   num_key_value_heads=1, max_position_embeddings=64, eos_token_id=0, bos_token_id=0)
SPECS = {
    "engram": EngramSpec(layers=[0, 1], heads_per_order=2, dim_per_order=16, table_rows=101),
    "peer": PEERSpec(layers=[2, 3], num_experts=64, top_k=4, key_dim=8),
    "mhc": MHCSpec(layers=[1, 2]),
}
OPTIONS = {
    "none": {}, "engram": {"engram": {}}, "peer": {"peer": {}}, "mhc": {"mhc": {}},
    "mhc_adapter": {"mhc": {"variant": "adapter"}}, "hybrid": {"engram": {}, "peer": {}},
    "triple": {"engram": {}, "peer": {}, "mhc": {}},
}
IDS = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(1))


def specs(option: str, **changes: dict) -> dict:
    """The specs of a `sparse` option, with per-kind field changes."""
    chosen = {**OPTIONS[option], **changes}
    return {kind: dataclasses.replace(SPECS[kind], **{**OPTIONS[option].get(kind, {}), **changes.get(kind, {})})
            for kind in chosen}


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("base")
    LlamaForCausalLM(BASE).save_pretrained(path)
    return path


def from_base(base_dir, option: str, tokenizer=None, **changes) -> TsparseForCausalLM:
    config = TsparseConfig.from_base(BASE, specs(option, **changes), hash_seed=3, tokenizer=tokenizer)
    return TsparseForCausalLM.from_pretrained(base_dir, config=config).eval()


def perturb_(module: nn.Module, scale=0.5) -> None:
    """Make every zero-initialised output path non-zero."""
    with torch.no_grad():
        for p in module.parameters():
            if p.is_floating_point():
                p.add_((torch.randn_like(p.float()) * scale * (p.float().abs().mean() + 0.1)).to(p.dtype))


@pytest.mark.parametrize("option", list(OPTIONS))
def test_identity_at_init_over_a_plain_base(option, base_dir):
    base = LlamaForCausalLM.from_pretrained(base_dir).eval()
    model = from_base(base_dir, option)
    with torch.no_grad():
        torch.testing.assert_close(model(IDS).logits, base(IDS).logits, atol=1e-5, rtol=0)
    assert [k for k in model.state_dict() if k in base.state_dict()] == list(base.state_dict())  # Llama's key names


@pytest.mark.parametrize("kind", list(KINDS))
def test_each_module_changes_the_output_and_gets_gradients(kind, base_dir):
    model, base = from_base(base_dir, "triple"), LlamaForCausalLM.from_pretrained(base_dir).eval()
    targets = [m for name, m in model.sparse_modules().items() if name.startswith(f"{kind}.")]
    assert len(targets) == len(SPECS[kind].layers)
    for module in targets:
        perturb_(module)
    logits = model(IDS).logits
    assert not torch.allclose(logits, base(IDS).logits, atol=1e-3)
    logits.pow(2).mean().backward()
    for group in KINDS[kind].groups:
        grads = [p.grad for _, p in params_by_group(model)[group]]
        assert grads and all(g is not None and (g.coalesce().values() if g.is_sparse else g).abs().sum() > 0
                             for g in grads), group


ROUND_TRIPS = {**{o: {} for o in OPTIONS}, "compress_tokens": {"engram": {"compress_tokens": True}},
               "bf16_tables": {"engram": {"table_dtype": "bfloat16"}, "peer": {"table_dtype": "bfloat16"}},
               "mhc_learned_reduce": {"mhc": {"reduce": "learned"}}}


class CaseTokenizer:
    """Ids whose text differs only by case (id i and i + 64) share a compressed id."""

    def decode(self, ids):
        return f"tok{ids[0] % 64}" if ids[0] < 64 else f"TOK{ids[0] % 64}"

    def convert_ids_to_tokens(self, i):
        return self.decode([i])


@pytest.mark.parametrize("case", list(ROUND_TRIPS))
def test_save_pretrained_round_trip_gives_identical_logits(case, base_dir, tmp_path):
    changes = ROUND_TRIPS[case]
    option = case if case in OPTIONS else "triple"
    model = from_base(base_dir, option, tokenizer=CaseTokenizer(), **changes)
    perturb_(model)
    model.save_pretrained(tmp_path / "out")
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    assert type(loaded) is TsparseForCausalLM
    assert loaded.config.module_specs() == model.config.module_specs()
    assert loaded.config.engram_multipliers == model.config.engram_multipliers
    assert loaded.config.engram_token_map == model.config.engram_token_map
    with torch.no_grad():
        torch.testing.assert_close(loaded(IDS).logits, model(IDS).logits, atol=0, rtol=0)
    if case == "compress_tokens":
        engram = loaded.sparse_modules()["engram.L0"]
        assert engram.token_map[5] == engram.token_map[69] and engram.token_map[5] != engram.token_map[6]
    if case == "bf16_tables":
        assert all(t.dtype == torch.bfloat16 for m in loaded.sparse_modules().values()
                   if hasattr(m, "table_parameters") for t in m.table_parameters())


def test_a_fresh_process_loads_the_export_with_auto_classes(base_dir, tmp_path):
    model = from_base(base_dir, "triple")
    perturb_(model)
    model.save_pretrained(tmp_path / "out")
    with torch.no_grad():
        expected = model(IDS).logits
    torch.save({"ids": IDS, "logits": expected}, tmp_path / "expected.pt")
    code = ("import sys, torch, tsparse, transformers; "
            "m = transformers.AutoModelForCausalLM.from_pretrained(sys.argv[1]).eval(); "
            "e = torch.load(sys.argv[2], weights_only=True); "
            "torch.testing.assert_close(m(e['ids']).logits, e['logits'], atol=0, rtol=0); print('same logits')")
    out = subprocess.run([sys.executable, "-c", code, str(tmp_path / "out"), str(tmp_path / "expected.pt")],
                         capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"}, timeout=300)
    assert out.returncode == 0 and "same logits" in out.stdout, out.stderr[-2000:]


NON_DEFAULT = {
    "engram": dict(layers=[3], orders=[2, 4], heads_per_order=4, dim_per_order=8, table_rows=211, conv_kernel=2,
                   compress_tokens=True, table_dtype="bfloat16", sparse_grad=False),
    "peer": dict(layers=[0], num_experts=100, heads=3, top_k=5, key_dim=6, gate="relu", query_batchnorm=True,
                 input_norm=False, table_dtype="bfloat16", sparse_grad=False),
    "mhc": dict(layers=[2], variant="hyper", streams=3, reduce="learned", sinkhorn_iters=7, alpha_init=0.03,
                post_bias=0.7, res_diag_bias=0.4, adapter_bottleneck=9),
}


def test_every_spec_key_reaches_the_built_module():
    for kind, values in NON_DEFAULT.items():
        spec_type = KINDS[kind].spec
        defaults = spec_type()
        assert set(values) == {f.name for f in dataclasses.fields(spec_type)}, f"{kind}: test every key"
        assert all(getattr(defaults, k) != v for k, v in values.items() if k != "variant"), kind
    config = TsparseConfig.from_base(BASE, {k: KINDS[k].spec(**v) for k, v in NON_DEFAULT.items()},
                                     tokenizer=CaseTokenizer())
    model = TsparseForCausalLM(config)
    layers = model.model.layers
    assert [i for i, layer in enumerate(layers) if layer.engram is not None] == [3]
    assert [i for i, layer in enumerate(layers) if layer.peer is not None] == [0]
    assert [i for i, layer in enumerate(layers) if layer.mhc is not None] == [2]

    engram = layers[3].engram
    assert engram.orders == (2, 4) and engram.heads_per_order == 4 and engram.head_dim == 2
    assert min(engram.primes_list) >= 211 and len(engram.primes_list) == 8
    assert engram.conv.kernel_size == (2,) and engram.conv.dilation == (4,)
    assert engram.token_map is not None and engram.table.weight.dtype == torch.bfloat16
    assert engram.table.sparse is False and engram.sparse_grad is False

    peer = layers[0].peer
    assert (peer.num_experts, peer.side, peer.heads, peer.top_k, peer.key_dim) == (100, 10, 3, 5, 6)
    assert peer.keys.shape == (3, 10, 2, 6) and peer.query.out_features == 2 * 3 * 6
    assert peer.gate == "relu" and isinstance(peer.query_norm, nn.BatchNorm1d) and peer.input_norm is False
    assert peer.down.weight.dtype == peer.up.weight.dtype == torch.bfloat16 and peer.down.sparse is False

    mhc = layers[2].mhc
    assert isinstance(mhc, HyperConnection) and mhc.streams == 3 and mhc.sinkhorn_iters == 7
    assert model.config.num_streams == 3 and model.model.stream_reduce.weight.shape == (3,)
    assert torch.equal(mhc.alpha_res.detach(), torch.tensor(0.03))
    assert mhc.b_post.detach().max().item() == pytest.approx(0.7) and mhc.b_res.detach()[0, 0].item() == pytest.approx(0.4)
    with torch.no_grad():
        assert model(IDS).logits.shape == (2, 16, 128)

    adapter = TsparseForCausalLM(TsparseConfig.from_base(BASE, {"mhc": MHCSpec(layers=[1], variant="adapter",
                                                                                adapter_bottleneck=9)}))
    assert isinstance(adapter.model.layers[1].mhc, GatedResidualAdapter)
    assert adapter.model.layers[1].mhc.down.out_features == 9 and adapter.config.num_streams == 1


@pytest.mark.parametrize("kind,layers,needle", [
    ("peer", [9], "peer.layers=[9]: [9] outside this model's layers [0, 3]"),
    ("engram", [1, 1], "engram.layers=[1, 1] must be distinct non-negative layer indices"),
    ("mhc", [-1], "mhc.layers=[-1] must be distinct non-negative layer indices"),
])
def test_bad_placement_is_one_line(kind, layers, needle):
    with pytest.raises(ValueError) as err:
        TsparseConfig.from_base(BASE, {kind: dataclasses.replace(SPECS[kind], layers=layers)})
    assert needle in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize("kind,change,needle", [
    ("peer", dict(num_experts=1000), "peer.num_experts=1000 must be a positive perfect square"),
    ("peer", dict(top_k=9), "peer.top_k=9 must be in [1, sqrt(num_experts)=8]"),
    ("peer", dict(gate="sigmoid"), "peer.gate='sigmoid' is not allowed; choose one of ['softmax', 'relu']"),
    ("engram", dict(orders=[1, 2]), "engram.orders=[1, 2] must be distinct integers >= 2"),
    ("engram", dict(table_dtype="fp8"), "engram.table_dtype='fp8' is not allowed"),
    ("mhc", dict(variant="ladder"), "mhc.variant='ladder' is not allowed; choose one of ['hyper', 'adapter']"),
    ("mhc", dict(streams=1), "mhc.streams=1 must be an integer >= 2"),
])
def test_bad_spec_values_are_one_line_config_errors(kind, change, needle):
    with pytest.raises(ConfigError) as err:
        dataclasses.replace(SPECS[kind], **change)
    assert needle in str(err.value) and "\n" not in str(err.value)


def test_engram_needs_input_ids(base_dir):
    model = from_base(base_dir, "engram")
    with pytest.raises(ValueError, match="pass input_ids"):
        model(inputs_embeds=torch.randn(1, 4, 32))


def test_param_groups_split_tables_and_freeze_the_base(base_dir):
    model = from_base(base_dir, "triple")
    named = params_by_group(model)
    assert {n.rsplit(".", 2)[-2] for n, _ in named["peer_table"]} == {"down", "up"}
    assert {n.rsplit(".", 2)[-2] for n, _ in named["engram_table"]} == {"table"}
    assert all(".peer." in n for n, _ in named["peer"]) and not any(n.endswith(("down.weight", "up.weight"))
                                                                     for n, _ in named["peer"])
    groups = trainable_groups(model, "frozen")
    assert groups["base"] == [] and all(groups[g] for g in ("engram", "engram_table", "peer", "peer_table", "mhc"))
    assert not any(p.requires_grad for _, p in named["base"])
    assert len(trainable_groups(model, "finetune")["base"]) == len(named["base"])


def test_compressed_tokens_follow_the_official_normaliser(wikitext_small):
    from tsparse.tokenizer import train_bpe

    assert normalize_token_text("Ĉafé") == "cafe" and normalize_token_text("  ") == " "
    assert normalize_token_text(" The\t") == "the" and normalize_token_text("ﬁ") == "fi"  # NFKC ligature
    tok = train_bpe((wikitext_small / "train.txt").read_text(), 400)
    token_map = compressed_token_map(tok, len(tok))
    vocab = tok.get_vocab()

    def lower(piece: str) -> str:  # lowercase the text, not ByteLevel's space marker "Ġ"
        return piece[0] + piece[1:].lower() if piece.startswith("Ġ") else piece.lower()

    def is_word(piece: str) -> bool:
        text = tok.decode([vocab[piece]]).strip()
        return text.isascii() and text.isalpha()

    pairs = [(vocab[w], vocab[lower(w)]) for w in vocab if is_word(w) and w != lower(w) and lower(w) in vocab]
    assert pairs and all(token_map[a] == token_map[b] for a, b in pairs)
    partial = [i for i in range(len(tok)) if "\ufffd" in tok.decode([i])]
    assert len(partial) > 10, "a byte-level BPE has partial UTF-8 tokens"
    assert len({token_map[i] for i in partial}) == len(partial), "partial-byte tokens keep distinct ids"
    assert max(token_map) < len(tok) and len(set(token_map)) < len(tok)
