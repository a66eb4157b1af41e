"""Faults a real machine has, made real: SIGKILL at random points of training and inside a checkpoint's renames, a
truncated or bit-flipped checkpoint, a damaged replay, and a file-size limit hit while a checkpoint is written."""

import json
import os
import random
import signal
import subprocess
import sys
import time

import pytest
import torch
from tiny import TINY_RUN

from fastdream.run import checkpoint
from fastdream.run.config import Config, apply
from fastdream.run.logger import read_rows
from fastdream.run.train import train

FREQUENT = {**TINY_RUN, "train.checkpoint_every": 3, "train.log_every": 3, "train.steps": 320}

_TRAIN = """
import json, os, signal, sys
from fastdream.run.config import Config, apply
from fastdream.run.logger import read_rows
from fastdream.run.train import train
mode, run, over = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
resume = os.path.isdir(os.path.join(run, "checkpoint")) or os.path.isdir(os.path.join(run, "checkpoint.prev"))
if mode.startswith("kill-at-replace-"):  # SIGKILL this process at the n-th rename of the run's atomic writes
    import fastdream.data.atomic as atomic
    calls, n, real = [0], int(mode.rsplit("-", 1)[1]), atomic.os.replace
    def replace(a, b):
        calls[0] += 1
        if calls[0] == n:
            os.kill(os.getpid(), signal.SIGKILL)
        real(a, b)
    atomic.os.replace = replace
if mode == "fsize":  # after the first checkpoint, no file may grow past 100 kB (state.pt is ~650 kB)
    import resource
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG instead
    def cap(step, row):
        if os.path.exists(os.path.join(run, "checkpoint", "state.pt")):
            resource.setrlimit(resource.RLIMIT_FSIZE, (100_000, resource.RLIM_INFINITY))
    from fastdream.run.checkpoint import CheckpointError
    try:
        train(None if resume else apply(Config(), over), run, resume=resume, progress=False, log_fn=cap)
    except CheckpointError as exc:
        print("stopped:", exc)
        sys.exit(3)
else:
    res = train(None if resume else apply(Config(), over), run, resume=resume, progress=False)
    print("done", res.env_steps)
"""


def _child(mode: str, run_dir, over: dict | None = None) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", _TRAIN, mode, str(run_dir), json.dumps(over or FREQUENT)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _updates(run_dir) -> int:
    return checkpoint.load(run_dir, with_replay=True)[0]["counters"]["updates"]


def test_sigkill_at_random_points_never_loses_more_than_the_last_checkpoint(tmp_path):
    rng = random.Random(0)
    run, seen, kills = tmp_path / "run", -1, 0
    long = {**FREQUENT, "train.steps": 1200}  # long enough to be killed five times on a fast CPU
    while kills < 5:
        child = _child("plain", run, long)
        time.sleep(rng.uniform(2.0, 6.0))
        if child.poll() is not None:  # finished before the kill
            break
        child.send_signal(signal.SIGKILL)
        child.wait()
        kills += 1
        if checkpoint.exists(run):
            now = _updates(run)  # readable after every kill, and never behind what a resume had already seen
            assert now >= seen
            seen = now
    out, err = _child("plain", run, long).communicate(timeout=300)
    assert "done 1200" in out, err
    assert kills >= 3 and not list(tmp_path.glob("run/.checkpoint.*"))
    # Each resume dropped the rows the killed process logged after its checkpoint: every step logged once, in order.
    steps = [r["env_steps"] for r in read_rows(run / "metrics.jsonl") if "wm/loss" in r]
    assert steps == sorted(steps) and len(steps) == len(set(steps))


def test_a_second_process_cannot_train_in_a_run_dir_in_use(tmp_path):
    run = tmp_path / "run"
    held = checkpoint.claim(run)
    with pytest.raises(ValueError, match=f"{run} is in use by pid {os.getpid()}; wait for it or use another"):
        train(apply(Config(), FREQUENT), run, progress=False)
    held.close()
    assert train(apply(Config(), {**FREQUENT, "train.steps": 96}), run, progress=False).env_steps == 96


# The first checkpoint renames twice (its replay into place, then itself); each later one three times (its replay,
# the old checkpoint to checkpoint.prev, the new one into place): n = 3..8 kills inside the second and third.
@pytest.mark.parametrize("n", [3, 4, 5, 6, 7, 8])
def test_sigkill_inside_a_checkpoints_renames_leaves_one_to_resume_from(tmp_path, n):
    run = tmp_path / "run"
    child = _child(f"kill-at-replace-{n}", run)
    child.wait(timeout=300)
    assert child.returncode == -signal.SIGKILL
    assert checkpoint.exists(run)
    state, replay = checkpoint.load(run)  # the new checkpoint or the previous one, whole
    assert replay is not None and state["counters"]["updates"] >= 3
    out, err = _child("plain", run).communicate(timeout=300)
    assert "done 320" in out, err


def test_a_damaged_checkpoint_falls_back_to_the_previous_one(tmp_path, capsys):
    run = tmp_path / "run"
    train(apply(Config(), FREQUENT), run, progress=False)
    last = _updates(run)
    state = run / "checkpoint" / "state.pt"
    data = state.read_bytes()
    prev_updates = torch.load(run / "checkpoint.prev" / "state.pt", weights_only=False)["counters"]["updates"]
    assert prev_updates < last
    capsys.readouterr()
    damaged = f"checkpoint {state} is damaged (its SHA-256 does not match state.sha256)"
    state.write_bytes(data[: len(data) // 2])  # truncated
    assert _updates(run) == prev_updates
    assert damaged in capsys.readouterr().err
    flipped = bytearray(data)
    flipped[len(data) // 2] ^= 0xFF  # same size, one byte off: only the checksum sees it
    state.write_bytes(bytes(flipped))
    assert _updates(run) == prev_updates
    assert damaged in capsys.readouterr().err
    sums = (run / "checkpoint" / "state.sha256").read_text()
    (run / "checkpoint" / "state.sha256").unlink()  # a checkpoint without its checksum: torch's reader finds it
    state.write_bytes(data[: len(data) // 2])
    assert _updates(run) == prev_updates
    assert f"cannot read checkpoint {state}" in capsys.readouterr().err
    (run / "checkpoint" / "state.sha256").write_text(sums)
    state.write_bytes(data)
    assert _updates(run) == last and capsys.readouterr().err == ""
    field = run / "checkpoint" / "replay" / "field0.npy"
    field.write_bytes(field.read_bytes()[:100])  # a damaged replay
    assert _updates(run) == prev_updates
    assert "cannot load replay from" in capsys.readouterr().err
    (run / "checkpoint.prev" / "state.pt").write_bytes(b"junk")
    with pytest.raises(ValueError, match="cannot load replay from .*; checkpoint .*checkpoint.prev.* is damaged"):
        checkpoint.load(run)


def test_resume_from_a_truncated_checkpoint_warns_and_finishes(tmp_path):
    run = tmp_path / "run"
    train(apply(Config(), {**FREQUENT, "train.steps": 160}), run, progress=False)
    state = run / "checkpoint" / "state.pt"
    state.write_bytes(state.read_bytes()[:1000])
    r = subprocess.run([sys.executable, "-m", "fastdream", "train", "--resume", str(run), "--steps", "240", "--quiet"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert f"fastdream: warning: checkpoint {state} is damaged" in r.stderr and "240 env steps" in r.stdout


def test_a_full_disk_during_a_checkpoint_stops_the_run_with_the_last_one_intact(tmp_path):
    run = tmp_path / "run"
    out, err = _child("fsize", run).communicate(timeout=300)
    assert "stopped: cannot write checkpoint" in out and "is intact" in out, (out, err)
    state, replay = checkpoint.load(run)  # the last good checkpoint
    assert replay is not None and state["counters"]["updates"] >= 3
    assert not list(run.glob(".checkpoint*"))  # the failed write's temp directory is gone
    out, err = _child("plain", run).communicate(timeout=300)  # room again: the run resumes and finishes
    assert "done 320" in out, err
