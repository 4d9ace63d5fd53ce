"""generate() with a KV cache: the same tokens and logits as without one, for every module kind."""
from __future__ import annotations

import dataclasses

import pytest
import torch
from transformers import DynamicCache

from tsparse import TsparseForCausalLM
from tsparse.modeling_tsparse import TsparseCache
from tsparse.modules.engram import EngramSpec
from tsparse.modules.mhc import MHCSpec
from tsparse.modules.peer import PEERSpec

from helpers import make_tiny_model

SPECS = {"engram": EngramSpec(layers=[0, 2], heads_per_order=2, dim_per_order=16, table_rows=53),
         "peer": PEERSpec(layers=[1], num_experts=64, top_k=4, key_dim=8),
         "mhc": MHCSpec(layers=[1])}
OPTIONS = {"engram": ["engram"], "peer": ["peer"], "mhc": ["mhc"], "triple": ["engram", "peer", "mhc"]}


def model_with(kinds: list[str], **changes) -> TsparseForCausalLM:
    """The tiny model with `kinds` at SPECS' placement, every module weight non-zero (zero-initialised paths too)."""
    model = make_tiny_model({k: dataclasses.replace(SPECS[k], **changes.get(k, {})) for k in kinds}, perturb=0.3)
    assert all(p.abs().sum() > 0 for m in model.sparse_modules().values() for p in m.parameters())
    return model


def left_padded_batch():
    ids = torch.randint(1, 96, (3, 9), generator=torch.Generator().manual_seed(4))
    mask = torch.ones_like(ids)
    for row, pad in enumerate((4, 2, 0)):
        ids[row, :pad], mask[row, :pad] = 0, 0
    return ids, mask


@pytest.mark.parametrize("option", list(OPTIONS))
def test_cached_greedy_generation_equals_uncached(option):
    model = model_with(OPTIONS[option])
    ids, mask = left_padded_batch()
    with torch.no_grad():
        cached = model.generate(ids, attention_mask=mask, max_new_tokens=10, do_sample=False, use_cache=True)
        uncached = model.generate(ids, attention_mask=mask, max_new_tokens=10, do_sample=False, use_cache=False)
    assert cached.shape == (3, 19)
    assert torch.equal(cached, uncached)


@pytest.mark.parametrize("option", list(OPTIONS))
def test_incremental_logits_equal_full_sequence_logits(option):
    model = model_with(OPTIONS[option])
    ids, mask = left_padded_batch()
    ids = torch.cat((ids, torch.randint(1, 96, (3, 7), generator=torch.Generator().manual_seed(5))), 1)
    mask = torch.cat((mask, torch.ones(3, 7, dtype=mask.dtype)), 1)
    with torch.no_grad():
        full = model(ids, attention_mask=mask).logits
        out = model(ids[:, :9], attention_mask=mask[:, :9], use_cache=True)
        steps, cache = [out.logits], out.cache
        assert isinstance(cache, TsparseCache)
        for t in range(9, ids.shape[1]):
            out = model(ids[:, t : t + 1], attention_mask=mask[:, : t + 1], cache=cache, use_cache=True)
            steps.append(out.logits)
    torch.testing.assert_close(torch.cat(steps, 1), full, atol=1e-4, rtol=0)


def test_beam_search_reorders_engram_state():
    model = model_with(OPTIONS["triple"])
    ids = torch.randint(1, 96, (2, 6), generator=torch.Generator().manual_seed(6))
    mask = torch.ones_like(ids)
    with torch.no_grad():
        kwargs = dict(attention_mask=mask, max_new_tokens=6, num_beams=3, do_sample=False)
        assert torch.equal(model.generate(ids, use_cache=True, **kwargs), model.generate(ids, use_cache=False, **kwargs))


def test_engram_state_crops_with_the_kv_cache():
    model = model_with(["engram"], engram={"conv_kernel": 3})
    ids = torch.randint(1, 96, (2, 12), generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        cache = model(ids[:, :10], use_cache=True).cache
        cache.crop(-3)  # drop the last 3 positions, as assisted decoding does
        assert all(state.ids.shape[1] == 7 for state in cache.module_states.values())
        steps = model(ids[:, 7:], cache=cache, use_cache=True).logits
        torch.testing.assert_close(steps, model(ids).logits[:, 7:], atol=1e-4, rtol=0)


def test_a_plain_dynamic_cache_is_refused_with_engram():
    model = model_with(["engram"])
    with pytest.raises(TypeError, match="TsparseCache"):
        model(torch.ones(1, 3, dtype=torch.long), cache=DynamicCache(config=model.config), use_cache=True)
