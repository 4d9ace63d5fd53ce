"""optim.base_dtype=bfloat16: the frozen base's projections stored in bf16 (half their bytes, the modules
untouched), the fp32 model's loss and gradients on the same values, no fp32 weight copy saved for backward,
one-line refusals, train -> resume -> export through the CLI, and the plan's base-weights row."""
import copy
import json

import pytest
import torch
from torch import nn

from tsparse import plan
from tsparse.base_dtype import Bf16Linear, store_base_in_bf16
from tsparse.checks import ConfigError
from tsparse.config import compose_config, validate
from tsparse.export import main as export_main
from tsparse.lit_module import next_token_loss
from tsparse.loading import load_run
from tsparse.modules.engram import EngramSpec
from tsparse.modules.mhc import MHCSpec
from tsparse.modules.peer import PEERSpec
from tsparse.registry import params_by_group, trainable_groups
from tsparse.train import run

from helpers import make_tiny_model

SPECS = {"engram": EngramSpec(layers=[1], heads_per_order=2, dim_per_order=16, table_rows=101, table_dtype="bfloat16"),
         "peer": PEERSpec(layers=[1], num_experts=81, heads=2, top_k=2, key_dim=8),
         "mhc": MHCSpec(layers=[2], streams=2)}
IDS = torch.randint(0, 96, (2, 10), generator=torch.Generator().manual_seed(0))


def pair(specs=SPECS):
    """(the tiny model with its base in bf16, an fp32 copy whose base projections hold the same bf16 values)."""
    model = make_tiny_model(specs, perturb=0.5).train()
    trainable_groups(model)  # freezes the base, as a run does
    reference = copy.deepcopy(model)
    store_base_in_bf16(model)
    for module in reference.modules():
        if type(module) is nn.Linear and not module.weight.requires_grad:
            module.weight.data = module.weight.data.bfloat16().float()
    return model, reference


def test_base_projections_take_half_the_bytes_and_the_rest_keeps_its_dtype():
    fp32 = make_tiny_model(SPECS)
    model = copy.deepcopy(fp32)
    store_base_in_bf16(model)
    size = lambda m: sum(p.numel() * p.element_size() for _, p in params_by_group(m)["base"])
    projections = {f"{n}.weight": m.weight for n, m in model.named_modules() if isinstance(m, Bf16Linear)}
    assert len(projections) == 3 * 7 + 1  # q, k, v, o, gate, up, down per layer and the lm_head
    assert all(w.dtype == torch.bfloat16 and not w.requires_grad for w in projections.values())
    assert size(model) == size(fp32) - 2 * sum(w.numel() for w in projections.values())
    # norms, the embedding and the modules (fp32 dense weights and PEER table, bf16 Engram table) as they were
    assert {n: t.dtype for n, t in model.state_dict().items()} == {
        n: torch.bfloat16 if n in projections else t.dtype for n, t in fp32.state_dict().items()}
    assert model.model.rotary_emb.inv_freq.dtype == torch.float32


def test_loss_and_gradients_equal_the_fp32_model_on_the_same_values():
    model, reference = pair()
    losses = []
    for m in (model, reference):
        losses.append(next_token_loss(m, IDS))
        losses[-1].backward()
    assert losses[0].item() == pytest.approx(losses[1].item(), rel=1e-6)
    trained = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    assert len(trained) > 10 and all(p.grad is not None for _, p in trained)
    ref = dict(reference.named_parameters())
    for name, p in trained:
        torch.testing.assert_close(p.grad, ref[name].grad, rtol=1e-5, atol=1e-7, msg=name)


@pytest.mark.parametrize("autocast", [False, True])
def test_no_fp32_copy_of_a_base_weight_is_saved_for_backward(autocast):
    model, _ = pair({k: v for k, v in SPECS.items() if k != "peer" or not autocast})  # PEER fails CPU autocast
    shapes = {tuple(m.weight.shape) for m in model.modules() if isinstance(m, Bf16Linear)}
    params = {p.untyped_storage()._cdata for p in model.parameters()}
    saved = []

    def pack(t):
        if t.untyped_storage()._cdata not in params:
            saved.append((t.dtype, tuple(t.shape)))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), \
            torch.autocast("cpu", torch.bfloat16, enabled=autocast):
        next_token_loss(model, IDS).backward()
    assert saved and not [s for s in saved if s[1] in shapes and s[0] != torch.bfloat16]


@pytest.mark.parametrize("overrides,message", [
    (["optim.base_dtype=bfloat16", "optim.base=finetune"],
     "optim.base_dtype=bfloat16 needs optim.base=frozen (got optim.base=finetune)"),
    (["optim.base_dtype=fp8"], "optim.base_dtype='fp8' is not allowed; choose one of ['float32', 'bfloat16']"),
])
def test_bad_settings_are_refused_in_one_line(overrides, message):
    with pytest.raises(ConfigError) as err:
        validate(compose_config(["model=nano", "sparse=peer", *overrides]))
    assert message in str(err.value) and "\n" not in str(err.value)


def test_a_run_trains_resumes_and_exports(tmp_path, wikitext_small, compose, nano, cli, small_modules):
    """Two steps through the CLI, a third resumed in-process with export_dir; both exports (end of training,
    and `tsparse.export` from the checkpoint) reload with the logits of the trained model."""
    from transformers import AutoModelForCausalLM

    run_dir = tmp_path / "run"
    args = nano(tmp_path, wikitext_small, *small_modules, "sparse=peer", "optim.base_dtype=bfloat16",
                "trainer.max_steps=2", "trainer.val_check_interval=2", "trainer.limit_val_batches=1", "test=false")
    first = cli("tsparse.train", *[a for a in args if not a.startswith("paths.output_dir")], f"hydra.run.dir={run_dir}")
    assert first.returncode == 0, first.stderr[-2000:]
    resumed = run(compose([*[a.replace("max_steps=2", "max_steps=3") for a in args], "ckpt_path=last",
                           f"export_dir={tmp_path / 'end'}"]))
    assert resumed["global_step"] == 3
    state = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
    assert state["model.model.layers.0.self_attn.q_proj.weight"].dtype == torch.bfloat16
    assert state["model.model.norm.weight"].dtype == torch.float32

    export_main([str(run_dir), str(tmp_path / "exported")])
    trained, _ = load_run(run_dir)  # the checkpoint's values in an fp32 model; then stored as the run stored them
    store_base_in_bf16(trained)
    ids = torch.randint(0, 512, (2, 16))
    with torch.no_grad():
        expected = trained(ids).logits
        for out in ("end", "exported"):
            exported = AutoModelForCausalLM.from_pretrained(tmp_path / out).eval()
            torch.testing.assert_close(exported(ids).logits, expected, atol=0, rtol=0)


def test_plan_counts_the_base_projections_at_two_bytes():
    overrides = ["model=tinyllama", "sparse=peer"]
    fp32, bf16 = (plan.memory_plan(compose_config([*overrides, f"optim.base_dtype={d}"]))
                  for d in ("float32", "bfloat16"))
    embedding, vectors = 32000 * 2048, 22 * 2 * 2048 + 2048  # stay fp32
    assert fp32["base weights"] == 4 * 1_100_048_384
    assert bf16["base weights"] == 2 * (1_100_048_384 - embedding - vectors) + 4 * (embedding + vectors)
    assert {k: v for k, v in bf16.items() if k not in ("base weights", "total")} == \
        {k: v for k, v in fp32.items() if k not in ("base weights", "total")}
