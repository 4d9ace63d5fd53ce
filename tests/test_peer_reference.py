"""tsparse's PEER equals lucidrains' peer-pytorch with the same weights (the extra `bench`)."""
import pytest
import torch

pytest.importorskip("PEER_pytorch")

from tsparse.bench_peers import reference_peer  # noqa: E402
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


def test_bench_peers_runs_at_tiny_dims():
    from omegaconf import OmegaConf

    from tsparse.bench_peers import run_peers

    cfg = OmegaConf.create({"bench": {
        "name": "peers", "tokens": 64, "dims": [32], "experts": [256, 1024], "heads": 2, "top_k": 4, "key_dim": 8,
        "bf16_table_bytes": 64 * 1024, "threads": None, "warmup": 1, "repeats": 2,
        "mhc": {"dim": 16, "streams": 4, "batch_size": 2, "seq_len": 8, "sinkhorn_iters": 20},
        "optim_params": 2 * 2048 * 1024}})
    report = run_peers(cfg)
    assert "| 32 | 256 | float32 |" in report and "| 32 | 1,024 | bfloat16 |" in report
    assert "skipped" in report and "hyper-connections" in report and "AdamW(fused=True)" in report
