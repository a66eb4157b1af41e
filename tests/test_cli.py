import io
import json
import os
import re
import subprocess
import sys

import pytest

SMALL_SETS = ["model.deter=32", "model.hidden=32", "model.units=32", "model.stoch=8", "model.classes=4",
              "model.blocks=4", "train.horizon=5", "train.batch_size=2", "train.seq_len=8", "train.prefill=64",
              "train.train_ratio=4", "train.warmup_updates=5", "train.eval_every=200", "train.eval_episodes=2",
              "train.log_every=5", "train.replay_capacity=800"]


def run(*args, timeout=300):
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    return subprocess.run([sys.executable, "-m", "fastdream.cli", *args], capture_output=True, text=True,
                          timeout=timeout, env=env)


def test_help_lists_commands_and_flags():
    r = run("--help")
    assert r.returncode == 0
    for cmd in ("train", "eval", "collect", "bench"):
        assert cmd in r.stdout
    r = run("train", "--help")
    assert r.returncode == 0
    for flag in ("--env", "--envs", "--preset", "--obs", "--steps", "--minutes", "--train-ratio", "--logdir", "--seed",
                 "--device", "--resume", "--set"):
        assert flag in r.stdout


@pytest.mark.parametrize("args, message", [
    (["train", "--env", "CartPol-v1"], "unknown environment id 'CartPol-v1'"),
    (["train", "--preset", "cartpol"], "unknown preset 'cartpol'; valid presets: cartpole"),
    (["train", "--set", "train.horizonn=5"], "unknown config key 'train.horizonn'; valid keys:"),
    (["train", "--set", "train.horizon=five"], "bad value 'five' for train.horizon (expected int)"),
    (["train", "--set", "train.horizon"], "--set expects section.field=value"),
    (["train", "--set", "train.horizon=0"], "train.horizon must be >= 1, got 0"),
    (["train", "--minutes", "-5"], "train.minutes must be >= 0 (0: no wall-clock budget), got -5.0"),
    (["train", "--resume", "/nonexistent/run"], "no checkpoint there"),
    (["eval", "/nonexistent/run"], "no checkpoint in /nonexistent/run"),
    (["bench", "nosuch"], "unknown bench suite(s) ['nosuch']"),
])
def test_errors_exit_nonzero_with_one_line(args, message):
    r = run(*args)
    assert r.returncode == 2
    assert "Traceback" not in r.stderr
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and message in lines[0], r.stderr


def test_short_run_writes_metrics_tensorboard_checkpoint_and_evaluates(tmp_path):
    logdir = tmp_path / "run"
    sets = [x for s in SMALL_SETS for x in ("--set", s)]
    r = run("train", "--envs", "4", "--steps", "400", "--logdir", str(logdir), "--quiet", *sets)
    assert r.returncode == 0, r.stderr
    assert "budget: eval return" in r.stdout and "400 env steps" in r.stdout
    rows = [json.loads(line) for line in (logdir / "metrics.jsonl").read_text().splitlines()]
    assert any("wm/loss" in row for row in rows) and any("eval/return" in row for row in rows)
    assert rows[-1]["summary/env_steps"] == 400
    assert any(p.name.startswith("events.out.tfevents") for p in (logdir / "tb").iterdir())
    assert (logdir / "checkpoint" / "state.pt").is_file() and (logdir / "checkpoint" / "replay" / "meta.json").is_file()
    # Starting a new run over an existing one is refused; --resume continues it.
    r = run("train", "--envs", "4", "--logdir", str(logdir), *sets)
    assert r.returncode == 2 and "already holds a run" in r.stderr
    r = run("train", "--resume", str(logdir), "--steps", "480")
    assert r.returncode == 0, r.stderr
    assert "480 env steps" in r.stdout
    # Output to a pipe gets plain progress lines (a redrawn bar would only show its last frame).
    assert re.search(r"^train [\d,]+/480 env steps \(\d+\.\d %\)  return ", r.stdout, re.M), r.stdout
    gif = tmp_path / "ep.gif"
    r = run("eval", str(logdir), "--episodes", "2", "--video", str(gif))
    assert r.returncode == 0, r.stderr
    assert "mean return" in r.stdout and "mode actions" in r.stdout
    assert gif.read_bytes()[:6] == b"GIF89a"
    # The mode policy is reproducible; --sample draws actions (seeded by the checkpoint) and plays other episodes.
    mode = [run("eval", str(logdir), "--episodes", "4").stdout for _ in range(2)]
    sampled = run("eval", str(logdir), "--episodes", "4", "--sample").stdout
    assert mode[0] == mode[1] and "mode actions" in mode[0]
    assert "sampled actions" in sampled and sampled.split("(")[0] != mode[0].split("(")[0], (sampled, mode[0])
    r = run("eval", str(logdir), "--episodes", "0")
    assert r.returncode == 2 and "--episodes must be >= 1, got 0" in r.stderr


def test_resume_refuses_config_changes(tmp_path):
    logdir = tmp_path / "run"
    sets = [x for s in SMALL_SETS for x in ("--set", s)]
    r = run("train", "--envs", "4", "--steps", "100", "--logdir", str(logdir), "--quiet", *sets)
    assert r.returncode == 0, r.stderr
    r = run("train", "--resume", str(logdir), "--envs", "8")
    assert r.returncode == 2 and "only --steps and --minutes may change it (got ['envs'])" in r.stderr
    r = run("train", "--resume", str(logdir), "--minutes", "-1")
    assert r.returncode == 2 and "train.minutes must be >= 0 (0: no wall-clock budget), got -1.0" in r.stderr


@pytest.mark.parametrize("argv, env_id, target, deter, obs", [
    # A size preset alone keeps the env's task settings (LunarLander's target 200, not CartPole's 475).
    (["--env", "LunarLander-v3", "--preset", "xs"], "LunarLander-v3", 200.0, 256, "vector"),
    # Repeated --preset flags add up, in order, like a comma-separated list.
    (["--env", "LunarLander-v3", "--preset", "lunarlander", "--preset", "xs"], "LunarLander-v3", 200.0, 256,
     "vector"),
    (["--preset", "cartpole,xs"], "CartPole-v1", 475.0, 256, "vector"),
    (["--obs", "pixels", "--preset", "tiny"], "CartPole-v1", 400.0, 128, "pixels"),
    ([], "CartPole-v1", 475.0, 128, "vector"),
    # LunarLander's task preset picks the xs model; a size preset named after it overrides that.
    (["--env", "LunarLander-v3"], "LunarLander-v3", 200.0, 256, "vector"),
    (["--env", "LunarLander-v3", "--preset", "tiny"], "LunarLander-v3", 200.0, 128, "vector"),
])
def test_presets_resolve_task_then_size(argv, env_id, target, deter, obs):
    from fastdream.cli import _load_config, build_parser

    cfg = _load_config(build_parser().parse_args(["train", *argv]))
    assert (cfg.env.id, cfg.env.target_return, cfg.model.deter, cfg.env.obs) == (env_id, target, deter, obs)
    # CartPole trains on half-length windows (pixels: twice the updates per minute; see config.TASKS).
    assert cfg.train.seq_len == (32 if env_id == "CartPole-v1" else 64)
    # The tasks solved within 90 min here ran compiled and in bf16; their presets carry that.
    long_task = env_id == "LunarLander-v3" or obs == "pixels"
    want = ("compile", True) if long_task else ("auto", False)
    assert (cfg.train.engine, cfg.train.compile_model, cfg.train.precision) == (*want, "auto" if long_task else "fp32")


@pytest.mark.parametrize("env_id, target, discrete", [
    ("Acrobot-v1", -100.0, True),  # negative returns: CartPole's 475 could never be reached
    ("MountainCarContinuous-v0", 90.0, False),
    ("Pendulum-v1", float("inf"), False),  # no reward threshold: no target
])
def test_an_env_without_a_task_preset_gets_one_from_its_spec(env_id, target, discrete):
    from fastdream.cli import _load_config, build_parser
    from fastdream.data.envs import env_facts
    from fastdream.run.config import TASKS

    facts = env_facts(env_id)
    assert (facts["obs"], facts["discrete"]) == ("vector", discrete)
    cfg = _load_config(build_parser().parse_args(["train", "--env", env_id]))
    assert (cfg.env.id, cfg.env.target_return, cfg.env.obs) == (env_id, target, "vector")
    assert cfg.train.prefill == TASKS["cartpole"]["train.prefill"]
    # --obs pixels takes the pixel variant of the generic preset.
    cfg = _load_config(build_parser().parse_args(["train", "--env", env_id, "--obs", "pixels"]))
    assert (cfg.env.obs, cfg.env.num_envs) == ("pixels", TASKS["cartpole-pixels"]["env.num_envs"])


def test_a_run_without_target_says_so_and_records_its_precision(tmp_path):
    logdir = tmp_path / "run"
    sets = [x for s in SMALL_SETS for x in ("--set", s)]
    r = run("train", "--env", "Pendulum-v1", "--envs", "4", "--steps", "200", "--logdir", str(logdir), "--quiet",
            "--precision", "auto", *sets)
    assert r.returncode == 0, r.stderr
    assert "no target (the env has no reward threshold: the run spends its budget)" in r.stdout
    assert r.stdout.strip().splitlines()[-1].startswith("budget: eval return")
    from fastdream.fast.precision import auto_precision

    saved = json.loads((logdir / "config.json").read_text())
    assert saved["train"]["precision"] == auto_precision("cpu")  # auto resolved once, so a resume keeps it
    assert f"precision {auto_precision('cpu')} (auto)" in r.stdout


def test_progress_prints_plain_lines_when_not_a_terminal():
    from rich.console import Console

    from fastdream.run.logger import Progress

    out = io.StringIO()
    bar = Progress(4000, interval=3600.0, console=Console(file=out, width=60))
    bar.update(1000, "return 5.0")
    bar.update(2000, "return 6.0")  # within the interval: no line
    bar.update(3000, "eval 7.0", force=True)
    bar.close()
    lines = out.getvalue().splitlines()
    assert [ln.rsplit("  ", 1)[0] for ln in lines] == [
        "train 1,000/4,000 env steps (25.0 %)  return 5.0", "train 3,000/4,000 env steps (75.0 %)  eval 7.0"]
    assert all(re.search(r"  \d+:\d\d elapsed$", ln) for ln in lines)


def test_bench_learn_runs_each_seed_then_reads_finished_runs_back(tmp_path):
    runs = tmp_path / "learn"
    args = ("bench", "learn", "--tasks", "cartpole", "--seeds", "2", "--steps", "1200", "--runs-dir", str(runs))
    r = run(*args, "--json", timeout=600)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert [(x["task"], x["seed"], x["stopped"], x["env_steps"]) for x in out["runs"]] == [
        ("cartpole", 0, "budget", 1200), ("cartpole", 1, "budget", 1200)]
    assert all(x["updates"] > 0 and x["best_eval"] > 0 for x in out["runs"])
    assert out["tasks"] == [{"task": "cartpole", "target": 475.0, "solved": 0, "runs": 2, "median_env_steps": None,
                             "median_wall_time": None, "best_eval": max(x["best_eval"] for x in out["runs"])}]
    # A second call finds both runs finished and trains nothing: the metrics files are untouched.
    before = {p: p.read_bytes() for p in runs.glob("*/metrics.jsonl")}
    r = run(*args)
    assert r.returncode == 0, r.stderr
    assert "cartpole: 0/2 seeds reached 475; best eval" in r.stdout
    assert {p: p.read_bytes() for p in runs.glob("*/metrics.jsonl")} == before
    r = run("bench", "learn", "replay")
    assert r.returncode == 2 and "run it on its own" in r.stderr
