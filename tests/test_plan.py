"""tsparse.plan: exact weights at TinyLlama dims, the saved-activation formulas against autograd's own
count (and, with activation checkpointing, the allocator's), the total against the measured peak memory of
CPU training steps, and one-line bad input."""
import json
import subprocess
import sys

import pytest
import torch
from torch.autograd.graph import saved_tensors_hooks
from torch.profiler import ProfilerActivity, profile

from tsparse import plan
from tsparse.build import architecture_model
from tsparse.config import compose_config
from tsparse.lit_module import next_token_loss
from tsparse.params import count
from tsparse.registry import trainable_groups

from helpers import autograd_saved_bytes

MEASURE = """
import json, resource, sys, torch
from tsparse.bench.experts import train_step
from tsparse.build import architecture_model
from tsparse.config import compose_config
torch.set_num_threads(1)
cfg = compose_config(sys.argv[1:])
rss = lambda: int(open("/proc/self/statm").read().split()[1]) * 4096
before = rss()
torch.manual_seed(0)
model = architecture_model(cfg).train()
ids = torch.randint(0, cfg.model.config.vocab_size, (cfg.data.batch_size, cfg.data.block_size))
step, _ = train_step(model, ids)
for _ in range(2):  # the second step runs with the optimizer state in place
    step()
print(json.dumps(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - before))
"""


@pytest.mark.parametrize("experts, total", [(16384, 1_236_494_336), (65536, 1_639_278_592), (262144, 3_250_153_472),
                                            (589824, 5_934_770_176), (802816, 7_679_731_712)])
def test_weights_are_exact_at_tinyllama_dims(experts, total):
    """The seed table of DESIGN.md (fp32: 4 bytes a parameter), and bf16 tables at 2 bytes a table entry."""
    overrides = ["model=tinyllama", "sparse=peer", f"peer.num_experts={experts}"]
    items = plan.memory_plan(compose_config(overrides))
    weights = items["base weights"] + items["module dense weights"] + items["tables (float32)"]
    assert weights == 4 * total == 4 * count(compose_config(overrides))["total"]
    bf16 = plan.memory_plan(compose_config([*overrides, "peer.table_dtype=bfloat16"]))
    assert bf16["tables (bfloat16)"] == items["tables (float32)"] // 2 == 2 * 2 * experts * 2048 * 2


def test_optimizer_state_and_table_grads_follow_optim():
    """AdamW: two fp32 moments per dense trainable parameter; row-wise AdaGrad: one fp32 per table row;
    PEER's table grads: at most N distinct rows, of d values and one int64 index each."""
    cfg = compose_config(["model=nano", "sparse=peer", "data.batch_size=64", "data.block_size=128"])
    items = plan.memory_plan(cfg)
    with torch.device("meta"):
        model = architecture_model(cfg)
    dense = [p for name, ps in trainable_groups(model).items() if not name.endswith("_table") for p in ps]
    assert items["optimizer: AdamW moments + fp32 masters"] == 8 * sum(p.numel() for p in dense)
    experts, layers, dim = cfg.peer.num_experts, len(cfg.peer.layers), cfg.model.config.hidden_size
    assert items["optimizer: row-wise AdaGrad"] == 4 * 2 * layers * experts
    assert items["gradients: table rows"] == 2 * layers * experts * (4 * dim + 8)  # every row touched
    assert "base" not in items and items["gradients: dense"] == 4 * sum(p.numel() for p in dense)


def test_ddp_adds_buckets_and_gathered_rows_only():
    one = plan.memory_plan(compose_config(["model=tinyllama", "+experiment=diff_lr", "trainer=gpu"]))
    ddp = plan.memory_plan(compose_config(["model=tinyllama", "+experiment=diff_lr", "trainer=ddp_gpu",
                                           "trainer.devices=8"]))
    assert ddp["DDP gradient buckets"] == one["gradients: dense"]
    assert ddp["gradients: table rows"] > one["gradients: table rows"]
    same = {k for k in one if k not in ("gradients: table rows", "total")}
    assert {k: ddp[k] for k in same} == {k: one[k] for k in same}


@pytest.mark.parametrize("overrides", [["sparse=triple"], ["sparse=engram"], ["sparse=peer"], ["sparse=mhc"],
                                       ["sparse=triple", "optim.base=finetune"],
                                       ["sparse=triple", "model.config.hidden_size=128",
                                        "model.config.intermediate_size=300", "mhc.streams=2"]])
def test_saved_activation_formulas_match_autograd(overrides, one_thread):
    """`saved_bytes` against the bytes autograd saves in a real fp32 forward (parameters left out)."""
    cfg = compose_config(["model=micro", "peer=16k", "data.batch_size=2", "data.block_size=64", *overrides])
    torch.manual_seed(0)
    model = architecture_model(cfg).train()
    trainable_groups(model, cfg.optim.base)
    ids = torch.randint(0, cfg.model.config.vocab_size, (2, 64))
    per_token, per_step, _ = plan.saved_bytes(model, 64, 4)
    assert per_token * ids.numel() + per_step == pytest.approx(autograd_saved_bytes(model, ids), rel=0.03)


def allocated(fn) -> list[int]:
    """Bytes the CPU allocator holds above its start, after each allocation or free while `fn()` runs, its
    result kept (one torch thread: the profiler sees the calling thread's allocations)."""
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        result = fn()  # noqa: F841 (held until the profile ends)
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events() if e.name() == "[memory]")
    totals = [0]
    for _, nbytes in events:
        totals.append(totals[-1] + nbytes)
    return totals


def layer_saved_bytes(model, ids) -> list[int]:
    """Bytes autograd saves inside each decoder layer (parameters and the layer's input left out) in a
    training forward without checkpointing."""
    kept = {p.untyped_storage()._cdata: p for p in model.parameters()}  # held, so that no address is reused
    saved, current = [0] * len(model.model.layers), []

    def enter(i):
        def hook(layer, args):
            current[:] = [i]
            kept[args[0].untyped_storage()._cdata] = args[0]
        return hook

    def pack(t):
        if current and t.untyped_storage()._cdata not in kept:
            kept[t.untyped_storage()._cdata] = t
            saved[current[0]] += t.untyped_storage().nbytes()
        return t

    handles = [h for i, layer in enumerate(model.model.layers) for h in (
        layer.register_forward_pre_hook(enter(i)), layer.register_forward_hook(lambda *_: current.clear()))]
    with saved_tensors_hooks(pack, lambda t: t):
        next_token_loss(model, ids)
    for handle in handles:
        handle.remove()
    return saved


@pytest.mark.parametrize("overrides", [["sparse=triple"], ["sparse=peer"], ["sparse=mhc"],
                                       ["sparse=triple", "optim.base=finetune"]])
def test_saved_activation_formulas_match_with_checkpointing(overrides, one_thread):
    """`model.activation_checkpointing=true`: what the forward leaves allocated (the layers' kept inputs, the
    head's saved tensors) plus the largest layer's recompute (its saved tensors, its input aside), measured."""
    cfg = compose_config(["model=micro", "peer=16k", "data.batch_size=2", "data.block_size=64",
                          "model.activation_checkpointing=true", *overrides])
    torch.manual_seed(0)
    model = architecture_model(cfg).train()
    trainable_groups(model, cfg.optim.base)
    ids = torch.randint(0, cfg.model.config.vocab_size, (2, 64))
    per_token, per_step, _ = plan.saved_bytes(model, 64, 4)
    held = allocated(lambda: next_token_loss(model, ids))[-1]
    for layer in model.model.layers:
        layer.gradient_checkpointing = False
    assert per_token * ids.numel() + per_step == pytest.approx(held + max(layer_saved_bytes(model, ids)), rel=0.03)
    assert per_token < plan.saved_bytes(model, 64, 4)[0]  # than without checkpointing


def measured_peak(overrides: list[str]) -> int:
    """Peak RSS minus RSS before the model is built, over two CPU training steps, in a fresh process."""
    out = subprocess.run([sys.executable, "-c", MEASURE, *overrides], capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.slow
@pytest.mark.parametrize("experts", [16384, 262144])
def test_total_within_15_percent_of_a_measured_cpu_step(experts):
    overrides = ["model=micro", "+experiment=diff_lr", f"peer.num_experts={experts}", "data.batch_size=8",
                 "data.block_size=256"]
    predicted = plan.memory_plan(compose_config(overrides))["total"]
    measured = measured_peak(overrides)
    print(f"{experts} experts: measured {measured / 2**20:.0f} MiB, planned {predicted / 2**20:.0f} MiB")
    assert predicted == pytest.approx(measured, rel=0.15)


def test_cli_prints_a_markdown_table_and_a_verdict(capsys):
    columns = plan.main(["model=tinyllama", "+experiment=diff_lr", "trainer=gpu", "--experts", "16384", "802816",
                         "--markdown", "--device-gb", "24"])
    out = capsys.readouterr().out
    assert "| item | 16,384 experts | 802,816 experts |" in out and "| **total** |" in out
    assert "16,384 experts: fits" in out
    assert "802,816 experts: does not fit" in out and "(largest: tables (float32)" in out
    assert columns["802,816 experts"]["total"] > 24 * plan.GiB


@pytest.mark.parametrize("argv, needle", [
    (["trainer.precision=64-true"], "trainer.precision='64-true' is not allowed"),
    (["trainer=fsdp"], "is not planned; choose auto (1 device) or ddp"),
    (["trainer.devices=auto"], "trainer.devices='auto' must be a positive number of devices"),
    (["--device-gb", "0"], "--device-gb: 0.0 is not a positive number"),
    (["model=nope"], "Could not find 'model/nope'"),
])
def test_bad_input_is_one_line(argv, needle, capsys):
    with pytest.raises(SystemExit) as exit_info:
        plan.main(argv)
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err.startswith("error: ") and err.count("\n") == 1 and needle in err, err
