import subprocess
import sys

import numpy as np
import pytest
import torch
from tiny import TINY_RUN

from fastdream.model.maths import symexp
from fastdream.run.config import Config, apply
from fastdream.run.dream_view import dream_prediction, dream_strip, held_out_sequences, side_by_side_frames, windows
from fastdream.run.train import load_run, train


@pytest.fixture(scope="module")
def pixel_run(tmp_path_factory):
    path = tmp_path_factory.mktemp("pixels") / "run"
    train(apply(Config(), {**TINY_RUN, "env.obs": "pixels", "model.cnn_mult": 4, "train.steps": 96,
                           "train.prefill": 64}), path, progress=False)
    return path


def test_windows_stay_inside_one_episode():
    first = torch.zeros(2, 12, dtype=torch.bool)
    first[0, 0] = first[0, 5] = first[1, 0] = True
    e, t = windows(first, 3)
    got = set(zip(e.tolist(), t.tolist(), strict=True))
    # env 0: a start t needs no episode start in t+1..t+3; the one at row 5 rules out t = 2, 3, 4.
    assert got == {(0, 0), (0, 1), (0, 5), (0, 6), (0, 7), (0, 8)} | {(1, t) for t in range(9)}


def test_a_dream_prediction_starts_from_the_posterior_and_lines_up_with_the_real_rows(tiny_run):
    cfg, agent, _ = load_run(tiny_run)
    seq = held_out_sequences(agent, cfg, 1, 30, seed=2)
    pred = dream_prediction(agent, seq, 6, seed=4)
    start = int(pred["start"])
    assert pred["real_vector"].shape == pred["pred_vector"].shape == (7, 4) and pred["pred_reward"].shape == (7,)
    np.testing.assert_array_equal(pred["real_vector"], seq["vector"][0, start : start + 7].numpy())
    wm = agent.wm
    with torch.random.fork_rng(), torch.no_grad():
        torch.manual_seed(4)
        post = wm.rssm.observe(wm.encode(seq), seq["action"], seq["is_first"])
        k0 = symexp(wm.vec_dec(wm.rssm.feat(post["deter"][0, start], post["stoch"][0, start])))
    np.testing.assert_allclose(pred["pred_vector"][0], k0.numpy(), rtol=1e-5, atol=1e-6)
    assert not np.allclose(pred["pred_vector"][6], pred["real_vector"][6], atol=1e-3)  # a tiny model drifts


def test_pixel_dream_frames_put_the_real_frame_left_and_the_dream_right(pixel_run):
    cfg, agent, _ = load_run(pixel_run)
    pred = dream_prediction(agent, held_out_sequences(agent, cfg, 1, 20, seed=0), 4)
    assert pred["real_image"].shape == pred["pred_image"].shape == (5, 64, 64, 3)
    assert pred["pred_image"].dtype == np.uint8
    frames = side_by_side_frames(pred, scale=2)
    assert len(frames) == 5 and frames[0].shape == (128, 256, 3)
    np.testing.assert_array_equal(frames[3][::2, ::2][:, :64], pred["real_image"][3])
    np.testing.assert_array_equal(frames[3][::2, ::2][:, 64:], pred["pred_image"][3])
    strip = dream_strip(pred)
    assert strip.shape == (128, 320, 3)
    np.testing.assert_array_equal(strip[64:, 128:192], pred["pred_image"][2])


def test_eval_dream_writes_a_video_for_pixels_and_refuses_one_for_vectors(pixel_run, tiny_run, tmp_path):
    from PIL import Image

    base = [sys.executable, "-m", "fastdream", "eval"]
    r = subprocess.run([*base, str(pixel_run), "--dream", "--horizon", "5", "--video", str(tmp_path / "d.gif"),
                        "--out", str(tmp_path)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    gif = Image.open(tmp_path / "d.gif")
    assert gif.n_frames == 6 and gif.size == (384, 192)
    assert (tmp_path / "dream.png").stat().st_size > 10_000
    r = subprocess.run([*base, str(tiny_run), "--dream", "--video", str(tmp_path / "v.gif")], capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 2 and "a dream video needs a pixel run" in r.stderr
    assert not (tmp_path / "v.gif").exists() and not (tiny_run / "dream").exists()


def test_training_logs_dream_pictures_to_tensorboard(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    cfg = apply(Config(), {**TINY_RUN, "train.steps": 128, "train.eval_every": 64, "train.eval_episodes": 1,
                           "train.dream_every": 1})
    train(cfg, tmp_path / "run", progress=False)
    events = EventAccumulator(str(tmp_path / "run" / "tb"), size_guidance={"images": 0})
    events.Reload()
    assert "dream/curves" in events.Tags()["images"]
    pictures = events.Images("dream/curves")
    assert len(pictures) >= 1 and pictures[0].width > 500
