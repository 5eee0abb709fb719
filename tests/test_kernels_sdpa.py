"""attention_weights and sdpa against the float64 reference (and PyTorch when installed)."""

from __future__ import annotations

import numba
import numpy as np
import pytest
from benchmarks import reference as ref
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fastattn.kernels import attention_weights, sdpa

HYPOTHESIS = settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.too_slow])
# PyTorch's float32 tolerances (torch.testing.assert_close); float64 much tighter.
TOL = {np.float32: dict(atol=1e-5, rtol=1.3e-6), np.float64: dict(atol=1e-12, rtol=1e-9)}
THREADS = min(2, numba.config.NUMBA_NUM_THREADS)


def row_masks(Q, K, lengths, lead, causal):
    """(masked (..., Q, K), fully_masked (..., Q)) as the docs define them."""
    masked = np.zeros(lead + (Q, K), dtype=bool)
    i = np.arange(Q)[:, None]
    j = np.arange(K)[None, :]
    for index in np.ndindex(*lead):
        n = ref.plane_length(lengths, index)
        n = max(Q, K) if n is None else n
        m = (j >= n) | (i >= n)
        masked[index] = (m | (j > i)) if causal else m
    return masked, masked.all(axis=-1)


@st.composite
def qkv_cases(draw):
    lead = tuple(draw(st.lists(st.integers(1, 3), min_size=0, max_size=3)))
    Q = draw(st.integers(1, 12))
    K = draw(st.integers(1, 12))
    d = draw(st.integers(1, 64))
    dv = draw(st.integers(1, 16))
    dtype = draw(st.sampled_from([np.float32, np.float64]))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    spread = draw(st.sampled_from([0.1, 1.0, 3.0]))
    q = (rng.standard_normal(lead + (Q, d)) * spread).astype(dtype)
    k = (rng.standard_normal(lead + (K, d)) * spread).astype(dtype)
    v = rng.standard_normal(lead + (K, dv)).astype(dtype)
    scale = draw(st.sampled_from([None, 0.3, 2.0]))
    causal = draw(st.booleans())
    lengths = None
    if draw(st.booleans()):
        prefix = lead[: draw(st.integers(0, len(lead)))]
        lengths = rng.integers(0, max(Q, K) + 2, size=prefix)
    return q, k, v, dict(scale=scale, causal=causal, lengths=lengths)


@HYPOTHESIS
@given(qkv_cases())
def test_attention_weights_match_reference(case):
    q, k, v, kw = case
    w = attention_weights(q, k, **kw)
    assert w.dtype == q.dtype and w.shape == q.shape[:-1] + (k.shape[-2],)
    assert np.isfinite(w).all()
    np.testing.assert_allclose(w, ref.attention_weights(q, k, **kw), **TOL[q.dtype.type])

    masked, fully = row_masks(q.shape[-2], k.shape[-2], kw["lengths"], q.shape[:-2], kw["causal"])
    assert np.all(w[masked] == 0.0)  # masked weights exactly 0, incl. the causal upper triangle
    assert np.all(w[fully] == 0.0)  # fully masked rows: exact zeros, not NaN
    sums = w.sum(axis=-1, dtype=np.float64)
    np.testing.assert_allclose(sums[~fully], 1.0, atol=1e-6 if q.dtype == np.float32 else 1e-12)


@HYPOTHESIS
@given(qkv_cases())
def test_sdpa_matches_reference(case):
    q, k, v, kw = case
    out = sdpa(q, k, v, **kw)
    assert out.dtype == q.dtype and out.shape == q.shape[:-1] + (v.shape[-1],)
    assert np.isfinite(out).all()
    np.testing.assert_allclose(out, ref.sdpa(q, k, v, **kw), **TOL[q.dtype.type])
    _, fully = row_masks(q.shape[-2], k.shape[-2], kw["lengths"], q.shape[:-2], kw["causal"])
    assert np.all(out[fully] == 0.0)


def test_causal_upper_triangle_is_exactly_zero():
    rng = np.random.default_rng(0)
    q = rng.standard_normal((2, 3, 9, 16)).astype(np.float32)
    w = attention_weights(q, q, causal=True)
    assert np.all(np.triu(w, k=1) == 0.0)
    assert np.all(w[..., np.tril(np.ones((9, 9), dtype=bool))] > 0.0)
    np.testing.assert_allclose(w[..., 0, 0], 1.0)  # first query sees only itself


def test_lengths_mask_keys_and_queries():
    rng = np.random.default_rng(1)
    q = rng.standard_normal((3, 2, 6, 8))
    k = rng.standard_normal((3, 2, 7, 8))
    v = rng.standard_normal((3, 2, 7, 5))
    lengths = np.array([6, 1, 0])
    w = attention_weights(q, k, lengths=lengths)
    assert np.all(w[0, :, :, 6:] == 0.0)
    np.testing.assert_allclose(w[0].sum(-1), 1.0, rtol=1e-12)
    assert np.all(w[1, :, 0, 0] == 1.0) and np.all(w[1, :, 1:] == 0.0) and np.all(w[1, :, 0, 1:] == 0.0)
    assert np.all(w[2] == 0.0)  # length 0: every row fully masked
    out = sdpa(q, k, v, lengths=lengths)
    np.testing.assert_array_equal(out[1, :, 0], v[1, :, 0])  # one key with weight 1
    assert np.all(out[1, :, 1:] == 0.0) and np.all(out[2] == 0.0)


def test_large_scores_do_not_overflow():
    rng = np.random.default_rng(2)
    q = (rng.standard_normal((4, 5, 32)) * 100).astype(np.float32)
    k = (rng.standard_normal((4, 6, 32)) * 100).astype(np.float32)
    w = attention_weights(q, k)
    assert np.isfinite(w).all()
    np.testing.assert_allclose(w.sum(-1), 1.0, atol=1e-6)
    np.testing.assert_allclose(w, ref.attention_weights(q, k), **TOL[np.float32])


def test_mixed_dtypes_promote_to_float64():
    rng = np.random.default_rng(3)
    q = rng.standard_normal((2, 4, 8)).astype(np.float32)
    k = rng.standard_normal((2, 4, 8))
    assert attention_weights(q, k).dtype == np.float64
    assert attention_weights(q, q).dtype == np.float32


def test_argument_errors():
    q = np.ones((2, 4, 8))
    with pytest.raises(ValueError):
        attention_weights(q, np.ones((3, 4, 8)))  # leading dims differ
    with pytest.raises(ValueError):
        attention_weights(q, np.ones((2, 4, 7)))  # feature dims differ
    with pytest.raises(ValueError):
        sdpa(q, q, np.ones((2, 5, 3)))  # v keys differ
    with pytest.raises(ValueError):
        attention_weights(q, q, lengths=np.array([4, 4, 4]))
    with pytest.raises(ValueError):
        attention_weights(np.ones(8), np.ones(8))


def _case(seed=4):
    rng = np.random.default_rng(seed)
    q = rng.standard_normal((8, 3, 12, 16)).astype(np.float32)
    k = rng.standard_normal((8, 3, 10, 16)).astype(np.float32)
    v = rng.standard_normal((8, 3, 10, 4)).astype(np.float32)
    return q, k, v, rng.integers(0, 13, size=8)


def test_parallel_serial_and_thread_counts_identical():
    q, k, v, n = _case()
    before = numba.get_num_threads()
    results = []
    try:
        for threads in (1, THREADS):
            numba.set_num_threads(threads)
            results.append((attention_weights(q, k, causal=True, lengths=n), sdpa(q, k, v, lengths=n)))
    finally:
        numba.set_num_threads(before)
    results.append(
        (
            attention_weights(q, k, causal=True, lengths=n, parallel=False),
            sdpa(q, k, v, lengths=n, parallel=False),
        )
    )
    for w, out in results[1:]:
        np.testing.assert_array_equal(w.view(np.uint8), results[0][0].view(np.uint8))  # bit-identical
        np.testing.assert_array_equal(out.view(np.uint8), results[0][1].view(np.uint8))


def test_matches_torch():
    torch = pytest.importorskip("torch")
    F = torch.nn.functional
    q, k, v, _ = _case(5)
    q, k, v = (x.astype(np.float64) for x in (q, k, v))
    lengths = np.array([12, 10, 7, 3, 1, 5, 9, 2])
    keep = np.arange(k.shape[-2])[None, :] < lengths[:, None]  # (B, K) keys that take part
    mask = torch.from_numpy(np.broadcast_to(keep[:, None, None, :], (8, 3, 12, 10)).copy())
    want = F.scaled_dot_product_attention(
        torch.from_numpy(q), torch.from_numpy(k), torch.from_numpy(v), attn_mask=mask
    ).numpy()
    got = sdpa(q, k, v, lengths=lengths)
    b, i = np.nonzero(np.arange(12)[None, :] < lengths[:, None])  # query rows that are not padding
    np.testing.assert_allclose(got[b, :, i], want[b, :, i], rtol=1e-10, atol=1e-12)
    # causal, no lengths: torch's is_causal is top-left aligned like ours
    qc, kc, vc = q[:, :, :10], k, v
    want = F.scaled_dot_product_attention(
        torch.from_numpy(qc.copy()), torch.from_numpy(kc), torch.from_numpy(vc), is_causal=True
    ).numpy()
    np.testing.assert_allclose(sdpa(qc, kc, vc, causal=True), want, rtol=1e-10, atol=1e-12)
    q32, k32 = q.astype(np.float32), k.astype(np.float32)
    t32 = torch.softmax(torch.from_numpy(q32) @ torch.from_numpy(k32).transpose(-1, -2) / 4.0, dim=-1)
    np.testing.assert_allclose(attention_weights(q32, k32), t32.numpy(), atol=1e-5, rtol=1.3e-6)


@pytest.mark.parametrize("low, rtol", [(-1e-3, 3e-16), (-1.0, 5e-16), (-30.0, 2e-15), (-708.0, 4e-14)])
def test_exp_of_shifted_scores_matches_numpy(low, rtol):
    """The kernel's own vectorisable exp against np.exp on fresh random x in [low, 0]."""
    import numba

    from fastattn.kernels.sdpa import _exp_nonpositive

    @numba.njit
    def exp_all(x, out):
        for i in range(x.size):
            out[i] = _exp_nonpositive(x[i])

    x = np.random.default_rng().uniform(low, 0.0, 200_000)
    x[:3] = 0.0, -0.0, low
    got = np.empty_like(x)
    exp_all(x, got)
    np.testing.assert_allclose(got, np.exp(x), rtol=rtol, atol=0)
    below = np.array([-708.5, -745.2, -1e300, -np.inf])
    exp_all(below, got[:4])
    assert (got[:4] == 0.0).all()
