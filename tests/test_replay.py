import threading

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fastdream import ReplayBuffer
from fastdream.data.replay_reference import NumpyReplay

SPEC = {
    "image": ((4, 4, 3), "uint8"),
    "vector": ((3,), "float32"),
    "action": ((2,), "float32"),
    "reward": ((), "float32"),
    "is_first": ((), "bool"),
    "is_last": ((), "bool"),
    "is_terminal": ((), "bool"),
}


def make_rows(n: int, rng: np.random.Generator, spec=SPEC) -> dict[str, np.ndarray]:
    rows = {}
    for name, (shape, dtype) in spec.items():
        dt = np.dtype(dtype)
        if dt.kind == "b":
            rows[name] = rng.random((n, *shape)) < 0.3
        elif dt.kind == "u":
            rows[name] = rng.integers(0, 256, (n, *shape)).astype(dt)
        else:
            rows[name] = rng.standard_normal((n, *shape)).astype(dt)
    return rows


def assert_batches_equal(a: dict, b: dict) -> None:
    assert set(a) == set(b)
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)


def test_sample_matches_numpy_reference_with_wraparound():
    rng = np.random.default_rng(0)
    rb = ReplayBuffer(capacity=4 * 20, num_envs=4, spec=SPEC, seed=1)
    ref = NumpyReplay(4 * 20, 4, SPEC)
    for _ in range(57):  # 57 > 20 rows per env: every ring wraps more than twice
        rows = make_rows(4, rng)
        rb.add(rows)
        ref.add(rows, range(4))
    assert len(rb) == 80
    assert rb.counts().tolist() == [57] * 4
    batch, env, start = rb.sample_with_index(32, 7)
    for e, s in zip(env, start, strict=True):
        assert ref.is_valid(e, s, 7), (e, s)
    assert_batches_equal(batch, ref.gather(env, start, 7))
    assert rb.num_windows(7) == ref.num_windows(7) == 4 * (20 - 7 + 1)


@settings(max_examples=60, deadline=None)
@given(
    num_envs=st.integers(1, 4),
    per_env=st.integers(3, 12),
    ops=st.lists(st.tuples(st.integers(0, 2**32 - 1), st.integers(1, 4)), min_size=1, max_size=40),
    seq_len=st.integers(1, 3),
    recency=st.sampled_from([0.0, 0.5, 1.0]),
)
def test_random_add_sample_sequences_match_reference(num_envs, per_env, ops, seq_len, recency):
    spec = {"vector": ((2,), "float32"), "reward": ((), "float32"), "is_first": ((), "bool")}
    rb = ReplayBuffer(num_envs * per_env, num_envs, spec, seed=3)
    ref = NumpyReplay(num_envs * per_env, num_envs, spec)
    for op_seed, k in ops:
        rng = np.random.default_rng(op_seed)
        ids = rng.permutation(num_envs)[: min(k, num_envs)]
        rows = make_rows(len(ids), rng, spec)
        rb.add(rows, env_ids=ids)
        ref.add(rows, ids)
        assert rb.num_windows(seq_len) == ref.num_windows(seq_len)
        if ref.num_windows(seq_len) == 0:
            with pytest.raises(ValueError, match="no env stream holds"):
                rb.sample(2, seq_len)
            continue
        batch, env, start = rb.sample_with_index(5, seq_len, recency=recency)
        assert all(ref.is_valid(e, s, seq_len) for e, s in zip(env, start, strict=True))
        assert_batches_equal(batch, ref.gather(env, start, seq_len))


def test_uniform_selection_covers_windows_evenly():
    spec = {"reward": ((), "float32")}
    rb = ReplayBuffer(2 * 30, 2, spec, seed=0)
    for t in range(45):
        rb.add({"reward": np.array([t, 1000 + t], np.float32)})
    _, env, start = rb.sample_with_index(60_000, 10)
    # 2 envs x (30 - 10 + 1) = 42 windows, each expected 60000/42 ~ 1429 times.
    keys = env * 1000 + start
    _, freq = np.unique(keys, return_counts=True)
    assert len(freq) == 42
    assert freq.min() > 1429 * 0.85 and freq.max() < 1429 * 1.15
    assert set(start.tolist()) == set(range(15, 36))  # oldest stored row is 45 - 30 = 15


def test_recency_favours_recent_windows():
    spec = {"reward": ((), "float32")}
    rb = ReplayBuffer(1000, 1, spec, seed=0)
    for t in range(1000):
        rb.add({"reward": np.array([t], np.float32)})
    _, _, uniform = rb.sample_with_index(40_000, 1, recency=0.0)
    _, _, recent = rb.sample_with_index(40_000, 1, recency=1.0)
    # Uniform mean age ~ 500; triangular density 2(1-x) has mean age 1000/3 ~ 333.
    assert abs((999 - uniform).mean() - 499.5) < 10
    assert abs((999 - recent).mean() - 333) < 10


def test_seeded_sampling_is_reproducible():
    rng = np.random.default_rng(5)
    rows = [make_rows(2, rng) for _ in range(30)]
    out = []
    for _ in range(2):
        rb = ReplayBuffer(40, 2, SPEC, seed=42)
        for r in rows:
            rb.add(r)
        out.append(rb.sample_with_index(8, 5, recency=0.3)[1:])
    np.testing.assert_array_equal(out[0][0], out[1][0])
    np.testing.assert_array_equal(out[0][1], out[1][1])


def test_preallocated_output_is_reused_and_torch_views_work():
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(0)
    rb = ReplayBuffer(100, 2, SPEC)
    for _ in range(30):
        rb.add(make_rows(2, rng))
    out = rb.alloc_batch(4, 6, as_torch=True)
    ptr = out["image"].data_ptr()
    batch, env, start = rb.sample_with_index(4, 6, out=out)
    assert batch is out and out["image"].data_ptr() == ptr
    ref = {k: np.stack([rb.storage(k)[e, s % rb.env_capacity: s % rb.env_capacity + 6]
                        for e, s in zip(env, start, strict=True)]) for k in SPEC}
    for k in SPEC:
        np.testing.assert_array_equal(out[k].numpy(), ref[k])
    assert out["is_first"].dtype == torch.bool and out["image"].dtype == torch.uint8


def test_save_load_round_trip(tmp_path):
    rng = np.random.default_rng(0)
    rb = ReplayBuffer(3 * 10, 3, SPEC, seed=9)
    for _ in range(14):
        rb.add(make_rows(3, rng))
    rb.add(make_rows(1, rng), env_ids=[2])
    rb.save(tmp_path / "rb")
    rb2 = ReplayBuffer.load(tmp_path / "rb")
    assert rb2.counts().tolist() == rb.counts().tolist() == [14, 14, 15]
    assert rb2.spec == rb.spec and len(rb2) == len(rb) and rb2.nbytes == rb.nbytes
    for k in SPEC:
        np.testing.assert_array_equal(rb2.storage(k), rb.storage(k))
    # The sampler state round-trips too: both continue with identical draws.
    a, ea, sa = rb.sample_with_index(16, 4, recency=0.5)
    b, eb, sb = rb2.sample_with_index(16, 4, recency=0.5)
    np.testing.assert_array_equal(ea, eb)
    np.testing.assert_array_equal(sa, sb)
    assert_batches_equal(a, b)
    # Saving over an existing directory replaces it atomically and leaves no temp dirs.
    rb2.add(make_rows(3, rng))
    rb2.save(tmp_path / "rb")
    assert ReplayBuffer.load(tmp_path / "rb").counts().tolist() == [15, 15, 16]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["rb"]


def test_load_damaged_or_foreign_directory_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="not a fastdream replay directory"):
        ReplayBuffer.load(tmp_path)
    rb = ReplayBuffer(20, 2, SPEC)
    rb.add(make_rows(2, np.random.default_rng(0)))
    rb.save(tmp_path / "rb")
    (tmp_path / "rb" / "meta.json").write_text("{not json")
    with pytest.raises(ValueError, match="damaged"):
        ReplayBuffer.load(tmp_path / "rb")
    rb.save(tmp_path / "rb2")
    f = tmp_path / "rb2" / "field0.npy"
    f.write_bytes(f.read_bytes()[:-5])
    with pytest.raises(ValueError, match="cannot load replay"):
        ReplayBuffer.load(tmp_path / "rb2")
    rb.save(tmp_path / "rb3")
    (tmp_path / "rb3" / "meta.json").write_text('{"format": "something-else"}')
    with pytest.raises(ValueError, match="format is 'something-else'"):
        ReplayBuffer.load(tmp_path / "rb3")


@pytest.mark.parametrize(
    "mutate, exc, match",
    [
        (lambda r: r.update(reward=r["reward"].astype(np.float64)), TypeError, "'reward': dtype float64"),
        (lambda r: r.update(vector=r["vector"][:, :2]), ValueError, r"'vector': shape \(2, 2\)"),
        (lambda r: r.pop("is_last"), ValueError, r"missing field\(s\) \['is_last'\]"),
        (lambda r: r.update(bogus=r["reward"]), ValueError, r"unknown field\(s\) \['bogus'\]"),
        (lambda r: r.update(image=r["image"][:1]), ValueError, "'image': shape"),
    ],
)
def test_add_rejects_bad_rows_before_touching_memory(mutate, exc, match):
    rb = ReplayBuffer(20, 2, SPEC)
    rows = make_rows(2, np.random.default_rng(0))
    mutate(rows)
    with pytest.raises(exc, match=match):
        rb.add(rows)
    assert len(rb) == 0 and rb.counts().tolist() == [0, 0]
    assert not rb.storage("image").any()


def test_other_errors_name_the_bad_value():
    with pytest.raises(ValueError, match="capacity must be an int >= num_envs"):
        ReplayBuffer(3, 4, SPEC)
    with pytest.raises(ValueError, match="dimensions? must be >= 1"):
        ReplayBuffer(10, 1, {"x": ((0,), "float32")})
    with pytest.raises(ValueError, match="not bool/int/uint/float"):
        ReplayBuffer(10, 1, {"x": ((1,), "complex64")})
    rb = ReplayBuffer(20, 2, SPEC)
    rows = make_rows(1, np.random.default_rng(0))
    with pytest.raises(ValueError, match="env id 2 out of range"):
        rb.add(rows, env_ids=[2])
    with pytest.raises(ValueError, match="env id -1 out of range"):
        rb.add(rows, env_ids=[-1])
    with pytest.raises(ValueError, match="no env stream holds"):
        rb.sample(2, 3)
    with pytest.raises(ValueError, match="seq_len 11 exceeds the per-env capacity 10"):
        rb.sample(2, 11)
    with pytest.raises(ValueError, match="recency must be"):
        rb.sample(2, 1, recency=1.5)
    with pytest.raises(ValueError, match="batch_size must be an int >= 1"):
        rb.sample(0, 1)
    with pytest.raises(TypeError, match="rows must be a dict"):
        rb.add([1, 2])


def test_core_checks_shapes_even_without_the_python_wrapper():
    rb = ReplayBuffer(20, 2, SPEC)
    core = rb._core
    arrays = [np.zeros((2, *s), d) for s, d in rb.spec.values()]
    arrays[0] = np.zeros((2, 4, 4), np.uint8)  # image missing its channel axis
    with pytest.raises(ValueError, match="'image': shape"):
        core.add(np.arange(2), arrays)
    arrays[0] = np.zeros((2, 4, 4, 3), np.float32)
    with pytest.raises(TypeError, match="'image': dtype float32"):
        core.add(np.arange(2), arrays)
    assert core.counts() == [0, 0]


def test_concurrent_add_and_sample_never_see_half_written_rows():
    """Every field of a row encodes the same counter; windows must be consecutive counters."""
    num_envs, per_env, T = 4, 64, 16
    spec = {"image": ((16, 16, 3), "uint8"), "vector": ((32,), "float32"), "reward": ((), "float32")}
    rb = ReplayBuffer(num_envs * per_env, num_envs, spec, seed=0)
    stop = threading.Event()
    errors: list[str] = []

    def writer():
        t = 0
        while not stop.is_set() and t < 20_000:
            c = np.arange(num_envs, dtype=np.float32) * 1e6 + t
            rb.add({
                "image": np.full((num_envs, 16, 16, 3), t % 251, np.uint8),
                "vector": np.repeat(c[:, None], 32, axis=1),
                "reward": c,
            })
            t += 1

    th = threading.Thread(target=writer)
    th.start()
    samples = 0
    try:
        while th.is_alive() and samples < 3000:
            if rb.num_windows(T) == 0:
                continue
            b = rb.sample(8, T)
            r = b["reward"]
            t = (r % 1e6).astype(np.int64)
            if not (b["vector"] == r[..., None]).all():
                errors.append("vector/reward mismatch")
            if not (b["image"] == (t % 251).astype(np.uint8)[..., None, None, None]).all():
                errors.append("image/reward mismatch")
            if not (np.diff(t, axis=1) == 1).all():
                errors.append(f"window not consecutive: {t[0]}")
            samples += 1
    finally:
        stop.set()
        th.join()
    assert samples > 100
    assert errors == []


def test_repeated_env_id_in_one_add_is_rejected():
    rb = ReplayBuffer(20, 2, SPEC)
    with pytest.raises(ValueError, match="env id 1 repeats within one add"):
        rb.add(make_rows(2, np.random.default_rng(0)), env_ids=[1, 1])
    assert rb.counts().tolist() == [0, 0]
