"""Every kind of bad dump: one line `path: reason`, exit code 1, committed content unchanged."""

from __future__ import annotations

import io
import pickle
import zipfile

import numpy as np
import pytest
from conftest import softmax_rows, store_snapshot, write_dump
from click.testing import CliRunner

from fastattn.errors import DumpError
from fastattn_cli.main import app

runner = CliRunner()


def _npz_bytes(**arrays) -> bytes:
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    return buffer.getvalue()


def _good(rng):
    return softmax_rows(rng, (2, 3, 5, 5))


def make_empty(path, rng):
    path.write_bytes(b"")


def make_not_zip(path, rng):
    path.write_text("this is a CSV file, not a numpy archive\n1,2,3\n")


def make_truncated(path, rng):
    path.write_bytes(_npz_bytes(attention_weights=_good(rng))[:700])


def make_bad_crc(path, rng):
    data = bytearray(_npz_bytes(attention_weights=_good(rng)))
    data[200] ^= 0xFF  # inside the attention member's data
    path.write_bytes(bytes(data))


def make_pickled(path, rng):
    np.savez(path, attention_weights=np.array([{"a": 1}, None], dtype=object))


def make_pickle_file(path, rng):
    path.write_bytes(pickle.dumps({"attention_weights": _good(rng)}))


def make_missing(path, rng):
    np.savez(path, weights=_good(rng))


def make_wrong_ndim(path, rng):
    np.savez(path, attention_weights=softmax_rows(rng, (3, 5, 5)))


def make_integer(path, rng):
    np.savez(path, attention_weights=np.ones((2, 3, 5, 5), dtype=np.int64))


def make_complex(path, rng):
    np.savez(path, attention_weights=_good(rng).astype(np.complex64))


def make_nan(path, rng):
    a = _good(rng)
    a[1, 2, 3, 4] = np.nan
    np.savez(path, attention_weights=a)


def make_inf(path, rng):
    a = _good(rng)
    a[0, 0, 0, 0] = np.inf
    np.savez(path, attention_weights=a)


def make_negative(path, rng):
    a = _good(rng)
    a[0, 1, 2, 1] += a[0, 1, 2, 0] + 0.25  # the row still sums to 1, with one weight at -0.25
    a[0, 1, 2, 0] = -0.25
    np.savez(path, attention_weights=a)


def make_logits(path, rng):
    np.savez(path, attention_weights=np.abs(rng.standard_normal((2, 3, 5, 5))).astype(np.float32) * 3)


def make_bad_mask(path, rng):
    a = softmax_rows(rng, (2, 2, 3, 5, 5))
    np.savez(path, attention_weights=a, attention_mask=np.ones((2, 7), dtype=np.int8))


def make_zip_bomb(path, rng):
    # a deflated member declaring 16 GB of zeros; its header is honest, its size absurd
    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(header, {"descr": "<f4", "fortran_order": False, "shape": (2, 3, 2**14, 2**14)})
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        with zf.open("attention_weights.npy", "w", force_zip64=True) as f:
            f.write(header.getvalue())
            zeros = bytes(1 << 24)
            for _ in range(16):  # 256 MiB of zeros compresses ~1000x
                f.write(zeros)


def make_huge_shape(path, rng):
    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(header, {"descr": "<f4", "fortran_order": False, "shape": (10**6, 10**6, 10**6, 4)})
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("attention_weights.npy", header.getvalue() + b"\0" * 64)


def make_directory(path, rng):
    path.mkdir()


CASES = {
    "empty": (make_empty, "empty file (0 bytes)"),
    "not_zip": (make_not_zip, "not an .npz archive"),
    "pickle_file": (make_pickle_file, "not an .npz archive"),
    "truncated": (make_truncated, "corrupt zip archive"),
    "bad_crc": (make_bad_crc, "corrupt zip archive"),
    "pickled": (make_pickled, "pickled object array; fastattn never unpickles"),
    "missing": (make_missing, "no 'attention_weights' array (found: weights)"),
    "wrong_ndim": (make_wrong_ndim, "attention_weights has 3 dims"),
    "integer": (make_integer, "attention_weights has dtype int64; expected float16, float32 or float64"),
    "complex": (make_complex, "attention_weights has dtype complex64"),
    "nan": (make_nan, "NaN or Inf in its valid block (sample 0, layer 1, head 2, query 3, key 4)"),
    "inf": (make_inf, "NaN or Inf in its valid block (sample 0, layer 0, head 0, query 0, key 0)"),
    "negative": (make_negative, "negative weight"),
    "logits": (make_logits, "rows do not sum to 1"),
    "bad_mask": (make_bad_mask, "attention_mask has shape (2, 7); expected (2, 5)"),
    "zip_bomb": (make_zip_bomb, "(a zip bomb?)"),
    "huge_shape": (make_huge_shape, "absurd shape"),
    "directory": (make_directory, "is a directory, not an .npz file"),
}


@pytest.fixture
def committed_store(tmp_path, rng):
    """A store with two committed good batches, and its snapshot."""
    good = tmp_path / "good"
    write_dump(good / "a.npz", _good(rng))
    write_dump(good / "b.npz", _good(rng))
    store = tmp_path / "store.zarr"
    result = runner.invoke(app, ["ingest", str(good), str(store)])
    assert result.exit_code == 0, result.output
    return good, store, store_snapshot(store)


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_file_gets_one_line_and_good_ones_go_in(case, committed_store, tmp_path, rng):
    good, store, before = committed_store
    make, reason = CASES[case]
    bad = good / "bad.npz"
    make(bad, rng)
    write_dump(good / "c.npz", _good(rng))  # a good new file beside the bad one
    result = runner.invoke(app, ["ingest", str(good), str(store)])
    assert result.exit_code == 1
    lines = [line for line in result.stderr.splitlines() if line.startswith(str(bad))]
    assert len(lines) == 1, result.stderr
    assert reason in lines[0], lines[0]
    assert "Traceback" not in result.output
    after = store_snapshot(store)
    assert after["committed"] == before["committed"] + 1  # c.npz went in
    np.testing.assert_array_equal(after["attention"][:2], before["attention"])


@pytest.mark.parametrize("case", ["nan", "bad_crc", "zip_bomb"])
def test_strict_rejects_the_run_before_writing(case, committed_store, rng):
    good, store, before = committed_store
    CASES[case][0](good / "bad.npz", rng)
    write_dump(good / "c.npz", _good(rng))
    result = runner.invoke(app, ["ingest", "--strict", str(good), str(store)])
    assert result.exit_code == 1 and "nothing written" in result.stderr
    after = store_snapshot(store)
    assert after["committed"] == before["committed"] and after["files"] == before["files"]


def test_no_dumps_found_is_one_line(tmp_path):
    (tmp_path / "empty").mkdir()
    result = runner.invoke(app, ["ingest", str(tmp_path / "empty"), str(tmp_path / "s.zarr")])
    assert result.exit_code == 1
    assert result.stderr.strip() == f"error: no .npz dumps found in {tmp_path / 'empty'}"


def test_foreign_store_is_one_line_and_untouched(tmp_path, rng):
    write_dump(tmp_path / "d" / "a.npz", _good(rng))
    foreign = tmp_path / "notastore"
    foreign.mkdir()
    (foreign / "data.txt").write_text("mine")
    result = runner.invoke(app, ["ingest", str(tmp_path / "d"), str(foreign)])
    assert result.exit_code == 1
    assert result.stderr.strip() == f"error: {foreign}: exists and is not a fastattn store; refusing to write into it"
    assert sorted(p.name for p in foreign.iterdir()) == ["data.txt"]


def test_info_on_a_bad_dump_and_a_foreign_store(tmp_path, rng):
    bad = tmp_path / "bad.npz"
    make_not_zip(bad, rng)
    result = runner.invoke(app, ["info", str(bad)])
    assert result.exit_code == 1 and result.stderr.startswith(f"error: {bad}: not an .npz archive")
    result = runner.invoke(app, ["info", str(tmp_path)])
    assert result.exit_code == 1 and "not a fastattn store" in result.stderr


def flagged_samples(a: np.ndarray, lengths: np.ndarray) -> list[int]:
    """The samples ingest's validation rejects, each sample validated alone."""
    from fastattn.dumps import _validate

    flagged = []
    for b in range(len(a)):
        try:
            _validate(a[b : b + 1], lengths[b : b + 1], a.dtype)
        except DumpError:
            flagged.append(b)
    return flagged


@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
def test_validation_pass_flags_exactly_the_bad_samples(dtype):
    """The check against its definition: NaN/Inf, a negative weight or a row off 1, inside
    each sample's valid block only; NaN, negatives and logits in the padding are fine."""
    rng = np.random.default_rng(7)
    lengths = np.array([9, 5, 9, 3, 7, 9, 6])
    a = np.full((7, 2, 3, 9, 9), np.nan, dtype=dtype)
    for b, n in enumerate(lengths):
        a[b, :, :, :n, :n] = softmax_rows(rng, (2, 3, n, n)).astype(dtype)
    a[1, :, :, 5:, :] = -3.0  # padding: never read
    a[2, 1, 2, 4, 6] = np.nan
    a[3, 0, 0, 2, 1] = -0.01
    a[4, 1, 0, 6, :7] *= 1.05  # a row off by 5%
    a[5, 0, 1, 3, 3] = np.inf
    got = flagged_samples(a.transpose(1, 0, 2, 3, 4).copy().transpose(1, 0, 2, 3, 4), lengths)  # a strided view
    np.testing.assert_array_equal(got, [2, 3, 4, 5])
    assert flagged_samples(a[[0, 1, 6]], lengths[[0, 1, 6]]) == []


def test_validation_pass_accepts_the_real_samples():
    from conftest import SAMPLES

    paths = sorted(SAMPLES.rglob("*.npz"))
    assert paths
    for path in paths:
        with np.load(path, allow_pickle=False) as f:
            a = f["attention_weights"]
            a = a.transpose(1, 0, 2, 3, 4) if a.ndim == 5 else a[np.newaxis]
            lengths = f["attention_mask"].sum(axis=1) if "attention_mask" in f else np.full(1, a.shape[-1])
        assert flagged_samples(a, lengths) == [], path.name
        broken = a.copy()
        broken[-1, 0, 0, 0, 0] += 0.01
        assert flagged_samples(broken, lengths) == [len(a) - 1], path.name
