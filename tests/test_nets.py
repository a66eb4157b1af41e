import math

import pytest
import torch
import torch.nn.functional as F

from fastdream.nets import (
    MLP,
    BlockLinear,
    categorical_kl,
    onehot_linear,
    straight_through_sample,
    symexp,
    symlog,
    twohot_bins,
    twohot_decode,
    twohot_decode_logp,
    twohot_encode,
    twohot_loss,
    twohot_nll,
    unimix_logits,
)


def test_symlog_symexp_hand_values_and_inverse():
    x = torch.tensor([-10.0, -1.0, 0.0, 1.0, math.e - 1, 1000.0])
    expected = torch.tensor([-math.log(11), -math.log(2), 0.0, math.log(2), 1.0, math.log(1001)])
    torch.testing.assert_close(symlog(x), expected)
    torch.testing.assert_close(symexp(symlog(x)), x, rtol=1e-5, atol=1e-5)


def test_twohot_encode_hand_values():
    bins = torch.tensor([-2.0, -1.0, 0.0, 1.0, 2.0])
    enc = twohot_encode(torch.tensor([0.25, -2.0, 1.0, 5.0, -1.5]), bins)
    torch.testing.assert_close(enc[0], torch.tensor([0.0, 0.0, 0.75, 0.25, 0.0]))
    torch.testing.assert_close(enc[1], torch.tensor([1.0, 0.0, 0.0, 0.0, 0.0]))
    torch.testing.assert_close(enc[2], torch.tensor([0.0, 0.0, 0.0, 1.0, 0.0]))
    torch.testing.assert_close(enc[3], torch.tensor([0.0, 0.0, 0.0, 0.0, 1.0]))  # clipped to the top bin
    torch.testing.assert_close(enc[4], torch.tensor([0.5, 0.5, 0.0, 0.0, 0.0]))


def test_twohot_round_trip_over_dreamer_bins():
    bins = twohot_bins()
    assert len(bins) == 255 and bins[0] == -20 and bins[-1] == 20
    y = torch.tensor([-1234.5, -3.0, -0.01, 0.0, 0.7, 1.0, 475.0, 1e5])
    enc = twohot_encode(symlog(y), bins)
    torch.testing.assert_close(enc.sum(-1), torch.ones(len(y)))
    # Decoding logits log(enc) gives back y (expected value of the two-hot in symlog space).
    dec = twohot_decode(enc.clamp(min=1e-30).log(), bins)
    torch.testing.assert_close(dec, y, rtol=1e-4, atol=1e-4)


def test_unimix_probabilities():
    logits = torch.tensor([[10.0, 0.0, 0.0, 0.0]])
    p = unimix_logits(logits, 0.01).exp()
    soft = torch.softmax(logits, -1)
    torch.testing.assert_close(p, 0.99 * soft + 0.01 / 4)
    assert p.min() >= 0.01 / 4 - 1e-7
    torch.testing.assert_close(p.sum(-1), torch.ones(1))


def test_categorical_kl_hand_value():
    p = torch.tensor([0.5, 0.5]).log()
    q = torch.tensor([0.9, 0.1]).log()
    kl = categorical_kl(p[None, None], q[None, None])  # one latent, two classes
    expected = 0.5 * math.log(0.5 / 0.9) + 0.5 * math.log(0.5 / 0.1)
    torch.testing.assert_close(kl, torch.tensor([expected]))
    # Summed over latents: two identical latents give twice the KL.
    kl2 = categorical_kl(torch.stack([p, p])[None], torch.stack([q, q])[None])
    torch.testing.assert_close(kl2, torch.tensor([2 * expected]))


def test_straight_through_sample_frequencies_and_gradient():
    torch.manual_seed(0)
    logits = torch.tensor([0.0, math.log(3.0)]).requires_grad_()  # probabilities 0.25, 0.75
    samples = straight_through_sample(logits.expand(40_000, 2))
    assert ((samples == 0) | (samples == 1)).all() or torch.allclose(samples.detach().sum(-1), torch.ones(40_000))
    freq = samples.detach().mean(0)
    torch.testing.assert_close(freq, torch.tensor([0.25, 0.75]), atol=0.01, rtol=0)
    # Straight-through: d sample / d logits is the softmax Jacobian.
    samples[:, 1].sum().backward()
    torch.testing.assert_close(logits.grad, 40_000 * torch.tensor([-0.1875, 0.1875]), rtol=1e-4, atol=1e-2)
    # Fixed noise makes the draw reproducible: u < 0.25 picks class 0.
    s = straight_through_sample(torch.tensor([[0.0, math.log(3.0)]] * 2), noise=torch.tensor([0.2, 0.3]))
    torch.testing.assert_close(s, torch.tensor([[1.0, 0.0], [0.0, 1.0]]))


def test_block_linear_equals_block_diagonal_matrix():
    torch.manual_seed(0)
    layer = BlockLinear(12, 6, groups=3)
    x = torch.randn(5, 12)
    dense = torch.block_diag(*layer.weight.detach())  # [12, 6]
    torch.testing.assert_close(layer(x), x @ dense + layer.bias, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="divisible by groups"):
        BlockLinear(10, 6, groups=3)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(("rows", "dense", "groups", "classes", "out"),
                         [(4099, 256, 32, 32, 256), (37, 0, 5, 7, 96), (33, 12, 3, 4, 272), (5, 6, 3, 4, 40)])
def test_onehot_norm_silu_equals_the_gather_then_layer_norm_and_silu(dtype, rows, dense, groups, classes, out):
    """The fused C++ gather + LayerNorm + SiLU (no gradient) against float64 maths on the same (bf16-rounded)
    operands: 256 columns sum in registers, 96 and 272 end in 16-lane remainders, 40 is the scalar path;
    ``dense = 0`` is a layer on the one-hot stoch alone (the RSSM's stoch input)."""
    from fastdream.nets import Norm, onehot_norm_silu

    torch.manual_seed(0)
    norm = Norm(out)
    torch.nn.init.normal_(norm.ln.weight, 1.0, 0.5)
    torch.nn.init.normal_(norm.ln.bias, 0.0, 0.5)
    index = torch.randint(0, classes, (rows, groups))
    x = torch.cat([torch.randn(rows, dense), F.one_hot(index, classes).float().flatten(-2)], -1)
    w = torch.randn(out, dense + groups * classes)
    with torch.no_grad(), torch.autocast("cpu", torch.bfloat16, enabled=dtype == torch.bfloat16):
        got = onehot_norm_silu(x[:, :dense] if dense else x, w, norm, index, classes)
    assert got.dtype == dtype and got.shape == (rows, out)
    # The operands the kernel reads, rounded as it reads them; the sums and the norm in float64.
    wq = w.to(dtype).double()
    pre = x[:, :dense].to(dtype).double() @ wq[:, :dense].T if dense else torch.zeros(rows, out, dtype=torch.float64)
    if dense and dtype == torch.bfloat16:
        pre = pre.to(dtype).double()  # the dense part's matmul result is bf16 under autocast
    pre = pre + x[:, dense:].double() @ wq[:, dense:].T
    want = F.silu(F.layer_norm(pre, (out,), norm.ln.weight.double(), norm.ln.bias.double(), 1e-3))
    if dtype == torch.float32:
        torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-4)
    else:  # a bf16 rounding of the output, plus one of the dense part's matmul (fp32-accumulated) at ~1/16 scale
        torch.testing.assert_close(got.double(), want, rtol=2**-8, atol=2**-8)
    # The composed ops (embedding_bag, add, norm_silu) agree to their own roundings.
    with torch.no_grad(), torch.autocast("cpu", torch.bfloat16, enabled=dtype == torch.bfloat16):
        from fastdream.nets import norm_silu

        composed = norm_silu(onehot_linear(x[:, :dense] if dense else x, w, index, classes), norm)
    tol = 1e-5 if dtype == torch.float32 else 0.05
    torch.testing.assert_close(got.float(), composed.float(), rtol=tol, atol=tol)


_OPS_SCRIPT = """
import sys, numpy as np, torch
from fastdream import _ops
torch.manual_seed(0)
x = (torch.randn(300, 256) * 3).bfloat16().view(torch.int16).numpy()
w, b = (torch.randn(256) * 0.5 + 1).numpy(), (torch.randn(256) * 0.5).numpy()
table = (torch.randn(1024, 256) / 4).bfloat16().view(torch.int16).numpy()
rows = (torch.randint(0, 32, (300, 32)) + torch.arange(32) * 32).numpy()
y = (torch.randn(8, 300, 96) * 2).bfloat16().view(torch.int16).numpy()
gate_bias, deter = (torch.randn(768) * 0.3).numpy(), torch.randn(300, 256).numpy()
as_f32 = lambda a: torch.from_numpy(a).view(torch.bfloat16).float().numpy()
np.savez(sys.argv[1], avx=_ops.avx512_bf16, norm=as_f32(_ops.norm_silu(x, w, b, 1e-3, True, 2)),
         grouped=as_f32(_ops.norm_silu(x, w, b, 1e-3, True, 2, 8)),
         gather=as_f32(_ops.gather_norm_silu(x, table, rows, w, b, 1e-3, True, 2)),
         gate=_ops.gru_gate(y, gate_bias, deter, True, 2))
"""


def test_avx512_bf16_paths_equal_the_portable_clones(tmp_path):
    """On a CPU with AVX512_BF16 the bf16 kernels take intrinsics paths; FASTDREAM_PORTABLE_OPS=1 keeps the
    portable clones. Both runs of the same inputs agree within a bf16 rounding (gates: the exp polynomials)."""
    import os
    import subprocess
    import sys

    import numpy as np

    from fastdream import _ops

    if not _ops.avx512_bf16:
        pytest.skip("this CPU has no AVX512_BF16: only the portable path exists here")
    out = {}
    for name, env in (("fast", {}), ("portable", {"FASTDREAM_PORTABLE_OPS": "1"})):
        path = tmp_path / f"{name}.npz"
        subprocess.run([sys.executable, "-c", _OPS_SCRIPT, str(path)], check=True, env={**os.environ, **env})
        out[name] = np.load(path)
    assert bool(out["fast"]["avx"]) and not bool(out["portable"]["avx"])
    for key in ("norm", "grouped", "gather"):
        np.testing.assert_allclose(out["fast"][key], out["portable"][key], rtol=2**-7, atol=2**-7, err_msg=key)
        assert float(np.mean(out["fast"][key] != out["portable"][key])) < 0.02, key  # mostly the same rounding
    np.testing.assert_allclose(out["fast"]["gate"], out["portable"]["gate"], rtol=1e-4, atol=1e-4)


def test_gather_norm_silu_refuses_bad_input_before_reading_out_of_bounds():
    import numpy as np

    from fastdream import _ops

    table, w, b = np.ones((8, 16), np.float32), np.ones(16, np.float32), np.zeros(16, np.float32)
    rows, dense = np.zeros((5, 2), np.int64), np.ones((5, 16), np.float32)
    assert _ops.gather_norm_silu(dense, table, rows, w, b, 1e-3, False, 2).shape == (5, 16)
    bad = rows.copy()
    bad[4, 1] = 8
    with pytest.raises(IndexError, match=r"row index 8 outside \[0, 8\) of table \(8, 16\)"):
        _ops.gather_norm_silu(dense, table, bad, w, b, 1e-3, False, 2)
    bad[4, 1] = -1
    with pytest.raises(IndexError, match="row index -1"):
        _ops.gather_norm_silu(None, table, bad, w, b, 1e-3, False, 1)
    with pytest.raises(TypeError, match="rows dtype int32, expected int64"):
        _ops.gather_norm_silu(dense, table, rows.astype(np.int32), w, b, 1e-3)
    with pytest.raises(ValueError, match=r"dense \(4, 16\) must be a C-contiguous \[5, 16\]"):
        _ops.gather_norm_silu(dense[:4], table, rows, w, b, 1e-3)
    with pytest.raises(TypeError, match="table dtype float64, expected float32"):
        _ops.gather_norm_silu(dense, table.astype(np.float64), rows, w, b, 1e-3)
    with pytest.raises(TypeError, match="dense dtype float32, expected 16-bit words"):
        _ops.gather_norm_silu(dense, table.astype(np.int16), rows, w, b, 1e-3, True)
    with pytest.raises(ValueError, match=r"weight \(15,\) must be a contiguous \[16\]"):
        _ops.gather_norm_silu(dense, table, rows, w[:15], b, 1e-3)
    with pytest.raises(ValueError, match="eps must be > 0"):
        _ops.gather_norm_silu(dense, table, rows, w, b, -1.0)


def test_onehot_linear_equals_the_matmul_in_values_and_weight_gradient():
    torch.manual_seed(0)
    deter, groups, classes, out = 5, 3, 4, 7
    index = torch.randint(0, classes, (2, 6, groups))
    hot = torch.nn.functional.one_hot(index, classes).float().flatten(-2)
    x = torch.cat([torch.randn(2, 6, deter), hot], -1)  # [2, 6, 5 + 12]
    w = torch.randn(out, deter + groups * classes, requires_grad=True)
    dense = torch.nn.functional.linear(x, w)
    fast = onehot_linear(x, w, index, classes)
    assert fast.shape == (2, 6, out)
    torch.testing.assert_close(fast, dense, rtol=1e-5, atol=1e-5)
    g = torch.randn(2, 6, out)
    torch.testing.assert_close(torch.autograd.grad(fast, w, g)[0], torch.autograd.grad(dense, w, g)[0],
                               rtol=1e-5, atol=1e-5)
    # Only the stoch part: start = 0 (the RSSM's stoch input layer).
    torch.testing.assert_close(onehot_linear(hot, w[:, deter:], index, classes), hot @ w[:, deter:].T,
                               rtol=1e-5, atol=1e-5)
    # An input that needs its gradient (straight-through) takes the matmul, so it still gets one.
    xg = x.clone().requires_grad_(True)
    (gx,) = torch.autograd.grad(onehot_linear(xg, w, index, classes).sum(), xg)
    torch.testing.assert_close(gx, w.detach().sum(0).expand_as(x))


def test_mlp_onehot_path_matches_dense_path():
    torch.manual_seed(0)
    mlp = MLP(5 + 8, 16, 2, 3)
    index = torch.randint(0, 4, (9, 2))
    x = torch.cat([torch.randn(9, 5), torch.nn.functional.one_hot(index, 4).float().flatten(-2)], -1)
    torch.testing.assert_close(mlp(x, (index, 4)), mlp(x), rtol=1e-5, atol=1e-5)
    with torch.no_grad():  # no gradient: the first layer, its norm and SiLU are one gather_norm_silu
        torch.testing.assert_close(mlp(x, (index, 4)), mlp(x), rtol=1e-5, atol=1e-5)


def test_rssm_dynhid_first_equals_block_linear_on_expanded_group_inputs():
    from fastdream.rssm import RSSM

    torch.manual_seed(0)
    rssm = RSSM(action_dim=3, embed_dim=5, deter=24, hidden=10, stoch=4, classes=4, blocks=4)
    deter, x = torch.randn(7, 24, requires_grad=True), torch.randn(7, 30, requires_grad=True)
    groups = torch.cat([deter.reshape(7, 4, 6), x.unsqueeze(1).expand(7, 4, 30)], -1).flatten(-2)  # [7, 4 * 36]
    ref = rssm.dynhid[0](groups)
    out = rssm.dynhid_first(deter, x)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    g = torch.randn_like(ref)
    params = (deter, x, rssm.dynhid[0].weight, rssm.dynhid[0].bias)
    for a, b in zip(torch.autograd.grad(out, params, g), torch.autograd.grad(ref, params, g), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_twohot_loss_is_the_cross_entropy_against_the_twohot_target():
    bins = twohot_bins()
    torch.manual_seed(0)
    logits = torch.randn(6, 255, requires_grad=True)
    target = torch.tensor([0.0, 1.0, -3.5, 250.0, 1e12, -1e12])  # in range, symlog-mid-bin, clipped both ends
    dense = -(twohot_encode(symlog(target), bins) * logits.log_softmax(-1)).sum(-1)
    loss = twohot_loss(logits, target, bins)
    torch.testing.assert_close(loss, dense, rtol=1e-5, atol=1e-5)
    # Hand value: zero logits put 1/255 on every bin, so the loss is ln 255 whatever the target.
    torch.testing.assert_close(twohot_loss(torch.zeros(2, 255), torch.tensor([0.3, -7.0]), bins),
                               torch.full((2,), math.log(255.0)))
    g = torch.randn(6)
    torch.testing.assert_close(torch.autograd.grad(loss, logits, g)[0], torch.autograd.grad(dense, logits, g)[0],
                               rtol=1e-5, atol=1e-6)


def test_twohot_from_shared_log_probs_equals_the_logit_forms():
    """The critic shares one log_softmax between its value and two losses: the log-prob forms must equal
    ``twohot_decode``/``twohot_loss`` on the logits, and the summed losses' gradient too."""
    bins = twohot_bins()
    torch.manual_seed(1)
    logits = (3 * torch.randn(5, 255)).requires_grad_(True)
    a, b = torch.tensor([0.5, -2.0, 40.0, 0.0, -1e9]), torch.tensor([1.0, 7.0, -3.0, 2.5, 0.1])
    logp = logits.log_softmax(-1)
    shared = twohot_nll(logp, a, bins) + twohot_nll(logp, b, bins)
    apart = twohot_loss(logits, a, bins) + twohot_loss(logits, b, bins)
    torch.testing.assert_close(shared, apart)
    torch.testing.assert_close(torch.autograd.grad(shared.sum(), logits)[0],
                               torch.autograd.grad(apart.sum(), logits)[0])
    torch.testing.assert_close(twohot_decode_logp(logp, bins), twohot_decode(logits, bins))
    # Hand value: all mass on bin 200 decodes to exactly symexp(bins[200]).
    peak = torch.full((1, 255), -1e4)
    peak[0, 200] = 0.0
    torch.testing.assert_close(twohot_decode_logp(peak.log_softmax(-1), bins), symexp(bins[200:201]))


def test_twohot_decode_stays_fp32_under_bf16_autocast():
    bins = twohot_bins()
    logits = torch.full((3, 255), -50.0)
    logits[:, 200] = 50.0  # all mass on one bin: the value is exactly symexp(bins[200])
    with torch.autocast("cpu", torch.bfloat16):
        value = twohot_decode(logits, bins)
    assert value.dtype == torch.float32
    torch.testing.assert_close(value, symexp(bins[200]).expand(3), rtol=1e-5, atol=1e-4)


def test_rssm_observe_equals_the_plain_per_step_loop_in_values_and_gradients():
    """observe hoists the action input, the embedding's projection and the weight slices out of the
    recurrence; it must equal a loop of core + full posterior MLP per step, resets included."""
    from fastdream.nets import unimix_logits
    from fastdream.rssm import RSSM

    torch.manual_seed(0)
    B, T, E, A = 3, 6, 7, 2
    rssm = RSSM(action_dim=A, embed_dim=E, deter=24, hidden=10, stoch=4, classes=5, blocks=4)
    embed = torch.randn(B, T, E, requires_grad=True)
    action = 3 * torch.randn(B, T, A)  # |a| > 1 exercises the scaling
    is_first = torch.zeros(B, T, dtype=torch.bool)
    is_first[:, 0] = True
    is_first[1, 3] = True
    torch.manual_seed(1)
    out = rssm.observe(embed, action, is_first)
    torch.manual_seed(1)
    deter, stoch = rssm.initial(B)
    deters, stochs, posts = [], [], []
    for t in range(T):
        keep = (~is_first[:, t]).float()
        deter = rssm.core(deter * keep[:, None], stoch * keep[:, None, None], action[:, t] * keep[:, None])
        raw = rssm.post_net(torch.cat([deter, embed[:, t]], -1)).reshape(B, 4, 5)
        post = unimix_logits(raw, rssm.unimix)
        stoch = straight_through_sample(post, torch.rand(B, 4))
        deters.append(deter), stochs.append(stoch), posts.append(post)
    ref = {"deter": torch.stack(deters, 1), "stoch": torch.stack(stochs, 1), "post": torch.stack(posts, 1)}
    for k, v in ref.items():
        torch.testing.assert_close(out[k], v, rtol=1e-5, atol=1e-5)
    assert torch.equal(out["stoch"].detach().argmax(-1), ref["stoch"].detach().argmax(-1))
    params = [embed, *rssm.parameters()]
    weights = {k: torch.randn_like(v) for k, v in ref.items()}

    def grads(d):
        loss = sum((d[k] * w).sum() for k, w in weights.items())
        return torch.autograd.grad(loss, params, allow_unused=True)

    for a, b in zip(grads(out), grads(ref), strict=True):
        if b is None:  # the prior net is not on this path
            assert a is None or torch.count_nonzero(a) == 0
        else:
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_rssm_observe_compiled_step_equals_eager_in_values_and_gradients():
    """The compile engines run the posterior steps as compiled graphs of ``obs_chunk`` steps (the rest one
    by one): given the same draws they must give the eager sequence's states and parameter gradients (resets
    inside a chunk and fed noise included)."""
    from fastdream.rssm import RSSM

    torch.manual_seed(0)
    B, T, E, A = 3, 5, 7, 2
    rssm = RSSM(action_dim=A, embed_dim=E, deter=24, hidden=10, stoch=4, classes=5, blocks=4)
    embed = torch.randn(B, T, E, requires_grad=True)
    action = 3 * torch.randn(B, T, A)
    is_first = torch.zeros(B, T, dtype=torch.bool)
    is_first[:, 0] = True
    is_first[2, 2] = True
    noise = torch.rand(B, T, 4)
    rssm.obs_chunk = 2  # T = 5: two 2-step graphs, then one single step
    eager = rssm.observe(embed, action, is_first, noise=noise)
    comp = rssm.observe(embed, action, is_first, noise=noise, compiled=True)
    for k in ("deter", "stoch", "post", "prior"):
        torch.testing.assert_close(comp[k], eager[k], rtol=1e-4, atol=1e-5)
    assert torch.equal(comp["stoch"].detach().argmax(-1), eager["stoch"].detach().argmax(-1))
    params = [embed, *rssm.parameters()]
    weights = {k: torch.randn_like(v) for k, v in eager.items()}

    def grads(d):
        return torch.autograd.grad(sum((d[k] * w).sum() for k, w in weights.items()), params, allow_unused=True)

    for a, b in zip(grads(comp), grads(eager), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("threads", [1, 2])
def test_gather_rows_backward_equals_index_add_with_repeated_rows(threads):
    from fastdream.nets import gather_rows_backward

    torch.manual_seed(0)
    g = torch.randn(301, 37)  # 37 columns: not a multiple of the 16-float thread blocks
    rows = torch.randint(0, 11, (301, 5))  # many repeats, also within one row of `rows`
    want, want_bf16 = torch.zeros(11, 37), torch.zeros(11, 37)
    for s in range(5):
        want.index_add_(0, rows[:, s], g)
        want_bf16.index_add_(0, rows[:, s], g.bfloat16().float())
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        out = gather_rows_backward(g.bfloat16(), rows, 11)  # bf16 gradients (autocast) are summed in fp32
        exact = gather_rows_backward(g, rows, 11)
    finally:
        torch.set_num_threads(before)
    assert out.dtype == torch.float32 and out.shape == (11, 37)
    torch.testing.assert_close(exact, want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out, want_bf16, rtol=1e-5, atol=1e-5)


def test_gather_rows_backward_rejects_bad_input_before_touching_memory():
    import numpy as np

    from fastdream import _ops

    g, rows = np.ones((4, 3), np.float32), np.zeros((4, 2), np.int64)
    with pytest.raises(TypeError, match="float64, expected float32"):
        _ops.gather_rows_backward(g.astype(np.float64), rows, 5)
    with pytest.raises(TypeError, match="int32, expected int64"):
        _ops.gather_rows_backward(g, rows.astype(np.int32), 5)
    with pytest.raises(ValueError, match=r"g \(4, 3\) and rows \(3, 2\)"):
        _ops.gather_rows_backward(g, rows[:3], 5)
    with pytest.raises(ValueError, match="C-contiguous"):
        _ops.gather_rows_backward(np.ones((3, 4), np.float32).T, rows, 5)
    bad = rows.copy()
    bad[2, 1] = 5
    with pytest.raises(IndexError, match=r"row index 5 outside \[0, 5\)"):
        _ops.gather_rows_backward(g, bad, 5)
    bad[2, 1] = -1
    with pytest.raises(IndexError, match="row index -1"):
        _ops.gather_rows_backward(g, bad, 5)
    with pytest.raises(ValueError, match="num_rows must be >= 1"):
        _ops.gather_rows_backward(g, rows, 0)
    assert _ops.gather_rows_backward(g, rows, 1).sum() == 24.0  # every g row twice into row 0


def test_world_model_compiled_loss_equals_eager_with_pixels_and_vector():
    """The world-model loss with compiled posterior steps, image encoder and image loss equals the eager
    loss for the same draws, in every loss term (image and vector) and every parameter gradient."""
    from fastdream.world_model import WorldModel

    torch.manual_seed(0)
    B, T = 2, 3
    wm = WorldModel(vector_dim=3, image=True, action_dim=2, deter=16, hidden=8, stoch=4, classes=4, blocks=4,
                    units=16, cnn_mult=2)
    batch = {"vector": torch.randn(B, T, 3), "image": torch.randint(0, 256, (B, T, 64, 64, 3), dtype=torch.uint8),
             "action": torch.randn(B, T, 2), "reward": torch.randn(B, T),
             "is_first": torch.tensor([[True, False, False], [True, False, True]]),
             "is_terminal": torch.tensor([[False, False, True], [False, False, False]])}
    noise = torch.rand(B, T, 4)  # the same posterior draws for both paths
    results = []
    for compiled in (False, True):
        loss, metrics, _ = wm.loss(batch, compiled=compiled, noise=noise)
        grads = torch.autograd.grad(loss, list(wm.parameters()), allow_unused=True)
        results.append((loss, metrics, grads))
    (l0, m0, g0), (l1, m1, g1) = results
    assert "wm/rec_image" in m0 and float(m0["wm/rec_image"]) > 0
    torch.testing.assert_close(l1, l0, rtol=1e-4, atol=1e-4)
    for k in m0:
        torch.testing.assert_close(m1[k], m0[k], rtol=1e-4, atol=1e-4)
    for (name, _), a, b in zip(wm.named_parameters(), g1, g0, strict=True):
        assert (a is None) == (b is None), name
        if b is not None:
            torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-5, msg=name)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(("rows", "classes", "unimix"), [(4099, 32, 0.01), (37, 5, 0.01), (50, 48, 0.0), (20, 1, 0.01)])
def test_unimix_index_equals_the_cumsum_draw(dtype, rows, classes, unimix):
    """The C++ draw against ``inverse_cdf_index(unimix_probs(·))``: 4099 rows end in a partial 16-row tile,
    K = 5 and 1 take the scalar transposition, K = 48 three shuffled 16 x 16 blocks; logits span ±40."""
    from fastdream.nets import inverse_cdf_index, unimix_index, unimix_probs

    torch.manual_seed(0)
    logits = (torch.randn(rows, classes) * 12).clamp(-40, 40).to(dtype)
    noise = torch.rand(rows)
    want = inverse_cdf_index(unimix_probs(logits.float(), unimix), noise)
    got = unimix_index(logits, noise, unimix)
    assert got.dtype == torch.int64 and got.shape == (rows,)
    # Only a draw within float rounding of a CDF step may land on the neighbouring class.
    cdf = unimix_probs(logits.float(), unimix).cumsum(-1)
    near_step = (cdf - noise[:, None]).abs().min(-1).values < 1e-5
    assert bool(((got == want) | near_step).all())
    assert int((got != want).sum()) <= 1
    assert int(got.min()) >= 0 and int(got.max()) <= classes - 1
    # Rows shaped [..., K] keep their leading shape; u = 0 takes class 0, u just below 1 the last class
    # that has any probability.
    edge_noise = torch.tensor([[0.0, 0.0, 0.0], [1 - 1e-7] * 3])
    edge = unimix_index(logits[:6].reshape(2, 3, classes), edge_noise, unimix)
    last = inverse_cdf_index(unimix_probs(logits[3:6].float(), unimix), edge_noise[1])
    assert edge.shape == (2, 3) and edge[0].eq(0).all() and edge[1].eq(last).all()
    if unimix > 0:
        assert edge[1].eq(classes - 1).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(("n", "latents", "classes"), [(257, 32, 32), (9, 3, 5)])
def test_unimix_index_adds_a_bias_row_per_latent(dtype, n, latents, classes):
    """``bias [S·K]``: row (n, s) draws from logits + bias row s, as if a head's addmm had added it (K = 32
    takes the transposed tiles, K = 5 the scalar path; 257·32 rows end in a partial tile)."""
    from fastdream.nets import inverse_cdf_index, unimix_index, unimix_probs

    torch.manual_seed(0)
    logits = (torch.randn(n, latents, classes) * 4).to(dtype)
    bias = torch.randn(latents * classes) * 4
    noise = torch.rand(n, latents)
    full = logits.float() + bias.reshape(latents, classes)
    want = inverse_cdf_index(unimix_probs(full, 0.01), noise)
    got = unimix_index(logits, noise, 0.01, bias)
    near_step = (unimix_probs(full, 0.01).cumsum(-1) - noise[..., None]).abs().min(-1).values < 1e-5
    assert got.shape == (n, latents) and bool(((got == want) | near_step).all())
    assert float((got != unimix_index(logits, noise, 0.01)).float().mean()) > 0.2  # the bias matters
    from fastdream import _ops

    with pytest.raises(ValueError, match=r"bias \(7,\) must be a contiguous \[P \* K\]"):
        _ops.unimix_index(logits.float().reshape(-1, classes).numpy(), noise.reshape(-1).numpy(), 0.01, False, 1,
                          torch.zeros(7).numpy())


def test_unimix_index_threads_split_rows_and_bad_input_is_refused():
    import numpy as np

    from fastdream import _ops

    rng = np.random.default_rng(0)
    logits, noise = rng.standard_normal((1000, 32), dtype=np.float32), rng.random(1000, dtype=np.float32)
    one = _ops.unimix_index(logits, noise, 0.01, False, 1)
    assert np.array_equal(one, _ops.unimix_index(logits, noise, 0.01, False, 2))
    with pytest.raises(TypeError, match="float64, expected float32"):
        _ops.unimix_index(logits.astype(np.float64), noise, 0.01)
    with pytest.raises(TypeError, match="float32, expected 16-bit words"):
        _ops.unimix_index(logits, noise, 0.01, True)
    with pytest.raises(TypeError, match="noise dtype float64"):
        _ops.unimix_index(logits, noise.astype(np.float64), 0.01)
    with pytest.raises(ValueError, match=r"logits \(1000, 32\) and noise \(999,\)"):
        _ops.unimix_index(logits, noise[:999], 0.01)
    with pytest.raises(ValueError, match="C-contiguous"):
        _ops.unimix_index(np.ascontiguousarray(logits[:32, :32]).T, noise[:32], 0.01)
    with pytest.raises(ValueError, match="unimix must be in"):
        _ops.unimix_index(logits, noise, 1.0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(4099, 256), (37, 96), (5, 7, 40)])
def test_norm_silu_equals_layer_norm_then_silu(dtype, shape):
    """The C++ LayerNorm+SiLU (no gradient) against torch's fp32 maths: 256 and 96 columns take the 16-lane
    path, 40 the scalar one; rows carry a mean and scale of their own, weights and biases are not trivial."""
    from fastdream.nets import Norm, norm_silu

    torch.manual_seed(0)
    norm = Norm(shape[-1])
    torch.nn.init.normal_(norm.ln.weight, 1.0, 0.5)
    torch.nn.init.normal_(norm.ln.bias, 0.0, 0.5)
    x = (torch.randn(shape) * torch.rand(*shape[:-1], 1) * 8 + torch.randn(*shape[:-1], 1) * 3).to(dtype)
    want = F.silu(F.layer_norm(x.float(), shape[-1:], norm.ln.weight, norm.ln.bias, 1e-3)).detach()
    with torch.no_grad():
        got = norm_silu(x, norm)
    assert got.dtype == dtype and got.shape == shape
    # Outputs reach ~±10: atol covers float32's summation order in the mean and variance (outputs near 0).
    if dtype == torch.float32:
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-4)
    else:  # within a bfloat16 rounding of the fp32 result; the exact rounding in all but a few
        torch.testing.assert_close(got.float(), want, rtol=2**-8, atol=2e-5)
        assert float((got != want.to(dtype)).float().mean()) < 0.01
    # With a gradient to pass on it is torch's own maths, and the gradient flows.
    y = norm_silu(x.float(), norm)
    assert y.requires_grad
    torch.testing.assert_close(y.detach(), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(("rows", "groups", "cg"), [(4099, 8, 32), (37, 4, 24), (5, 3, 7)])
def test_norm_silu_groups_writes_the_block_matmul_layout(dtype, rows, groups, cg):
    """``groups``: the same values laid out ``[G, M, C/G]``, for the 16-lane (256 and 96 columns) and
    scalar (21) paths; with a gradient the torch maths give the same layout."""
    from fastdream.nets import Norm, norm_silu

    torch.manual_seed(0)
    norm = Norm(groups * cg)
    torch.nn.init.normal_(norm.ln.bias, 0.0, 0.5)
    x = (torch.randn(rows, groups * cg) * 3).to(dtype)
    with torch.no_grad():
        flat = norm_silu(x, norm)
        grouped = norm_silu(x, norm, groups)
    assert grouped.shape == (groups, rows, cg) and grouped.is_contiguous() and grouped.dtype == dtype
    assert torch.equal(grouped, flat.reshape(rows, groups, cg).transpose(0, 1))
    y = norm_silu(x.float(), norm, groups)
    assert y.requires_grad and y.shape == (groups, rows, cg) and y.is_contiguous()
    torch.testing.assert_close(y.detach(), flat.float().reshape(rows, groups, cg).transpose(0, 1),
                               rtol=2**-8, atol=1e-5)
    # A block matmul's output as its bmm leaves it ([G, M, C/G]) and a bias, summed in by the kernel: the same as
    # the sum in float64 (the kernel sums in fp32, so bf16 results may differ by one rounding).
    add = (torch.randn(groups, rows, cg) * 2).to(dtype)
    add_bias = torch.randn(groups * cg)
    with torch.no_grad():
        summed = norm_silu(x, norm, groups, add, add_bias)
    pre = x.double() + add.double().transpose(0, 1).reshape(rows, -1) + add_bias.double()
    want = F.silu(F.layer_norm(pre, (groups * cg,), norm.ln.weight.double(), norm.ln.bias.double(), 1e-3))
    want = want.reshape(rows, groups, cg).transpose(0, 1)
    tol = 1e-5 if dtype == torch.float32 else 2**-7
    torch.testing.assert_close(summed.double(), want, rtol=tol, atol=tol)
    g = norm_silu(x.float(), norm, groups, add.float(), add_bias)  # with a gradient: torch's maths, same values
    torch.testing.assert_close(g.detach().double(), want, rtol=2**-7 if dtype == torch.bfloat16 else 1e-5, atol=1e-4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(("groups", "rows", "dg"), [(8, 4099, 32), (4, 37, 24), (3, 5, 7)])
def test_gru_gate_grouped_equals_the_reference_gate(dtype, groups, rows, dg):
    """The C++ block-GRU update on the block matmul's own output ``[G, N, 3 D/G]`` against
    ``gru_gate_reference`` of the transposed gates plus bias: D/G = 24 and 7 end in scalar columns."""
    from fastdream.kernels.reference import gru_gate_reference
    from fastdream.nets import gru_gate_grouped

    torch.manual_seed(0)
    y = (torch.randn(groups, rows, 3 * dg) * 4).to(dtype)
    bias, deter = torch.randn(3 * groups * dg), torch.randn(rows, groups * dg) * 2
    want = gru_gate_reference(y.float().transpose(0, 1).reshape(rows, -1) + bias, deter, groups)
    got = gru_gate_grouped(y, bias, deter)
    assert got.dtype == torch.float32 and got.shape == (rows, groups * dg)
    # fp32 inputs: a float32-accurate exp; bf16 inputs: the degree-4 exp (~4e-5).
    tol = 2e-6 if dtype == torch.float32 else 2e-4
    torch.testing.assert_close(got, want, rtol=tol, atol=tol)
    # A gradient to pass on takes the reference maths.
    w = y.float().requires_grad_()
    out = gru_gate_grouped(w, bias, deter)
    out.sum().backward()
    assert w.grad is not None and w.grad.abs().sum() > 0
    torch.testing.assert_close(out.detach(), want, rtol=1e-5, atol=1e-5)


def test_norm_silu_and_gru_gate_refuse_bad_input():
    import numpy as np

    from fastdream import _ops

    x, w, b = np.ones((8, 16), np.float32), np.ones(16, np.float32), np.zeros(16, np.float32)
    assert _ops.norm_silu(x, w, b, 1e-3).shape == (8, 16)
    with pytest.raises(TypeError, match="x dtype float64, expected float32"):
        _ops.norm_silu(x.astype(np.float64), w, b, 1e-3)
    with pytest.raises(TypeError, match="expected 16-bit words"):
        _ops.norm_silu(x, w, b, 1e-3, True)
    with pytest.raises(ValueError, match=r"weight \(15,\) must be a contiguous \[16\]"):
        _ops.norm_silu(x, w[:15], b, 1e-3)
    with pytest.raises(TypeError, match="bias dtype float64"):
        _ops.norm_silu(x, w, b.astype(np.float64), 1e-3)
    with pytest.raises(ValueError, match="C-contiguous"):
        _ops.norm_silu(np.ones((16, 8), np.float32).T, w, b, 1e-3)
    with pytest.raises(ValueError, match="eps must be > 0"):
        _ops.norm_silu(x, w, b, 0.0)
    with pytest.raises(ValueError, match="groups 3 must be >= 1 and divide C = 16"):
        _ops.norm_silu(x, w, b, 1e-3, False, 1, 3)
    with pytest.raises(ValueError, match=r"add \(2, 7, 8\) must be a C-contiguous \[G, 8, C/G\] with C = 16"):
        _ops.norm_silu(x, w, b, 1e-3, False, 1, 1, np.ones((2, 7, 8), np.float32))
    with pytest.raises(ValueError, match=r"add_bias \(15,\) must be a contiguous \[16\]"):
        _ops.norm_silu(x, w, b, 1e-3, False, 1, 1, None, np.ones(15, np.float32))
    added = _ops.norm_silu(x, w, b, 1e-3, False, 1, 2, np.zeros((4, 8, 4), np.float32), np.zeros(16, np.float32))
    assert added.shape == (2, 8, 8)
    y, bias, deter = np.ones((2, 8, 6), np.float32), np.zeros(12, np.float32), np.zeros((8, 4), np.float32)
    assert _ops.gru_gate(y, bias, deter).shape == (8, 4)
    with pytest.raises(ValueError, match=r"y \(2, 8, 6\) and deter \(8, 5\) must be \[G, N, 3 D/G\] and \[N, D\]"):
        _ops.gru_gate(y, bias, np.zeros((8, 5), np.float32))
    with pytest.raises(ValueError, match=r"y \(2, 8, 5\)"):
        _ops.gru_gate(np.ones((2, 8, 5), np.float32), bias, deter)
    with pytest.raises(TypeError, match="deter dtype float64"):
        _ops.gru_gate(y, bias, deter.astype(np.float64))
    with pytest.raises(ValueError, match=r"bias \(11,\)"):
        _ops.gru_gate(y, bias[:11], deter)
    with pytest.raises(ValueError, match="C-contiguous"):
        _ops.gru_gate(np.ones((2, 6, 8), np.float32).transpose(0, 2, 1), bias, deter)


def test_stack_fuses_norm_silu_without_changing_modules_or_state_dict_keys():
    from fastdream.nets import Norm, Stack

    torch.manual_seed(0)
    mods = [torch.nn.Linear(6, 32, bias=False), Norm(32), torch.nn.SiLU(), torch.nn.Linear(32, 32), Norm(32)]
    stack, plain = Stack(*mods), torch.nn.Sequential(*mods)
    assert list(stack.state_dict()) == list(plain.state_dict())
    assert isinstance(stack[1:], Stack) and len(stack[1:]) == 4
    x = torch.randn(40, 6)
    with torch.no_grad():  # the C++ norm_silu for modules 1-2, torch's LayerNorm alone for the last Norm
        torch.testing.assert_close(stack(x), plain(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(("rows", "bins"), [(4099, 255), (33, 16), (7, 5)])
def test_twohot_decode_kernel_equals_the_softmax_expectation(dtype, rows, bins):
    """The C++ decode (no gradient) against the expectation in float64: 255 bins end in a padded 15-column
    block, 16 fill one exactly, 5 are all padding; logits span ±30 so whole rows sit on one or two bins."""
    from fastdream.nets import twohot_decode

    torch.manual_seed(0)
    grid = twohot_bins(bins)
    logits = (torch.randn(rows, bins) * torch.rand(rows, 1) * 10).clamp(-30, 30).to(dtype)
    expect = (logits.double().softmax(-1) * grid.double()).sum(-1)  # in symlog space
    with torch.no_grad():
        got = twohot_decode(logits, grid)
    assert got.dtype == torch.float32 and got.shape == (rows,)
    torch.testing.assert_close(symlog(got.double()), expect, rtol=0, atol=5e-5)
    assert float(expect.abs().max()) > 10  # the test reaches far bins, where symexp is steep
    # Leading axes stay; with a gradient to pass on it is torch's softmax, and the gradient flows.
    w = logits[:6].float().reshape(2, 3, bins).requires_grad_()
    out = twohot_decode(w, grid)
    assert out.shape == (2, 3)
    out.sum().backward()
    assert w.grad is not None and w.grad.abs().sum() > 0
    torch.testing.assert_close(symlog(out.detach().double()).flatten(), expect[:6], rtol=0, atol=5e-5)
    # A head's bias left out of its matmul: added per column by the kernel, as by the torch maths.
    bias = torch.randn(bins) * 3
    expect_b = ((logits.double() + bias.double()).softmax(-1) * grid.double()).sum(-1)
    with torch.no_grad():
        got_b = twohot_decode(logits, grid, bias)
    torch.testing.assert_close(symlog(got_b.double()), expect_b, rtol=0, atol=5e-5)
    assert float((expect_b - expect).abs().max()) > 1  # the bias moves the expectation
    torch.testing.assert_close(symlog(twohot_decode(logits.float(), grid, bias.requires_grad_()).detach().double()),
                               expect_b, rtol=0, atol=5e-5)


def test_twohot_decode_kernel_refuses_bad_input():
    import numpy as np

    from fastdream import _ops

    logits, bins = np.zeros((4, 255), np.float32), np.linspace(-20, 20, 255, dtype=np.float32)
    assert np.allclose(_ops.twohot_decode(logits, bins), 0.0, atol=1e-5)  # uniform over symmetric bins
    with pytest.raises(TypeError, match="logits dtype float64, expected float32"):
        _ops.twohot_decode(logits.astype(np.float64), bins)
    with pytest.raises(ValueError, match=r"bins \(254,\) must be a contiguous \[255\]"):
        _ops.twohot_decode(logits, bins[:254])
    with pytest.raises(ValueError, match="C-contiguous"):
        _ops.twohot_decode(np.zeros((255, 4), np.float32).T, bins)
    with pytest.raises(ValueError, match=r"bias \(7,\) must be a contiguous \[255\]"):
        _ops.twohot_decode(logits, bins, bias=np.zeros(7, np.float32))
    with pytest.raises(TypeError, match="bias dtype float64"):
        _ops.twohot_decode(logits, bins, bias=np.zeros(255))
