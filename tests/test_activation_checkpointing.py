"""`model.activation_checkpointing=true`: every decoder layer, its sparse modules and mHC streams included, is
recomputed in backward. Gradients, PEER's usage counts and BatchNorm statistics and the modules' stats equal
the run without it, the allocator's peak is lower, generation is unchanged, and the flag is checked and built."""
from __future__ import annotations

import types

import pytest
import torch
from omegaconf import OmegaConf

from tsparse import plan
from tsparse.build import build_model, set_activation_checkpointing
from tsparse.lit_module import next_token_loss
from tsparse.modules.engram import EngramSpec
from tsparse.modules.mhc import MHCSpec
from tsparse.modules.peer import PEERSpec

from helpers import make_tiny_model, one_error_line
from test_plan import allocated

SPECS = {"engram": EngramSpec(layers=[0, 1], heads_per_order=2, dim_per_order=16, table_rows=101),
         "peer": PEERSpec(layers=[1, 2], num_experts=64, top_k=4, key_dim=8, query_batchnorm=True),
         "mhc": MHCSpec(layers=[1, 2])}
IDS = torch.randint(1, 96, (2, 16), generator=torch.Generator().manual_seed(1))


def triple(checkpointing: bool, **base):
    """The tiny peer + engram + mhc model (BatchNorm on PEER's query, every module weight non-zero), training."""
    model = make_tiny_model(SPECS, perturb=0.5, **base).train()
    return set_activation_checkpointing(model, OmegaConf.create({"activation_checkpointing": checkpointing}))


@pytest.mark.parametrize("base_trains", [True, False])
@pytest.mark.parametrize("mode", [True, "offload"])  # offload: its host copy is a no-op on a CPU
def test_gradients_and_side_effects_equal_the_run_without(mode, base_trains, one_thread):
    runs = {}
    for checkpointing in (False, mode):
        model = triple(checkpointing)
        for m in model.sparse_modules().values():
            m.track_stats = True
        for name, p in model.named_parameters():
            p.requires_grad_(base_trains or ".peer." in name or ".engram." in name or ".mhc." in name)
        peer_calls = []
        model.model.layers[1].peer.register_forward_pre_hook(lambda *_: peer_calls.append(1))
        next_token_loss(model, IDS).backward()
        assert len(peer_calls) == 1 + bool(checkpointing)  # recomputed in backward
        runs[checkpointing] = model
    plain, checkpointed = runs[False], runs[mode]
    grads = {n: p.grad for n, p in checkpointed.named_parameters() if p.requires_grad}
    assert any(g.is_sparse for g in grads.values())  # PEER's and Engram's row-sparse table gradients
    for name, p in plain.named_parameters():
        if p.requires_grad:
            expected, got = p.grad.to_dense(), grads[name].to_dense()
            assert (got - expected).norm() <= 1e-6 * expected.norm(), name
    buffers = dict(checkpointed.named_buffers())
    stateful = [n for n in buffers if "usage_counts" in n or "query_norm" in n]
    assert len(stateful) == 2 * 4 and plain.model.layers[1].peer.usage_counts.sum() > 0
    for name, buffer in plain.named_buffers():
        torch.testing.assert_close(buffers[name], buffer, rtol=0, atol=0, msg=name)
    stats = {k: m.stats for k, m in checkpointed.sparse_modules().items()}
    for key, module in plain.sparse_modules().items():
        assert module.stats and stats[key].keys() == module.stats.keys()
        for name, value in module.stats.items():
            torch.testing.assert_close(stats[key][name], value, rtol=0, atol=0, msg=f"{key} {name}")


def test_peak_memory_is_lower(one_thread):
    ids = torch.randint(1, 96, (4, 256), generator=torch.Generator().manual_seed(2))
    peaks = {}
    for checkpointing in (False, True):
        model = triple(checkpointing, num_hidden_layers=8, max_position_embeddings=256)
        peaks[checkpointing] = max(allocated(lambda: next_token_loss(model, ids).backward()))
    print(f"peak above the weights: {peaks[False] / 2**20:.1f} MiB, checkpointed {peaks[True] / 2**20:.1f} MiB")
    assert peaks[True] < 0.5 * peaks[False]


def test_generation_is_unchanged():
    prompt = IDS[:, :6]
    outs = [triple(c).generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=6, do_sample=False,
                               pad_token_id=0) for c in (False, True)]
    assert torch.equal(outs[0], outs[1])


def test_a_bad_value_is_one_config_error_line(capsys):
    err = one_error_line(capsys, lambda: plan.main(["model=nano", "model.activation_checkpointing=maybe"]))
    assert "model.activation_checkpointing='maybe' is not allowed; choose one of [false, true, offload]" in err


def test_offload_moves_the_kept_inputs_from_the_device_to_host_memory_in_the_plan(compose):
    """The plan of `offload` keeps the layer inputs off the device (a host line outside the total) and
    recomputes the same layer: device activations drop by exactly the inputs `true` keeps there."""
    plans = {mode: plan.memory_plan(compose(["model=micro", "sparse=triple", f"model.activation_checkpointing={mode}"]))
             for mode in ("true", "offload")}
    activations = next(k for k in plans["true"] if k.startswith("activations"))
    assert plan.HOST not in plans["true"] and plans["offload"][plan.HOST] > 0
    kept = plans["true"][activations] - plans["offload"][activations]
    assert kept == pytest.approx(plan.ACTIVATION_SLACK * plans["offload"][plan.HOST], abs=1)
    assert plans["offload"]["total"] == plans["true"]["total"] - kept


def test_the_flag_reaches_the_built_model(compose, nano, small_modules, wikitext_small, tmp_path, one_thread):
    cfg = compose(nano(tmp_path, wikitext_small, *small_modules, "sparse=triple", "model.activation_checkpointing=true"))
    datamodule = types.SimpleNamespace(texts={"train": (wikitext_small / "train.txt").read_text()})
    model, _ = build_model(cfg, datamodule)
    layers = model.model.layers
    assert model.training and all(layer.gradient_checkpointing for layer in layers)
    calls = []
    for layer in layers:
        layer.self_attn.register_forward_pre_hook(lambda *_: calls.append(1))
    next_token_loss(model, torch.randint(0, 512, (2, 64))).backward()
    assert len(calls) > len(layers)  # layers ran again in backward
