"""The cheaper mHC kernels (exp-domain Sinkhorn, fp32 H maps, one baddbmm) equal the plain formulas."""
import torch
from torch import nn

from tsparse.modules import mhc
from tsparse.modules.mhc import HyperConnection, MHCSpec, sinkhorn


def test_exp_domain_sinkhorn_equals_log_domain_with_grads(monkeypatch):
    logits = (torch.randn(64, 4, 4, generator=torch.Generator().manual_seed(0)) * 3).requires_grad_()
    weight = torch.randn(64, 4, 4)
    fast = sinkhorn(logits)
    (g_fast,) = torch.autograd.grad((fast * weight).sum(), logits)
    monkeypatch.setattr(mhc, "EXP_SPREAD", 0.0)  # force the log-domain fallback
    slow = sinkhorn(logits)
    (g_slow,) = torch.autograd.grad((slow * weight).sum(), logits)
    torch.testing.assert_close(fast, slow, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(g_fast, g_slow, rtol=1e-5, atol=1e-6)


def reference_forward(hc: HyperConnection, x, branch):
    """The unfused formulas: RMSNorm module, einsums, log-domain Sinkhorn."""
    n = hc.streams
    proj = hc.norm(x.flatten(-2)) @ torch.cat((hc.phi_pre, hc.phi_post, hc.phi_res), dim=-1)
    p_pre, p_post, p_res = proj.split((n, n, n * n), dim=-1)
    h_pre = torch.sigmoid(hc.alpha_pre * p_pre + hc.b_pre)
    h_post = 2 * torch.sigmoid(hc.alpha_post * p_post + hc.b_post)
    log_p = hc.alpha_res * p_res.unflatten(-1, (n, n)) + hc.b_res
    for _ in range(hc.sinkhorn_iters):
        log_p = log_p - log_p.logsumexp(dim=-1, keepdim=True)
        log_p = log_p - log_p.logsumexp(dim=-2, keepdim=True)
    out = branch(torch.einsum("...n,...nd->...d", h_pre, x))
    return torch.einsum("...ij,...jd->...id", log_p.exp(), x) + h_post.unsqueeze(-1) * out.unsqueeze(-2)


def test_hyper_connection_matches_reference_formulas():
    torch.manual_seed(0)
    hc = HyperConnection(16, MHCSpec(streams=4))
    with torch.no_grad():
        for phi in (hc.phi_pre, hc.phi_post, hc.phi_res):
            phi.normal_(std=0.5)
    branch = nn.Linear(16, 16)
    x = torch.randn(2, 5, 4, 16, requires_grad=True)
    outs, grads = [], []
    for fn in (hc.forward, lambda t, b: reference_forward(hc, t, b)):
        out = fn(x, branch)
        outs.append(out)
        grads.append(torch.autograd.grad(out.pow(2).sum(), [x, *hc.parameters()]))
    torch.testing.assert_close(outs[0], outs[1], rtol=1e-5, atol=1e-5)
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_h_maps_are_fp32_under_bf16_autocast():
    torch.manual_seed(0)
    hc = HyperConnection(16, MHCSpec(streams=4))
    with torch.no_grad():
        hc.phi_res.normal_()
    x = torch.randn(2, 5, 4, 16)
    ref = hc.mixing(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = hc.mixing(x)
    for a, b in zip(got, ref):
        assert a.dtype == torch.float32
        torch.testing.assert_close(a, b)
