"""Dream engines agree with eager for the same noise; schedules give the right H and N."""

import pytest
import torch

from fastdream.dream.engines import resolve_engine
from fastdream.dream.rollout import draw_noise, imagine
from fastdream.dream.schedule import HorizonSchedule
from fastdream.kernels import rssm_step as kernels
from fastdream.model.behavior import Actor
from fastdream.model.world_model import WorldModel


def tiny(discrete: bool):
    torch.manual_seed(0)
    wm = WorldModel(vector_dim=4, image=False, action_dim=2, deter=32, hidden=16, stoch=4, classes=4, blocks=4,
                    units=16)
    actor = Actor(wm.rssm.feat_dim, 2, discrete, units=16, layers=1)
    n = 6
    deter = torch.randn(n, 32)
    stoch = torch.nn.functional.one_hot(torch.randint(0, 4, (n, 4)), 4).float()
    noise = draw_noise(n, 3, 4, actor, "cpu", torch.Generator().manual_seed(1))
    return wm, actor, (deter, stoch), noise


def engines_here():
    out = ["kernels", "compile"]
    if kernels.available("cpu"):
        out.append("triton")
    return out


@pytest.mark.parametrize("engine", engines_here())
@pytest.mark.parametrize("discrete", [True, False])
def test_engine_matches_eager_forward_and_gradients(engine, discrete):
    wm, actor, starts, noise = tiny(discrete)
    grad = not discrete
    ref = imagine(wm, actor, starts, 3, engine="eager", grad=grad, noise=noise)
    out = imagine(wm, actor, starts, 3, engine=engine, grad=grad, noise=noise)
    torch.testing.assert_close(out["action"], ref["action"], rtol=1e-4, atol=1e-4)
    for k in ("feat", "reward", "cont", "logprob", "entropy"):
        torch.testing.assert_close(out[k], ref[k], rtol=1e-4, atol=1e-4, msg=k)
    # Gradients of a scalar of the dream w.r.t. the actor: through the dynamics for continuous
    # actions, through the log-probabilities for discrete ones.
    params = list(actor.parameters())
    loss_ref = (ref["reward"] * ref["logprob"]).sum() + ref["feat"][:, -1].sum()
    loss_out = (out["reward"] * out["logprob"]).sum() + out["feat"][:, -1].sum()
    g_ref = torch.autograd.grad(loss_ref, params, allow_unused=True)
    g_out = torch.autograd.grad(loss_out, params, allow_unused=True)
    for a, b in zip(g_out, g_ref, strict=True):
        assert (a is None) == (b is None)
        if a is not None:
            torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-4)


@pytest.mark.parametrize("discrete", [True, False])
def test_onehot_gathers_give_the_dense_dream_and_losses(discrete):
    """The one-hot stoch path (gathers instead of matmuls) changes no value and no actor/critic gradient."""
    from fastdream.model.behavior import Behavior

    wm, actor, starts, noise = tiny(discrete)
    beh = Behavior(wm.rssm.feat_dim, 2, discrete, units=16, layers=1)
    beh.actor = actor
    outs = []
    for onehot in (False, True):
        traj = imagine(wm, actor, starts, 3, grad=not discrete, noise=noise, onehot=onehot)
        assert (traj["index"] is not None) == onehot
        if onehot:  # the carried classes are those of the one-hot stoch in feat
            hot = traj["feat"][..., wm.rssm.deter:].unflatten(-1, (wm.rssm.stoch, wm.rssm.classes))
            assert torch.equal(hot.argmax(-1), traj["index"])
        traj["start_cont"] = torch.ones(starts[0].shape[0])
        beh.ret_lo.zero_()
        beh.ret_hi.zero_()
        actor_loss, critic_loss, _ = beh.losses(traj)
        params = list(actor.parameters()) + list(beh.critic.parameters())
        grads = torch.autograd.grad(actor_loss + critic_loss, params, allow_unused=True)
        outs.append((traj, actor_loss, critic_loss, grads))
    (ref, ra, rc, rg), *rest = outs
    for out, oa, oc, og in rest:
        for k in ("feat", "action", "reward", "cont", "logprob", "entropy"):
            want = ref[k][..., : out[k].shape[-1]] if k == "feat" else ref[k]
            torch.testing.assert_close(out[k], want, rtol=1e-5, atol=1e-5, msg=k)
        torch.testing.assert_close((oa, oc), (ra, rc), rtol=1e-5, atol=1e-6)
        for a, b in zip(og, rg, strict=True):
            assert (a is None) == (b is None)
            if a is not None:
                torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("discrete", [True, False])
def test_compiled_behaviour_losses_match_eager(discrete):
    """The compiled critic/slow-critic passes give the eager losses and, in the Agent's two separate
    gradient calls (actor, then critic), the eager gradients."""
    from fastdream.model.behavior import Behavior

    wm, actor, starts, noise = tiny(discrete)
    beh = Behavior(wm.rssm.feat_dim, 2, discrete, units=16, layers=1)
    beh.actor = actor
    with torch.no_grad():  # non-zero critic heads, so the value path carries real numbers
        for p in beh.critic.parameters():
            p.normal_(0.0, 0.3)
        beh.slow_critic.load_state_dict(beh.critic.state_dict())
    outs = []
    for engine, compiled in (("eager", False), ("compile", True)):
        traj = imagine(wm, actor, starts, 3, engine=engine, grad=not discrete, noise=noise)
        traj["start_cont"] = torch.tensor([1.0, 1.0, 0.0, 1.0, 1.0, 1.0])
        beh.ret_lo.zero_()
        beh.ret_hi.zero_()
        actor_loss, critic_loss, m = beh.losses(traj, compiled=compiled)
        ga = torch.autograd.grad(actor_loss, list(actor.parameters()), allow_unused=True)
        gc = torch.autograd.grad(critic_loss, list(beh.critic.parameters()))
        outs.append((actor_loss, critic_loss, m["behavior/value"], ga, gc))
    (ra, rc, rv, rga, rgc), (oa, oc, ov, oga, ogc) = outs
    assert float(rc.detach()) > 0.1 and abs(float(rv)) > 1e-3  # the comparison is not of zeros
    torch.testing.assert_close((oa, oc, ov), (ra, rc, rv), rtol=1e-4, atol=1e-5)
    for a, b in zip(oga + ogc, rga + rgc, strict=True):
        assert (a is None) == (b is None)
        if a is not None:
            torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-5)


def test_compiled_rollout_has_no_graph_breaks():
    import torch._dynamo as dynamo

    from fastdream.dream.rollout import _rollout_fn

    wm, actor, (deter, stoch), noise = tiny(True)
    for onehot in (False, True):
        for bf16 in (False, True):  # autocast: the weights cast once, through functional_call
            with torch.no_grad(), torch.autocast("cpu", torch.bfloat16, enabled=bf16):
                fn = _rollout_fn(wm, actor, onehot, torch.bfloat16 if bf16 else torch.float32)
                explain = dynamo.explain(fn)(deter, stoch, noise["stoch"], noise["action"])
            assert explain.graph_break_count == 0, explain.break_reasons
            assert explain.graph_count == 1


def test_compiled_bf16_dream_matches_eager_bf16():
    """Under bf16 autocast the compiled no-grad dream (weights cast once per rollout, C++ kernels in the graph)
    takes the kernels engine's draws (the same C++ draws, step by step) and gives its values within a bf16
    rounding; 16-lane sizes, so the kernels' vector paths run. (Against the plain-torch eager engine a bf16 dream
    cannot match draw for draw: a bf16 spacing of a logit moves a draw whose noise lies that close to a CDF step,
    and the dream then diverges; fp32 dreams are compared with eager in test_engine_matches_eager_*.)"""
    torch.manual_seed(0)
    wm = WorldModel(vector_dim=4, image=False, action_dim=3, deter=64, hidden=32, stoch=8, classes=16, blocks=4,
                    units=32)
    actor = Actor(wm.rssm.feat_dim, 3, True, units=32, layers=2)
    n = 37
    starts = (torch.randn(n, 64), torch.nn.functional.one_hot(torch.randint(0, 16, (n, 8)), 16).float())
    noise = draw_noise(n, 5, 8, actor, "cpu", torch.Generator().manual_seed(2))
    outs = []
    for engine in ("kernels", "compile"):
        with torch.no_grad(), torch.autocast("cpu", torch.bfloat16):
            outs.append(imagine(wm, actor, starts, 5, engine=engine, noise=noise, dense_feat=False))
    ref, out = outs
    assert ref["feat"].dtype == torch.bfloat16 and ref["index"].unique().numel() > 8
    assert torch.equal(out["action"], ref["action"]) and torch.equal(out["index"], ref["index"])
    for k in ("feat", "reward", "cont", "logprob", "entropy"):  # log-probs come out in bf16: one spacing (2^-7)
        torch.testing.assert_close(out[k].float(), ref[k].float(), rtol=2**-6, atol=1e-3, msg=k)


def test_engine_resolution_and_errors():
    assert resolve_engine("auto", "cpu", grad=False) == "kernels"
    assert resolve_engine("auto", "cpu", grad=True) == "kernels"
    assert resolve_engine("compile", "cpu", grad=True) == "compile"
    assert resolve_engine("eager", "cpu", grad=True) == "eager"
    with pytest.raises(ValueError, match="cudagraph engine needs a CUDA device"):
        resolve_engine("cudagraph", "cpu", grad=False)
    with pytest.raises(ValueError, match="unknown dream engine 'fast'"):
        resolve_engine("fast", "cpu", grad=False)


@pytest.mark.parametrize("bf16", [False, True])
def test_eager_engine_runs_plain_torch_only(monkeypatch, bf16):
    """The eager engine is the reference: no C++ kernel runs in its dream (the kernels engine runs them), and its
    values equal the kernels engine's within float32 rounding."""
    from fastdream.fast import _ops

    calls: list[str] = []
    for name in ("norm_silu", "gather_norm_silu", "gru_gate", "unimix_index", "twohot_decode", "take_rows",
                 "gather_rows_backward"):
        real = getattr(_ops, name)
        monkeypatch.setattr(_ops, name, lambda *a, _f=real, _n=name, **k: calls.append(_n) or _f(*a, **k))
    wm, actor, starts, noise = tiny(True)
    out = {}
    for engine in ("eager", "kernels"):
        calls.clear()
        with torch.no_grad(), torch.autocast("cpu", torch.bfloat16, enabled=bf16):
            out[engine] = imagine(wm, actor, starts, 3, engine=engine, noise=noise)
        out[engine]["calls"] = sorted(set(calls))
    assert out["eager"]["calls"] == []
    assert {"norm_silu", "gru_gate", "unimix_index", "twohot_decode"} <= set(out["kernels"]["calls"])
    if not bf16:
        assert torch.equal(out["eager"]["action"], out["kernels"]["action"])
        for k in ("feat", "reward", "cont", "logprob", "entropy"):
            torch.testing.assert_close(out["eager"][k], out["kernels"][k], rtol=1e-5, atol=1e-5, msg=k)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
def test_cudagraph_matches_eager_on_gpu():
    wm, actor, (deter, stoch), noise = tiny(True)
    wm, actor = wm.cuda(), actor.cuda()
    starts = (deter.cuda(), stoch.cuda())
    noise = {k: v.cuda() for k, v in noise.items()}
    ref = imagine(wm, actor, starts, 3, engine="eager", noise=noise)
    for _ in range(2):  # capture, then replay
        out = imagine(wm, actor, starts, 3, engine="cudagraph", noise=noise)
        torch.testing.assert_close(out["feat"], ref["feat"], rtol=1e-4, atol=1e-4)


def test_horizon_schedules():
    fixed = HorizonSchedule("fixed", horizon=15)
    assert [fixed.horizon_at(u) for u in (0, 10, 10**6)] == [15, 15, 15]
    assert fixed.starts_at(0, available=1024) == 1024 and fixed.starts_at(0, 1024, requested=256) == 256
    assert fixed.starts_at(0, 512, requested=1024) == 1024  # more dreams than states: some states twice
    ramp = HorizonSchedule("ramp", h_min=1, h_max=15, ramp_start=0, ramp_end=20_000)
    assert [ramp.horizon_at(u) for u in (0, 5_000, 10_000, 20_000, 30_000)] == [1, 4, 8, 15, 15]
    budget = HorizonSchedule("budget", horizon=5, budget=15 * 1024)
    assert budget.starts_at(0, available=16_384) * budget.horizon_at(0) == 15 * 1024
    short = HorizonSchedule("budget", horizon=3, budget=15 * 1024)
    assert short.starts_at(0, 16_384) == 5 * 1024  # shorter dreams, more of them: N*H kept
    assert short.starts_at(0, 512) == 5 * 1024  # beyond the states at hand: some are dreamed from twice
    with pytest.raises(ValueError, match="mode must be fixed, ramp or budget"):
        HorizonSchedule("cosine")


@pytest.mark.parametrize("bf16", [False, True])
def test_action_table_rows_are_the_gru_action_inputs(bf16):
    """``RSSM.action_table``: row a is ``action_input(one_hot(a))`` bit for bit (the same row maths), which a
    discrete-action rollout gathers instead of a matmul, LayerNorm and SiLU per step."""
    torch.manual_seed(0)
    wm = WorldModel(vector_dim=4, image=False, action_dim=5, deter=64, hidden=32, stoch=8, classes=16, blocks=4,
                    units=32)
    actions = torch.randint(0, 5, (37,))
    with torch.no_grad(), torch.autocast("cpu", torch.bfloat16, enabled=bf16):
        table = wm.rssm.action_table(5)
        want = wm.rssm.action_input(torch.nn.functional.one_hot(actions, 5).float())
    assert table.shape == (5, 32) and table.dtype == want.dtype == (torch.bfloat16 if bf16 else torch.float32)
    assert torch.equal(table[actions], want) and table.std() > 0.1


def test_class_index_is_the_argmax_of_one_hot_and_zero_rows():
    from fastdream.dream.rollout import class_index

    torch.manual_seed(0)
    index = torch.randint(0, 32, (37, 8))
    stoch = torch.nn.functional.one_hot(index, 32).float()
    stoch[3, 2] = 0.0  # a zero row (the initial state): class 0, as argmax gives
    want = stoch.argmax(-1)
    assert want[3, 2] == 0 and torch.equal(class_index(stoch), want)
    assert torch.equal(class_index(stoch.bfloat16()), want) and class_index(stoch).dtype == torch.int64
    # A straight-through sample (one_hot + p - p) may hold 1 ± an ulp: still its class.
    probs = torch.rand(37, 8, 32).softmax(-1)
    st = (torch.nn.functional.one_hot(index, 32).float() + probs) - probs
    assert not bool((st[st > 0.5] == 1.0).all()) and torch.equal(class_index(st), index)


def test_precision_is_passed_not_read_from_the_callers_autocast():
    """``precision="bf16"`` gives the dream the caller's bf16 autocast would (the same values, bf16 sequences);
    ``"fp32"`` keeps it float32 inside a bf16 autocast; ``None`` follows the caller; a bad value names itself."""
    wm, actor, starts, noise = tiny(True)
    with torch.no_grad():
        with torch.autocast("cpu", torch.bfloat16):
            ambient = imagine(wm, actor, starts, 3, engine="kernels", noise=noise, dense_feat=False)
            forced_fp32 = imagine(wm, actor, starts, 3, engine="kernels", noise=noise, dense_feat=False,
                                  precision="fp32")
        passed = imagine(wm, actor, starts, 3, engine="kernels", noise=noise, dense_feat=False, precision="bf16")
        plain = imagine(wm, actor, starts, 3, engine="kernels", noise=noise, dense_feat=False)
    assert ambient["feat"].dtype == passed["feat"].dtype == torch.bfloat16
    for k in ("feat", "action", "index", "reward", "cont", "logprob"):
        assert torch.equal(passed[k], ambient[k]), k
    assert forced_fp32["feat"].dtype == plain["feat"].dtype == torch.float32
    for k in ("feat", "reward", "cont", "logprob"):
        torch.testing.assert_close(forced_fp32[k], plain[k], rtol=1e-6, atol=1e-6, msg=k)
    with pytest.raises(ValueError, match="precision must be 'fp32', 'bf16' or None .* got 'half'"):
        imagine(wm, actor, starts, 3, noise=noise, precision="half")
