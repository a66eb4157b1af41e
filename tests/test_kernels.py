"""Triton kernels vs kernels/reference.py, forward and backward, on awkward shapes.

On this CPU they run under TRITON_INTERPRET=1 (set in conftest.py when there is no CUDA).
Tolerances: fp32 kernels vs fp32 torch; 1e-5 absolute for the gates, 1e-5 for softmax gradients.
"""

import pytest
import torch

from fastdream.kernels import reference, rssm_step
from fastdream.model.rssm import RSSM

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
pytestmark = pytest.mark.skipif(not rssm_step.available(DEVICE), reason="Triton cannot run on this device")


@pytest.mark.parametrize("n, d, groups", [(37, 96, 8), (5, 16, 1), (64, 256, 8)])
def test_gru_gate_matches_reference_forward_and_backward(n, d, groups):
    torch.manual_seed(0)
    x = (2 * torch.randn(n, 3 * d, device=DEVICE)).requires_grad_()
    deter = torch.randn(n, d, device=DEVICE).requires_grad_()
    out = rssm_step.gru_gate(x, deter, groups)
    ref = reference.gru_gate_reference(x, deter, groups)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    g = torch.randn_like(out)
    gx, gd = torch.autograd.grad(out, (x, deter), g)
    rx, rd = torch.autograd.grad(ref, (x, deter), g)
    torch.testing.assert_close(gx, rx, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(gd, rd, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("n, s, k", [(37, 32, 16), (3, 5, 7), (8, 32, 32)])
def test_unimix_sample_matches_reference_forward_and_backward(n, s, k):
    torch.manual_seed(1)
    logits = (3 * torch.randn(n, s, k, device=DEVICE)).requires_grad_()
    noise = torch.rand(n, s, device=DEVICE)
    mixed, sample, index = rssm_step.unimix_sample(logits, noise, 0.01)
    rmixed, rsample, rindex = reference.unimix_sample_reference(logits, noise, 0.01)
    torch.testing.assert_close(mixed, rmixed, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(sample.detach(), rsample.detach())  # identical one-hot draws
    assert index.dtype == torch.int64 and torch.equal(index, rindex)
    assert torch.equal(index, sample.detach().argmax(-1))  # the kernel's index is the drawn class
    assert (sample.detach().sum(-1) == 1).all()
    gm, gs = torch.randn_like(mixed), torch.randn_like(sample)
    (g1,) = torch.autograd.grad((mixed * gm).sum() + (sample * gs).sum(), logits)
    (g2,) = torch.autograd.grad((rmixed * gm).sum() + (rsample * gs).sum(), logits)
    torch.testing.assert_close(g1, g2, rtol=1e-5, atol=1e-5)


def test_rssm_step_matches_reference_on_awkward_shapes():
    torch.manual_seed(2)
    rssm = RSSM(action_dim=3, embed_dim=10, deter=96, hidden=40, stoch=32, classes=16, blocks=8).to(DEVICE)
    deter = torch.randn(37, 96, device=DEVICE).requires_grad_()
    stoch = torch.nn.functional.one_hot(torch.randint(0, 16, (37, 32)), 16).float().to(DEVICE)
    action = torch.randn(37, 3, device=DEVICE).requires_grad_()
    noise = torch.rand(37, 32, device=DEVICE)
    d1, s1, l1, i1 = rssm_step.rssm_step(rssm, deter, stoch, action, noise)
    d2, s2, l2, i2 = reference.rssm_step_reference(rssm, deter, stoch, action, noise)
    assert torch.equal(i1, i2)
    torch.testing.assert_close(s2.detach(), torch.nn.functional.one_hot(i2, 16).float())  # onehot + p − sg(p)
    torch.testing.assert_close(d1, d2, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(l1, l2, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(s1.detach(), s2.detach())
    w = torch.randn_like(s1)
    params = [p for n, p in rssm.named_parameters() if not n.startswith("post_net")]  # the prior step's own
    g1 = torch.autograd.grad((s1 * w).sum() + d1.sum(), (deter, action, *params))
    g2 = torch.autograd.grad((s2 * w).sum() + d2.sum(), (deter, action, *params))
    for a, b in zip(g1, g2, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
