"""The contract every module kind of the registry meets, checked from its example spec and variations: an exact
identity at init, wired into the forward pass, a gradient for every parameter, a bit-exact save/load round
trip, and every spec key reaching the built module. A kind that is built but not wired fails here."""
import dataclasses

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaForCausalLM

from tsparse.modules import perturb_
from tsparse.registry import KINDS

IDS = torch.randint(1, 96, (2, 12), generator=torch.Generator().manual_seed(1))


def kind_modules(model, name):
    modules = [m for key, m in model.sparse_modules().items() if key.startswith(f"{name}.")]
    reduce = model.model.stream_reduce
    return modules + ([reduce] if reduce is not None and KINDS[name].reduce is not None else [])


@pytest.fixture(params=list(KINDS))
def kind(request):
    return KINDS[request.param]


def test_identity_at_init(kind, tiny_model):
    model = tiny_model({kind.name: kind.example()})
    base = LlamaForCausalLM(model.config).eval()
    missing, _ = base.load_state_dict(model.state_dict(), strict=False)
    assert not missing
    with torch.no_grad():
        torch.testing.assert_close(model(IDS).logits, base(IDS).logits, rtol=0, atol=1e-6)


def test_perturbed_weights_change_the_output_and_every_parameter_gets_a_gradient(kind, tiny_model):
    model = tiny_model({kind.name: kind.example()})
    with torch.no_grad():
        before = model(IDS).logits
    modules = kind_modules(model, kind.name)
    assert modules, f"{kind.name}: nothing was built for layers {kind.example().layers}"
    for module in modules:
        perturb_(module, 0.5)
    logits = model(IDS).logits
    assert (logits - before).abs().max() > 1e-3, f"{kind.name} is built but does not change the forward pass"
    logits.logsumexp(-1).mean().backward()
    for module in modules:
        for name, p in module.named_parameters():
            grad = p.grad.to_dense() if p.grad is not None and p.grad.is_sparse else p.grad
            assert grad is not None and grad.abs().sum() > 0, f"{kind.name}: {name} gets no gradient"


def test_save_pretrained_round_trip_is_bit_exact(kind, tiny_model, tmp_path):
    model = tiny_model({kind.name: kind.example()}, perturb=0.5)
    model.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert type(loaded) is type(model) and loaded.config.module_specs() == model.config.module_specs()
    assert loaded.config.module_data == model.config.module_data
    for key, value in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key
    with torch.no_grad():
        assert torch.equal(loaded(IDS).logits, model(IDS).logits)


def fingerprint(model) -> tuple:
    """What a spec key can change: parameter and buffer shapes and dtypes, module reprs (embedding sparsity,
    sizes), and the output of the perturbed model."""
    for module in model.sparse_modules().values():
        torch.manual_seed(0)
        perturb_(module, 0.5)
    shapes = [(k, tuple(v.shape), v.dtype) for k, v in model.state_dict().items()]
    with torch.no_grad():
        return shapes, repr(model), model(IDS).logits


def test_every_spec_key_reaches_the_built_module(kind, tiny_model):
    keys = {f.name for f in dataclasses.fields(kind.spec)} - {"layers"}
    assert set(kind.variations) == keys, f"{kind.name}: registry variations must cover {sorted(keys)}"
    example = kind.example()
    for key, changes in kind.variations.items():
        baseline = dataclasses.replace(example, **{k: v for k, v in changes.items() if k != key})
        varied = dataclasses.replace(example, **changes)
        assert getattr(varied, key) != getattr(baseline, key), f"{kind.name}.{key}: the variation changes nothing"
        a, b = (fingerprint(tiny_model({kind.name: spec})) for spec in (baseline, varied))
        same_output = a[2].shape == b[2].shape and torch.equal(a[2], b[2])
        assert a[0] != b[0] or a[1] != b[1] or not same_output, f"{kind.name}.{key} does not reach the module"
