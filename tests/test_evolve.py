import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from fastdream.model.maths import inverse_cdf_index, unimix_probs
from fastdream.research.evolve import (
    EvolveSettings,
    controller_actions,
    controller_size,
    dream_returns,
    evolve,
    real_returns,
    tempered_draw,
    tempered_prior,
)
from fastdream.run.train import load_run

QUICK = {"population": 4, "dreams": 3, "horizon": 12, "eval_every": 2, "eval_dreams": 16, "episodes": 4}


@pytest.fixture
def run_dir(tiny_run):
    return tiny_run


def test_controller_actions_are_the_argmax_or_tanh_of_each_linear_map():
    g = torch.Generator().manual_seed(0)
    p, m, f, a = 3, 5, 7, 2
    params, feat = torch.randn(p, controller_size(f, a), generator=g), torch.randn(p, m, f, generator=g)
    for discrete in (True, False):
        got = controller_actions(params, feat, discrete)
        assert got.shape == (p, m, a)
        for i in range(p):
            y = feat[i] @ params[i, : a * f].reshape(a, f).T + params[i, a * f :]
            want = torch.nn.functional.one_hot(y.argmax(-1), a).float() if discrete else torch.tanh(y)
            torch.testing.assert_close(got[i], want)


def test_tempered_prior_is_the_prior_at_one_and_flattens_above_it():
    raw = torch.randn(64, 8, 16, generator=torch.Generator().manual_seed(1)) * 3
    torch.testing.assert_close(tempered_prior(raw, 1.0, 0.01), unimix_probs(raw, 0.01))

    def entropy(tau):
        p = tempered_prior(raw, tau, 0.01)
        return float(-(p * p.log()).sum(-1).mean())

    taus = [0.5, 1.0, 1.15, 1.5, 100.0]
    ents = [entropy(t) for t in taus]
    assert all(a < b for a, b in zip(ents, ents[1:], strict=False)), ents
    assert abs(ents[-1] - np.log(16)) < 0.01  # τ = 100: nearly uniform over K = 16


def test_tempered_draw_is_the_inverse_cdf_of_the_tempered_prior(run_dir):
    _, agent, _ = load_run(run_dir)
    rssm = agent.wm.rssm
    g = torch.Generator().manual_seed(4)
    deter, noise = torch.randn(300, rssm.deter, generator=g), torch.rand(300, rssm.stoch, generator=g)
    for tau in (0.5, 1.0, 1.5):
        with torch.no_grad():
            want = inverse_cdf_index(tempered_prior(rssm.prior_raw(deter), tau, rssm.unimix), noise)
            got = tempered_draw(rssm, deter, tau, noise)
        assert (got == want).float().mean() > 0.999  # a draw on a class boundary may round either way


def test_dream_returns_of_a_batch_equal_each_controller_dreamed_alone(run_dir):
    _, agent, replay = load_run(run_dir, with_replay=True)
    wm = agent.wm
    g = torch.Generator().manual_seed(0)
    starts = wm.rssm.initial(6)
    starts[1][..., 0] = 1.0  # one-hot stochs
    params = torch.randn(3, controller_size(wm.rssm.feat_dim, wm.action_dim), generator=g)
    together, length = dream_returns(wm, params, starts, 9, 1.15, True, torch.Generator().manual_seed(5))
    assert together.shape == length.shape == (3, 6)
    assert ((length >= 1) & (length <= 9)).all()
    for i in range(3):
        alone, alone_len = dream_returns(wm, params[i : i + 1], starts, 9, 1.15, True,
                                         torch.Generator().manual_seed(5))
        torch.testing.assert_close(alone[0], together[i], rtol=1e-5, atol=1e-5)
        assert torch.equal(alone_len[0], length[i])


def test_a_dream_episode_ends_by_the_continue_head(run_dir):
    _, agent, _ = load_run(run_dir)
    wm = agent.wm
    starts = wm.rssm.initial(8)
    starts[1][..., 1] = 1.0
    params = torch.zeros(2, controller_size(wm.rssm.feat_dim, wm.action_dim))
    with torch.no_grad():
        wm.cont_head.head.bias.fill_(50.0)  # always continues: every dream runs the whole horizon
        full, full_len = dream_returns(wm, params, starts, 7, 1.0, True, torch.Generator().manual_seed(2))
        wm.cont_head.head.bias.fill_(-50.0)  # never continues: one step's reward, then nothing
        one, one_len = dream_returns(wm, params, starts, 7, 1.0, True, torch.Generator().manual_seed(2))
    assert torch.equal(full_len, torch.full((2, 8), 7.0)) and torch.equal(one_len, torch.ones(2, 8))
    # The first step is the same in both (same noise): its reward is the whole of the short dream's return.
    short, _ = dream_returns(wm, params, starts, 1, 1.0, True, torch.Generator().manual_seed(2))
    torch.testing.assert_close(one, short)
    assert not torch.allclose(full, one)


def test_evolve_writes_scores_resumes_exactly_and_leaves_the_run_alone(run_dir, tmp_path):
    ck = run_dir / "checkpoint" / "state.pt"
    before = ck.read_bytes()
    straight = evolve(run_dir, [1.0, 1.5], EvolveSettings(generations=3, **QUICK), tmp_path / "straight")
    evolve(run_dir, [1.0, 1.5], EvolveSettings(generations=2, **QUICK), tmp_path / "split")
    resumed = evolve(run_dir, [1.0, 1.5], EvolveSettings(generations=3, **QUICK), tmp_path / "split")
    assert ck.read_bytes() == before
    for tau in ("1", "1.5"):
        a, b = straight["temperatures"][tau]["history"], resumed["temperatures"][tau]["history"]
        assert [r["generation"] for r in a] == [1, 2, 3] and a == b
        assert {"eval_dream", "real", "real_std"} <= set(a[1]) and "real" not in a[0] and "real" in a[2]
    on_disk = json.loads((tmp_path / "straight" / "evolve.json").read_text())
    assert on_disk["temperatures"]["1.5"]["real"] == straight["temperatures"]["1.5"]["real"]
    assert (tmp_path / "straight" / "evolve.png").stat().st_size > 10_000
    # The real score is the saved mean controller's, replayed: CartPole episodes return >= 8 each.
    cfg, agent, _ = load_run(run_dir)
    state = torch.load(tmp_path / "straight" / "tau-1" / "state.pt", weights_only=False)
    rets = real_returns(agent, cfg, torch.as_tensor(state["mean"], dtype=torch.float32), 4, seed=10_000)
    assert len(rets) == 4 and min(rets) >= 8
    assert np.mean(rets) == pytest.approx(straight["temperatures"]["1"]["real"])
    # Other settings in the same directory are refused, not mixed in.
    with pytest.raises(ValueError, match=r"other settings \(\['horizon'\]\)"):
        evolve(run_dir, [1.0], EvolveSettings(generations=3, **{**QUICK, "horizon": 5}), tmp_path / "split")


@pytest.mark.parametrize("args, message", [
    (["--tau", "0"], "the dream temperature must be a finite number > 0, got 0.0"),
    (["--tau", "1,x"], "--tau takes comma-separated numbers > 0, got '1,x'"),
    (["--population", "1"], "population must be an int >= 2, got 1"),
    (["--horizon", "0"], "horizon must be an int >= 1, got 0"),
    (["--sigma", "-1"], "sigma must be a finite number > 0, got -1.0"),
    (["--out", "{run}/checkpoint/evolve"], "is inside the run's checkpoint"),
])
def test_bad_evolve_input_is_one_line_before_any_work(run_dir, args, message):
    args = [a.replace("{run}", str(run_dir)) for a in args]
    r = subprocess.run([sys.executable, "-m", "fastdream", "evolve", str(run_dir), *args], capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 2 and message in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert not (run_dir / "evolve").exists()


def test_evolve_needs_a_checkpoint(tmp_path):
    r = subprocess.run([sys.executable, "-m", "fastdream", "evolve", str(tmp_path)], capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 2 and f"no checkpoint in {tmp_path}" in r.stderr
