import pytest
import torch
from torch import nn

from tsparse.modules.mhc import GatedResidualAdapter, HyperConnection, MHCSpec, sinkhorn
from tsparse.modules.streams import StreamReduce, expand_streams, uniform_step

B, T, N, D = 2, 5, 4, 16


def hyper(dim: int, streams: int = N, **kw) -> HyperConnection:
    return HyperConnection(dim, MHCSpec(streams=streams, **kw))


def make_branch(seed: int, d: int = D) -> nn.Module:
    torch.manual_seed(seed)
    mlp = nn.Sequential(nn.Linear(d, 2 * d), nn.GELU(), nn.Linear(2 * d, d))
    return mlp.requires_grad_(False)


def generic_streams(seed: int = 0, n: int = N) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, T, n, D, generator=g) * torch.linspace(0.5, 2.0, n)[:, None]


def base_step(m: torch.Tensor, branch) -> torch.Tensor:
    return m + branch(m)


# 1. Sinkhorn


@pytest.mark.parametrize(
    "scale, offset", [(0.01, 0.0), (0.1, 0.0), (1.0, 0.0), (1.0, 1e4), (1.0, -1e4)]
)
def test_sinkhorn_doubly_stochastic(scale, offset):
    logits = torch.randn(64, N, N, generator=torch.Generator().manual_seed(1)) * scale + offset
    p = sinkhorn(logits)
    assert p.dtype == torch.float32 and (p >= 0).all()
    torch.testing.assert_close(p.sum(-1), torch.ones(64, N), atol=1e-4, rtol=0)
    torch.testing.assert_close(p.sum(-2), torch.ones(64, N), atol=1e-4, rtol=0)


def test_sinkhorn_large_logits_stay_finite_and_converge_with_iters():
    logits = torch.randn(64, N, N, generator=torch.Generator().manual_seed(2)) * 30 + 1e4
    p = sinkhorn(logits)
    assert torch.isfinite(p).all()
    torch.testing.assert_close(p.sum(-2), torch.ones(64, N), atol=1e-4, rtol=0)
    p = sinkhorn(torch.randn(64, N, N, generator=torch.Generator().manual_seed(3)) * 3, iters=2000)
    torch.testing.assert_close(p.sum(-1), torch.ones(64, N), atol=1e-4, rtol=0)


def test_sinkhorn_fp32_under_autocast():
    logits = torch.randn(8, N, N).to(torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        p = sinkhorn(logits)
    assert p.dtype == torch.float32
    torch.testing.assert_close(p.sum(-1), torch.ones(8, N), atol=1e-4, rtol=0)


def test_streams_stay_fp32_under_autocast():
    hc, branch, x = hyper(D, N), make_branch(0), generic_streams()
    ref = hc(x, branch)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = hc(x, branch)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, ref, atol=0.1, rtol=0.05)


# 2. Identity at init


@pytest.mark.parametrize("n", [2, 3, 4])
@pytest.mark.parametrize("expanded", [True, False])
def test_identity_at_init(n, expanded):
    branch = make_branch(0)
    torch.manual_seed(1)
    x = expand_streams(torch.randn(B, T, D), n) if expanded else generic_streams(1, n)
    m = x.mean(dim=-2)
    want = base_step(m, branch)
    hc = hyper(D, n)
    torch.testing.assert_close(StreamReduce(n, "mean")(hc(x, branch)), want, atol=1e-5, rtol=0)
    torch.testing.assert_close(
        StreamReduce(n, "mean")(uniform_step(x, branch)), want, atol=1e-5, rtol=0
    )


def test_learned_reduce_equals_mean_at_init():
    x = generic_streams(2)
    learned = StreamReduce(N, "learned")
    assert list(StreamReduce(N).parameters()) == [] and list(learned.parameters()) == [learned.weight]
    torch.testing.assert_close(learned(x), StreamReduce(N)(x), atol=1e-6, rtol=0)
    learned(x).sum().backward()  # a weighted sum of the streams: d/dw_i is the sum of stream i
    torch.testing.assert_close(learned.weight.grad, x.sum(dim=(0, 1, 3)))


def test_expand_streams_copies():
    h = torch.randn(B, T, D)
    x = expand_streams(h, N)
    assert x.shape == (B, T, N, D)
    for i in range(N):
        assert torch.equal(x[:, :, i], h)


# 3. Chain equals the base residual chain


def test_chain_matches_base():
    branches = [make_branch(10 + i) for i in range(6)]
    use_hc = [True, False, True, True, False, True]
    hcs = [hyper(D, N) if u else None for u in use_hc]
    h = torch.randn(B, T, D)
    x = expand_streams(h, N)
    for hc, branch in zip(hcs, branches):
        x = hc(x, branch) if hc is not None else uniform_step(x, branch)
        h = base_step(h, branch)
    torch.testing.assert_close(StreamReduce(N)(x), h, atol=1e-5, rtol=0)
    assert not torch.allclose(x[:, :, 0], x[:, :, 1])


# 4. Streams diverge


def test_streams_diverge_after_one_layer():
    hc = hyper(D, N)
    _, h_post, _ = hc.mixing(generic_streams())
    assert h_post.std(dim=-1).min() > 0.1
    torch.testing.assert_close(h_post.mean(-1), torch.ones(B, T), atol=1e-6, rtol=0)
    x = hc(expand_streams(torch.randn(B, T, D), N), make_branch(0))
    for i in range(N):  # pairwise distinct: no two streams share a fate by symmetry
        for j in range(i + 1, N):
            assert (x[:, :, i] - x[:, :, j]).abs().max() > 1e-3, (i, j)


# 5. Gradients at init


def test_gradients_at_init_and_no_deadlock():
    hc = hyper(D, N)
    x = generic_streams(3).requires_grad_()
    weights = torch.randn(N, D, generator=torch.Generator().manual_seed(4))
    loss = (hc(x, make_branch(0)) * weights).sum()
    loss.backward()
    for name in ("phi_pre", "phi_post", "phi_res", "b_pre", "b_post", "b_res"):
        grad = getattr(hc, name).grad
        assert grad is not None and grad.abs().sum() > 0, name
    # phi = 0, so alpha's gradient (x~ phi) is exactly zero at step 0, but alpha != 0 lets phi
    # learn, after which alpha receives gradient too: no deadlock.
    with torch.no_grad():
        for p in (hc.phi_pre, hc.phi_post, hc.phi_res):
            p -= 1.0 * p.grad
    hc.zero_grad()
    (hc(x, make_branch(0)) * weights).sum().backward()
    for name in ("alpha_pre", "alpha_post", "alpha_res"):
        assert getattr(hc, name).grad.abs() > 0, name


def test_h_res_not_saturated_at_init():
    hc = hyper(D, N)
    _, _, h_res = hc.mixing(generic_streams())
    off_diag = h_res[..., ~torch.eye(N, dtype=torch.bool)]
    assert off_diag.min() > 0.05
    assert h_res.diagonal(dim1=-2, dim2=-1).max() < 0.9


# 6. Non-zero phi changes the output


def test_perturbed_phi_changes_output():
    branch = make_branch(0)
    x = generic_streams(5)
    hc = hyper(D, N)
    ref = hc(x, branch)
    for name in ("phi_pre", "phi_post", "phi_res"):
        hc_p = hyper(D, N)
        with torch.no_grad():
            getattr(hc_p, name).normal_(std=1.0)
            for a in (hc_p.alpha_pre, hc_p.alpha_post, hc_p.alpha_res):
                a.fill_(1.0)
        out = hc_p(x, branch)
        assert (out - ref).abs().max() > 1e-3, name
        mean_shift = (StreamReduce(N)(out) - StreamReduce(N)(ref)).abs().max()
        if name == "phi_res":  # any doubly-stochastic H_res keeps the stream mean
            assert mean_shift < 1e-5
        else:
            assert mean_shift > 1e-3, name


def test_track_stats():
    hc, x, branch = hyper(D, N), generic_streams(), make_branch(0)
    hc(x, branch)
    assert hc.stats == {}
    hc.track_stats = True
    hc(x, branch)
    assert set(hc.stats) == {"h_res_identity_dist", "h_post_std", "out_rms_ratio"}
    for v in hc.stats.values():
        assert v.dim() == 0 and not v.requires_grad and torch.isfinite(v)
    assert hc.stats["h_res_identity_dist"] > 0.1  # moderate diagonal, not the identity
    assert hc.stats["h_post_std"] > 0.1
    with torch.no_grad():  # the written update H_post^T F(H_pre x) over the streams x, by RMS
        h_pre, h_post, _ = hc.mixing(x)
        write = h_post[..., None] * branch((h_pre[..., None] * x).sum(-2))[..., None, :]
    torch.testing.assert_close(hc.stats["out_rms_ratio"], write.pow(2).mean().sqrt() / x.pow(2).mean().sqrt())


def test_meta_construction():
    with torch.device("meta"):
        hc = hyper(2048, 4)
    assert hc.phi_res.is_meta and hc.phi_res.shape == (4 * 2048, 16)
    assert all(p.is_meta for p in hc.parameters())


# 7. Seed adapter


def test_gated_adapter():
    adapter = GatedResidualAdapter(D, bottleneck=8)
    h = torch.randn(B, T, D)
    assert torch.equal(adapter(h), torch.zeros(B, T, D))
    (adapter(h) * torch.randn(B, T, D)).sum().backward()
    assert adapter.up.weight.grad.abs().sum() > 0
    with torch.no_grad():
        adapter.up.weight.normal_()
    assert adapter(h).abs().max() > 1e-3


# 8. Validation


@pytest.mark.parametrize(
    "build, key",
    [
        (lambda: hyper(D, streams=0), "streams"),
        (lambda: hyper(D, streams=1), "streams"),
        (lambda: hyper(D, sinkhorn_iters=0), "sinkhorn_iters"),
        (lambda: MHCSpec(layers=[1], reduce="sum"), "reduce"),  # StreamReduce and sinkhorn take checked spec values
        (lambda: GatedResidualAdapter(D, bottleneck=0), "bottleneck"),
    ],
)
def test_bad_values_raise(build, key):
    with pytest.raises(ValueError, match=key) as err:
        build()
    assert "\n" not in str(err.value)
