"""`compile: true`: every sparse option trains under torch.compile (inductor on CPU) with the same loss
and gradients as eager, the sparse-table ops stay eager, and layers of one structure share compiled code."""
from __future__ import annotations

import pytest
import torch
from torch._dynamo.utils import counters

from tsparse.lit_module import compiled, next_token_loss
from tsparse.build import architecture_model
from tsparse.modules.perturb import perturb_
from tsparse.optim import SparseAwareAdamW
from tsparse.registry import trainable_groups

OPTIONS = {
    "engram": ["sparse=engram"],
    "peer": ["sparse=peer"],
    "mhc": ["sparse=mhc"],
    "mhc-adapter": ["sparse=mhc", "mhc.variant=adapter"],
    "hybrid": ["sparse=hybrid"],
    "triple": ["sparse=triple"],
    # All three kinds (and sparse tables) in one layer: the cheapest compile of every path, run in CI.
    "triple-one-layer": ["sparse=triple", "engram.layers=[1]", "peer.layers=[1]",
                         "mhc.layers=[1]"],
    "triple-dense-tables": ["sparse=triple", "peer.sparse_grad=false", "engram.sparse_grad=false"],
    "triple-bf16-tables": ["sparse=triple", "peer.table_dtype=bfloat16", "engram.table_dtype=bfloat16"],
}


def dense(grad: torch.Tensor) -> torch.Tensor:
    return grad.to_dense() if grad.is_sparse else grad


def nano_model(compose, small_modules, *overrides):
    torch.manual_seed(0)
    model = architecture_model(compose(["model=nano", *small_modules, *overrides])).train()
    for module in model.sparse_modules().values():
        perturb_(module)  # non-zero outputs, so every path carries gradient
    return model


def grads(model, loss_fn, ids) -> tuple[float, dict[str, torch.Tensor]]:
    params = [p for group in trainable_groups(model, "frozen").values() for p in group]
    for p in params:
        p.grad = None
    loss = loss_fn(ids)
    loss.backward()
    named = {n: p for n, p in model.named_parameters() if p.grad is not None}
    assert len(named) == len(params), "every trainable parameter gets a gradient"
    return loss.item(), {n: dense(p.grad) for n, p in named.items()}


# Inductor takes 10-30 s per distinct layer on 2 cores: CI compiles triple-one-layer, `make test-slow` every option.
@pytest.mark.parametrize("option", [o if o == "triple-one-layer" else pytest.param(o, marks=pytest.mark.slow)
                                    for o in OPTIONS])
def test_compiled_training_matches_eager(option, compose, small_modules, one_thread):
    model = nano_model(compose, small_modules, *OPTIONS[option])
    ids = torch.randint(0, model.config.vocab_size, (2, 32), generator=torch.Generator().manual_seed(1))
    eager_loss, eager_grads = grads(model, lambda x: next_token_loss(model, x), ids)
    torch._dynamo.reset()  # no code compiled by an earlier test (nor its recompile budget) carries over
    counters.clear()
    step = compiled(lambda x: next_token_loss(model, x))
    loss, compiled_grads = grads(model, step, ids)
    assert counters["stats"]["unique_graphs"] > 0  # it really compiled (no silent eager fallback)

    assert loss == pytest.approx(eager_loss, rel=1e-5)
    for name, grad in eager_grads.items():
        tol = {"rtol": 1e-4, "atol": 1e-6} if grad.dtype == torch.float32 else {}  # bf16 tables: torch's bf16 defaults
        torch.testing.assert_close(compiled_grads[name], grad, **tol, msg=name)
    tables = [p for m in model.sparse_modules().values() for p in getattr(m, "table_parameters", list)()]
    sparse = "sparse_grad=false" not in " ".join(OPTIONS[option])
    assert all(t.grad.is_sparse == sparse for t in tables)

    # A short run: the compiled step trains (the loss falls on a repeated batch) under the real optimizer.
    groups = [{"name": n, "params": p} for n, p in trainable_groups(model, "frozen").items() if p]
    optimizer = SparseAwareAdamW(groups, lr=1e-2)
    losses = []
    for _ in range(4):
        optimizer.zero_grad(set_to_none=True)
        loss = step(ids)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]


def captured_graphs(compose, small_modules, layers: int) -> int:
    """Graphs dynamo captures for one training step (graph capture and guards do not depend on the backend)."""
    model = nano_model(compose, small_modules, "sparse=triple", f"model.config.num_hidden_layers={layers}",
                       "engram.layers=[0]", f"peer.layers={list(range(1, layers))}",
                       f"mhc.layers={list(range(1, layers))}")
    counters.clear()
    torch._dynamo.reset()
    ids = torch.randint(0, model.config.vocab_size, (2, 16))
    compiled(lambda x: next_token_loss(model, x), backend="eager")(ids).backward()
    return counters["stats"]["unique_graphs"]


def test_layers_of_one_structure_share_compiled_code(compose, small_modules, one_thread):
    """Layers 1..L-1 carry the same modules: going from 3 to 5 layers compiles no new graph."""
    assert captured_graphs(compose, small_modules, 5) == captured_graphs(compose, small_modules, 3) > 0


@pytest.mark.slow
def test_compile_is_a_training_option(tiny_run, wikitext_small, tmp_path):
    """`compile=true` trains through Lightning, and resumes an eager run's checkpoint (same keys)."""
    run_dir = tmp_path / "run"
    tiny_run(tmp_path, wikitext_small, run_dir, "+experiment=diff_lr")
    results = tiny_run(tmp_path, wikitext_small, run_dir, "+experiment=diff_lr", "compile=true", "ckpt_path=last",
                       "trainer.max_steps=6")
    assert results["global_step"] == 6 and results["skipped_steps"] == 0
