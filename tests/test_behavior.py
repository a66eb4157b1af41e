import pytest
import torch

from fastdream.model.behavior import Actor
from fastdream.model.maths import kl_losses, lambda_return, return_norm_update, return_scale, return_weights


def test_lambda_return_hand_computed_with_continues_and_bootstrap():
    gamma, lam = 0.9, 0.5
    reward = torch.tensor([[1.0, 2.0, 3.0]])
    cont = torch.tensor([[1.0, 0.0, 1.0]])  # the episode ends on the transition 1 -> 2
    value = torch.tensor([[10.0, 20.0, 30.0, 40.0]])
    # R_3 = v_3 = 40
    # R_2 = r_2 + g c_2 [(1-l) v_3 + l R_3] = 3 + 0.9 * (0.5*40 + 0.5*40) = 39
    # R_1 = r_1 + g c_1 [...] = 2 + 0 = 2
    # R_0 = r_0 + g c_0 [(1-l) v_1 + l R_1] = 1 + 0.9 * (0.5*20 + 0.5*2) = 10.9
    ret = lambda_return(reward, cont, value, gamma, lam)
    torch.testing.assert_close(ret, torch.tensor([[10.9, 2.0, 39.0]]))


def test_lambda_return_limits():
    reward = torch.tensor([[1.0, 1.0]])
    cont = torch.ones(1, 2)
    value = torch.tensor([[0.0, 5.0, 7.0]])
    # lam = 0: one-step TD targets r + g v'
    torch.testing.assert_close(lambda_return(reward, cont, value, 0.5, 0.0), torch.tensor([[3.5, 4.5]]))
    # lam = 1: discounted Monte Carlo with bootstrap at the end: 1 + .5(1 + .5*7)
    torch.testing.assert_close(lambda_return(reward, cont, value, 0.5, 1.0), torch.tensor([[3.25, 4.5]]))


def test_return_weights_cumprod():
    cont = torch.tensor([[1.0, 1.0, 0.0, 1.0]])
    w = return_weights(cont, 0.5)
    torch.testing.assert_close(w, torch.tensor([[1.0, 0.5, 0.0, 0.0]]))


def test_return_normaliser_update_and_scale():
    returns = torch.arange(101, dtype=torch.float32)  # percentiles: 5th = 5, 95th = 95
    lo, hi = return_norm_update(torch.tensor(0.0), torch.tensor(0.0), returns, decay=0.99)
    torch.testing.assert_close(lo, torch.tensor(0.05))
    torch.testing.assert_close(hi, torch.tensor(0.95))
    assert return_scale(lo, hi) == 1.0  # max(1, 0.9)
    for _ in range(2000):
        lo, hi = return_norm_update(lo, hi, returns)
    torch.testing.assert_close(return_scale(lo, hi), torch.tensor(90.0), rtol=1e-3, atol=1e-3)


def test_free_bits_kl_balance():
    post = torch.tensor([[[0.0, 0.0]]])  # uniform
    prior_far = torch.log(torch.tensor([[[0.99, 0.01]]]))
    dyn, rep, kl = kl_losses(post, prior_far)
    expected = 0.5 * (torch.log(torch.tensor(0.5 / 0.99)) + torch.log(torch.tensor(0.5 / 0.01)))
    torch.testing.assert_close(kl, expected.reshape(1))
    torch.testing.assert_close(dyn, expected.reshape(1))  # above 1 nat: unclipped
    torch.testing.assert_close(rep, expected.reshape(1))
    prior_near = torch.log(torch.tensor([[[0.6, 0.4]]]))
    dyn, rep, kl = kl_losses(post, prior_near)
    assert kl.item() < 0.1
    assert dyn.item() == 1.0 and rep.item() == 1.0  # free bits: clipped to 1 nat
    # dyn trains only the prior, rep only the posterior.
    post = torch.zeros(1, 1, 2, requires_grad=True)
    prior = torch.log(torch.tensor([[[0.99, 0.01]]])).requires_grad_()
    dyn, rep, _ = kl_losses(post, prior)
    dyn.sum().backward()
    assert post.grad is None or post.grad.abs().sum() == 0
    assert prior.grad.abs().sum() > 0


@pytest.mark.parametrize("unimix", [0.01, 0.0])
def test_discrete_log_prob_and_entropy_match_the_categorical(unimix):
    torch.manual_seed(0)
    actor = Actor(12, 5, True, units=16, layers=1, unimix=unimix)
    feat = torch.randn(7, 3, 12) * 4  # large logits: unimix matters
    action = torch.nn.functional.one_hot(torch.randint(0, 5, (7, 3)), 5).float()
    logp, ent = actor.log_prob(feat, action)
    d = actor.dist(feat)
    torch.testing.assert_close(logp, d.log_prob(action.argmax(-1)), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ent, d.entropy(), rtol=1e-5, atol=1e-5)
    assert logp.shape == ent.shape == (7, 3) and bool((logp < 0).all()) and bool((ent > 0).all())
    logp.sum().backward()  # the REINFORCE gradient reaches the actor
    assert actor.net.head.weight.grad.abs().sum() > 0


def _dream(n: int = 6, h: int = 4, feat: int = 8, actions: int = 2, cont: torch.Tensor | None = None) -> dict:
    g = torch.Generator().manual_seed(0)
    return {"feat": torch.randn(n, h + 1, feat, generator=g),
            "action": torch.nn.functional.one_hot(torch.randint(0, actions, (n, h), generator=g), actions).float(),
            "reward": torch.randn(n, h, generator=g), "cont": cont, "start_cont": torch.ones(n),
            "logprob": torch.randn(n, h, generator=g), "entropy": torch.rand(n, h, generator=g)}


def test_continue_mode_discounts_returns_by_the_rounded_probability():
    from fastdream.model.behavior import Behavior

    torch.manual_seed(0)
    prob, mode = Behavior(8, 2, True, units=16, cont="prob"), Behavior(8, 2, True, units=16, cont="mode")
    mode.load_state_dict(prob.state_dict())
    p = torch.tensor([0.9, 0.2, 0.6, 0.97]).repeat(6, 1)
    # With mode the returns are those of the probabilities rounded to 0/1 (DreamerV3's discount).
    _, _, m_mode = mode.losses(_dream(cont=p))
    _, _, m_rounded = prob.losses(_dream(cont=(p > 0.5).float()))
    torch.testing.assert_close(m_mode["behavior/return"], m_rounded["behavior/return"])
    _, _, m_prob = prob.losses(_dream(cont=p))
    assert abs(float(m_prob["behavior/return"] - m_mode["behavior/return"])) > 1e-3
    with pytest.raises(ValueError, match="cont must be 'prob' or 'mode', got 'median'"):
        Behavior(8, 2, True, cont="median")
