"""Smoke test of the benchmark runner: `python -m benchmarks --quick` works end to end and its
JSON has every figure with positive times. Goals are not checked here (a loaded CI machine
measures nothing); the numbers live in docs/performance.md."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parent.parent
FIGURES = {"kernels", "sdpa", "ingest", "stats", "scaling", "memory"}


def _positive(value) -> bool:
    return isinstance(value, (int, float)) and value > 0 and np.isfinite(value)


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("bench")
    out = tmp / "results.json"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks", "--quick", "--out", str(out), "--data", str(tmp / "data")],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=900,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return json.loads(out.read_text()), proc.stdout, tmp


def test_every_figure_has_positive_times(quick_run):
    result, _, _ = quick_run
    assert result["quick"] is True
    rows = result["rows"]
    assert {r["figure"] for r in rows} == FIGURES
    assert not any(r.get("error") for r in rows), [r["note"] for r in rows if r.get("error")]
    for r in rows:
        if r.get("skipped"):
            assert r["note"].startswith("skipped:")  # e.g. torch missing: said so in the row
            continue
        if r["figure"] == "scaling":  # a fitted slope: noise at smoke-test sizes may tip it below 0
            assert np.isfinite(r["fastattn"]), r
        else:
            assert _positive(r["fastattn"]), r
        if r["unit"] == "s":
            assert r["baseline"] is None or _positive(r["baseline"]), r
            for side in r.get("times", {}).values():
                assert side and all(_positive(t) for t in side), r
    by_figure = {f: [r for r in rows if r["figure"] == f and not r.get("skipped")] for f in FIGURES}
    for figure in ("ingest", "stats", "sdpa"):
        compared = [r for r in by_figure[figure] if r["unit"] == "s"]
        assert compared and all(_positive(r["baseline"]) and _positive(r["ratio"]) for r in compared), figure
    for figure in ("ingest", "stats", "sdpa"):  # CPU seconds beside wall time (shared machines)
        for r in by_figure[figure]:
            if r["unit"] == "s":
                assert r["fastattn_cpu_s"] >= 0 and r["baseline_cpu_s"] >= 0, r
    ingest = next(r for r in by_figure["ingest"] if r["unit"] == "s")
    assert _positive(ingest["fastattn_mb_s"]) and _positive(ingest["baseline_mb_s"])
    sizes = next(r for r in by_figure["ingest"] if r["unit"] == "MB")
    assert sizes["fastattn_bytes"] > 0 and sizes["baseline_bytes"] > 0
    assert {r["step"] for r in by_figure["scaling"]} == {"ingest", "stats"}
    for r in by_figure["scaling"]:
        assert r["sizes"] == [25, 50, 100] and all(_positive(s) for s in r["seconds"])
        assert -1 <= r["r2"] <= 1
    assert len(by_figure["memory"]) == 2 and all(r["unit"] == "MB" for r in by_figure["memory"])


def test_table_printed_and_scratch_removed(quick_run):
    result, stdout, tmp = quick_run
    assert "figure" in stdout and "ratio" in stdout and "GB/s" in stdout
    for figure in FIGURES:
        assert f"\n{figure}" in stdout
    # cached dumps stay for the next run; stores and the memory corpus do not (no --keep)
    data = tmp / "data"
    assert not (data / "scratch").exists()
    assert not list(data.glob("*.zarr"))
    assert any(p.name.startswith("dumps-") for p in data.iterdir())


def test_interleave_and_fit():
    from benchmarks.ingest_bench import fit_line
    from benchmarks.runner import interleave

    calls = []
    times = interleave({"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}, 3, warmup=1)
    assert calls == ["a", "b"] * 4  # one warm-up round, then A B A B A B
    assert all(len(v) == 3 and all(t >= 0 for t in v) for v in times.values())
    x = np.array([250.0, 500, 1000, 2000])
    slope, intercept, r2 = fit_line(x, 0.002 * x + 1.0)
    assert slope == pytest.approx(0.002) and intercept == pytest.approx(1.0) and r2 == pytest.approx(1.0)


def test_baselines_compute_what_they_claim(tmp_path):
    """Same weights as a float64 softmax, the stated statistics, the dumps' attention stored.
    (The figures also check the kernels against the baselines before timing them.)"""
    import xarray as xr

    from benchmarks import baselines
    from fastattn.synth import synthesize

    rng = np.random.default_rng(0)
    q, k = rng.standard_normal((2, 3, 16, 8), dtype=np.float32), rng.standard_normal((2, 3, 16, 8), dtype=np.float32)
    logits = q.astype(np.float64) @ np.swapaxes(k, -1, -2).astype(np.float64) / np.sqrt(8)
    want = np.exp(logits - logits.max(-1, keepdims=True))
    want /= want.sum(-1, keepdims=True)
    np.testing.assert_allclose(baselines.numpy_attention_weights(q, k), want, atol=1e-6)

    paths = synthesize(tmp_path / "d", files=5, layers=2, heads=3, seq=12, jobs=1)
    baselines.per_file_stats(paths, tmp_path / "s.npz", k=3)
    got = np.load(tmp_path / "s.npz")
    a = np.stack([np.load(p)["attention_weights"] for p in paths]).astype(np.float64)
    np.testing.assert_allclose(got["row_sum"], a.sum(-1), rtol=1e-5)
    np.testing.assert_allclose(got["col_sum"], a.sum(-2), rtol=1e-5)
    xlogx = np.where(a > 0, a * np.log(np.where(a > 0, a, 1)), 0)
    np.testing.assert_allclose(got["entropy"], -xlogx.sum(-1), rtol=1e-4, atol=1e-6)
    assert got["topk_index"].shape == a.shape[:-1] + (3,)
    top = np.take_along_axis(a, got["topk_index"].astype(np.int64), -1)
    np.testing.assert_array_equal(top, np.sort(a, -1)[..., ::-1][..., :3])

    baselines.xarray_ingest(paths, tmp_path / "b.zarr", group_size=2)
    stored = xr.open_zarr(tmp_path / "b.zarr").attention.values
    np.testing.assert_array_equal(stored, a.astype(np.float32))
