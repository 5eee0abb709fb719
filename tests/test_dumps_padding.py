"""Padding without a mask (fastattn.dumps.infer_lengths): a dump saved with padding but no
`attention_mask` gets each sample's length from its exactly-zero trailing key columns, so
it is stored, and its statistics come out, as if the mask had been saved."""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import SAMPLES, softmax_rows, write_dump

from fastattn import dumps, open_store
from fastattn.errors import DumpError
from fastattn.ingest import ingest
from fastattn.stats import compute_stats


def reference_lengths(att: np.ndarray) -> np.ndarray:
    """Per sample of a canonical (batch, layer, head, q, k) array: one past the last key
    column that holds any non-zero weight, in any layer, head or query (K if none is zero)."""
    out = []
    for b in range(att.shape[0]):
        used = np.flatnonzero((np.asarray(att[b], dtype=np.float64) != 0).any(axis=(0, 1, 2)))
        out.append(used[-1] + 1 if used.size else att.shape[-1])
    return np.array(out)


def right_padded(rng, lengths, layers=2, heads=3, size=None, dtype=np.float32, causal=False) -> np.ndarray:
    """(layer, batch, head, size, size) as a masked model computes it: padded keys weigh
    exactly 0 for every query, padded queries attend over the valid keys."""
    size = size or max(lengths)
    att = np.zeros((layers, len(lengths), heads, size, size), dtype=dtype)
    for b, n in enumerate(lengths):
        rows = softmax_rows(rng, (layers, heads, size, n)).astype(np.float64)
        if causal:
            rows = np.where(np.tril(np.ones((size, n)), 0) > 0, rows, 0.0)
            rows /= rows.sum(-1, keepdims=True)
        att[:, b, :, :, :n] = rows
    return att


def strip_masks(src, dst):
    """Copies of the dumps under `src` without their attention_mask."""
    for path in sorted(src.rglob("*.npz")):
        with np.load(path, allow_pickle=False) as z:
            write_dump(dst / path.relative_to(src), z["attention_weights"])
    return dst


def test_minilm_padded_dumps_without_mask_get_the_mask_lengths(tmp_path):
    for path in sorted(SAMPLES.rglob("*.npz")):
        with_mask = dumps.read(dumps.scan(str(path)))
        with np.load(path, allow_pickle=False) as z:
            plain = write_dump(tmp_path / path.relative_to(SAMPLES), z["attention_weights"])
            want = z["attention_mask"].sum(axis=1) if "attention_mask" in z.files else [z["attention_weights"].shape[-1]]
        without = dumps.read(dumps.scan(str(plain)))
        np.testing.assert_array_equal(without.lengths, want)
        np.testing.assert_array_equal(without.lengths, reference_lengths(without.attention))
        np.testing.assert_array_equal(without.attention, with_mask.attention)
        assert without.inferred == int(np.sum(np.asarray(want) < without.header.key))
        assert with_mask.inferred == 0
    # the padded MiniLM samples: one in batch_0002, two in batch_0003
    counts = [dumps.read(dumps.scan(str(path))).inferred for path in sorted((tmp_path / "batched").glob("*.npz"))]
    assert counts == [1, 2]


def test_store_without_mask_equals_store_with_mask_and_so_do_its_statistics(tmp_path, cli):
    masked = SAMPLES / "batched"
    plain = strip_masks(masked, tmp_path / "plain")
    ra = ingest([str(masked)], str(tmp_path / "a.zarr"), jobs=1)
    rb = ingest([str(plain)], str(tmp_path / "b.zarr"), jobs=1)
    assert ra.inferred_lengths == 0 and rb.inferred_lengths == 3
    assert "3 batches without a mask got their length from zero key columns" in rb.summary()
    assert "zero key columns" not in ra.summary()
    a, b = open_store(tmp_path / "a.zarr"), open_store(tmp_path / "b.zarr")
    np.testing.assert_array_equal(a.length.values, b.length.values)
    np.testing.assert_array_equal(a.attention.values, b.attention.values)  # NaN padding in the same places
    sa, sb = compute_stats(a).compute(), compute_stats(b).compute()
    for name in sa.data_vars:
        np.testing.assert_array_equal(sa[name].values, sb[name].values, err_msg=name)
    # the last key is the last real token ([SEP]), not a pad: float64 reference on the valid block
    att, n = b.attention.values, b.length.values
    want = np.array([[att[i, :, :, : n[i], n[i] - 1].astype(np.float64).sum(-1) / n[i]] for i in range(len(n))])[:, 0]
    np.testing.assert_allclose(sb.last_token.values, want, rtol=1e-6)
    sizes = [h.key for h in (dumps.scan(str(p)) for p in sorted(masked.glob("*.npz"))) for _ in range(h.batch)]
    padded = n < np.array(sizes)  # shorter than their own dump
    assert padded.sum() == 3 and (sb.last_token.values[padded] > 0).all()  # the full-length last key was a pad: 0
    result = cli("ingest", plain, tmp_path / "c.zarr", "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["inferred_lengths"] == 3


@pytest.mark.parametrize("dtype", [np.float32, np.float16, np.float64])
def test_random_ragged_dumps_match_the_reference_per_sample(tmp_path, rng, dtype):
    lengths = [7, 1, 12, 3, 12, 9]
    att = right_padded(rng, lengths, size=12, dtype=dtype)
    dump = dumps.read(dumps.scan(str(write_dump(tmp_path / "d.npz", att))))
    np.testing.assert_array_equal(dump.lengths, lengths)
    np.testing.assert_array_equal(dump.lengths, reference_lengths(dump.attention))
    assert dump.inferred == 4
    # a 4-d dump (one sample), and causal attention with right padding
    one = dumps.read(dumps.scan(str(write_dump(tmp_path / "one.npz", att[:, 0]))))
    assert list(one.lengths) == [7] and one.inferred == 1
    causal = right_padded(rng, [5, 8, 2], size=8, causal=True)
    got = dumps.read(dumps.scan(str(write_dump(tmp_path / "causal.npz", causal))))
    np.testing.assert_array_equal(got.lengths, [5, 8, 2])


def test_zero_columns_that_are_not_trailing_padding_keep_the_full_length(tmp_path, rng):
    size = 10
    # causal, no padding: the last key is weighted by the last query only
    causal = right_padded(rng, [size, size], size=size, causal=True)
    assert dumps.read(dumps.scan(str(write_dump(tmp_path / "causal.npz", causal)))).lengths.tolist() == [size, size]
    # left padding without a mask: the zero columns lead, nothing is inferred
    left = np.flip(right_padded(rng, [6, size], size=size), axis=(3, 4)).copy()
    got = dumps.read(dumps.scan(str(write_dump(tmp_path / "left.npz", left))))
    assert got.lengths.tolist() == [size, size] and got.inferred == 0
    # one weight in one layer, head and query keeps its key (and every key before it)
    att = right_padded(rng, [6, 6, 6], size=size)
    att[1, 0, 2, 3, :] = softmax_rows(rng, (size,))  # sample 0: key 9 weighted once, in layer 1 head 2
    att[1, 1, 1, 8, :8] = softmax_rows(rng, (8,))  # sample 1: up to key 7, not in layer 0 head 0
    got = dumps.read(dumps.scan(str(write_dump(tmp_path / "once.npz", att))))
    assert got.lengths.tolist() == [size, 8, 6] == reference_lengths(got.attention).tolist()
    # a mask, when given, is what counts
    masked = write_dump(tmp_path / "masked.npz", att, attention_mask=np.ones((3, size), dtype=np.int8))
    assert dumps.read(dumps.scan(str(masked))).lengths.tolist() == [size] * 3
    # cross-attention (query != key) is never cut
    cross = np.zeros((2, 3, 4, 7), dtype=np.float32)
    cross[..., :5] = softmax_rows(rng, (2, 3, 4, 5))
    assert dumps.read(dumps.scan(str(write_dump(tmp_path / "cross.npz", cross)))).lengths.tolist() == [7]


def test_a_sample_of_zeros_is_still_rejected(tmp_path, rng):
    att = right_padded(rng, [4, 4], size=6)
    att[:, 1] = 0.0
    with pytest.raises(DumpError, match="rows do not sum to 1"):
        dumps.read(dumps.scan(str(write_dump(tmp_path / "zeros.npz", att))))


def test_no_infer_padding_keeps_the_full_length(tmp_path, rng, cli):
    """`--no-infer-padding` (`infer_padding=False`): a padded dump without a mask is stored
    whole, zero columns and all; by default its lengths are inferred."""
    lengths = [5, 9, 3]
    att = right_padded(rng, lengths, size=9)
    write_dump(tmp_path / "dumps" / "d.npz", att)
    assert dumps.read(dumps.scan(str(tmp_path / "dumps" / "d.npz"), infer_padding=False)).lengths.tolist() == [9] * 3
    inferred = cli("ingest", tmp_path / "dumps", tmp_path / "a.zarr", "--json")
    whole = cli("ingest", tmp_path / "dumps", tmp_path / "b.zarr", "--json", "--no-infer-padding")
    assert inferred.exit_code == 0 and whole.exit_code == 0, inferred.output + whole.output
    assert json.loads(inferred.stdout)["inferred_lengths"] == 2
    assert json.loads(whole.stdout)["inferred_lengths"] == 0
    a, b = open_store(tmp_path / "a.zarr"), open_store(tmp_path / "b.zarr")
    assert a.length.values.tolist() == lengths
    assert b.length.values.tolist() == [9, 9, 9]
    canonical = np.transpose(att, (1, 0, 2, 3, 4))  # (batch, layer, head, q, k)
    np.testing.assert_array_equal(b.attention.values, canonical)  # the zero columns kept as stored
    for i, n in enumerate(lengths):
        np.testing.assert_array_equal(a.attention.values[i, :, :, :n, :n], canonical[i, :, :, :n, :n])
        assert np.isnan(a.attention.values[i, :, :, n:, :]).all()  # padding rows stored as NaN
    # the library parameter, the same
    report = ingest([str(tmp_path / "dumps")], str(tmp_path / "c.zarr"), jobs=1, infer_padding=False)
    assert report.inferred_lengths == 0
    assert open_store(tmp_path / "c.zarr").length.values.tolist() == [9, 9, 9]
