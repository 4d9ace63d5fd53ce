"""Sparse-aware optimizer and clipping."""
import torch
from torch import nn

from tsparse.optim import SparseAwareAdamW, grad_norm_and_clip_


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


def test_no_clipping_below_threshold_and_step_after_clipping():
    table, dense, _ = sparse_setup()
    norm = grad_norm_and_clip_([table, dense], max_norm=1e9)
    before = table.detach().clone()
    SparseAwareAdamW([table, dense], lr=0.1).step()
    assert norm > 0 and not torch.equal(before, table.detach())


def test_table_lr_scale_is_per_group_or_global():
    from tsparse.lit_module import CausalLMModule
    from tsparse.modules.peer import PEER
    model = nn.ModuleDict({"peer": PEER(32, 64, heads=2, top_k=4, key_dim=8), "head": nn.Linear(32, 32)})
    optim = {"base": "finetune", "betas": (0.9, 0.95), "eps": 1e-8, "weight_decay": 0.0}
    per_group = CausalLMModule(model, {**optim, "table_lr_scale": {"peer": 7.0}}).configure_optimizers()
    assert {g["name"]: g["table_lr_scale"] for g in per_group.param_groups} == {"peer": 7.0, "base": 1.0}
    shared = CausalLMModule(model, {**optim, "table_lr_scale": 3.0}).configure_optimizers()
    assert {g["name"]: g["table_lr_scale"] for g in shared.param_groups} == {"peer": 3.0, "base": 3.0}
