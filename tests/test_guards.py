"""Numerical guards: a non-finite loss or gradient stops the run (or skips the step) without poisoning."""
import math

import pytest
import torch

import tsparse.train as train_mod
from tsparse.checkpoint import load_checkpoint
from tsparse.lit_module import CausalLMModule, NonFiniteError
from tsparse.train import run

SMALL = ("sparse=peer", "peer.num_experts=256", "peer.key_dim=16", "trainer.max_steps=6",
         "trainer.val_check_interval=3", "callbacks.model_checkpoint.every_n_train_steps=1", "test=false")


class FaultyModule(CausalLMModule):
    """Injects a fault at step 3: a NaN loss, or a NaN gradient on the PEER parameters."""

    fault = "loss"

    def on_fit_start(self):
        self.seen = {}
        if self.fault == "grad":
            for p in self.trainable_groups()["peer"]:
                p.register_hook(lambda g: g * float("nan") if self.global_step == 3 else g)

    def loss(self, input_ids):
        loss = super().loss(input_ids)
        if self.training:
            self.seen[self.global_step] = [p.detach().clone() for p in self.trainable_groups()["peer"]]
        return loss * float("nan") if self.fault == "loss" and self.training and self.global_step == 3 else loss


@pytest.fixture
def faulty(monkeypatch):
    modules = []

    def make(*args, **kwargs):
        modules.append(FaultyModule(*args, **kwargs))
        return modules[-1]

    monkeypatch.setattr(train_mod, "CausalLMModule", make)
    return modules


@pytest.mark.parametrize("fault,needle", [("loss", "non-finite loss (nan) at step 3"),
                                          ("grad", "non-finite gradient in param groups ['peer'] at step 3")])
def test_stop_policy_raises_and_writes_no_poisoned_checkpoint(fault, needle, faulty, tmp_path, wikitext_small, compose,
                                                              nano):
    FaultyModule.fault = fault
    with pytest.raises(NonFiniteError, match=needle.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")
                       .replace("]", r"\]")):
        run(compose(nano(tmp_path, wikitext_small, *SMALL)))
    last = load_checkpoint(tmp_path / "run" / "checkpoints" / "last.ckpt")
    assert last["global_step"] == 3
    assert all(torch.isfinite(v).all() for v in last["state_dict"].values() if v.is_floating_point())


@pytest.mark.parametrize("fault", ["loss", "grad"])
def test_skip_policy_skips_the_step(fault, faulty, tmp_path, wikitext_small, compose, nano):
    FaultyModule.fault = fault
    results = run(compose(nano(tmp_path, wikitext_small, *SMALL, "optim.on_non_finite=skip")))
    module = faulty[0]
    assert module.skipped_steps == 1
    assert all(torch.isfinite(p).all() for p in module.parameters())
    assert math.isfinite(results["val/loss"]) and math.isfinite(results["val/ppl"])
    if fault == "grad":  # the step ran (global_step advanced) but moved nothing
        assert all(torch.equal(a, b) for a, b in zip(module.seen[3], module.seen[4]))
