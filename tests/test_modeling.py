"""TsparseForCausalLM over a plain base: identity for every sparse option, save/load, value checks, param groups
(the per-kind contract is in test_kinds.py)."""
from __future__ import annotations

import dataclasses
import os
import subprocess
import sys

import pytest
import torch

from transformers import AutoModelForCausalLM, LlamaForCausalLM

from tsparse import TsparseConfig, TsparseForCausalLM
from tsparse.checks import ConfigError
from tsparse.modules.engram import EngramSpec, compressed_token_map, normalize_token_text
from tsparse.modules.mhc import MHCSpec
from tsparse.modules.peer import PEERSpec
from tsparse.modules.perturb import perturb_
from tsparse.registry import params_by_group, trainable_groups

from helpers import CaseTokenizer, tiny_llama_config

BASE = tiny_llama_config(vocab_size=128, num_hidden_layers=4, pad_token_id=None)
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


@pytest.mark.parametrize("option", list(OPTIONS))
def test_identity_at_init_over_a_plain_base(option, base_dir):
    base = LlamaForCausalLM.from_pretrained(base_dir).eval()
    model = from_base(base_dir, option)
    with torch.no_grad():
        torch.testing.assert_close(model(IDS).logits, base(IDS).logits, atol=1e-5, rtol=0)
    assert [k for k in model.state_dict() if k in base.state_dict()] == list(base.state_dict())  # Llama's key names


ROUND_TRIPS = {**{o: {} for o in OPTIONS}, "compress_tokens": {"engram": {"compress_tokens": True}},
               "bf16_tables": {"engram": {"table_dtype": "bfloat16"}, "peer": {"table_dtype": "bfloat16"}},
               "mhc_learned_reduce": {"mhc": {"reduce": "learned"}}}


@pytest.mark.parametrize("case", list(ROUND_TRIPS))
def test_save_pretrained_round_trip_gives_identical_logits(case, base_dir, tmp_path):
    changes = ROUND_TRIPS[case]
    option = case if case in OPTIONS else "triple"
    model = from_base(base_dir, option, tokenizer=CaseTokenizer(64), **changes)
    perturb_(model, 0.5)
    model.save_pretrained(tmp_path / "out")
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    assert type(loaded) is TsparseForCausalLM
    assert loaded.config.module_specs() == model.config.module_specs()
    assert loaded.config.module_data == model.config.module_data
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
    perturb_(model, 0.5)
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



def test_bypassing_modules_gives_the_base_with_the_same_weights(base_dir):
    base = LlamaForCausalLM.from_pretrained(base_dir).eval()
    model = from_base(base_dir, "hybrid")
    with torch.no_grad():
        for module in model.sparse_modules().values():  # off the identity
            for p in module.parameters():
                p.add_(0.05 * torch.randn_like(p))
        full = model(IDS).logits
        with model.bypassing("engram", "peer"):
            bypassed = model(IDS).logits
        again = model(IDS).logits
    assert not torch.allclose(full, base(IDS).logits, atol=1e-3)
    torch.testing.assert_close(bypassed, base(IDS).logits, atol=1e-5, rtol=0)
    torch.testing.assert_close(again, full, atol=0, rtol=0)  # every module back on exit
    with pytest.raises(ValueError, match="residual module cannot be bypassed"):
        with from_base(base_dir, "mhc").bypassing("mhc"):
            pass


@pytest.mark.parametrize("kind", ["engram", "peer"])
def test_default_init_is_pytorchs_and_not_an_identity(kind, base_dir):
    """`init: default` (the init ablation): the tables get nn.Embedding's N(0, 1) rows and the output moves."""
    base = LlamaForCausalLM.from_pretrained(base_dir).eval()
    model = from_base(base_dir, kind, **{kind: {"init": "default"}})
    table = model.sparse_modules()[f"{kind}.L{SPECS[kind].layers[0]}"].table_parameters()[0]
    assert 0.9 < table.std().item() < 1.1
    with torch.no_grad():
        assert not torch.allclose(model(IDS).logits, base(IDS).logits, atol=1e-2)
    with pytest.raises(ConfigError, match=rf"{kind}.init='zero' is not allowed"):
        dataclasses.replace(SPECS[kind], init="zero")
