import pytest
import torch

from tsparse.modules.peer import PEER, PEERSpec

TINYLLAMA_BASE = 1_100_048_384
TINYLLAMA_TOTALS = {
    16384: 1_236_494_336,
    65536: 1_639_278_592,
    262144: 3_250_153_472,
    589824: 5_934_770_176,
    802816: 7_679_731_712,
}


def build_peer(dim: int, num_experts: int, **kw) -> PEER:
    return PEER(dim, PEERSpec(num_experts=num_experts, **kw))


def make(dim=32, num_experts=256, **kw):
    torch.manual_seed(0)
    return build_peer(dim, num_experts, **kw)


def fill_up(peer, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        peer.up.weight.copy_(torch.randn(peer.up.weight.shape, generator=g))


def test_zero_output_at_init():
    peer = make()
    x = torch.randn(2, 5, 32)
    out = peer(x)
    assert out.shape == x.shape
    assert out.abs().max().item() == 0.0


@pytest.mark.parametrize("num_experts,heads", [(64, 2), (256, 3)])
def test_retrieve_matches_brute_force(num_experts, heads):
    peer = make(num_experts=num_experts, heads=heads, top_k=4, key_dim=8)
    x = torch.randn(3, 7, 32)
    scores, idx = peer.retrieve(x)
    assert scores.shape == idx.shape == (3, 7, heads, 4)

    with torch.no_grad():
        q = peer.query(peer._normed(x)).view(-1, heads, 2, 8)
        s1 = torch.einsum("mhd,hsd->mhs", q[:, :, 0], peer.keys[:, :, 0])
        s2 = torch.einsum("mhd,hsd->mhs", q[:, :, 1], peer.keys[:, :, 1])
        full = (s1[..., :, None] + s2[..., None, :]).flatten(-2)  # expert i1*sqrtN + i2
        ref_scores, ref_idx = full.topk(4, dim=-1)

    idx, scores = idx.reshape(-1, heads, 4), scores.reshape(-1, heads, 4)
    assert torch.equal(idx.sort(-1).values, ref_idx.sort(-1).values)
    torch.testing.assert_close(scores, ref_scores, atol=1e-5, rtol=0)
    # returned scores are the true product-key scores of the returned experts
    torch.testing.assert_close(scores, full.gather(-1, idx), atol=1e-5, rtol=0)


@pytest.mark.parametrize("dim,n,heads,key_dim", [(16, 64, 1, 4), (32, 256, 4, 8), (24, 1024, 2, 16)])
def test_param_count_small(dim, n, heads, key_dim):
    module = build_peer(dim, n, heads=heads, top_k=2, key_dim=key_dim)
    assert sum(p.numel() for p in module.parameters()) == PEER.param_count(dim, n, heads, key_dim)
    bn = build_peer(dim, n, heads=heads, top_k=2, key_dim=key_dim, query_batchnorm=True)
    extra = 2 * (2 * heads * key_dim)
    assert sum(p.numel() for p in bn.parameters()) == PEER.param_count(dim, n, heads, key_dim) + extra


@pytest.mark.parametrize("n,total", TINYLLAMA_TOTALS.items())
def test_param_count_tinyllama_on_meta(n, total):
    assert 2 * PEER.param_count(2048, n, heads=4, key_dim=64) + TINYLLAMA_BASE == total
    with torch.device("meta"):
        module = build_peer(2048, n)
    assert module.down.weight.is_meta and module.up.weight.is_meta
    assert 2 * sum(p.numel() for p in module.parameters()) + TINYLLAMA_BASE == total


@pytest.mark.parametrize("kw,key", [
    (dict(num_experts=1000), "peer.num_experts"),
    (dict(num_experts=0), "peer.num_experts"),
    (dict(num_experts=-16), "peer.num_experts"),
    (dict(gate="sigmoid"), "peer.gate"),
    (dict(top_k=20), "peer.top_k"),
])
def test_invalid_config_raises(kw, key):
    kw = {"num_experts": 256, **kw}
    with pytest.raises(ValueError, match=key):
        build_peer(32, **kw)
    if "num_experts" in kw and kw["num_experts"] != 256:
        with pytest.raises(ValueError, match=key):
            PEER.param_count(32, kw["num_experts"])


def test_nonzero_tables_give_output_and_sparse_grads():
    peer = make(heads=2, top_k=4)
    x = torch.randn(2, 3, 32)
    fill_up(peer)
    out = peer(x)
    with torch.no_grad():  # sum over heads and chosen experts of softmax gate * GELU(u_i . x~) * v_i
        scores, idx = peer.retrieve(x)
        h = torch.nn.functional.rms_norm(x, (32,), eps=1e-5)[..., None, None, :]
        act = torch.nn.functional.gelu((peer.down.weight[idx] * h).sum(-1)) * scores.softmax(-1)
        want = (act[..., None] * peer.up.weight[idx]).sum(dim=(-3, -2))
    assert want.abs().max() > 0.1
    torch.testing.assert_close(out, want)
    out.pow(2).sum().backward()
    max_rows = 2 * 3 * 2 * 4
    for table in peer.table_parameters():
        assert table.grad.is_sparse
        rows = table.grad.coalesce().indices().unique()
        assert 0 < rows.numel() <= max_rows
    for p in (peer.query.weight, peer.keys):
        assert not p.grad.is_sparse and p.grad.abs().sum() > 0

    dense = make(heads=2, top_k=4, sparse_grad=False)
    fill_up(dense)
    dense(x).pow(2).sum().backward()
    torch.testing.assert_close(out, dense(x))
    for table, ref in zip(dense.table_parameters(), peer.table_parameters()):
        assert not table.grad.is_sparse
        torch.testing.assert_close(table.grad, ref.grad.to_dense())


def test_relu_gate_differs_and_batchnorm_modes():
    x = torch.randn(4, 6, 32)
    soft, relu = make(gate="softmax"), make(gate="relu")
    fill_up(soft), fill_up(relu)
    assert not torch.allclose(soft(x), relu(x))

    bn = make(query_batchnorm=True)
    fill_up(bn)
    train_out = bn(x)
    assert bn.query_norm.num_batches_tracked.item() == 1
    bn.eval()
    eval_out = bn(x)
    assert train_out.shape == eval_out.shape == x.shape
    assert torch.isfinite(eval_out).all() and not torch.allclose(train_out, eval_out)


def test_bf16_tables():
    x = torch.randn(2, 5, 32)
    ref, low = make(), make(table_dtype="bfloat16")
    fill_up(ref)
    with torch.no_grad():
        for t in ref.table_parameters():
            t.copy_(t.bfloat16().float())  # same representable values in both
        low.load_state_dict(ref.state_dict())
    assert all(t.dtype == torch.bfloat16 for t in low.table_parameters())
    out = low(x)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, ref(x), atol=1e-5, rtol=1e-5)
    out.sum().backward()
    assert low.down.weight.grad.dtype == torch.bfloat16 and low.down.weight.grad.is_sparse


def test_usage_tracking():
    peer = make(heads=2, top_k=4)
    x = torch.randn(3, 5, 32)
    assert peer.usage_summary() == {}  # nothing counted yet: nothing to log
    peer.track_stats = True
    fill_up(peer)
    peer(x)
    peer(x[:1])
    assert peer.usage_counts.sum().item() == (15 + 5) * 2 * 4
    summary = peer.usage_summary()
    assert 0 < summary["usage_fraction"] <= 1 and 0 < summary["usage_entropy"] <= 1
    ratio = peer.stats["out_rms_ratio"]
    assert ratio.dtype == torch.float32 and not ratio.requires_grad and ratio > 0
    assert "usage_counts" not in peer.state_dict()
    peer.reset_usage()
    assert peer.usage_counts.sum().item() == 0


@pytest.mark.parametrize("table_dtype", ["float32", "bfloat16"])
def test_peer_trains_under_bf16_autocast(table_dtype):
    """bf16-mixed (the GPU trainers' precision) runs PEER in fp32: its fused kernels failed on bf16 weights
    against fp32 tables. The output and the gradients equal the same step without autocast."""
    torch.manual_seed(0)
    peer = PEER(32, PEERSpec(layers=[0], num_experts=64, top_k=4, key_dim=8, table_dtype=table_dtype))
    torch.nn.init.normal_(peer.up.weight)
    x = torch.randn(2, 8, 32, requires_grad=True)
    results = []
    for autocast in (False, True):
        peer.zero_grad(set_to_none=True)
        x.grad = None
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            out = peer(x)
        out.square().sum().backward()
        results.append((out, x.grad, peer.up.weight.grad.to_dense(), peer.query.weight.grad))
    for plain, mixed in zip(*results):
        assert mixed.dtype == plain.dtype
        torch.testing.assert_close(mixed, plain, rtol=0, atol=0)
