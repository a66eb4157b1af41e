import json
import subprocess
import sys

import numpy as np
import pytest
from tiny import TINY_RUN

from fastdream.research.study import (
    area_under_curve,
    claim_study_dir,
    format_study,
    horizon_settings,
    reward_noise_settings,
    run_study,
    summarise_study,
    write_study,
)
from fastdream.run.learn_bench import task_config
from fastdream.run.logger import read_rows
from fastdream.run.plots import Curve

# The tiny run's settings without its step budget (the study's --steps sets it).
QUICK = {**{k: v for k, v in TINY_RUN.items() if k != "train.steps"}, "train.eval_every": 64,
         "train.eval_episodes": 2, "train.dream_every": 0, "train.log_every": 4}


def test_horizon_settings_keep_the_imagined_steps_per_update():
    base = task_config("cartpole", 0)  # 256 dreams x H=15 per update
    settings = horizon_settings(base, (1, 5, 30), ramp_end=700)
    assert list(settings) == ["H=1", "H=5", "H=30", "ramp 1-15"]
    for h in (1, 5, 30):
        s = settings[f"H={h}"]
        assert s["train.horizon"] == h and s["train.dream_budget"] == 256 * 15 and s["train.horizon_mode"] == "budget"
    assert settings["ramp 1-15"]["train.ramp_end"] == 700
    assert reward_noise_settings((0.0, 1.0), (64,)) == {
        "sigma=0 N=64": {"dream.reward_noise": 0.0, "train.dream_starts": 64},
        "sigma=1 N=64": {"dream.reward_noise": 1.0, "train.dream_starts": 64}}


def test_area_under_curve_holds_the_ends_and_interpolates_between():
    c = Curve(None, np.array([100.0, 300.0]), np.array([1.0, 2.0]), np.array([10.0, 30.0]))
    # 0..100 at 10, 100..300 rising 10 -> 30 (mean 20), 300..400 at 30: (10*100 + 20*200 + 30*100) / 400 = 20.
    assert abs(area_under_curve(c, 400.0) - 20.0) < 0.2


def test_a_study_trains_each_setting_resumes_and_writes_its_summary(tmp_path):
    settings = {k: v for k, v in horizon_settings(task_config("cartpole", 0), (1, 4)).items() if k.startswith("H=")}
    settings = {k: {**v, "train.dream_budget": 24} for k, v in settings.items()}
    records = run_study(settings, "cartpole", [0], tmp_path, steps=128, extra=QUICK)
    assert [(r["setting"], r["seed"], r["env_steps"]) for r in records] == [("H=1", 0, 128), ("H=4", 0, 128)]
    # The budget's wiring: N = 24 // H dreams of H steps in every logged update.
    for label, h in (("H=1", 1), ("H=4", 4)):
        rows = [r for r in read_rows(tmp_path / f"{label.replace('=', '_')}-s0" / "metrics.jsonl")
                if "dream/horizon" in r]
        assert rows and all(r["dream/horizon"] == h and r["dream/starts"] == 24 // h for r in rows)
    stamp = (tmp_path / "H_1-s0" / "metrics.jsonl").stat().st_mtime_ns
    again = run_study(settings, "cartpole", [0], tmp_path, steps=128, extra=QUICK)  # read back, not retrained
    assert again == records and (tmp_path / "H_1-s0" / "metrics.jsonl").stat().st_mtime_ns == stamp
    summary = summarise_study(records)
    assert summary["H=1"]["final_eval"]["mean"] == records[0]["final_eval"]
    assert summary["H=1"]["final_eval"]["std"] == 0.0 and summary["H=1"]["solved"] == 0
    assert np.isnan(summary["H=4"]["env_steps_to_target"]["mean"])
    assert "H=4" in format_study(summary)
    path, plot = write_study(tmp_path, "horizon", "cartpole", records, summary)
    doc = json.loads(path.read_text())
    assert doc["settings"]["H=4"]["env_steps_to_target"]["mean"] is None  # NaN is written as null
    assert plot.stat().st_size > 10_000


def test_a_study_dir_refuses_another_study(tmp_path):
    spec = {"study": "horizon", "task": "cartpole", "settings": {"H=1": {"train.horizon": 1}}, "steps": 100,
            "minutes": None, "extra": {}}
    claim_study_dir(tmp_path, spec)
    claim_study_dir(tmp_path, dict(spec))  # the same study again: resumes
    with pytest.raises(ValueError, match=r"holds another study \(its settings, steps differ\); use another --dir"):
        claim_study_dir(tmp_path, {**spec, "steps": 200, "settings": {"H=3": {"train.horizon": 3}}})
    r = subprocess.run([sys.executable, "-m", "fastdream", "study", "reward-noise", "--dir", str(tmp_path)],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "holds another study (its" in r.stderr, r.stderr
    assert json.loads((tmp_path / "spec.json").read_text())["study"] == "horizon"


@pytest.mark.parametrize("args, message", [
    (["horizon", "--values", "0,3"], "horizon study: --values are horizons, ints >= 1, got 0,3"),
    (["reward-noise", "--values", "-1"], "reward-noise study: --values are noise stds >= 0, got -1"),
    (["horizon", "--seeds", "x"], "--seeds and --dreams take comma-separated ints"),
    (["horizon", "--set", "train.nope=1"], "unknown config key 'train.nope'"),
    (["horizon", "--set", "train.recency=2"], "train.recency must be in [0, 1], got 2.0"),
])
def test_bad_study_input_is_one_line_before_any_run(args, message, tmp_path):
    r = subprocess.run([sys.executable, "-m", "fastdream", "study", *args, "--dir", str(tmp_path / "s")],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and message in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert not (tmp_path / "s").exists()


def test_sigterm_stops_the_whole_study_and_the_same_command_resumes_it(tmp_path):
    import signal
    import time

    sets = [f"--set={k}={v}" for k, v in QUICK.items()]
    cmd = [sys.executable, "-m", "fastdream", "study", "horizon", "--values", "1,3", "--seeds", "0", "--steps",
           "100000", "--dir", str(tmp_path), "--quiet", *sets]
    child = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not list(tmp_path.glob("H_1-s0/metrics.jsonl")) and time.time() < deadline:
        time.sleep(0.5)
    time.sleep(3)
    child.send_signal(signal.SIGTERM)
    out, err = child.communicate(timeout=120)
    assert child.returncode == 130 and "study interrupted; the same command resumes it" in err, (out, err)
    assert "H=1 seed 0: not solved (interrupted)" in out
    assert not (tmp_path / "H_3-s0").exists()  # the next setting never started
