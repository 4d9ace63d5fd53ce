"""tsparse's PEER and mHC equal lucidrains' peer-pytorch and hyper-connections with the same weights (the extras
`bench` / `dev`; skipped without them)."""
import pytest
import torch
from torch import nn

pytest.importorskip("PEER_pytorch")
pytest.importorskip("hyper_connections")

from tsparse.bench.references import reference_peer  # noqa: E402
from tsparse.modules.mhc import HyperConnection, MHCSpec  # noqa: E402
from tsparse.modules.peer import PEER, PEERSpec  # noqa: E402


@pytest.mark.parametrize("gate,top_k", [("softmax", 4), ("relu", 1)])
def test_matches_peer_pytorch(gate, top_k):
    # peer-pytorch's relu ("non-competing") gate keeps the top 1 of the k^2 candidates per head,
    # which is tsparse's top_k=1 (the best candidate is the sum of both halves' best sub-keys).
    torch.manual_seed(0)
    peer = PEER(32, PEERSpec(num_experts=256, heads=3, top_k=top_k, key_dim=8, gate=gate, input_norm=False))
    with torch.no_grad():
        peer.up.weight.normal_()
    ref = reference_peer(peer)
    if gate == "relu":
        ref.product_key_topk = 4  # its sub-key top-k; the result is the same for any value >= 1
    x = torch.randn(2, 9, 32)
    out = peer(x)
    torch.testing.assert_close(out, ref(x), rtol=1e-5, atol=1e-6)
    assert out.abs().max() > 0


def test_mhc_matches_hyper_connections_with_the_same_static_maps():
    """With phi = 0 (theirs: dynamic fns = 0) both mix streams by static maps: H_pre = sigmoid(b_pre),
    H_post = 2 sigmoid(b_post), H_res = Sinkhorn(b_res). Their residual matrix maps stream s to t (out_t =
    sum_s A[s, t] x_s), ours maps j to i (out_i = sum_j H[i, j] x_j), so b_res = A^T; the output of the
    same branch must then agree to float rounding."""
    from hyper_connections import mHC

    torch.manual_seed(0)
    b, t, n, d = 2, 5, 4, 16
    branch = nn.Sequential(nn.Linear(d, d), nn.Tanh())
    ref = mHC(n, dim=d, branch=branch, layer_index=0, sinkhorn_iters=20)
    ours = HyperConnection(d, MHCSpec(streams=n, sinkhorn_iters=20))
    with torch.no_grad():
        ref.static_alpha.normal_()  # column 0: the branch input weights; columns 1..n: the residual logits
        ref.static_beta.normal_()
        ours.b_pre.copy_(ref.static_alpha[:, 0])
        ours.b_res.copy_(ref.static_alpha[:, 1:].T)
        ours.b_post.copy_(ref.static_beta)
    x = torch.randn(b, t, n, d)
    expected = ref(x.transpose(1, 2).reshape(b * n, t, d)).reshape(b, n, t, d).transpose(1, 2)
    out = ours(x, branch)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6)
    assert (out - x).abs().max() > 0.1  # the maps are far from the identity: the comparison has teeth


def test_bench_peers_runs_at_tiny_dims(tmp_path):
    from omegaconf import OmegaConf

    from tsparse.bench.references import run

    cfg = OmegaConf.create({"bench": {
        "name": "peers", "tokens": 64, "dims": [32], "experts": [256, 1024], "heads": 2, "top_k": 4, "key_dim": 8,
        "bf16_table_bytes": 64 * 1024, "threads": None, "warmup": 1, "repeats": 2,
        "mhc": {"dim": 16, "streams": 4, "batch_size": 2, "seq_len": 8, "sinkhorn_iters": 20},
        "optim_params": 2 * 2048 * 1024}})
    report = run(cfg, tmp_path)
    assert (tmp_path / "bench.md").read_text() == report
    assert "| 32 | 256 | float32 |" in report and "| 32 | 1,024 | bfloat16 |" in report
    assert "skipped" in report and "hyper-connections" in report and "AdamW(fused=True)" in report
