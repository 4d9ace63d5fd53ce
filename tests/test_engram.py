import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tsparse.modules.engram import (Engram, EngramSpec, compressed_token_map, distinct_primes, draw_multipliers,
                                    ngram_hash_ids)

DIM, VOCAB = 32, 500
SMALL = dict(heads_per_order=4, dim_per_order=16, table_rows=1000)


def make(layer_index=1, seed=0, token_map=None, **kw) -> Engram:
    spec = EngramSpec(**{**SMALL, **kw})
    return Engram(DIM, spec, draw_multipliers(seed, layer_index, max(spec.orders)), token_map=token_map)


def randomize(m: Engram) -> Engram:
    """Make every weight non-zero and non-trivial (W_V, conv, norm weights)."""
    g = torch.Generator().manual_seed(123)
    with torch.no_grad():
        m.value_proj.weight.copy_(torch.randn(m.value_proj.weight.shape, generator=g) * 0.2)
        m.conv.weight.copy_(torch.randn(m.conv.weight.shape, generator=g) * 0.5)
        for norm in (m.norm_k, m.norm_q, m.norm_v):
            norm.weight.add_(torch.randn(norm.weight.shape, generator=g) * 0.1)
    return m


def inputs(B=2, T=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, T, DIM, generator=g), torch.randint(0, VOCAB, (B, T), generator=g)


def test_identity_at_init():
    m = make()
    h, ids = inputs()
    y, alpha = m(h, ids, return_gate=True)
    assert y.shape == h.shape and alpha.shape == ids.shape
    assert torch.equal(y, torch.zeros_like(y))


def test_hash_deterministic_across_processes_and_rng_untouched():
    # The hash never touches the global RNG: meta construction (no weight init draws) leaves it as is,
    # the multipliers do not depend on it, and the module does not reseed it.
    state = torch.get_rng_state()
    with torch.device("meta"):
        make(layer_index=3, seed=7)
    assert torch.equal(state, torch.get_rng_state())
    after = []
    for global_seed in (1, 2):
        torch.manual_seed(global_seed)
        m = make(layer_index=3, seed=7)
        after.append((m.multipliers.clone(), torch.rand(4)))
    assert torch.equal(after[0][0], after[1][0]) and not torch.equal(after[0][1], after[1][1])
    torch.set_rng_state(state)

    ids = torch.arange(40).reshape(2, 20) * 37 % VOCAB
    code = (
        "import torch; from tsparse.modules.engram import Engram, EngramSpec, draw_multipliers; "
        f"m = Engram({DIM}, EngramSpec(**{SMALL!r}), draw_multipliers(7, 3, 3)); "
        "ids = torch.arange(40).reshape(2, 20) * 37 % 500; "
        "print(m.hash_indices(ids).flatten().tolist())"
    )
    src = str(Path(__file__).resolve().parents[1] / "src")
    env = {**os.environ, "PYTHONPATH": src + os.pathsep + os.environ.get("PYTHONPATH", "")}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert eval(out.stdout) == m.hash_indices(ids).flatten().tolist()
    # Other layers hash differently.
    assert not torch.equal(make(layer_index=4, seed=7).multipliers, m.multipliers)


def test_meta_construction_then_materialize():
    tm = torch.arange(VOCAB) // 2
    with torch.device("meta"):
        m = make(token_map=tm)
    assert all(t.is_meta for t in [*m.parameters(), *m.buffers()])
    m.to_empty(device="cpu")
    m.reset_parameters()
    ref = make(token_map=tm)
    _, ids = inputs()
    assert torch.equal(m.multipliers, ref.multipliers)
    assert torch.equal(m.hash_indices(ids), ref.hash_indices(ids))


def test_distinct_primes_and_per_head_collisions():
    assert distinct_primes(10, 4) == [11, 13, 17, 19]
    assert distinct_primes(10, 3, exclude=[13]) == [11, 17, 19]

    K = 4
    m = make(heads_per_order=K, dim_per_order=16, table_rows=53)  # tiny tables: many collisions
    primes = m.primes.tolist()
    assert len(set(primes)) == len(primes) == 2 * K and min(primes) >= 53
    assert m.table.weight.shape[0] == sum(primes)

    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, VOCAB, (1, 400), generator=g)
    idx = m.hash_indices(ids)[0]  # [T, heads]
    lo, hi = m.offsets, m.offsets + m.primes
    assert ((idx >= lo) & (idx < hi)).all()
    for order_i in range(2):
        patterns = [idx[:, j, None] == idx[None, :, j] for j in range(order_i * K, (order_i + 1) * K)]
        assert all(p.sum() > len(p) for p in patterns)  # collisions exist at this size
        for a in range(K):
            for b in range(a + 1, K):
                assert not torch.equal(patterns[a], patterns[b])


def test_hash_depends_only_on_last_n_ids():
    m = make(table_rows=100_003)
    ids = torch.tensor([[5, 6, 7, 1, 9, 6, 7, 2, 5, 6, 7]])
    idx = m.hash_indices(ids)[0]
    order2, order3 = slice(0, 4), slice(4, 8)
    assert torch.equal(idx[2, order3], idx[10, order3])  # (5, 6, 7)
    assert torch.equal(idx[2, order2], idx[6, order2])  # (6, 7)
    assert not torch.equal(idx[2, order3], idx[6, order3])  # (5, 6, 7) vs (9, 6, 7)
    # Left padding with pad_id: position 0 sees (pad, pad, x0).
    direct = ngram_hash_ids(torch.tensor([[0, 0, 5]]), m.multipliers, 3, pad_id=0)[0, -1]
    assert direct == ngram_hash_ids(ids, m.multipliers, 3, pad_id=0)[0, 0]


def test_causality():
    m = randomize(make())
    h, ids = inputs(B=1, T=16)
    y = m(h, ids)
    t = 9
    ids2, h2 = ids.clone(), h.clone()
    ids2[0, t] = (ids[0, t] + 1) % VOCAB
    h2[0, t] += 1.0
    for y2 in (m(h, ids2), m(h2, ids)):
        torch.testing.assert_close(y2[:, :t], y[:, :t], rtol=0, atol=0)
        assert not torch.allclose(y2[:, t], y[:, t])


@pytest.mark.parametrize("sparse", [True, False])
def test_output_changes_and_gradients(sparse):
    m = make(sparse_grad=sparse)
    h, ids = inputs()
    randomize(m)
    y = m(h, ids)
    assert y.abs().max() > 1e-3
    y.pow(2).sum().backward()
    assert m.table.weight.grad.is_sparse == sparse
    table_grad = m.table.weight.grad.to_dense() if sparse else m.table.weight.grad
    touched = torch.zeros(m.table.weight.shape[0], dtype=torch.bool)
    touched[m.hash_indices(ids).flatten()] = True
    assert table_grad[touched].abs().sum(-1).gt(0).all() and table_grad[~touched].eq(0).all()
    named = dict(m.named_parameters())
    for name in ["key_proj", "value_proj", "conv", "norm_k", "norm_q", "norm_v"]:
        grad = named[f"{name}.weight"].grad
        assert grad is not None and grad.abs().sum() > 0, name
    assert m.table_parameters() == [m.table.weight]


def test_token_map_compression():
    tm = torch.arange(VOCAB)
    tm[7] = 3  # e.g. "The" -> "the"
    m = make(token_map=tm)
    a = torch.tensor([[1, 2, 3, 4, 3, 8]])
    b = torch.tensor([[1, 2, 7, 4, 7, 8]])
    assert torch.equal(m.hash_indices(a), m.hash_indices(b))
    # derived from the model config, so not saved with the weights
    assert "token_map" not in m.state_dict() and "multipliers" not in m.state_dict()
    assert not torch.equal(make().hash_indices(a), make().hash_indices(b))


class TextTokenizer:
    """Hand-built vocabulary: id i decodes to texts[i]."""

    def __init__(self, texts):
        self.texts = texts

    def decode(self, ids):
        return self.texts[ids[0]]

    def convert_ids_to_tokens(self, i):
        return f"<raw{i}>"


def test_compressed_map_equals_the_demo_normaliser():
    # The demo collapses only [ \t\r\n]+, strips Unicode White_Space (not \x1c-\x1f) and strips every mark
    # (Mn, Mc, Me); Python's \s, str.strip() and category "Mn" differ on exactly these tokens.
    texts = [" ", "\t", "\r\n", "  ", "\x0b", "\x85", "\x0c", "\u2028", " \x0b", "\x1c", " \x1c",
             "a", "aः", " The", "the", "\ufffd"]
    token_map = compressed_token_map(TextTokenizer(texts), len(texts))
    cls = dict(zip(texts, token_map))
    assert cls["\t"] == cls["\r\n"] == cls["  "] == cls[" "]
    control = ["\x0b", "\x85", "\x0c", "\u2028", " \x0b", "\x1c"]  # each normalises to "" (own class) or itself
    assert len({cls[t] for t in control} | {cls[" "]}) == len(control) + 1
    assert cls[" \x1c"] == cls["\x1c"]  # Strip removes " " but keeps \x1c
    assert cls["aः"] == cls["a"]  # U+0903 is a spacing mark (Mc)
    assert cls[" The"] == cls["the"] and cls["\ufffd"] not in token_map[:-1]
    assert max(token_map) == len(set(token_map)) - 1


@pytest.mark.parametrize(
    "kw, key",
    [
        (dict(orders=(1, 2)), "orders"),
        (dict(orders=()), "orders"),
        (dict(orders=(2, 2)), "orders"),
        (dict(orders=(2.0, 3)), "orders"),
        (dict(heads_per_order=0), "heads_per_order"),
        (dict(heads_per_order=3, dim_per_order=16), "dim_per_order"),
        (dict(table_rows=1), "table_rows"),
        (dict(conv_kernel=0), "conv_kernel"),
    ],
)
def test_bad_config(kw, key):
    with pytest.raises(ValueError, match=key):
        make(**kw)


def test_bf16_table_close_to_fp32():
    ref = randomize(make())
    m = make(table_dtype="bfloat16")
    m.load_state_dict(ref.state_dict())
    assert m.table.weight.dtype == torch.bfloat16
    h, ids = inputs()
    y, y_ref = m(h, ids), ref(h, ids)
    assert y.dtype == torch.float32
    torch.testing.assert_close(y, y_ref, rtol=0.05, atol=0.02 * y_ref.abs().max().item())


def test_stats():
    m = randomize(make())
    m.track_stats = True
    h, ids = inputs()
    y, alpha = m(h, ids, return_gate=True)
    assert set(m.stats) == {"gate_mean", "gate_std", "out_rms_ratio"}
    assert all(v.dim() == 0 and not v.requires_grad for v in m.stats.values())
    torch.testing.assert_close(m.stats["gate_mean"], alpha.mean().detach())
    ratio = y.pow(2).mean().sqrt() / h.pow(2).mean().sqrt()
    torch.testing.assert_close(m.stats["out_rms_ratio"], ratio.detach())
    assert not hasattr(m, "last_gate")
