"""How ingest knows a file, and the small holes around it (issue: reliability items 1 and 9)."""

from __future__ import annotations

import os
import time

import numpy as np

from fastattn import check, dumps, store
from fastattn.ingest import ingest
from fastattn.synth import synthesize

from conftest import batched_dump, softmax_rows, store_snapshot, write_dump


def _batches_of(path, dump) -> list[int]:
    entry = store.read_manifest(store.Location(path)).files[os.path.realpath(dump)]
    return list(range(entry.start, entry.stop))


def test_same_names_in_another_folder_are_other_files(tmp_path, cli):
    """`synth dA; synth dB --seed 1; ingest dA s; ingest dB s`: dB was rejected as changed,
    and with --replace dA's batches were overwritten by dB's while check said ok."""
    for folder, seed in (("dA", 0), ("dB", 1)):
        out = cli("synth", tmp_path / folder, "--files", 3, "--layers", 2, "--heads", 2, "--seq", "8-12", "--seed", seed)
        assert out.exit_code == 0, out.output
    target = tmp_path / "s.zarr"
    assert cli("ingest", tmp_path / "dA", target).exit_code == 0
    first = store_snapshot(target)
    out = cli("ingest", tmp_path / "dB", target)
    assert out.exit_code == 0, out.output
    after = store_snapshot(target)
    assert after["committed"] == 2 * first["committed"]
    np.testing.assert_array_equal(after["attention"][: first["committed"]], first["attention"])
    assert cli("ingest", tmp_path / "dB", target, "--replace").exit_code == 0  # nothing changed: nothing to replace
    np.testing.assert_array_equal(store_snapshot(target)["attention"], after["attention"])
    for name in sorted(os.listdir(tmp_path / "dB")):  # every batch traces back to the file it came from
        for b in _batches_of(target, tmp_path / "dB" / name):
            with np.load(tmp_path / "dB" / name, allow_pickle=False) as z:
                n = int(after["length"][b])
                np.testing.assert_array_equal(after["attention"][b, :, :, :n, :n], z["attention_weights"][:, :, :n, :n])
    assert check.store_problems(target) == []


def test_replace_rewrites_only_the_file_it_names(tmp_path, rng):
    for folder in ("dA", "dB"):
        synthesize(tmp_path / folder, files=2, layers=2, heads=2, seq=6, seed=hash(folder) % 100)
    target = tmp_path / "s.zarr"
    ingest([tmp_path / "dA"], target)
    ingest([tmp_path / "dB"], target)
    before = store_snapshot(target)
    victim = tmp_path / "dB" / "attention_batch_00001.npz"
    changed = softmax_rows(rng, (2, 2, 6, 6))
    time.sleep(0.01)
    write_dump(victim, changed)
    report = ingest([tmp_path / "dA", tmp_path / "dB"], target, replace=True)
    assert report.ok and report.files_replaced == 1 and report.files_unchanged == 3
    after = store_snapshot(target)
    (mine,) = _batches_of(target, victim)
    np.testing.assert_array_equal(after["attention"][mine], changed)
    others = [b for b in range(before["committed"]) if b != mine]
    np.testing.assert_array_equal(after["attention"][others], before["attention"][others])


def test_a_folder_reached_through_a_symlink_is_searched(tmp_path, rng):
    real = tmp_path / "real"
    write_dump(real / "a.npz", softmax_rows(rng, (1, 2, 4, 4)))
    (tmp_path / "top").mkdir()
    os.symlink(real, tmp_path / "top" / "linked")
    os.symlink(tmp_path / "top", real / "loop")  # a link loop ends, each real folder once
    found = dumps.find_dumps([tmp_path / "top"])
    assert [os.path.basename(f) for f in found.files] == ["a.npz"] and not found.problems
    report = ingest([tmp_path / "top"], tmp_path / "s.zarr")
    assert report.committed == 1
    assert ingest([real], tmp_path / "s.zarr").files_unchanged == 1  # the same file by either route


def test_a_rejected_name_with_a_newline_prints_one_line(tmp_path, cli):
    bad = tmp_path / "d" / "two\nlines.npz"
    bad.parent.mkdir()
    bad.write_bytes(b"not a zip")
    out = cli("ingest", tmp_path / "d", tmp_path / "s.zarr")
    assert out.exit_code == 1
    lines = [line for line in out.stderr.splitlines() if "lines.npz" in line]
    assert lines == [f"{tmp_path}/d/two\\nlines.npz: not an .npz archive (no zip signature)"], out.stderr


def test_all_files_rejected_leaves_no_store(tmp_path, rng):
    bad = softmax_rows(rng, (1, 2, 4, 4))
    bad[0, 0, 0, 0] = np.nan
    write_dump(tmp_path / "d" / "a.npz", bad)
    (tmp_path / "d" / "b.npz").write_bytes(b"")
    report = ingest([tmp_path / "d"], tmp_path / "s.zarr")
    assert len(report.rejected) == 2 and report.committed == 0
    assert not (tmp_path / "s.zarr").exists()


def test_strict_reports_what_the_store_holds(tmp_path, rng):
    for i in range(3):
        write_dump(tmp_path / "d" / f"{i}.npz", softmax_rows(rng, (1, 2, 4, 4)))
    ingest([tmp_path / "d"], tmp_path / "s.zarr")
    (tmp_path / "d" / "bad.npz").write_bytes(b"junk")
    report = ingest([tmp_path / "d"], tmp_path / "s.zarr", strict=True)
    assert not report.ok and report.committed == 3


def test_masks_of_other_values_than_0_and_1_are_rejected(tmp_path, rng):
    for value in (-1, 2):
        path = batched_dump(rng, tmp_path / "d" / f"m{value}.npz", [3, 4], layers=1, heads=2)
        with np.load(path, allow_pickle=False) as z:
            arrays = dict(z)
        arrays["attention_mask"] = np.full_like(arrays["attention_mask"], value)
        np.savez(path, **arrays)
    report = ingest([tmp_path / "d"], tmp_path / "s.zarr")
    reasons = sorted(r.reason for r in report.rejected)
    assert reasons == [
        "attention_mask holds -1 (sample 0, token 0); expected 1 for a token and 0 for padding",
        "attention_mask holds 2 (sample 0, token 0); expected 1 for a token and 0 for padding",
    ]


def test_a_wrong_layout_can_be_corrected(tmp_path, rng):
    """Saved as (batch, layer, head, q, k) but ingested as the default (layer, batch, ...):
    re-ingesting with the right layout said 'unchanged' for good."""
    weights = softmax_rows(rng, (2, 2, 3, 5, 5))  # batch 2, layer 2
    path = write_dump(tmp_path / "d" / "a.npz", weights)
    target = tmp_path / "s.zarr"
    ingest([path], target)
    wrong = store.open_store(target).attention.values
    np.testing.assert_array_equal(wrong, np.swapaxes(weights, 0, 1))
    report = ingest([path], target, layout="blhqk")
    assert report.rejected[0].reason.startswith("was ingested with layout 'lbhqk', now 'blhqk'")
    report = ingest([path], target, layout="blhqk", replace=True)
    assert report.ok and report.files_replaced == 1
    np.testing.assert_array_equal(store.open_store(target).attention.values, weights)
    assert ingest([path], target, layout="blhqk").files_unchanged == 1
