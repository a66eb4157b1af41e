import json
import math
import subprocess
import sys

import numpy as np
import torch

from fastdream.model.maths import categorical_kl, symexp
from fastdream.research.model_error import (
    growth_per_step,
    jacobian_norms,
    lipschitz_estimates,
    open_loop_errors,
)
from fastdream.run.dream_view import held_out_sequences
from fastdream.run.train import load_run


def test_growth_per_step_recovers_a_geometric_growth():
    errors = np.r_[np.nan, 0.3 * 1.2 ** np.arange(1, 11)]
    assert abs(growth_per_step(errors) - 1.2) < 1e-9
    assert abs(growth_per_step(np.r_[5.0, 2.0 * 0.9 ** np.arange(1, 6)]) - 0.9) < 1e-9  # k = 0 is left out
    assert math.isnan(growth_per_step(np.array([1.0, 2.0])))  # one point after k = 0
    assert math.isnan(growth_per_step(np.array([1.0, 0.0, 0.0, 0.0])))


def test_jacobian_norms_are_the_spectral_norms_of_each_rows_jacobian():
    g = torch.Generator().manual_seed(0)
    w, x = torch.randn(5, 7, generator=g), torch.randn(9, 7, generator=g)
    torch.testing.assert_close(jacobian_norms(lambda v: v @ w.T, x), torch.full((9,), float(torch.linalg.norm(w, 2))))
    # Row-wise tanh: J = diag(1 - tanh²(x) ⊙ ...) W; its spectral norm per row, built by hand.
    want = torch.stack([torch.linalg.norm((1 - torch.tanh(r @ w.T) ** 2)[:, None] * w, 2) for r in x])
    torch.testing.assert_close(jacobian_norms(lambda v: torch.tanh(v @ w.T), x), want)


def test_open_loop_errors_start_from_the_posterior_and_stay_inside_episodes(tiny_run):
    cfg, agent, _ = load_run(tiny_run)
    seq = held_out_sequences(agent, cfg, envs=4, length=40, seed=3)
    assert seq["vector"].shape == (4, 40, 4) and seq["action"].shape == (4, 40, 2)
    h = 6
    errors = open_loop_errors(agent, seq, h, seed=1)
    assert all(len(errors[k]) == h + 1 for k in ("latent_kl", "obs_vector", "reward", "cont"))
    assert "obs_image" not in errors and math.isnan(errors["latent_kl"][0])
    # Windows of rows t..t+H with no episode start after t, counted by hand.
    first = seq["is_first"].numpy()
    want = sum(not first[e, t + 1 : t + h + 1].any() for e in range(4) for t in range(40 - h))
    assert int(errors["starts"]) == want > 0
    # k = 0 and k = 1 from the same posterior pass (same seed): the posterior's reconstruction, and the one-step
    # prior, whose deter is the posterior's next deter, against the next posterior (the training KL).
    wm = agent.wm
    with torch.random.fork_rng():
        torch.manual_seed(1)
        post = wm.rssm.observe(wm.encode(seq), seq["action"], seq["is_first"])
    ok = torch.tensor([[not first[e, t + 1 : t + h + 1].any() for t in range(40 - h)] for e in range(4)])
    e_idx, t_idx = ok.nonzero(as_tuple=True)
    feat = wm.rssm.feat(post["deter"][e_idx, t_idx], post["stoch"][e_idx, t_idx])
    with torch.no_grad():
        rec = ((symexp(wm.vec_dec(feat)) - seq["vector"][e_idx, t_idx]) ** 2).mean()
        kl1 = categorical_kl(post["post"][e_idx, t_idx + 1], post["prior"][e_idx, t_idx + 1]).mean()
    assert abs(errors["obs_vector"][0] - float(rec)) <= 1e-5 * float(rec)
    assert abs(errors["latent_kl"][1] - float(kl1)) <= 1e-4 * float(kl1) + 1e-6


def test_lipschitz_estimates_are_positive_and_bounded_by_their_max(tiny_run):
    cfg, agent, _ = load_run(tiny_run)
    seq = held_out_sequences(agent, cfg, envs=2, length=20, seed=0)
    est = lipschitz_estimates(agent, seq, states=16)
    assert set(est) == {"dynamics", "reward", "policy"}
    for v in est.values():
        assert 0 < v["mean"] <= v["max"] and v["p90"] <= v["max"] and math.isfinite(v["max"])


def test_eval_model_error_writes_a_report_and_refuses_bad_input(tiny_run, tmp_path):
    base = [sys.executable, "-m", "fastdream", "eval", str(tiny_run), "--model-error"]
    r = subprocess.run([*base, "--horizon", "4", "--envs", "3", "--length", "30", "--out", str(tmp_path)],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "growth/step" in r.stdout and "lipschitz" in r.stdout
    report = json.loads((tmp_path / "model_error.json").read_text())
    assert report["horizon"] == 4 and report["envs"] == 3 and report["errors"]["latent_kl"][0] is None
    assert len(report["errors"]["reward"]) == 5 and report["starts"] > 0
    assert (tmp_path / "model_error.png").stat().st_size > 10_000
    for args, message in ((["--horizon", "0"], "horizon must be an int >= 1, got 0"),
                          (["--horizon", "9", "--length", "5"], "length must be an int >= horizon + 2 = 11, got 5"),
                          (["--envs", "0"], "--envs must be >= 1, got 0")):
        r = subprocess.run([*base, *args], capture_output=True, text=True, timeout=300)
        assert r.returncode == 2 and message in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert not (tiny_run / "model_error").exists()
