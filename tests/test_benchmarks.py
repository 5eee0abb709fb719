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
FIGURES = {"whole", "whole-long", "kernels", "sdpa", "ingest", "stats", "scaling", "memory", "live"}


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


def _float64_softmax(rng, shape) -> np.ndarray:
    logits = rng.standard_normal(shape)
    w = np.exp(logits - logits.max(-1, keepdims=True))
    return (w / w.sum(-1, keepdims=True)).astype(np.float32)


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
        elif r["unit"] == "max rel. error":  # an exactness check: 0 when the figures agree bit for bit
            assert 0 <= r["fastattn"] <= 1e-6 and r["met"], r
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
    assert [r["unit"] for r in by_figure["live"]] == ["MB", "MB", "MB", "x", "max rel. error"]


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


def test_whole_process_rows(quick_run):
    """The whole-process figures come first and every row has the fields the table promises:
    seconds, baseline, ratio, GB/s, CPU seconds, peak RSS, goal and met."""
    result, stdout, _ = quick_run
    rows = result["rows"]
    assert result["figures"][:2] == ["whole", "whole-long"]
    assert [r["figure"] for r in rows[:11]] == ["whole"] * 6 + ["whole-long"] * 5  # shown first
    whole = [r for r in rows if r["figure"] == "whole"]
    names = [r["name"] for r in whole]
    assert len(whole) == 6, names  # stats: second vs (a), first vs (a), second vs (b); ingest: second, first; help
    # --quick shares one Numba cache, so its first runs are skipped rows that say why
    first = [r for r in whole if "first run" in r["name"]]
    assert len(first) == 2 and all(r.get("skipped") and "--quick" in r["note"] for r in first)
    measured = [r for r in whole if not r.get("skipped")]
    for r in measured + [r for r in rows if r["figure"] == "whole-long" and r["unit"] == "s"]:
        assert r["unit"] == "s" and _positive(r["fastattn"]), r
        assert _positive(r["fastattn_cpu_s"]) and r["fastattn_peak_rss_mb"] > 10, r  # a Python process at least
        assert r["goal"] and r["met"] in (True, False) or not r["goal"] and r["met"] is None, r
        assert all(_positive(t) for t in r["times"]["fastattn"]), r
    compared = [r for r in measured if r["baseline"] is not None]
    assert len(compared) == 3
    for r in compared:
        assert _positive(r["baseline"]) and r["ratio"] == pytest.approx(r["baseline"] / r["fastattn"])
        assert r["fastattn_gb_s"] == pytest.approx(r["nbytes"] / r["fastattn"] / 1e9)
        assert r["baseline_gb_s"] == pytest.approx(r["nbytes"] / r["baseline"] / 1e9)
        assert r["nbytes"] == 10 * 2 * 4 * 32 * 32 * 4  # --quick: 10 dumps of (2, 4, 32, 32) float32
        assert _positive(r["baseline_cpu_s"]) and r["baseline_peak_rss_mb"] > 10
    stats_a = next(r for r in compared if r["name"].startswith("`fastattn stats STORE`, second run, vs the guide"))
    assert stats_a["goal"] == "≤ 1.5 s" and stats_a["met"] == (stats_a["fastattn"] <= 1.5)  # the 10-batch goal
    help_row = next(r for r in measured if "--help" in r["name"])
    assert help_row["baseline"] is None and help_row["met"] == (help_row["fastattn"] <= 0.4)
    long = [r for r in rows if r["figure"] == "whole-long"]
    assert [r["unit"] for r in long] == ["s", "s", "MB", "s", "s"]
    assert all(r["met"] == (r["fastattn_peak_rss_mb"] <= 1000) for r in long[:2])
    chunk = long[2]
    assert chunk["chunk_bytes"] > 0 and chunk["met"] == (chunk["chunk_bytes"] <= 16 << 20)
    figures = long[3:]  # `plot overview` and `report` of one long dump, ≤ 10 s each
    assert [r["name"].split(",")[0] for r in figures] == ["`fastattn plot STORE overview`", "`fastattn report STORE`"]
    assert all(r["met"] == (r["fastattn"] <= 10) for r in figures)
    assert "peak RSS MB" in stdout


def test_run_process_measures_the_child_alone():
    """Peak RSS and CPU are the command's own, not this (bigger) process's: Linux hands a
    child its parent's RSS high-water mark at fork and exec, which a plain
    getrusage(RUSAGE_CHILDREN) here would report."""
    from benchmarks.whole import run_process

    ballast = np.ones(400_000_000 // 8)  # this process: > 400 MB resident
    child = ("import time; b = bytearray(150_000_000); b[::4096] = b'x' * len(b[::4096]); t = time.process_time()\n"
             "while time.process_time() - t < 0.3: pass")
    p = run_process([sys.executable, "-c", child])
    assert 150e6 <= p.peak_rss_bytes < 300e6, p.peak_rss_bytes
    assert 0.3 <= p.cpu_s < 5 and p.seconds >= 0.3
    assert ballast.sum() == ballast.size
    with pytest.raises(RuntimeError, match="exit 3"):
        run_process([sys.executable, "-c", "import sys; sys.exit(3)"])


def test_first_runs_get_an_empty_cache(tmp_path, monkeypatch):
    """Outside --quick each first run gets a new empty folder as both NUMBA_CACHE_DIR and
    XDG_CACHE_HOME, whatever fastattn's default cache is, and fastattn's own caching default."""
    from benchmarks.runner import Config, Context
    from benchmarks.whole import child_env, new_cache

    monkeypatch.setenv("FASTATTN_NUMBA_CACHE", "1")
    ctx = Context(config=Config(), data=tmp_path)
    a, b = new_cache(ctx, "stats"), new_cache(ctx, "stats")
    assert a != b and a.is_dir() and not any(a.iterdir()) and a.is_relative_to(tmp_path / "scratch")
    env = child_env(ctx, a)
    assert env["NUMBA_CACHE_DIR"] == env["XDG_CACHE_HOME"] == str(a) and "FASTATTN_NUMBA_CACHE" not in env
    assert child_env(ctx).get("NUMBA_CACHE_DIR") == os.environ.get("NUMBA_CACHE_DIR")  # baselines: untouched


def test_softmax_dumps(tmp_path, rng):
    """The generator's dumps: float32 softmax rows (sum 1 against float64), the diagonal
    favoured by the bias, written whole by np.savez or streamed plane by plane with the same
    content, cached by their parameters."""
    from benchmarks.runner import Config, Context, softmax_dumps, write_softmax_dump

    ctx = Context(config=Config(), data=tmp_path, log=lambda message: None)
    folder = softmax_dumps(ctx, 3, (2, 3, 16, 16), bias=2.0, seed=5)
    paths = sorted(folder.glob("*.npz"))
    assert len(paths) == 3
    a = np.stack([np.load(p, allow_pickle=False)["attention_weights"] for p in paths])
    assert a.dtype == np.float32 and a.shape == (3, 2, 3, 16, 16)
    np.testing.assert_allclose(a.astype(np.float64).sum(-1), 1.0, atol=1e-5)
    diagonal = np.diagonal(a, axis1=-2, axis2=-1).astype(np.float64)
    off = (a.astype(np.float64).sum(-1) - diagonal) / 15
    assert diagonal.mean() > 3 * off.mean()  # e^2 ≈ 7.4 times a typical key, before normalising
    assert len({p.read_bytes() for p in paths}) == 3  # a different draw per file
    mtimes = [p.stat().st_mtime_ns for p in paths]
    assert softmax_dumps(ctx, 3, (2, 3, 16, 16), bias=2.0, seed=5) == folder  # cached: not rewritten
    assert [p.stat().st_mtime_ns for p in paths] == mtimes
    assert softmax_dumps(ctx, 3, (2, 3, 16, 16), bias=0.0, seed=5) != folder  # keyed by the parameters

    seed = int(rng.integers(1 << 30))
    whole, streamed = tmp_path / "whole.npz", tmp_path / "streamed.npz"
    write_softmax_dump(whole, (2, 3, 24, 24), 2.0, np.random.default_rng(seed), stream=False)
    write_softmax_dump(streamed, (2, 3, 24, 24), 2.0, np.random.default_rng(seed), stream=True)
    with np.load(whole, allow_pickle=False) as w, np.load(streamed, allow_pickle=False) as s:
        assert s.files == w.files == ["attention_weights"]
        np.testing.assert_array_equal(s["attention_weights"], w["attention_weights"])


@pytest.mark.parametrize("source", ["random", "minilm"])
def test_guide_loop_computes_what_it_claims(tmp_path, rng, source):
    """Baseline (a), the guide's loop, against float64 NumPy on fresh random dumps and on the
    real MiniLM samples."""
    from benchmarks import baselines

    if source == "random":
        (tmp_path / "d").mkdir()
        paths = []
        for i in range(4):
            paths.append(str(tmp_path / "d" / f"{i}.npz"))
            np.savez(paths[-1], attention_weights=_float64_softmax(rng, (2, 3, 12, 12)))
    else:
        paths = sorted(str(p) for p in (Path(__file__).parent / "data" / "minilm" / "fixed").glob("*.npz"))
        assert paths
    baselines.main(["guide", str(Path(paths[0]).parent), str(tmp_path / "out.npz")])
    got = np.load(tmp_path / "out.npz", allow_pickle=False)
    a = np.stack([np.load(p, allow_pickle=False)["attention_weights"] for p in paths]).astype(np.float64)
    np.testing.assert_allclose(got["row_sum"], a.sum(-1), rtol=1e-5)
    np.testing.assert_allclose(got["col_sum"], a.sum(-2), rtol=1e-5)
    np.testing.assert_allclose(got["entropy"], -(a * np.log(a + 1e-10)).sum(-1), rtol=1e-4, atol=1e-5)
    top = np.take_along_axis(a, got["top5"].astype(np.int64), -1)
    np.testing.assert_array_equal(np.sort(top, -1), np.sort(a, -1)[..., -5:])
    np.testing.assert_allclose(got["diag_mean"], np.diagonal(a, axis1=-2, axis2=-1).mean(-1), rtol=1e-5)


def test_stats_floor_reads_every_chunk_once(tmp_path, rng):
    """`python -m benchmarks.stats_floor STORE` reads, decodes and computes every attention chunk
    of a store (3 batches x 2 layers, chunks of one batch and layer: 6), and refuses a store it
    cannot read directly (other codecs) with one line."""
    from conftest import batched_dump
    from fastattn import store
    from fastattn.ingest import ingest

    batched_dump(rng, tmp_path / "d" / "a.npz", [9, 5, 7], layers=2, heads=4)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(store.schema, "CHUNK_BYTES", 4 * 9 * 9 * 4)  # one batch's layer a chunk
        ingest([tmp_path / "d"], tmp_path / "s.zarr")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
    run = [sys.executable, "-m", "benchmarks.stats_floor", str(tmp_path / "s.zarr"), "-j", "2"]
    proc = subprocess.run(run, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "then 6 chunks" in proc.stderr and "on 2 threads" in proc.stderr, proc.stderr
    meta = tmp_path / "s.zarr" / "attention" / "zarr.json"
    doc = json.loads(meta.read_text())
    doc["codecs"] = doc["codecs"][:2]  # no checksum: not the store's codecs
    meta.write_text(json.dumps(doc))
    proc = subprocess.run(run, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0 and "not a float32 fastattn store" in proc.stderr and "Traceback" not in proc.stderr
