"""The fused kernel (plane_stats, topk, attention_stats) against the plain float64 references in
benchmarks/reference.py."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numba
import numpy as np
import pytest
from benchmarks import reference as ref
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fastattn.kernels import PlaneStats, plane_stats, topk
from fastattn.kernels.stats import FLAGS, MAX_TOPK, PLANE_STATS, attention_stats, empty_buffers, fast_log, fill

SAMPLES = Path(__file__).parent / "data" / "minilm"
FIXED = sorted((SAMPLES / "fixed").glob("attention_batch_000[01].npz"))
BATCHED = sorted((SAMPLES / "batched").glob("attention_batch_000[23].npz"))
FIELDS = PlaneStats._fields
EXACT = {"max_weight", "diag"}  # no arithmetic: must equal the input values
RTOL = 1e-6
ATOL = 1e-12
HYPOTHESIS = settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.too_slow])
THREADS = min(2, numba.config.NUMBA_NUM_THREADS)


def softmax(rng, shape, dtype, temperature=1.0, zero_fraction=0.0):
    """Rows are softmaxes of Gaussian logits; ``zero_fraction`` of weights exactly 0."""
    logits = rng.standard_normal(shape) / temperature
    if zero_fraction:
        logits[rng.random(shape) < zero_fraction] = -np.inf
        logits[..., 0] = np.where(np.isinf(logits).all(-1), 0.0, logits[..., 0])
    w = np.exp(logits - logits.max(axis=-1, keepdims=True))
    return (w / w.sum(axis=-1, keepdims=True)).astype(dtype)


def check_stats(a, lengths=None, **kw):
    got = plane_stats(a, lengths, **kw)
    assert isinstance(got, PlaneStats)
    for name in FIELDS:
        want = ref.STATISTICS[name](a, lengths)
        value = getattr(got, name)
        assert value.dtype == np.float64, name
        assert value.shape == want.shape, name
        if name in EXACT:
            np.testing.assert_array_equal(value, want, err_msg=name)
        else:
            np.testing.assert_allclose(value, want, rtol=RTOL, atol=ATOL, err_msg=name)
    return got


def check_summaries(a, lengths=None, **kw):
    """Every per-plane summary and flag of the fused kernel against ref.summaries."""
    got = attention_stats(a, 0, lengths, **kw)
    want = ref.summaries(a, lengths)
    for name in PLANE_STATS:
        assert got[name].dtype == np.float64 and got[name].shape == want[name].shape, name
        np.testing.assert_allclose(got[name], want[name], rtol=RTOL, atol=ATOL, err_msg=name)
    assert got["peak_key"].dtype == np.int32
    np.testing.assert_array_equal(got["peak_key"], want["peak_key"])
    for flag in FLAGS:
        assert got[flag].dtype == np.bool_
        np.testing.assert_array_equal(got[flag], want[flag], err_msg=flag)
    return got


def check_topk(a, k, lengths=None, **kw):
    index, weight = topk(a, k, lengths, **kw)
    want_index, want_weight = ref.topk(a, k, lengths)
    assert index.dtype == np.int32 and weight.dtype == np.float64
    np.testing.assert_array_equal(index, want_index)
    np.testing.assert_array_equal(weight, want_weight)
    return index, weight


def assert_same(x, y):
    """Bit-identical arrays, NaNs and signed zeros included."""
    assert len(x) == len(y)
    for a, b in zip(x, y):
        assert a.dtype == b.dtype and a.shape == b.shape
        np.testing.assert_array_equal(np.ascontiguousarray(a).view(np.uint8), np.ascontiguousarray(b).view(np.uint8))


@st.composite
def attention_cases(draw):
    lead = tuple(draw(st.lists(st.integers(1, 3), min_size=0, max_size=3)))
    Q = draw(st.integers(1, 24))
    K = Q if draw(st.booleans()) else draw(st.integers(1, 24))
    dtype = draw(st.sampled_from([np.float32, np.float64]))
    seed = draw(st.integers(0, 2**32 - 1))
    temperature = draw(st.sampled_from([0.05, 0.5, 1.0, 4.0]))
    zero_fraction = draw(st.sampled_from([0.0, 0.0, 0.3, 0.8]))
    rng = np.random.default_rng(seed)
    a = softmax(rng, lead + (Q, K), dtype, temperature, zero_fraction)
    lengths = None
    if draw(st.booleans()):
        prefix = lead[: draw(st.integers(0, len(lead)))]
        full = max(Q, K)
        choices = np.array([0, 1, min(Q, K), full, full + 3, rng.integers(1, full + 1)])
        lengths = rng.choice(choices, size=prefix)
    return a, lengths


# ------------------------------------------------------------- correctness


@HYPOTHESIS
@given(attention_cases())
def test_stats_match_reference(case):
    a, lengths = case
    check_stats(a, lengths)
    check_summaries(a, lengths)


@HYPOTHESIS
@given(attention_cases(), st.integers(0, MAX_TOPK))
def test_topk_matches_reference(case, k):
    a, lengths = case
    check_topk(a, k, lengths)


@pytest.mark.parametrize("k", [1, 5, 8, 9])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_topk_threshold_path_with_ties(k, dtype):
    """Rows of ≥ 8·k keys go through the group-maximum pre-filter: many exact ties (5 levels),
    weights equal to the threshold, ragged lengths whose last group is partial, and k > groups."""
    rng = np.random.default_rng(k)
    a = (rng.integers(0, 5, (3, 4, 40, 70)) / 8).astype(dtype)
    a[0, 1, :, ::8] = 0.5  # every group's maximum the same weight: all tie with the threshold
    check_topk(a, k, np.array([70, 41, 9]))


@pytest.mark.parametrize("path", FIXED, ids=lambda p: p.name)
def test_real_fixed_samples(path):
    a = np.load(path, allow_pickle=False)["attention_weights"]  # (layer, head, q, k)
    got = check_stats(a)
    np.testing.assert_allclose(got.row_sum, 1.0, atol=1e-5)  # real softmax rows
    check_topk(a, 8)
    summary = check_summaries(a)
    assert (summary["prev_token"] > 0).all() and (summary["first_token"] > 0).all()  # real heads attend there


@pytest.mark.parametrize("path", BATCHED, ids=lambda p: p.name)
def test_real_batched_samples(path):
    with np.load(path, allow_pickle=False) as f:
        a = f["attention_weights"].transpose(1, 0, 2, 3, 4)  # → (batch, layer, head, q, k)
        lengths = f["attention_mask"].sum(axis=1)
    assert (lengths < a.shape[-1]).any(), "sample should have padding"
    got = check_stats(a, lengths)
    check_topk(a, 8, lengths)
    check_summaries(a, lengths)
    # Padding is never read: NaN there changes nothing.
    padded = ref.fill_outside_valid(a, lengths)
    assert_same(plane_stats(padded, lengths), got)
    assert_same(topk(padded, 8, lengths), topk(a, 8, lengths))
    assert_same(list(attention_stats(padded, 8, lengths).values()), list(attention_stats(a, 8, lengths).values()))


@pytest.mark.parametrize("dtype, rtol", [(np.float32, RTOL), (np.float64, 1e-15)])
def test_entropy_zero_log_zero_and_one_hot(dtype, rtol):
    a = np.zeros((2, 4, 4), dtype=dtype)
    a[0] = np.eye(4)  # one-hot rows: entropy exactly 0
    a[1, :, :2] = 0.5  # two equal weights, two exact zeros: ln 2
    got = check_stats(a)
    assert np.all(got.entropy[0] == 0.0)
    np.testing.assert_allclose(got.entropy[1], np.log(2.0), rtol=rtol)


def test_float64_subnormal_weights():
    rng = np.random.default_rng(3)
    a = softmax(rng, (3, 6, 6), np.float64)
    a[:, :, 0] = 5e-320 * rng.random((3, 6))  # subnormal weights
    a[:, :, 1] = 3e-310
    check_stats(a)
    check_topk(a, 6)


def _log_inputs():
    rng = np.random.default_rng(0)
    x = np.concatenate(
        [
            rng.random(200_000),
            np.exp(-rng.random(50_000) * 745.0),  # down into the float64 subnormals
            1.0 + rng.standard_normal(50_000) * 1e-7,  # around ln 1 = 0
            np.linspace(0.5, 2.0, 50_001),
            [5e-324, 2.2250738585072014e-308, 1.0, 2.0, 0.5, np.sqrt(0.5), np.sqrt(2.0)],
        ]
    )
    return x[x > 0]


def _max_rel_error(x):
    want = np.log(x.astype(np.float64))
    got = fast_log(x)
    assert got.dtype == np.float64
    assert np.all(got[want == 0] == 0.0)
    nonzero = want != 0
    return np.max(np.abs(got[nonzero] - want[nonzero]) / np.abs(want[nonzero]))


def test_log_accuracy_float64():
    assert _max_rel_error(_log_inputs()) < 1e-14


def test_log_accuracy_float32():
    x = _log_inputs().astype(np.float32)
    every = np.arange(1, 2**31 - 2**23, 997, dtype=np.int32).view(np.float32)  # all exponents, subnormals too
    x = np.concatenate([x[x > 0], every[np.isfinite(every)]])
    assert _max_rel_error(x) < 3e-7


def test_log_of_zero_is_finite():
    # so x·ln x is exactly 0 at x = 0 with no branch
    assert np.isfinite(fast_log(np.zeros(3))).all()
    assert np.isfinite(fast_log(np.zeros(3, dtype=np.float32))).all()


def test_neighbour_and_edge_tokens_by_hand():
    """prev/next/first/last token on a ragged plane: sums over the valid block divided by its length."""
    rng = np.random.default_rng(7)
    a = softmax(rng, (2, 5, 5), np.float64)
    got = attention_stats(a, 0, np.array([3, 1]))
    block = a[0, :3, :3]
    assert got["prev_token"][0] == pytest.approx((block[1, 0] + block[2, 1]) / 3, rel=1e-15)
    assert got["next_token"][0] == pytest.approx((block[0, 1] + block[1, 2]) / 3, rel=1e-15)
    assert got["first_token"][0] == pytest.approx(block[:, 0].sum() / 3, rel=1e-15)
    assert got["last_token"][0] == pytest.approx(block[:, 2].sum() / 3, rel=1e-15)
    # length 1: no neighbours (0), the one key is both first and last
    assert got["prev_token"][1] == 0.0 and got["next_token"][1] == 0.0
    assert got["first_token"][1] == got["last_token"][1] == a[1, 0, 0]
    cross = attention_stats(a[:, :2, :], 0)  # Q = 2 ≠ K = 5: no diagonal neighbours
    assert np.isnan(cross["prev_token"]).all() and np.isnan(cross["next_token"]).all()
    np.testing.assert_allclose(cross["last_token"], a[:, :2, 4].sum(axis=1) / 2, rtol=1e-15)
    empty = attention_stats(a, 0, np.array([0, 0]))
    for name in PLANE_STATS:
        assert np.isnan(empty[name]).all(), name
    assert (empty["peak_key"] == -1).all() and not any(empty[f].any() for f in FLAGS)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_topk_special_weights(dtype):
    """NaN and −inf are never selected, +inf is, −0.0 ties with +0.0 (lower index first)."""
    row = np.array([0.0, -0.0, np.nan, 0.5, -np.inf, np.inf, 0.5, -0.0, 1e-45, -1.0, np.nan], dtype=dtype)
    selectable = [j for j in range(row.size) if not np.isnan(row[j]) and row[j] != -np.inf]
    order = sorted(selectable, key=lambda j: (-row[j], j))  # a stable sort of −w; −0.0 == 0.0
    want = np.array(order + [-1] * (row.size - len(order)), dtype=np.int32)
    reversed_order = sorted(selectable, key=lambda j: (-row[j], -j))  # the same row, keys reversed
    rows = np.stack([row, row[::-1]])
    for a in (rows[:, None, :], rows[None]):  # 2 planes of 1 query; 1 plane of 2 (ranked together)
        index, weight = topk(a, row.size)
        index, weight = index.reshape(2, -1), weight.reshape(2, -1)
        np.testing.assert_array_equal(index[0], want)
        np.testing.assert_array_equal(weight[0, : len(order)], row[order])
        assert np.isnan(weight[:, len(order) :]).all()
        np.testing.assert_array_equal(index[1, : len(order)], [row.size - 1 - j for j in reversed_order])
        fused = attention_stats(a, row.size, dtype=dtype)
        np.testing.assert_array_equal(fused["topk_index"].reshape(2, -1), index)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_fused_outputs_are_the_separate_ones(dtype):
    """One kernel: attention_stats gives plane_stats' and topk's arrays bit for bit, and its
    float32 outputs are the float64 ones rounded once."""
    a, lengths = _big_case(dtype)
    wide = attention_stats(a, 5, lengths)
    narrow = attention_stats(a, 5, lengths, dtype=np.float32)
    assert_same([wide[name] for name in PlaneStats._fields], plane_stats(a, lengths))
    assert_same([wide["topk_index"], wide["topk_weight"]], topk(a, 5, lengths))
    assert wide.keys() == narrow.keys()
    for name, value in wide.items():
        rounded = value.astype(np.float32) if value.dtype == np.float64 and narrow[name].dtype == np.float32 else value
        assert_same([narrow[name]], [rounded])
    assert {name for name, v in narrow.items() if v.dtype == np.float32} == set(PlaneStats._fields) | {"topk_weight"}


def test_dest_writes_each_plane_where_told():
    a, lengths = _big_case(np.float32)
    planes, lens = a.reshape(-1, 20, 20), np.repeat(lengths, 12)
    dest = np.random.default_rng(0).permutation(len(planes))
    got = empty_buffers(len(planes), 20, 20, 5, np.float32)
    fill(got, planes, lens, dest)
    want = empty_buffers(len(planes), 20, 20, 5, np.float32)
    order = np.argsort(dest)
    fill(want, planes[order], lens[order])  # output plane j holds input plane order[j]
    assert_same(got, want)
    with pytest.raises(ValueError, match="dest"):
        fill(got, planes, lens, dest[:-1])
    with pytest.raises(ValueError, match="dest"):
        fill(got, planes, lens, dest + 1)  # one index past the outputs
    with pytest.raises(ValueError, match="outputs"):
        fill(got, a[..., :10, :], None)


# ------------------------------------------------------------- masking


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_nan_outside_valid_block_is_never_read(dtype):
    rng = np.random.default_rng(1)
    a = softmax(rng, (4, 3, 10, 10), dtype)
    lengths = np.array([10, 1, 7, 0])
    padded = ref.fill_outside_valid(a, lengths)
    clean = check_stats(a, lengths)
    assert_same(plane_stats(padded, lengths), clean)
    assert_same(topk(padded, 4, lengths), check_topk(a, 4, lengths))
    # lengths 0 → the whole plane is NaN / −1
    assert np.isnan(clean.row_sum[3]).all() and np.isnan(clean.col_sum[3]).all()
    assert (topk(a, 4, lengths)[0][3] == -1).all()


def test_cross_attention_diag_is_nan_and_lengths_clip():
    rng = np.random.default_rng(2)
    a = softmax(rng, (2, 5, 9), np.float32)
    got = check_stats(a, np.array([7, 3]))
    assert np.isnan(got.diag).all()
    assert np.isfinite(got.row_sum[0]).all()  # min(7, Q=5) rows valid
    assert np.isfinite(got.col_sum[0, :7]).all() and np.isnan(got.col_sum[0, 7:]).all()


def test_empty_shapes():
    for shape in [(0, 4, 4), (2, 0, 4), (2, 4, 0), (0, 0, 0)]:
        a = np.ones(shape, dtype=np.float32)
        got = plane_stats(a)
        assert got.row_sum.shape == shape[:-1] and got.col_sum.shape == shape[:-2] + shape[-1:]
        assert np.isnan(got.row_sum).all() and np.isnan(got.col_sum).all()
        index, weight = topk(a, 3)
        assert index.shape == shape[:-1] + (3,) and (index == -1).all() and np.isnan(weight).all()


def test_argument_errors():
    a = np.full((2, 3, 4, 4), 0.25, dtype=np.float32)
    with pytest.raises(ValueError):
        topk(a, MAX_TOPK + 1)
    with pytest.raises(ValueError):
        topk(a, -1)
    assert topk(a, 0)[0].shape == (2, 3, 4, 0)
    with pytest.raises(ValueError):
        plane_stats(a, np.array([4, 4, 4]))  # (3,) is not a prefix of (2, 3)
    with pytest.raises(ValueError):
        plane_stats(a, np.array([[4, 4, 4]]))
    with pytest.raises(ValueError):
        plane_stats(a, np.array([4, -1]))
    with pytest.raises(TypeError):
        plane_stats(a, np.array([4.0, 4.0]))
    with pytest.raises(ValueError):
        plane_stats(np.ones(4))


# ------------------------------------------------------------- threads


def _big_case(dtype, seed=5):
    rng = np.random.default_rng(seed)
    a = softmax(rng, (16, 3, 4, 20, 20), dtype, zero_fraction=0.2)
    lengths = rng.integers(0, 21, size=16)
    return a, lengths


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_parallel_and_serial_identical(dtype):
    a, lengths = _big_case(dtype)
    assert_same(plane_stats(a, lengths, parallel=True), plane_stats(a, lengths, parallel=False))
    assert_same(topk(a, 5, lengths, parallel=True), topk(a, 5, lengths, parallel=False))


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_thread_count_does_not_change_results(dtype):
    from fastattn.kernels._jit import kernel_threads

    a, lengths = _big_case(dtype)
    with kernel_threads(1):
        one = plane_stats(a, lengths), topk(a, 5, lengths)
    with kernel_threads(THREADS):
        two = plane_stats(a, lengths), topk(a, 5, lengths)
    assert_same(one[0], two[0])
    assert_same(one[1], two[1])


def test_concurrent_python_threads():
    cases = [_big_case(np.float32 if i % 2 else np.float64, seed=i) for i in range(8)]
    want = [(plane_stats(a, n, parallel=False), topk(a, 5, n, parallel=False)) for a, n in cases]

    def work(i):
        a, n = cases[i % len(cases)]
        return i % len(cases), plane_stats(a, n), topk(a, 5, n)

    with ThreadPoolExecutor(max_workers=4) as pool:
        results = list(pool.map(work, range(32)))
    for i, stats, top in results:
        assert_same(stats, want[i][0])
        assert_same(top, want[i][1])


# ------------------------------------------------------------- compilation


def _in_subprocess(code: str, **env) -> str:
    import os
    import subprocess
    import sys

    environ = {k: v for k, v in os.environ.items() if k != "FASTATTN_NUMBA_CACHE"}
    environ.update(env)
    done = subprocess.run([sys.executable, "-c", code], env=environ, capture_output=True, text=True, check=True)
    return done.stdout.strip()


def test_nothing_compiles_at_import():
    code = (
        "import importlib\n"
        "sdpa, stats = (importlib.import_module('fastattn.kernels.' + m) for m in ('sdpa', 'stats'))\n"
        "kernels = [stats._stats_planes, stats._topk_planes, sdpa._attend_planes]\n"
        "print(sum(len(k.signatures) for k in kernels))"
    )
    assert _in_subprocess(code) == "0"  # with the disk cache on (the default), too
