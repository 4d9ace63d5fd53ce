"""The contract every module kind of the registry meets, checked from its example spec and variations: the
module protocol (`tsparse.modules.protocol.SparseModule`), an exact identity at init, wired into the forward
pass, a gradient for every parameter, a bit-exact save/load round trip, cached generation equal to uncached,
saved-activation bytes, table rows and statistics as declared, and every spec key changing the module's output,
parameters or gradients. A kind that is built but not wired, or ignores a spec key, fails here."""
import dataclasses

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaForCausalLM

from tsparse import plan
from tsparse.modules.perturb import perturb_
from tsparse.modules.protocol import SparseModule
from tsparse.registry import KINDS, trainable_groups

from helpers import autograd_saved_bytes

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
    """What a spec key can change: parameter and buffer shapes and dtypes, the perturbed model's output, and
    the layout of each module parameter's gradient (dense or row-sparse). Not the modules' reprs: a key that
    only shows in a repr has not reached the module."""
    for module in model.sparse_modules().values():
        torch.manual_seed(0)
        perturb_(module, 0.5)
    shapes = [(k, tuple(v.shape), v.dtype) for k, v in model.state_dict().items()]
    logits = model(IDS).logits
    logits.logsumexp(-1).mean().backward()
    layouts = [(n, p.grad.layout if p.grad is not None else None) for m in model.sparse_modules().values()
               for n, p in m.named_parameters()]
    return shapes, layouts, logits.detach()


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


def test_modules_follow_the_protocol_and_reset_to_the_identity(kind, tiny_model):
    model = tiny_model({kind.name: kind.example()}, perturb=0.5)
    base = LlamaForCausalLM(model.config).eval()
    base.load_state_dict(model.state_dict(), strict=False)
    for key, module in model.sparse_modules().items():
        assert isinstance(module, SparseModule) and isinstance(module, kind.modules), key
        module.reset_parameters()
    with torch.no_grad():
        torch.testing.assert_close(model(IDS).logits, base(IDS).logits, rtol=0, atol=1e-6)


def test_cached_generation_equals_uncached(kind, tiny_model):
    model = tiny_model({kind.name: kind.example()}, perturb=0.3)
    with torch.no_grad():
        cached = model.generate(IDS[:, :6], max_new_tokens=8, do_sample=False, use_cache=True)
        uncached = model.generate(IDS[:, :6], max_new_tokens=8, do_sample=False, use_cache=False)
    assert cached.shape == (2, 14) and torch.equal(cached, uncached)


def test_saved_bytes_match_autograd(kind, tiny_model):
    """`tsparse.plan`'s activation count (the modules' `saved_bytes` plus the layers') against the bytes
    autograd saves in a training forward of the tiny model with the kind attached (within 10%)."""
    model = tiny_model({kind.name: kind.example()}, perturb=0.5).train()
    trainable_groups(model, "frozen")
    per_token, per_step, _ = plan.saved_bytes(model, IDS.shape[1], 4)
    assert per_token * IDS.numel() + per_step == pytest.approx(autograd_saved_bytes(model, IDS), rel=0.1)


def test_table_rows_per_token_match_the_gradient(kind, tiny_model):
    """`rows_per_token()`: a kind without tables looks up none; with tables, a token's gradient touches that
    many rows: exactly when the gradient is not coalesced; when it is (rows of different heads may
    coincide), at most that many for each of 8 single tokens and exactly that many for one of them."""
    touched = {}
    for t in range(8):
        model = tiny_model({kind.name: kind.example()}, perturb=0.5)
        model(IDS[:1, t:t + 1]).logits.logsumexp(-1).mean().backward()
        for key, module in model.sparse_modules().items():
            rows, coalesced = module.rows_per_token()
            assert (rows > 0) == bool(kind.tables), key
            for table in kind.tables:
                grad = module.get_parameter(table).grad
                assert grad is not None and grad.is_sparse, f"{key}.{table}: no row-sparse gradient"
                touched.setdefault((key, table, rows, coalesced), []).append(grad._indices().shape[1])
    for (key, table, rows, coalesced), counts in touched.items():
        assert max(counts) == rows and (coalesced or min(counts) == rows), (key, table, rows, counts)


def test_stats_are_the_declared_ones(kind, tiny_model):
    """With `track_stats`, a forward records the statistics the registry declares for the kind (some kinds
    accumulate them, e.g. PEER's expert usage, and report them in `usage_summary()`)."""
    model = tiny_model({kind.name: kind.example()}, perturb=0.5)
    modules = model.sparse_modules()
    for module in modules.values():
        module.track_stats = True
    with torch.no_grad():
        model(IDS)
    for key, module in modules.items():
        assert set(module.stats) | set(module.usage_summary()) == set(kind.stats), key
        assert all(torch.isfinite(torch.as_tensor(v)).all() for v in module.stats.values()), key


def test_a_residual_kind_on_one_stream_is_refused(monkeypatch):
    """The decoder layer calls a "residual" kind only with several streams: declaring one is refused."""
    from tsparse.modules.mhc import MHCSpec
    from tsparse.registry import check_specs

    monkeypatch.setitem(KINDS, "mhc", dataclasses.replace(KINDS["mhc"], streams=lambda spec: 1))
    with pytest.raises(ValueError, match=r"mhc wraps the residual branch .* needs streams >= 2"):
        check_specs({"mhc": MHCSpec(layers=[1])}, 3)


def test_a_kind_without_a_placement_is_refused_only_when_attached(compose, nano, tmp_path):
    """On a model the registry gives no default layers, composing works; attaching the kind needs its layers."""
    from tsparse.config import module_specs, validate

    cfg = compose(nano(tmp_path, tmp_path, "model.name=mine"))
    validate(cfg)  # nothing attached: fine
    with pytest.raises(ValueError, match=r"peer.layers is empty: peer is attached but placed on no layer"):
        validate(compose(nano(tmp_path, tmp_path, "model.name=mine", "sparse=peer")))
    assert module_specs(compose(nano(tmp_path, tmp_path, "model.name=mine", "sparse=peer", "peer.layers=[1]")))["peer"].layers == [1]
