"""Sparse-aware optimizer and clipping."""
import copy

import pytest
import torch
from torch import nn

from tsparse.optim import SparseAwareAdamW, coalesced, grad_norm_and_clip_


def sparse_setup(rows=1000, dim=8):
    torch.manual_seed(0)
    table = nn.Parameter(torch.randn(rows, dim))
    dense = nn.Parameter(torch.randn(dim, dim))
    idx = torch.tensor([3, 3, 17, 400])
    loss = (nn.functional.embedding(idx, table, sparse=True) @ dense).pow(2).sum()
    loss.backward()
    return table, dense, idx


def test_rowwise_adagrad_touches_only_looked_up_rows():
    table, dense, idx = sparse_setup()
    before = table.detach().clone()
    opt = SparseAwareAdamW([{"name": "peer", "params": [table, dense]}], lr=0.1)
    opt.step()
    changed = (table.detach() != before).any(dim=1).nonzero().flatten().tolist()
    assert changed == [3, 17, 400]
    assert opt.state[table]["row_sq_sum"].shape == (1000,)
    state_bytes = sum(t.numel() * t.element_size() for t in opt.state[table].values())
    assert state_bytes <= 1.25 * table.numel() * table.element_size() / 8  # one scalar per row of 8


def test_rowwise_update_matches_formula():
    table, dense, idx = sparse_setup()
    grad = table.grad.coalesce().to_dense()
    expected = table.detach().clone()
    for r in (3, 17, 400):
        g = grad[r]
        expected[r] -= 0.1 * g / (g.pow(2).mean().sqrt() + 1e-10)
    SparseAwareAdamW([table], lr=0.1).step()
    torch.testing.assert_close(table.detach(), expected)


def test_dense_path_matches_torch_adamw():
    torch.manual_seed(0)
    a = nn.Parameter(torch.randn(4, 4))
    b = nn.Parameter(a.detach().clone())
    ours = SparseAwareAdamW([a], lr=1e-2, betas=(0.9, 0.95), weight_decay=0.1)
    ref = torch.optim.AdamW([b], lr=1e-2, betas=(0.9, 0.95), weight_decay=0.1, eps=1e-8)
    for _ in range(3):
        for p, opt in ((a, ours), (b, ref)):
            opt.zero_grad()
            (p.sin().sum()).backward()
            opt.step()
    torch.testing.assert_close(a, b)


def test_clipping_handles_sparse_and_dense_grads():
    table, dense, _ = sparse_setup()
    dense_equivalent = torch.cat([table.grad.to_dense().flatten(), dense.grad.flatten()]).norm()
    norm = grad_norm_and_clip_([table, dense], max_norm=0.5)
    torch.testing.assert_close(norm, dense_equivalent)
    after = torch.cat([table.grad.to_dense().flatten(), dense.grad.flatten()]).norm()
    assert abs(after.item() - 0.5) < 1e-3
    assert table.grad.is_sparse


@pytest.mark.parametrize("max_norm,clipped", [(0.0, False), (1e9, False), (0.5, True)])
def test_clipping_only_above_a_positive_max_norm_and_step_after_clipping(max_norm, clipped):
    table, dense, _ = sparse_setup()
    grads = [table.grad.to_dense(), dense.grad.clone()]
    norm = grad_norm_and_clip_([table, dense], max_norm=max_norm)
    assert norm.item() > 1.0  # so that 0 (off) and 0.5 would both change the grads if they clipped
    scale = max_norm / norm if clipped else 1.0
    torch.testing.assert_close(table.grad.to_dense(), grads[0] * scale, rtol=1e-5, atol=0)
    torch.testing.assert_close(dense.grad, grads[1] * scale, rtol=1e-5, atol=0)
    before = table.detach().clone()
    SparseAwareAdamW([table, dense], lr=0.1).step()
    assert not torch.equal(before, table.detach())


def test_tables_step_at_group_lr():
    table, dense, _ = sparse_setup()
    grad = table.grad.coalesce().to_dense()[3]
    before = table.detach()[3].clone()
    opt = SparseAwareAdamW([{"name": "peer_table", "params": [table], "lr": 0.5}, {"name": "peer", "params": [dense]}],
                           lr=0.1)
    opt.step()
    torch.testing.assert_close(table.detach()[3], before - 0.5 * grad / grad.pow(2).mean().sqrt())


def test_dense_groups_decay_and_lr_changes_match_torch_adamw():
    torch.manual_seed(0)
    w, b = nn.Parameter(torch.randn(6, 5)), nn.Parameter(torch.randn(5))
    w2, b2 = (nn.Parameter(t.detach().clone()) for t in (w, b))
    ours = SparseAwareAdamW([{"name": "mhc", "params": [w, b]}], lr=1e-2, weight_decay=0.1)
    ref = torch.optim.AdamW([{"params": [w2], "weight_decay": 0.1}, {"params": [b2], "weight_decay": 0.0}],
                            lr=1e-2, betas=(0.9, 0.95), eps=1e-8)
    for lr in [1e-2, 3e-3, 5e-2, 1e-3]:  # per-step LR changes, as the phase callback makes them
        for (p, q), opt in (((w, b), ours), ((w2, b2), ref)):
            for g in opt.param_groups:
                g["lr"] = lr
            opt.zero_grad()
            (p.sin().sum() + (q.sin() * 2).sum()).backward()
            opt.step()
    torch.testing.assert_close(w, w2)
    torch.testing.assert_close(b, b2)


def test_bf16_params_keep_fp32_master_and_survive_resume():
    torch.manual_seed(0)
    ref = nn.Parameter(torch.randn(8, 8))
    low = nn.Parameter(ref.detach().bfloat16())
    fp32 = nn.Parameter(low.detach().float())
    make = lambda p: SparseAwareAdamW([{"name": "base", "params": [p]}], lr=1e-5)
    opt_low, opt_fp32 = make(low), make(fp32)
    for p, opt in ((low, opt_low), (fp32, opt_fp32)):
        for _ in range(3):
            opt.zero_grad()
            p.grad = torch.ones_like(p)
            opt.step()
    # 3 updates of 1e-5 each vanish in bf16 without a master copy; the master keeps them exactly.
    torch.testing.assert_close(opt_low.state[low]["master"], fp32.detach())
    assert low.dtype == torch.bfloat16 and torch.equal(low.detach(), fp32.detach().bfloat16())

    resumed_p = nn.Parameter(low.detach().clone())
    resumed = make(resumed_p)
    resumed.load_state_dict(copy.deepcopy(opt_low.state_dict()))  # as from a checkpoint file
    assert all(v.dtype == torch.float32 for v in resumed.state[resumed_p].values())
    for p, opt in ((low, opt_low), (resumed_p, resumed)):
        p.grad = torch.ones_like(p)
        opt.step()
    torch.testing.assert_close(resumed.state[resumed_p]["master"], opt_low.state[low]["master"], rtol=0, atol=0)


def test_state_clear_resets_moments():
    torch.manual_seed(0)
    a = nn.Parameter(torch.randn(4, 4))
    b = nn.Parameter(a.detach().clone())
    ours = SparseAwareAdamW([a], lr=1e-2)
    ours.zero_grad()
    a.pow(2).sum().backward()
    ours.step()
    ours.state.clear()
    ref = torch.optim.AdamW([b], lr=1e-2, betas=(0.9, 0.95), weight_decay=0.0)
    with torch.no_grad():
        b.copy_(a)
    for p, opt in ((a, ours), (b, ref)):
        opt.zero_grad()
        p.sin().sum().backward()
        opt.step()
    torch.testing.assert_close(a, b)


def test_bf16_table_grads_sum_repeated_rows_in_fp32():
    """torch coalesces bf16 values in bf16, where a sum stalls at 256 (256 + 1 == 256); a bf16 table's
    repeated rows (a frequent n-gram, a popular expert) are summed in fp32 and rounded once."""
    table = nn.Embedding(3, 2, sparse=True, dtype=torch.bfloat16)
    table(torch.zeros(1000, dtype=torch.long)).float().sum().backward()
    assert table.weight.grad.coalesce().values()[0].tolist() == [256.0, 256.0]  # torch's own coalesce
    grad = coalesced(table.weight.grad)
    assert grad.is_coalesced() and grad.dtype == torch.bfloat16
    assert grad.to_dense()[0].tolist() == [1000.0, 1000.0]
