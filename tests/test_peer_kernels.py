"""The fused PEER path equals the plain autograd path (top-k + gathers + einsums) it replaced."""
import pytest
import torch
import torch.nn.functional as F

from tsparse.modules import peer_kernels
from tsparse.modules.peer import PEER, PEERSpec
from tsparse.optim import SparseAwareAdamW, grad_norm_and_clip_


def reference_forward(peer: PEER, x):
    """The unfused path: dense top-k backward and [M, h*k, d] gathers."""
    h = peer._normed(x)
    q = peer.query(h)
    if peer.query_norm is not None:
        q = peer.query_norm(q)
    sub = torch.einsum("mhpd,hspd->mhps", q.view(-1, peer.heads, 2, peer.key_dim), peer.keys)
    s, i = sub.topk(peer.top_k, dim=-1)
    cand_s = (s[..., 0, :, None] + s[..., 1, None, :]).flatten(-2)
    cand_i = (i[..., 0, :, None] * peer.side + i[..., 1, None, :]).flatten(-2)
    scores, best = cand_s.topk(peer.top_k, dim=-1)
    gate = (scores.softmax(dim=-1) if peer.gate == "softmax" else F.relu(scores)).flatten(1)
    idx = cand_i.gather(-1, best).flatten(1)
    u = F.embedding(idx, peer.down.weight, sparse=peer.sparse_grad).float()
    v = F.embedding(idx, peer.up.weight, sparse=peer.sparse_grad).float()
    out = torch.einsum("mn,mnd->md", F.gelu(torch.einsum("mnd,md->mn", u, h)) * gate, v)
    return out.view_as(x).to(x.dtype)


def run(peer, x, forward, weight):
    peer.zero_grad(set_to_none=True)
    x = x.detach().clone().requires_grad_()
    out = forward(x)
    (out * weight).sum().backward()
    grads = {n: p.grad for n, p in peer.named_parameters() if p.grad is not None}
    return out.detach(), x.grad, grads


def make(gate="softmax", table_dtype="float32", sparse_grad=True, query_batchnorm=False, dim=24, n=256):
    torch.manual_seed(0)
    peer = PEER(dim, PEERSpec(num_experts=n, heads=3, top_k=5, key_dim=8, gate=gate, table_dtype=table_dtype,
                              sparse_grad=sparse_grad, query_batchnorm=query_batchnorm))
    with torch.no_grad():
        peer.up.weight.normal_()
    return peer


@pytest.mark.parametrize("gate", ["softmax", "relu"])
@pytest.mark.parametrize("table_dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("sparse_grad", [True, False])
def test_fused_matches_reference(monkeypatch, gate, table_dtype, sparse_grad):
    monkeypatch.setattr(peer_kernels, "CHUNK_BYTES", 4096)  # several token chunks
    peer = make(gate, table_dtype, sparse_grad, query_batchnorm=gate == "relu")
    x, weight = torch.randn(2, 37, 24), torch.randn(2, 37, 24)
    out, gx, grads = run(peer, x, peer, weight)
    ref_out, ref_gx, ref_grads = run(peer, x, lambda t: reference_forward(peer, t), weight)
    close = dict(rtol=1e-5, atol=1e-5 * ref_out.abs().max().item())
    torch.testing.assert_close(out, ref_out, **close)
    torch.testing.assert_close(gx, ref_gx, rtol=1e-5, atol=1e-5 * ref_gx.abs().max().item())
    assert grads.keys() == ref_grads.keys()
    for name, g in grads.items():
        ref = ref_grads[name]
        assert g.is_sparse == ref.is_sparse == (sparse_grad and name in ("down.weight", "up.weight")), name
        assert g.dtype == ref.dtype, name
        if g.is_sparse:
            assert (g._indices()[0].diff() > 0).all()  # sorted, distinct rows: coalesced as produced
            g, ref = g.to_dense(), ref.coalesce().to_dense()
        if g.dtype == torch.bfloat16:
            # Ours sums each row's contributions in fp32 and rounds once; the reference rounds each
            # contribution to bf16 and then sums: compare to the fp32 sum, rounded once.
            ref = fp32_table_grad(peer, x, weight, name).to(torch.bfloat16)
            torch.testing.assert_close(g.float(), ref.float(), rtol=8e-3, atol=1e-6)
        else:
            torch.testing.assert_close(g, ref, rtol=1e-5, atol=1e-5 * ref.abs().max().item())


def fp32_table_grad(peer, x, weight, name):
    fp32 = make(peer.gate, "float32", False, peer.query_norm is not None)
    fp32.load_state_dict({k: v.float() for k, v in peer.state_dict().items()})
    return run(fp32, x, lambda t: reference_forward(fp32, t), weight)[2][name]


def test_clipping_and_optimizer_never_coalesce(monkeypatch):
    peer = make()
    peer(torch.randn(4, 9, 24)).pow(2).sum().backward()
    values = [p.grad._values() for p in peer.table_parameters()]

    def no_coalesce(self):
        raise AssertionError("coalesce called")
    monkeypatch.setattr(torch.Tensor, "coalesce", no_coalesce)
    grad_norm_and_clip_(list(peer.parameters()), 1e-3)
    SparseAwareAdamW(peer.parameters(), lr=1e-3).step()
    for p, v in zip(peer.table_parameters(), values):
        assert p.grad.is_coalesced() and p.grad._values().data_ptr() == v.data_ptr()


def test_retrieve_is_unchanged_without_grad():
    peer = make()
    x = torch.randn(3, 11, 24)
    with torch.no_grad():
        scores, idx = peer.retrieve(x)
        q = peer.query(peer._normed(x)).view(-1, 3, 2, 8)
        sub = torch.einsum("mhpd,hspd->mhps", q, peer.keys)
        s, i = sub.topk(5, dim=-1)
    cand = (s[..., 0, :, None] + s[..., 1, None, :]).flatten(-2)
    ref_scores, best = cand.topk(5, dim=-1)
    ref_idx = (i[..., 0, :, None] * peer.side + i[..., 1, None, :]).flatten(-2).gather(-1, best)
    assert torch.equal(idx.view(-1, 3, 5), ref_idx)
    torch.testing.assert_close(scores.view(-1, 3, 5), ref_scores)


def test_frozen_tables_get_no_grad_and_the_rest_matches():
    peer = make()
    peer.down.weight.requires_grad_(False)
    peer.up.weight.requires_grad_(False)
    x, weight = torch.randn(3, 7, 24), torch.randn(3, 7, 24)
    _, gx, grads = run(peer, x, peer, weight)
    _, ref_gx, ref_grads = run(peer, x, lambda t: reference_forward(peer, t), weight)
    assert grads.keys() == ref_grads.keys() == {"query.weight", "keys"}
    torch.testing.assert_close(gx, ref_gx, rtol=1e-5, atol=1e-6)
    for name, g in grads.items():
        torch.testing.assert_close(g, ref_grads[name], rtol=1e-5, atol=1e-6)
