"""Corpus analyses (fastattn.corpus, kernels rollout/divergence, cli corpus_cmd) against the
plain float64 references in corpus_reference.py, on random inputs, the real MiniLM samples
and a synthetic corpus whose head roles are known."""

from __future__ import annotations

import json
import shutil
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
import xarray as xr

import corpus_reference as ref
from conftest import SAMPLES, batched_dump, softmax_rows
from fastattn import corpus, ingest, open_store
from fastattn.kernels.divergence import pairwise_js
from fastattn.kernels.rollout import rollout as rollout_kernel

RTOL = 1e-6
PERMUTED = (2, 7)  # the (layer, head) whose keys are shuffled in the permuted copy


def ragged(rng, batches, layers, heads, size, lengths, dtype=np.float32):
    """(batch, layer, head, S, S) softmax rows over each sample's valid keys, NaN outside."""
    att = np.full((batches, layers, heads, size, size), np.nan, dtype=dtype)
    for b, n in enumerate(lengths):
        if n:
            att[b, :, :, :n, :n] = softmax_rows(rng, (layers, heads, n, n), dtype)
    return att


# ---------------------------------------------------------------- stores shared by the tests


def _copy_samples(target: Path) -> Path:
    shutil.copytree(SAMPLES, target)
    (target / "README.md").unlink(missing_ok=True)
    return target


def _permute_one_head(folder: Path, layer: int, head: int, seed: int = 0) -> None:
    """Shuffle the valid keys of one (layer, head) in every dump (rows keep their sums)."""
    rng = np.random.default_rng(seed)
    for path in sorted(folder.rglob("*.npz")):
        with np.load(path) as z:
            arrays = {k: z[k] for k in z.files}
        att = arrays["attention_weights"]
        if att.ndim == 4:
            n = att.shape[-1]
            att[layer, head] = att[layer, head][:, rng.permutation(n)]
        else:
            for b, n in enumerate(arrays["attention_mask"].sum(axis=1)):
                plane = att[layer, b, head]
                plane[:, :n] = plane[:, :n][:, rng.permutation(n)]
        np.savez(path, **arrays)


@pytest.fixture(scope="module")
def real(tmp_path_factory):
    """The MiniLM samples ingested once, with their attention and lengths in memory."""
    root = tmp_path_factory.mktemp("real")
    ingest([str(_copy_samples(root / "dumps"))], str(root / "store.zarr"), jobs=2)
    ds = open_store(root / "store.zarr")
    return {"path": str(root / "store.zarr"), "ds": ds, "att": ds.attention.values, "length": ds.length.values, "root": root}


@pytest.fixture(scope="module")
def permuted(real):
    folder = _copy_samples(real["root"] / "permuted")
    _permute_one_head(folder, *PERMUTED)
    path = real["root"] / "permuted.zarr"
    ingest([str(folder)], str(path), jobs=2)
    return str(path)


@pytest.fixture(scope="module")
def stats_real(real):
    from fastattn.stats import compute_stats

    return compute_stats(real["ds"]).compute()


@pytest.fixture(scope="module")
def random_store(tmp_path_factory):
    """Random ragged batched dumps (lengths 1 to 11, padded keys weighted 0) in a store."""
    rng = np.random.default_rng(7)
    root = tmp_path_factory.mktemp("random")
    batched_dump(rng, root / "dumps" / "a.npz", [11, 3, 1, 8], layers=3, heads=2)
    batched_dump(rng, root / "dumps" / "b.npz", [5, 9, 6], layers=3, heads=2)
    ingest([str(root / "dumps")], str(root / "store.zarr"), jobs=1)
    ds = open_store(root / "store.zarr")
    return {"path": str(root / "store.zarr"), "ds": ds, "att": ds.attention.values, "length": ds.length.values}


# ---------------------------------------------------------------- kernels


def test_rollout_kernel_matches_reference_on_ragged_random_input():
    rng = np.random.default_rng(1)
    lengths = np.array([9, 5, 1, 0, 7, 9])
    att = ragged(rng, 6, 3, 4, 9, lengths)
    incoming, matrix = rollout_kernel(att, lengths, keep_matrix=True, parallel=False)
    want_incoming, want_matrix = ref.rollout(att, lengths)
    np.testing.assert_allclose(incoming, want_incoming, rtol=1e-12, equal_nan=True)
    np.testing.assert_allclose(matrix, want_matrix, rtol=1e-12, equal_nan=True)
    # rows of every R_l sum to 1, the incoming shares too; NaN exactly outside the valid block
    for b, n in enumerate(lengths):
        if n:
            np.testing.assert_allclose(matrix[b, :, :n, :n].sum(-1), 1.0, rtol=1e-12)
            np.testing.assert_allclose(incoming[b, :, :n].sum(-1), 1.0, rtol=1e-12)
        assert np.isnan(incoming[b, :, n:]).all() and not np.isnan(incoming[b, :, :n]).any()
    # whole samples per thread: the parallel variant is bit-identical
    par, _ = rollout_kernel(att, lengths, parallel=True)
    np.testing.assert_array_equal(par, incoming)
    # padding is never read
    att[np.isnan(att)] = 123.0
    again, _ = rollout_kernel(att, lengths, parallel=False)
    np.testing.assert_array_equal(again, incoming)


def test_rollout_kernel_rejects_cross_attention():
    with pytest.raises(ValueError, match="query == key"):
        rollout_kernel(np.ones((1, 2, 2, 3, 4), np.float32) / 4)


def test_pairwise_js_kernel_matches_reference():
    rng = np.random.default_rng(2)
    lengths = np.array([8, 3, 1, 0, 8])
    att = ragged(rng, 5, 2, 3, 8, lengths)
    got = pairwise_js(att.reshape(5, 6, 8, 8), lengths, parallel=False)
    want = ref.head_similarity(att, lengths, eps=1e-3, per_batch=True)
    ok = lengths > 0
    np.testing.assert_allclose(got[ok], want[ok], rtol=1e-10, atol=1e-15)
    assert np.isnan(got[~ok]).all()
    for m in got[ok]:
        np.testing.assert_array_equal(m, m.T)
        np.testing.assert_array_equal(np.diag(m), 0.0)
        assert (m >= 0).all() and (m <= np.log(2)).all()
    np.testing.assert_array_equal(pairwise_js(att.reshape(5, 6, 8, 8), lengths, parallel=True), got)
    # identical heads have exactly zero divergence; eps = 0 copes with zero weights
    same = np.zeros((1, 2, 4, 4), np.float32)
    same[0, :, :, 0] = 1.0
    np.testing.assert_array_equal(pairwise_js(same, eps=0.0, parallel=False), 0.0)
    one_hot = np.zeros((1, 2, 1, 2), np.float32)
    one_hot[0, 0, 0, 0] = one_hot[0, 1, 0, 1] = 1.0
    np.testing.assert_allclose(pairwise_js(one_hot, eps=0.0, parallel=False)[0, 0, 1], np.log(2), rtol=1e-15)


# ---------------------------------------------------------------- rollout


@pytest.mark.parametrize("which", ["real", "random_store"])
def test_rollout_of_a_store_matches_reference(which, request):
    data = request.getfixturevalue(which)
    r = corpus.rollout(data["ds"], keep_matrix=True)
    assert r.rollout_incoming.chunks is not None  # lazy
    r = r.compute()
    assert r.rollout_incoming.dims == ("batch", "layer", "key")
    assert r.rollout.dims == ("batch", "layer", "query", "key")
    want_incoming, want_matrix = ref.rollout(data["att"], data["length"])
    np.testing.assert_allclose(r.rollout_incoming.values, want_incoming, rtol=RTOL, equal_nan=True)
    np.testing.assert_allclose(r.rollout.values, want_matrix, rtol=RTOL, equal_nan=True)
    assert "rollout" not in corpus.rollout(data["ds"])


def test_rollout_on_minilm_concentrates_on_cls(real):
    rows = corpus.rollout_summary(corpus.rollout(real["ds"]).compute())
    first = [r["first_key"] for r in rows]
    assert all(a < b for a, b in zip(first, first[1:]))  # [CLS] gathers more with depth
    assert first[-1] > 0.4 and all(r["top_key"] == 0 for r in rows)


# ---------------------------------------------------------------- head similarity and MDS


@pytest.mark.parametrize("which", ["real", "random_store"])
def test_head_similarity_matches_reference(which, request):
    data = request.getfixturevalue(which)
    sim = corpus.head_similarity(data["ds"])
    assert sim.js.chunks is not None
    sim = sim.compute()
    want = ref.head_similarity(data["att"], data["length"], eps=1e-3)
    np.testing.assert_allclose(sim.js.values, want, rtol=RTOL, atol=1e-15)
    np.testing.assert_array_equal(sim.js.values, sim.js.values.T)
    np.testing.assert_array_equal(np.diag(sim.js.values), 0.0)
    layers, heads = data["att"].shape[1:3]
    assert list(sim.a_label.values[:2]) == ["L0H0", "L0H1"] and sim.a_layer.values[-1] == layers - 1
    assert sim.attrs["eps"] == 1e-3 and sim.js.sizes["head_a"] == layers * heads


def test_mds_matches_reference_and_recovers_euclidean_points(real):
    sim = corpus.head_similarity(real["ds"]).compute()
    got = corpus.mds(sim)
    np.testing.assert_allclose(got, ref.mds(sim.js.values), rtol=RTOL, atol=1e-12)
    # squared distances of points in the plane are reproduced exactly (up to rotation)
    points = np.random.default_rng(3).standard_normal((9, 2))
    d2 = ((points[:, None] - points[None]) ** 2).sum(-1)
    xy = corpus.mds(d2)
    np.testing.assert_allclose(((xy[:, None] - xy[None]) ** 2).sum(-1), d2, atol=1e-10)


def test_head_map_is_a_figure_with_labels(real, stats_real, tmp_path):
    from matplotlib.figure import Figure

    sim = corpus.head_similarity(real["ds"]).compute()
    fig = corpus.head_map(sim, stats_real)
    assert isinstance(fig, Figure)
    texts = {t.get_text() for t in fig.axes[0].texts}
    assert {"L0H0", "L5H11", "L0H2"} <= texts
    assert len(fig.axes) == 2  # the scatter and the layer colour bar
    sizes = fig.axes[0].collections[0].get_sizes()
    assert sizes.min() < sizes.max()  # marker size follows mean entropy
    fig.savefig(tmp_path / "map.png")
    assert (tmp_path / "map.png").stat().st_size > 1000


# ---------------------------------------------------------------- compatibility with Clark et al. 2019


@pytest.mark.parametrize("which", ["real", "random_store"])
def test_token_weighted_js_equals_clark_head_distances(which, request):
    data = request.getfixturevalue(which)
    sim = corpus.head_similarity(data["ds"], weight="token", per_batch=True).compute()
    total, tokens = ref.clark_head_distances(data["att"], data["length"])
    np.testing.assert_allclose(sim.js.values, total / tokens, rtol=RTOL, atol=1e-15)
    assert sim.attrs["weight"] == "token"
    per = sim.js_batch.values  # each sample's own mean, whatever the weight
    np.testing.assert_allclose(per, ref.head_similarity(data["att"], data["length"], per_batch=True), rtol=RTOL, atol=1e-15)
    sample = corpus.head_similarity(data["ds"]).compute().js.values
    off = ~np.eye(len(sample), dtype=bool)
    gap = np.abs(sim.js.values - sample)[off] / sample[off]
    if which == "random_store":  # ragged lengths 1 to 11: the two averages differ
        assert gap.max() > 0.05
    with pytest.raises(corpus.FastattnError, match="weight must be one of sample, token"):
        corpus.head_similarity(data["ds"], weight="tokens")


@pytest.mark.parametrize("which", ["real", "random_store"])
def test_entropy_smoothing_equals_clark_entropies(which, request):
    data = request.getfixturevalue(which)
    n = data["length"]
    st = corpus.corpus_stats(data["ds"], entropy_smoothing=1e-4)
    assert st.attrs["entropy_smoothing"] == 1e-4
    got = st["entropy_mean"].compute().values
    np.testing.assert_allclose(np.nanmean(got[n > 0], axis=0), ref.clark_entropies(data["att"], n), rtol=1e-6)
    norm = st["entropy_norm"].compute().values[n > 1]
    np.testing.assert_allclose(norm, got[n > 1] / np.log(n[n > 1])[:, None, None], rtol=1e-12)
    # s = 0 is the exact entropy of the statistics; the smoothing changes what is near one-hot
    exact = corpus.smoothed_entropy(data["ds"], 0.0).compute()
    plain = ref.plane_stats(data["att"], n)
    np.testing.assert_allclose(exact.entropy_mean.values, plain["entropy_mean"], rtol=1e-9, equal_nan=True)
    np.testing.assert_allclose(corpus.corpus_stats(data["ds"])["entropy_mean"].values, plain["entropy_mean"], rtol=1e-6, equal_nan=True)
    assert np.nanmax(got - plain["entropy_mean"]) > 1e-4
    with pytest.raises(corpus.FastattnError, match="entropy_smoothing must be in"):
        corpus.corpus_stats(data["ds"], entropy_smoothing=1.0)


def test_entropy_smoothing_reaches_every_analysis_that_reports_entropy(real, stats_real, permuted):
    """Roles, compare and the streaming summary all report the smoothed entropy on request;
    statistics alone (no attention) cannot give it."""
    n = real["length"]
    clark = ref.clark_entropies(real["att"], n)
    smoothed = corpus.corpus_stats(real["path"], entropy_smoothing=1e-4)
    rows = corpus.head_roles(smoothed)
    want = np.nanmean(smoothed["entropy_norm"].compute().values, axis=0).ravel()
    np.testing.assert_allclose([r["entropy"] for r in rows], want, rtol=1e-12)
    summary = corpus.streaming_summary(real["path"], entropy_smoothing=1e-4)
    np.testing.assert_allclose(summary.entropy_mean.values, clark, rtol=1e-6)
    assert summary.attrs["entropy_smoothing"] == 1e-4
    cmp = corpus.compare(real["path"], permuted, entropy_smoothing=1e-4)
    np.testing.assert_allclose(cmp.entropy_a.values, clark, rtol=1e-6)
    assert cmp.attrs["entropy_smoothing"] == 1e-4
    # L0H2 (previous-token, near one-hot): the "up to 40% apart"
    plain = stats_real["entropy_mean"].mean("batch").values
    assert 0.3 < clark[0, 2] / plain[0, 2] - 1 < 0.5
    with pytest.raises(corpus.FastattnError, match="needs the attention"):
        corpus.corpus_stats(stats_real, entropy_smoothing=1e-4)


def _ranks(x):
    order = np.argsort(x, kind="stable")
    r = np.empty(len(x))
    r[order] = np.arange(len(x))
    return r


def test_smacof_keeps_distances_better_than_classical_mds(real):
    sim = corpus.head_similarity(real["ds"]).compute()
    js = sim.js.values
    xy = corpus.mds(sim, method="smacof")
    assert xy.shape == (72, 2)
    # converged SMACOF of JS itself (Clark et al.'s dissimilarity): a fixed point of the Guttman transform
    step = ref.guttman_transform(xy, js)
    assert np.abs(step - xy).max() < 1e-4 * np.abs(xy).max()  # 1,000 iterations leave ~1e-5
    assert np.abs(ref.guttman_transform(xy, np.sqrt(js)) - xy).max() > 0.1 * np.abs(xy).max()  # not of sqrt(JS)
    fit = corpus.stress(sim, xy, "smacof")
    np.testing.assert_allclose(fit, ref.stress1(xy, js), rtol=1e-12)
    classical = corpus.mds(sim)
    np.testing.assert_allclose(corpus.stress(sim, classical), ref.stress1(classical, np.sqrt(js)), rtol=1e-12)
    assert fit < ref.stress1(classical * np.sqrt(js).sum() / js.sum(), js)  # even rescaled, classical fits JS worse
    # rank agreement of 2-D and true distances (the issue: Spearman 0.77 classical, 0.92 SMACOF)
    upper = np.triu_indices(72, 1)

    def spearman(coords, target):
        d = np.sqrt(((coords[:, None] - coords[None]) ** 2).sum(-1))[upper]
        return np.corrcoef(_ranks(d), _ranks(target[upper]))[0, 1]

    assert spearman(xy, js) > 0.88 and spearman(classical, np.sqrt(js)) < 0.8
    # points in the plane: their distances are recovered
    points = np.random.default_rng(5).standard_normal((12, 2))
    d = np.sqrt(((points[:, None] - points[None]) ** 2).sum(-1))
    got = corpus.mds(d, method="smacof")
    np.testing.assert_allclose(np.sqrt(((got[:, None] - got[None]) ** 2).sum(-1)), d, rtol=1e-3)  # converges linearly
    assert corpus.stress(d, got, "smacof") < 1e-4
    with pytest.raises(corpus.FastattnError, match="method must be one of classical, smacof"):
        corpus.mds(sim, method="sammon")


def test_smacof_without_scikit_learn_is_one_line(real, cli, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "sklearn.manifold", None)  # import fails as if not installed
    with pytest.raises(corpus.FastattnError, match=r"needs scikit-learn: pip install 'fastattn\[compat\]'"):
        corpus.mds(np.ones((3, 3)) - np.eye(3), method="smacof")
    result = cli("similarity", real["path"], "--mds", "smacof", "--batches", 1)
    assert result.exit_code == 1 and result.output.strip().count("\n") == 0
    assert "error: metric MDS (method='smacof') needs scikit-learn" in result.output


# ---------------------------------------------------------------- compare


def test_compare_a_store_with_itself_changes_nothing(real):
    cmp = corpus.compare(real["path"], real["path"])
    for name in corpus.CHANGE_FIELDS:
        np.testing.assert_array_equal(cmp[name].values, 0.0, err_msg=name)
    assert cmp.attrs["batches"] == len(real["length"])
    same = corpus.compare(real["ds"], real["path"], match="source")
    np.testing.assert_array_equal(same["score"].values, 0.0)


def test_compare_ranks_the_permuted_head_first_and_matches_reference(real, permuted):
    cmp = corpus.compare(real["path"], permuted)
    rows = corpus.ranked_changes(cmp)
    assert (rows[0]["layer"], rows[0]["head"]) == PERMUTED and rows[0]["score"] > 0.1
    assert all(r["score"] == 0.0 for r in rows[1:])
    perm_ds = open_store(permuted)
    pa = ref.plane_stats(real["att"], real["length"])
    pb = ref.plane_stats(perm_ds.attention.values, perm_ds.length.values)
    want = ref.compare(pa, pb)
    for name in ("d_entropy", "d_entropy_norm", "d_self"):  # differences of float32 statistics
        np.testing.assert_allclose(cmp[name].values, want[name], rtol=RTOL, atol=1e-6, err_msg=name)
    for name in ("peak_tv", "incoming_js", "score"):
        np.testing.assert_allclose(cmp[name].values, want[name], rtol=RTOL, atol=1e-9, err_msg=name)
    assert len(corpus.ranked_changes(cmp, top=3)) == 3


def test_compare_core_matches_reference_on_random_statistics(random_store):
    """compare_stats on plain-NumPy statistics (no stats kernels), different key sizes."""
    rng = np.random.default_rng(5)
    att = random_store["att"]
    lengths = random_store["length"]
    other = ragged(rng, len(lengths), 3, 2, 13, np.minimum(lengths + 2, 13))
    other_len = np.minimum(lengths + 2, 13)

    def as_dataset(ps):
        dims = ("batch", "layer", "head")
        return xr.Dataset({
            **{k: (dims, ps[k]) for k in ("entropy_mean", "entropy_norm", "self_attention", "peak_key")},
            "col_sum": (dims + ("key",), ps["col_sum"]),
        })

    pa, pb = ref.plane_stats(att, lengths), ref.plane_stats(other, other_len)
    got = corpus.compare_stats(as_dataset(pa), as_dataset(pb))
    want = ref.compare(pa, pb)
    for name in want:
        np.testing.assert_allclose(got[name].values, want[name], rtol=1e-12, atol=1e-15, err_msg=name)


def test_match_batches_by_position_and_by_source():
    a = xr.Dataset({"source": ("batch", ["x.npz", "x.npz", "y.npz", "z.npz"]), "source_index": ("batch", [0, 1, 0, 0])})
    b = xr.Dataset({"source": ("batch", ["y.npz", "x.npz", "w.npz", "x.npz"]), "source_index": ("batch", [0, 1, 0, 0])})
    ia, ib = corpus.match_batches(a, b, "source")
    assert ia.tolist() == [0, 1, 2] and ib.tolist() == [3, 1, 0]
    ia, ib = corpus.match_batches(a, b.isel(batch=slice(0, 3)), "position")
    assert ia.tolist() == ib.tolist() == [0, 1, 2]
    with pytest.raises(Exception, match="match must be"):
        corpus.match_batches(a, b, "name")


def test_compare_by_source_pairs_reordered_stores(real, tmp_path):
    """B holds the fixed/ dumps only (A's last 3 batches, after batched/): by source they
    pair exactly; by position A's first 3 batches (other texts) pair with them."""
    folder = tmp_path / "b"
    shutil.copytree(SAMPLES / "fixed", folder / "fixed")
    ingest([str(folder)], str(tmp_path / "b.zarr"), jobs=1)
    b = str(tmp_path / "b.zarr")
    assert list(real["ds"].source.values[-3:]) == list(open_store(b).source.values)
    by_source = corpus.compare(real["path"], b, match="source")
    assert by_source.attrs["batches"] == 3
    np.testing.assert_array_equal(by_source["score"].values, 0.0)
    by_position = corpus.compare(real["path"], b)
    assert by_position.attrs["batches"] == 3 and by_position["score"].values.min() > 0


def test_compare_map_is_a_heatmap(real, permuted):
    cmp = corpus.compare(real["path"], permuted)
    fig = corpus.compare_map(cmp)
    image = fig.axes[0].images[0].get_array()
    assert image.shape == (6, 12) and np.argmax(image) == PERMUTED[0] * 12 + PERMUTED[1]
    corpus.compare_map(cmp, "d_self")


# ---------------------------------------------------------------- roles


def test_roles_match_the_reference_rules_on_minilm(real, stats_real):
    rows = corpus.head_roles(stats_real)
    got = np.array([r["role"] for r in rows], dtype=object).reshape(6, 12)
    want, support = ref.roles(real["att"], real["length"])
    np.testing.assert_array_equal(got, want)
    np.testing.assert_allclose(np.array([r["support"] for r in rows]).reshape(6, 12), support, rtol=1e-12)
    # what a BERT model is known for: a previous-token head in layer 0, a next-token head
    # early, [CLS] sinks in the middle layers, broad heads in layer 0
    assert got[0, 2] == "previous-token" and got[1, 8] == "next-token"
    assert (got[1:5] == "first-token").mean() > 0.8
    assert (got[0] == "broad").sum() >= 6
    blocks = corpus.head_roles(stats_real, batch_chunk=3)  # block by block, same answer
    for a, b in zip(blocks, rows):
        assert {k: a[k] for k in ("role", "support", "shares", "batches")} == {k: b[k] for k in ("role", "support", "shares", "batches")}
        np.testing.assert_allclose([a[k] for k in corpus.EVIDENCE], [b[k] for k in corpus.EVIDENCE], rtol=1e-12)
    row = rows[2]
    assert row["label"] == "L0H2" and row["support"] == 1.0 and row["prev_token"] > 0.95 and row["batches"] == 11
    assert row["prev_argmax"] == 1.0  # its top key is q - 1 for every query
    json.dumps(rows)  # plain data


def test_role_evidence_is_the_attention_mass_with_the_argmax_share_beside_it(real, stats_real):
    """Every number the rules test, and the argmax shares, per batch, against the reference."""
    ev = corpus.role_evidence(stats_real)
    ps = ref.plane_stats(real["att"], real["length"])
    for name in corpus.EVIDENCE:
        want = ps[{"distance": "distance_mean", "entropy": "entropy_norm"}.get(name, name)]
        np.testing.assert_allclose(ev[name].values, want, rtol=1e-6, atol=1e-9, err_msg=name)
    # the mean evidence of a head is the mean over its classified batches
    rows = corpus.head_roles(stats_real)
    np.testing.assert_allclose([r["prev_token"] for r in rows], ps["prev_token"].mean(axis=0).ravel(), rtol=1e-6)
    np.testing.assert_allclose([r["next_argmax"] for r in rows], ps["next_argmax"].mean(axis=0).ravel(), rtol=1e-12)


def test_role_masses_equal_clark_and_transformer_lens(real, random_store, stats_real):
    """prev/next/self/first/last masses averaged over samples are Clark et al.'s left/right/self
    and [CLS]/[SEP] averages and TransformerLens's previous-token score (to 1e-6)."""
    from fastattn.stats import compute_stats

    for data, st in ((real, stats_real), (random_store, compute_stats(random_store["ds"]).compute())):
        n = data["length"]
        ev = corpus.role_evidence(st)
        mean = {name: np.nanmean(np.where((n > 0)[:, None, None], ev[name].values, np.nan), axis=0)
                for name in corpus.MASS_EVIDENCE}
        clark = ref.clark_average_attention(data["att"], n)
        np.testing.assert_allclose(mean["prev_token"], clark["left"], rtol=1e-6, atol=1e-12)
        np.testing.assert_allclose(mean["next_token"], clark["right"], rtol=1e-6, atol=1e-12)
        np.testing.assert_allclose(mean["self_attention"], clark["self"], rtol=1e-6, atol=1e-12)
        np.testing.assert_allclose(mean["first_token"], clark["first"], rtol=1e-6, atol=1e-12)
        np.testing.assert_allclose(mean["last_token"], clark["last"], rtol=1e-6, atol=1e-12)
        longer = n > 1  # TransformerLens needs two tokens
        tl = np.nanmean(np.where(longer[:, None, None], ev["prev_token"].values, np.nan), axis=0)
        np.testing.assert_allclose(tl, ref.transformer_lens_previous_token(data["att"], n), rtol=1e-6, atol=1e-12)


def test_role_thresholds_separate_the_positional_heads(real, stats_real, tmp_path):
    """POSITION_MASS = 0.5 (Clark et al.'s threshold) on MiniLM and on synthetic heads: the
    positional heads sit far above it, every other head far below, in every batch."""
    ev = corpus.role_evidence(stats_real)
    low, high = ev.min("batch"), ev.max("batch")
    prev, nxt = ev["prev_token"].mean("batch").values, ev["next_token"].mean("batch").values
    assert {tuple(x) for x in np.argwhere(prev >= corpus.POSITION_MASS)} == {(0, 2)}
    assert {tuple(x) for x in np.argwhere(nxt >= corpus.POSITION_MASS)} == {(1, 8)}
    assert low["prev_token"].values[0, 2] > 0.9 and low["next_token"].values[1, 8] > 0.55
    others = np.ones((6, 12), dtype=bool)
    others[0, 2] = others[1, 8] = others[2, 11] = False
    assert high["prev_token"].values[others].max() < 0.45 and high["next_token"].values[others].max() < 0.45
    assert high["self_attention"].values.max() < 0.3  # no self head in this model
    # the borderline head: L2H11 splits its attention between q - 1 (0.43) and [CLS] (0.42);
    # one batch of 11 crosses 0.5, so the head is a first-token head, as its mass says
    rows = corpus.head_roles(stats_real)
    assert 0.4 < prev[2, 11] < 0.45 and rows[35]["label"] == "L2H11" and rows[35]["role"] == "first-token"
    assert rows[35]["shares"]["previous-token"] == 1 / 11
    # the argmax share alone would call L0H5 half a previous-token head; its mass is 0.3
    assert ev["prev_argmax"].values[:, 0, 5].mean() > 0.4 and ev["prev_token"].values[:, 0, 5].mean() < 0.35
    assert rows[5]["label"] == "L0H5" and rows[5]["role"] != "previous-token"

    from fastattn.stats import compute_stats
    from fastattn.synth import head_roles as truth_roles
    from fastattn.synth import synthesize

    synthesize(tmp_path / "dumps", files=4, layers=2, heads=6, seq="12-40", batch=2, seed=0, jobs=2)
    ingest([str(tmp_path / "dumps")], str(tmp_path / "s.zarr"), jobs=2)
    ev = corpus.role_evidence(compute_stats(open_store(tmp_path / "s.zarr")))
    truth = truth_roles(2, 6, 0)
    for name, role in (("prev_token", "previous-token"), ("self_attention", "self")):
        values = ev[name].values
        assert values[:, truth == role].min() > 0.75, name
        assert values[:, truth != role].max() < 0.2, name
    assert ev["next_token"].values.max() < 0.2


def test_roles_on_random_ragged_store_match_reference(random_store):
    from fastattn.stats import compute_stats

    st = compute_stats(random_store["ds"])
    rows = corpus.head_roles(st, share=0.3)
    want, support = ref.roles(random_store["att"], random_store["length"], share=0.3)
    np.testing.assert_array_equal(np.array([r["role"] for r in rows], dtype=object).reshape(want.shape), want)
    assert {r["batches"] for r in rows} == {5}  # lengths 1 and 3 are not classified
    labels = corpus.batch_roles(st).values
    assert (labels[random_store["length"] < corpus.MIN_LENGTH] == -2).all()


def test_roles_recover_the_synthetic_heads(tmp_path):
    from fastattn.stats import compute_stats
    from fastattn.synth import head_roles as truth_roles
    from fastattn.synth import synthesize

    synthesize(tmp_path / "dumps", files=8, layers=2, heads=6, seq="20-40", batch=2, seed=0, jobs=2)
    ingest([str(tmp_path / "dumps")], str(tmp_path / "s.zarr"), jobs=2)
    ds = open_store(tmp_path / "s.zarr")
    rows = corpus.head_roles(compute_stats(ds))
    truth = truth_roles(2, 6, 0)
    assert set(truth.ravel()) == {"previous-token", "self", "first-token", "single-key", "broad"}
    assert set(truth.ravel()) <= set(corpus.ROLES)  # synth names each head as the roles do
    got = np.array([r["role"] for r in rows], dtype=object).reshape(2, 6)
    np.testing.assert_array_equal(got, truth)
    assert min(r["support"] for r in rows) >= 0.8
    want, _ = ref.roles(ds.attention.values, ds.length.values)
    np.testing.assert_array_equal(got, want)


# ---------------------------------------------------------------- streaming summaries


def _random_stats(rng, batches, layers=3, heads=4, keys=10, chunk=None):
    entropy = rng.gamma(2.0, 1.0, (batches, layers, heads))
    norm = rng.uniform(0, 1, (batches, layers, heads))
    norm[rng.uniform(size=norm.shape) < 0.05] = np.nan
    norm[0, 0, 0] = 1.0  # the closed last bin
    peak = rng.integers(0, keys, (batches, layers, heads))
    dims = ("batch", "layer", "head")
    ds = xr.Dataset(
        {"entropy_mean": (dims, entropy), "entropy_norm": (dims, norm), "peak_key": (dims, peak)},
        coords={"key": np.arange(keys)},
    )
    return ds.chunk({"batch": chunk}) if chunk else ds


def _assert_summary(got: xr.Dataset, want: dict) -> None:
    for name, value in want.items():
        np.testing.assert_allclose(got[name].values, value, rtol=1e-12, atol=1e-12, err_msg=name)


def test_merged_chunk_accumulators_equal_one_shot_numpy():
    rng = np.random.default_rng(11)
    st = _random_stats(rng, 257)
    want = ref.summary(st.entropy_mean.values, st.entropy_norm.values, st.peak_key.values, bins=7, keys=10)
    for chunk in (1, 10, 64, 1000):
        _assert_summary(corpus.streaming_summary(st, bins=7, batch_chunk=chunk), want)
    # accumulators of uneven pieces, merged in any grouping, give the same answer
    edges = np.linspace(0, 1, 8)
    cuts = [0, 3, 4, 100, 180, 257]
    parts = []
    for lo, hi in zip(cuts, cuts[1:]):
        block = st.isel(batch=slice(lo, hi))
        parts.append(corpus.SummaryAccumulator(edges, 10).update(
            block.entropy_mean.values, block.entropy_norm.values, block.peak_key.values))
    left = parts[0]
    for p in parts[1:]:
        left = left.merge(p)
    right = parts[-1]
    for p in reversed(parts[:-1]):
        right = p.merge(right)
    _assert_summary(left.result(), want)
    _assert_summary(right.result(), want)
    assert left.result().attrs["batches"] == 257
    # Moments alone: Chan's merge equals the two-pass moments of the whole
    x = rng.standard_normal((50, 3)) * 1e3 + 1e6
    m = corpus.Moments.of(x[:17]).merge(corpus.Moments.of(x[17:]))
    np.testing.assert_allclose(m.mean, x.mean(0), rtol=1e-14)
    np.testing.assert_allclose(m.variance, x.var(0), rtol=1e-9)


def test_streaming_summary_reads_one_chunk_at_a_time():
    """By construction: the statistics are a lazy dask array far larger than what the pass
    may hold; every block computed is at most one chunk, and the peak memory stays a small
    fraction of the whole."""
    import dask.array as da

    batches, chunk, layers, heads = 150_000, 2_000, 6, 12
    seen = []

    def block(x, block_info=None):
        seen.append(x.shape[0])
        return x

    shape, chunks = (batches, layers, heads), (chunk, layers, heads)
    state = da.random.default_rng(0)
    entropy = state.gamma(2.0, 1.0, shape, chunks=chunks).map_blocks(block, dtype=float)
    norm = state.uniform(0.0, 1.0, shape, chunks=chunks)
    peak = state.integers(0, 64, shape, chunks=chunks)
    dims = ("batch", "layer", "head")
    st = xr.Dataset({"entropy_mean": (dims, entropy), "entropy_norm": (dims, norm), "peak_key": (dims, peak)},
                    coords={"key": np.arange(64)})
    whole = 3 * batches * layers * heads * 8
    step = corpus._batch_step(st, corpus.SUMMARY_VARS, None)  # the default block: whole chunks
    assert step % chunk == 0 and step * whole // batches <= corpus.BLOCK_BYTES
    tracemalloc.start()
    try:
        out = corpus.streaming_summary(st, bins=10, batch_chunk=chunk)
        _, peak_bytes = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert max(seen) <= chunk and sum(seen) == batches
    assert peak_bytes < whole / 5, (peak_bytes, whole)
    assert int(out["count"].values.max()) == batches and out.attrs["batches"] == batches


def test_streaming_summary_of_a_store_matches_reference(real):
    from fastattn.stats import open_stats, write_stats

    path = str(real["root"] / "summary.zarr")
    shutil.copytree(real["path"], path)
    write_stats(path)
    st = open_stats(path)
    got = corpus.streaming_summary(path, bins=12)
    want = ref.summary(st.entropy_mean.values.astype(float), st.entropy_norm.values.astype(float),
                       st.peak_key.values, bins=12, keys=st.sizes["key"])
    _assert_summary(got, want)
    assert got.peak_key_hist.sum("key").values.min() == 11
    # the committed statistics serve roles and compare too
    assert corpus.corpus_stats(path).attrs.get("k") == 5  # open_stats, not recomputed
    want_roles, _ = ref.roles(real["att"], real["length"])
    got_roles = [r["role"] for r in corpus.head_roles(corpus.corpus_stats(path))]
    np.testing.assert_array_equal(np.array(got_roles, dtype=object).reshape(6, 12), want_roles)
    np.testing.assert_array_equal(corpus.compare(path, real["path"], match="source")["score"].values, 0.0)


# ---------------------------------------------------------------- CLI


def test_cli_compare(cli, real, permuted, tmp_path):
    result = cli("compare", real["path"], permuted, "--format", "json", "--top", "3", "--plot", tmp_path / "c.png")
    assert result.exit_code == 0, result.output
    body = json.loads(result.stdout)
    assert [h["label"] for h in body["heads"]][0] == "L2H7" and len(body["heads"]) == 3
    assert body["match"] == "position" and body["batches"] == 11
    assert (tmp_path / "c.png").stat().st_size > 1000
    table = cli("compare", real["path"], real["path"], "--match", "source")
    assert table.exit_code == 0 and "L0H0" in table.stdout and "0.000" in table.stdout
    bad = cli("compare", real["path"], tmp_path / "missing.zarr")
    assert bad.exit_code == 1 and bad.output.strip().count("\n") == 0 and "no such store" in bad.output
    wrong = cli("compare", real["path"], real["path"], "--match", "name")  # a choice: click's usage error
    assert wrong.exit_code == 2 and "'name' is not one of 'position', 'source'" in wrong.output
    clark = json.loads(cli("compare", real["path"], permuted, "--format", "json", "--entropy-smoothing", "1e-4").stdout)
    assert clark["entropy_smoothing"] == 1e-4
    np.testing.assert_allclose({h["label"]: h["entropy_a"] for h in clark["heads"]}["L2H7"],
                               ref.clark_entropies(real["att"], real["length"])[2, 7], rtol=1e-6)
    assert cli("compare", real["path"], real["path"], "--plot", tmp_path / "c.bmp").exit_code == 1


def test_cli_roles(cli, real):
    result = cli("roles", real["path"], "--format", "json")
    assert result.exit_code == 0, result.output
    body = json.loads(result.stdout)
    roles = {h["label"]: h["role"] for h in body["heads"]}
    assert roles["L0H2"] == "previous-token" and roles["L1H8"] == "next-token"
    assert body["thresholds"]["position_mass"] == corpus.POSITION_MASS and body["entropy_smoothing"] == 0.0
    ps = ref.plane_stats(real["att"], real["length"])
    heads = {h["label"]: h for h in body["heads"]}
    for name in ("prev_token", "prev_argmax", "next_token", "next_argmax", "self_attention", "self_argmax"):
        np.testing.assert_allclose(heads["L1H8"][name], ps[name][:, 1, 8].mean(), rtol=1e-6, err_msg=name)
    table = cli("roles", real["path"])
    assert table.exit_code == 0 and "first-token" in table.stdout and "roles:" in table.stdout
    assert "mass/argmax" in table.stdout
    smoothed = json.loads(cli("roles", real["path"], "--format", "json", "--entropy-smoothing", "1e-4").stdout)
    assert smoothed["entropy_smoothing"] == 1e-4
    plain, clark = heads["L0H2"]["entropy"], {h["label"]: h for h in smoothed["heads"]}["L0H2"]["entropy"]
    assert clark > 1.3 * plain > 0  # the near-one-hot previous-token head: tens of percent apart
    helps = " ".join(
        (cli("roles", "--help").stdout + cli("similarity", "--help").stdout + cli("compare", "--help").stdout)
        .replace("│", " ").split()
    )  # the help of every option names the paper it matches
    assert helps.count("Clark et al. 2019") >= 7 and "TransformerLens" in helps and "Voita et al. 2019" in helps


def test_cli_similarity(cli, random_store, tmp_path):
    result = cli("similarity", random_store["path"], "--format", "json", "--plot", tmp_path / "s.svg")
    assert result.exit_code == 0, result.output
    body = json.loads(result.stdout)
    want = ref.head_similarity(random_store["att"], random_store["length"])
    np.testing.assert_allclose(np.array(body["js"]), want, rtol=RTOL, atol=1e-15)
    assert body["labels"][0] == "L0H0" and len(body["heads"]) == 6
    assert "<svg" in (tmp_path / "s.svg").read_text()[:1000]
    table = cli("similarity", random_store["path"], "--batches", 2)
    assert table.exit_code == 0 and "nearest" in table.stdout and "2 batches" in table.stdout
    assert body["weight"] == "sample" and body["mds"] == "classical"
    xy = np.array([[h["x"], h["y"]] for h in body["heads"]])
    np.testing.assert_allclose(body["stress"], ref.stress1(xy, np.sqrt(np.array(body["js"]))), rtol=1e-9)
    clark = cli("similarity", random_store["path"], "--format", "json", "--weight", "token", "--mds", "smacof",
                "--entropy-smoothing", "1e-4", "--plot", tmp_path / "clark.png")
    assert clark.exit_code == 0, clark.output
    body = json.loads(clark.stdout)
    total, tokens = ref.clark_head_distances(random_store["att"], random_store["length"])
    np.testing.assert_allclose(np.array(body["js"]), total / tokens, rtol=RTOL, atol=1e-15)
    xy = np.array([[h["x"], h["y"]] for h in body["heads"]])
    np.testing.assert_allclose(body["stress"], ref.stress1(xy, np.array(body["js"])), rtol=1e-9)
    assert body["weight"] == "token" and body["mds"] == "smacof" and (tmp_path / "clark.png").stat().st_size > 1000
    for bad in (("--weight", "doc"), ("--mds", "tsne")):  # choices: click's usage error
        wrong = cli("similarity", random_store["path"], *bad)
        assert wrong.exit_code == 2 and bad[0] in wrong.output and f"'{bad[1]}' is not one of" in wrong.output


def test_cli_rollout_writes_the_store_group(cli, random_store, tmp_path):
    path = tmp_path / "r.zarr"
    shutil.copytree(random_store["path"], path)
    from fastattn.errors import StoreError

    with pytest.raises(StoreError, match="no rollout"):
        corpus.open_rollout(path)
    result = cli("rollout", path, "--keep-matrix", "--format", "json")
    assert result.exit_code == 0, result.output
    body = json.loads(result.stdout)
    assert body["batches"] == 7 and len(body["layers"]) == 3
    r = corpus.open_rollout(path)
    want_incoming, want_matrix = ref.rollout(random_store["att"], random_store["length"])
    np.testing.assert_allclose(r.rollout_incoming.values, want_incoming, rtol=RTOL, equal_nan=True)
    np.testing.assert_allclose(r.rollout.values, want_matrix, rtol=1e-6, atol=1e-7, equal_nan=True)  # float32 on disk
    open_store(path)  # the store itself still opens
    table = cli("rollout", path)
    assert table.exit_code == 0 and "first key" in table.stdout
    assert "rollout" not in corpus.open_rollout(path)
    summary = corpus.rollout_summary(corpus.open_rollout(path))
    n = random_store["length"]
    np.testing.assert_allclose([row["first_key"] for row in summary], want_incoming[n > 0, :, 0].mean(0), rtol=RTOL)
    last = np.array([[want_incoming[b, layer, n[b] - 1] if n[b] > 1 else 0.0 for layer in range(3)] for b in range(len(n))])
    np.testing.assert_allclose([row["last_key"] for row in summary], last.mean(0), rtol=RTOL)
    assert cli("rollout", tmp_path / "nope.zarr").exit_code == 1
    # a later ingest makes the saved rollout stale
    batched_dump(np.random.default_rng(0), tmp_path / "more" / "c.npz", [4], layers=3, heads=2)
    ingest([str(tmp_path / "more")], str(path), jobs=1)
    with pytest.raises(StoreError, match="run fastattn rollout again"):
        corpus.open_rollout(path)
