"""Zero-mean noise on imagined rewards leaves the REINFORCE actor gradient unbiased and adds variance that falls as
1/N with the number of dreams N ("On Training in Imagination", 2026), where the return normaliser's scale is at its
floor of 1 (the rewards here are small), so the advantages are linear in the rewards."""

import copy

import numpy as np
import pytest
import torch

from fastdream.model.behavior import Behavior
from fastdream.model.maths import noisy_rewards
from fastdream.run.config import Config, apply, validate

H, FEAT, ACTIONS = 5, 8, 3


def _dreams(n: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {"feat": torch.randn(n, H + 1, FEAT, generator=g),
            "action": torch.nn.functional.one_hot(torch.randint(0, ACTIONS, (n, H), generator=g), ACTIONS).float(),
            "reward": 0.02 * torch.randn(n, H, generator=g), "cont": torch.full((n, H), 0.97),
            "start_cont": torch.ones(n)}


def _actor_grad(beh: Behavior, traj: dict[str, torch.Tensor], sigma: float, noise: torch.Tensor | None,
                mean_shift: float = 0.0) -> torch.Tensor:
    beh = copy.deepcopy(beh)  # the return normaliser's state starts the same for every draw
    traj = dict(traj)
    traj["logprob"], traj["entropy"] = beh.actor.log_prob(traj["feat"][:, :H], traj["action"])
    if sigma:
        traj["reward"] = noisy_rewards(traj["reward"], sigma, noise + mean_shift)
    actor_loss, _, m = beh.losses(traj)
    assert float(m["behavior/retnorm_scale"]) == 1.0  # linear advantages: the premise of the claim
    grads = torch.autograd.grad(actor_loss, list(beh.actor.parameters()))
    return torch.cat([g.flatten() for g in grads])


@pytest.fixture(scope="module")
def behavior():
    torch.manual_seed(0)
    return Behavior(FEAT, ACTIONS, True, units=16, layers=1)


def test_noisy_rewards_adds_sigma_times_the_noise():
    r, e = torch.randn(4, 3), torch.randn(4, 3)
    torch.testing.assert_close(noisy_rewards(r, 0.5, e), r + 0.5 * e)
    torch.manual_seed(1)
    drawn = noisy_rewards(torch.zeros(20_000, 5), 0.3) / 0.3
    assert abs(float(drawn.mean())) < 0.01 and abs(float(drawn.std()) - 1) < 0.01


def test_reward_noise_leaves_the_actor_gradient_unbiased(behavior):
    n, draws, sigma = 256, 300, 0.05
    traj = _dreams(n)
    clean = _actor_grad(behavior, traj, 0.0, None)
    g = torch.Generator().manual_seed(7)
    noise = [torch.randn(n, H, generator=g) for _ in range(draws)]


    # Projections on fixed directions (the clean gradient's and five random ones): scalar estimates whose mean over
    # the draws must be the clean one within its standard error.
    dirs = torch.cat([clean[None] / clean.norm(), torch.randn(5, clean.numel(), generator=g)])
    dirs = dirs / dirs.norm(dim=1, keepdim=True)

    def worst_z(shift: float) -> float:
        proj = torch.stack([_actor_grad(behavior, traj, sigma, e, shift) for e in noise]) @ dirs.T  # [draws, 6]
        z = (proj.mean(0) - dirs @ clean) / (proj.std(0) / draws**0.5)
        return float(z.abs().max())

    assert worst_z(0.0) < 4.0  # unbiased
    assert worst_z(0.3) > 8.0  # and the same test flags noise whose mean is 0.3 sigma off zero


def test_reward_noise_variance_falls_as_one_over_the_number_of_dreams(behavior):
    sigma, draws = 0.05, 60
    sizes = [64, 128, 256, 512, 1024]
    variances = []
    for n in sizes:
        traj = _dreams(n)
        clean = _actor_grad(behavior, traj, 0.0, None)
        g = torch.Generator().manual_seed(n)
        dev = torch.stack([_actor_grad(behavior, traj, sigma, torch.randn(n, H, generator=g)) - clean
                           for _ in range(draws)])
        variances.append(float((dev**2).sum(1).mean()))  # total variance: the mean squared deviation
    slope = np.polyfit(np.log(sizes), np.log(variances), 1)[0]
    assert -1.2 < slope < -0.8, (slope, variances)


def test_reward_noise_is_a_dream_setting_with_a_range():
    assert apply(Config(), {"dream.reward_noise": 0.1}).dream.reward_noise == 0.1
    with pytest.raises(ValueError, match="dream.reward_noise must be a finite number >= 0, got -0.1"):
        validate(apply(Config(), {"dream.reward_noise": -0.1}))
