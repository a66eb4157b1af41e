"""Learning curves from metrics.jsonl: the eval rows read back, seeds averaged on a common grid, a PNG written."""

import json

import numpy as np
import pytest

from fastdream.run.plots import group_mean, load_curve, parse_group, plot_groups


def write_run(path, evals, wall=True):
    """A run directory whose metrics.jsonl holds update rows and eval rows as the training loop writes them."""
    path.mkdir(parents=True)
    rows = []
    for i, (steps, ret) in enumerate(evals):
        rows.append({"env_steps": steps - 10, "time": 1000.0 + 60 * i, "wm/loss": 1.0})
        row = {"env_steps": steps, "time": 1000.0 + 60 * i + 30, "eval/return": ret}
        if wall:
            row["progress/wall_time"] = 120.0 * (i + 1)
        rows.append(row)
    (path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_curves_are_read_averaged_and_plotted(tmp_path):
    a = write_run(tmp_path / "a", [(1000, 10.0), (2000, 30.0), (3000, 50.0)])
    b = write_run(tmp_path / "b", [(1000, 20.0), (2000, 50.0), (4000, 90.0)], wall=False)
    ca, cb = load_curve(a), load_curve(b)
    np.testing.assert_array_equal(ca.env_steps, [1000, 2000, 3000])
    np.testing.assert_array_equal(ca.eval_return, [10.0, 30.0, 50.0])
    np.testing.assert_allclose(ca.minutes, [2.0, 4.0, 6.0])  # progress/wall_time, counted across resumes
    np.testing.assert_allclose(cb.minutes, [0.5, 1.5, 2.5])  # without it: since the first row
    grid, mean, std = group_mean([ca, cb], "env_steps", points=5)
    np.testing.assert_allclose(grid, [1000, 1750, 2500, 3250, 4000])  # up to where the longer run ends
    # a (ended at 3000 steps) holds its last eval, 50; b interpolates 50 -> 90 over 2000..4000 steps.
    np.testing.assert_allclose(mean, [15.0, 33.75, 50.0, 62.5, 70.0])
    np.testing.assert_allclose(std, [5.0, 8.75, 10.0, 12.5, 20.0])
    out = plot_groups({"seeds": [ca, cb]}, tmp_path / "img" / "c.png", title="t", target=50.0)
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out.stat().st_size > 5000
    assert parse_group(f"CartPole={a},{b}") == ("CartPole", [a, b])
    assert parse_group(str(a)) == ("a", [a])


def test_runs_without_evaluations_are_refused_by_name(tmp_path):
    write_run(tmp_path / "r", [])
    with pytest.raises(ValueError, match="has no eval/return rows"):
        load_curve(tmp_path / "r")
    with pytest.raises(ValueError, match="no metrics.jsonl in"):
        load_curve(tmp_path / "missing")


def test_the_plot_command_writes_the_png_and_refuses_a_bad_run(tmp_path, capsys):
    from fastdream.cli import main

    a = write_run(tmp_path / "a", [(1000, 10.0), (2000, 480.0)])
    out = tmp_path / "curves.png"
    assert main(["plot", f"seeds={a}", "--out", str(out), "--target", "475"]) == 0
    assert out.read_bytes()[:4] == b"\x89PNG" and "seeds: 1 run(s), best eval 480.0-480.0" in capsys.readouterr().out
    assert main(["plot", str(tmp_path / "none")]) == 2
    assert "no metrics.jsonl in" in capsys.readouterr().err
