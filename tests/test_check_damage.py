"""`fastattn check` against damage done by hand to a store's files: JSON edited, chunks and
arrays deleted, bytes flipped. Each test does to the files on disk exactly what the damage
is, then asserts that check names it in one line (never a traceback), that `--repair`
never makes it permanent nor drops a batch a file entry claims without `--force`, and
that after the repair (and the re-ingest or recomputation it asks for) the store equals
the clean one."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import zarr
from conftest import assert_same_store, ragged_dumps, batched_dump, softmax_rows, store_snapshot, write_dump

from fastattn import check, corpus, dumps, store
from fastattn.check import store_problems, run_check
from fastattn.errors import StoreError
from fastattn.ingest import ingest
from fastattn.stats import open_stats, read_errors, write_stats

#: The `stats` group as the schema describes it: variable -> dims.
STATS_SCHEMA = store.schema.STATS.variables({})


@pytest.fixture(autouse=True)
def small_chunks(monkeypatch):
    """A few batches per chunk, so small stores span several chunks."""
    monkeypatch.setattr(store.schema, "CHUNK_BYTES", 8 << 10)


@pytest.fixture(scope="module")
def corpus_store(tmp_path_factory):
    """Dumps and a clean store of them with committed statistics and rollout (read-only)."""
    root = tmp_path_factory.mktemp("damage")
    folder = ragged_dumps(root / "dumps", np.random.default_rng(11))
    clean = root / "clean.zarr"
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(store.schema, "CHUNK_BYTES", 8 << 10)
        assert ingest([folder], clean).ok
        write_stats(clean)
        corpus.write_rollout(clean)
    manifest = store.read_manifest(store.Location(clean))
    assert manifest.committed == 24 and manifest.batch_chunk == 5 and manifest.stats_committed == 24
    assert store_problems(clean) == []
    return folder, clean


@pytest.fixture
def built(corpus_store, tmp_path):
    """(dumps folder, a fresh copy of the clean store to damage, the clean store)."""
    folder, clean = corpus_store
    path = tmp_path / "s.zarr"
    shutil.copytree(clean, path)
    return folder, path, clean


def _edit(path: Path, change) -> None:
    """Edit a JSON file in place: `change(body)` mutates the parsed document."""
    body = json.loads(path.read_text())
    change(body)
    path.write_text(json.dumps(body))


def _manifest(path) -> dict:
    return json.loads((Path(path) / store.MANIFEST).read_text())


def _lines(problems) -> str:
    return "\n".join(map(str, problems))


def _one_line_each(out) -> list[str]:
    """The CLI's stderr lines; never a traceback."""
    assert "Traceback" not in out.output and out.exception is None or isinstance(out.exception, SystemExit), out.output
    return out.stderr.splitlines()


def _stats_json(cli, path) -> dict:
    """What `fastattn stats --format json` reports (without how much it computed this time)."""
    out = cli("stats", path, "--format", "json")
    assert out.exit_code == 0, out.output
    body = json.loads(out.stdout)
    del body["computed"]
    return body


# ---------------------------------------------------------------- item 4: fewer batches held than committed


def test_committed_raised_in_the_manifest_is_reported_not_a_crash(built, cli):
    folder, path, clean = built
    _edit(path / store.MANIFEST, lambda m: m.update(committed=30))
    problems = store_problems(path)  # used to raise "operands could not be broadcast"
    text = _lines(problems)
    for name in store.BATCHED:
        assert f"{name}: holds 24 batches but 30 are committed: committed data is missing" in text
    assert "6 committed batches are claimed by no file (24..29)" in text
    out = cli("check", path, "--repair")
    lines = _one_line_each(out)
    assert out.exit_code == 1 and "--repair --force drops the damaged batches" in lines[-1]
    assert _manifest(path)["committed"] == 30  # nothing dropped without --force
    out = cli("check", path, "--repair", "--force")
    assert out.exit_code == 0, out.output
    assert "dropped committed batches 24..29 and rewound the manifest to 24 batches" in out.stderr
    assert store_problems(path) == []
    assert_same_store(path, clean)


def test_attention_shape_lowered_in_its_metadata_is_restored(built, cli):
    _, path, clean = built
    _edit(path / "attention/zarr.json", lambda m: m["shape"].__setitem__(0, 12))
    problems = store_problems(path)
    first = problems[0]
    assert str(first) == "attention: holds 12 batches but 24 are committed: its metadata lost them, their chunks are on disk"
    assert first.fix == check.META
    out = cli("check", path, "--repair")  # no --force: restoring the shape loses nothing
    assert out.exit_code == 0, out.output
    assert "[repaired: shape restored to (24, 2, 3, 11, 11) from the manifest" in out.stderr
    assert store_problems(path) == []
    assert_same_store(path, clean)


def test_attention_shape_lowered_with_its_chunks_gone_needs_force(built):
    folder, path, clean = built
    _edit(path / "attention/zarr.json", lambda m: m["shape"].__setitem__(0, 12))
    for chunk in (path / "attention").glob("c.4.*.0.0.0"):  # the chunk of batches 20..23, both layers
        chunk.unlink()
    problems = store_problems(path)
    assert "attention: holds 12 batches but 24 are committed: committed data is missing" in _lines(problems)
    store_problems(path, repair=True, force=True)
    assert _manifest(path)["committed"] <= 12 and store_problems(path) == []
    assert ingest([folder], path).ok  # the dropped files come back
    assert_same_store(path, clean)


def test_empty_length_metadata_is_restored_by_repair(built, cli):
    _, path, clean = built
    (path / "length/zarr.json").write_text("{}")
    problems = store_problems(path)
    assert [p.where for p in problems] == ["length/zarr.json"], _lines(problems)
    assert problems[0].message.startswith("unreadable array metadata")
    out = cli("check", path, "--repair")  # used to end in a MetadataValidationError traceback
    lines = _one_line_each(out)
    assert out.exit_code == 0, out.output
    assert lines[0].endswith("[repaired: restored from the consolidated metadata, shape from the manifest]")
    assert store_problems(path) == []
    assert_same_store(path, clean)


# ---------------------------------------------------------------- item 5: damage check used to miss


def test_query_dim_edited_64_to_32_is_found_and_repair_restores_it(tmp_path, rng, cli):
    folder = tmp_path / "d"
    for i in range(4):
        batched_dump(rng, folder / f"d{i}.npz", [64, int(rng.integers(20, 64))], size=64)
    path = tmp_path / "s.zarr"
    assert ingest([folder], path).ok
    clean = tmp_path / "clean.zarr"
    shutil.copytree(path, clean)
    _edit(path / "attention/zarr.json", lambda m: m["shape"].__setitem__(3, 32))
    problems = store_problems(path)  # used to pass
    assert "attention: holds 32 x 64 tokens (query x key); the manifest needs 64 x 64" in _lines(problems)
    out = cli("check", path, "--repair")  # used to make the 32 permanent (query coordinate, token, consolidated)
    assert out.exit_code == 0, out.output
    assert zarr.open_array(str(path / "attention"), mode="r").shape == (8, 2, 3, 64, 64)
    assert store_problems(path) == []
    assert_same_store(path, clean)


def test_query_dim_edited_without_its_chunks_is_never_shrunk(built):
    """Where the chunk grid does not match the manifest, repair leaves the shape alone (and says so)."""
    _, path, _ = built
    def square_chunks_broken(m):
        m["shape"][3] = 5
        m["chunk_grid"]["configuration"]["chunk_shape"][3] = 5
    _edit(path / "attention/zarr.json", square_chunks_broken)
    problems = store_problems(path)
    text = _lines(problems)
    assert "attention: chunks (5, 1, 3, 5, 11); the manifest's layout is (5, 1, 3, n, n; or heads or queries split)" in text
    assert "attention: holds 5 x 11 tokens (query x key); the manifest needs 11 x 11" in text
    store_problems(path, repair=True)
    assert zarr.open_array(str(path / "query"), mode="r").shape == (11,)  # nothing cut to the wrong shape
    assert _manifest(path)["committed"] == 24
    assert store_problems(path)  # still reported


@pytest.mark.parametrize("name", [n for n, dims in STATS_SCHEMA.items() if dims[0] == "batch"])
def test_every_deleted_stats_chunk_is_found(built, name):
    _, path, _ = built
    chunk = next((path / "stats" / name).glob("c.*"))  # write_stats writes every chunk, even an all-False flag's
    chunk.unlink()
    problems = store_problems(path)  # zarr reads a missing chunk as fill values: it used to pass
    key = chunk.relative_to(path).as_posix()
    says = "stats/batch: coordinate values are not 0..23" if name == "batch" else f"{key}: missing chunk: its committed values are lost (batches 0..23)"
    assert [str(p) for p in problems] == [says]
    assert problems[0].fix == check.STATS


def test_deleted_stats_chunk_is_recomputed_after_repair(built, cli):
    _, path, _ = built
    want = _stats_json(cli, path)
    os.remove(path / "stats/entropy_mean/c.0.0.0")
    assert [p.where for p in store_problems(path)] == ["stats/entropy_mean/c.0.0.0"]
    out = cli("check", path, "--repair")
    assert out.exit_code == 0 and "[repaired: statistics uncommitted; fastattn stats recomputes them]" in out.stderr
    assert _manifest(path)["stats_committed"] == 0 and _manifest(path)["committed"] == 24
    assert _stats_json(cli, path) == want  # recomputed, not blanks
    assert store_problems(path) == []


def test_deleted_stats_array_is_found_and_recomputed(built, cli):
    _, path, _ = built
    want = _stats_json(cli, path)
    shutil.rmtree(path / "stats/peak_key")
    problems = store_problems(path)  # used to pass
    assert [str(p) for p in problems] == ["stats/peak_key: missing array; statistics are committed for 24 batches"]
    with pytest.raises(StoreError, match="the statistics lack peak_key"):
        open_stats(path)
    assert _stats_json(cli, path) == want  # `fastattn stats` lays the group out again (used to end in a KeyError)
    assert store_problems(path) == []
    shutil.rmtree(path / "stats/peak_key")
    assert all(p.repaired for p in store_problems(path, repair=True))  # or check --repair uncommits it
    assert _stats_json(cli, path) == want
    assert store_problems(path) == []


def test_stats_schema_is_what_write_stats_lays_out(corpus_store):
    _, clean = corpus_store
    group = zarr.open_group(str(clean / "stats"), mode="r", use_consolidated=False)
    laid_out = {name: tuple(array.metadata.dimension_names) for name, array in group.arrays()}
    assert laid_out == STATS_SCHEMA


@pytest.mark.parametrize("damage", ["chunk", "array", "metadata"])
def test_rollout_is_checked_and_removed_when_broken(built, cli, damage):
    _, path, clean = built
    want = corpus.open_rollout(clean).rollout_incoming.values
    if damage == "chunk":
        os.remove(path / "rollout/rollout_incoming/c/2/0/0")
        where = "rollout/rollout_incoming/c/2/0/0"
        says = "missing chunk: its committed values are lost (batches 10..14)"
    elif damage == "array":
        shutil.rmtree(path / "rollout/length")
        where, says = "rollout/length", "missing array; the rollout is committed for 24 batches"
    else:
        _edit(path / "rollout/key/zarr.json", lambda m: m["shape"].__setitem__(0, 7))
        where, says = "rollout/key", "shape (7,), the store needs (11)"
    problems = store_problems(path)  # the rollout group used to be ignored
    assert [str(p) for p in problems] == [f"{where}: {says}"]
    out = cli("check", path, "--repair")
    assert out.exit_code == 0 and "[repaired: rollout removed; fastattn rollout recomputes it]" in out.stderr
    with pytest.raises(StoreError, match="no rollout yet"):
        corpus.open_rollout(path)
    assert store_problems(path) == []
    corpus.write_rollout(path)
    np.testing.assert_array_equal(corpus.open_rollout(path).rollout_incoming.values, want)
    assert store_problems(path) == []


def test_rollout_length_must_match_the_store(built):
    _, path, _ = built
    lengths = zarr.open_array(str(path / "rollout/length"), mode="r+")
    n = int(lengths[3])
    lengths[3] = n - 1  # stored with a valid checksum: only a comparison with the store finds it
    assert [str(p) for p in store_problems(path)] == [f"rollout/length: batch 3 has length {n - 1}, the store {n}"]


# ---------------------------------------------------------------- item 6: one row-sum tolerance, by the dump's dtype


def test_float16_dumps_in_a_float32_store_agree_with_ingest(tmp_path, rng, cli):
    folder = tmp_path / "d"
    half = softmax_rows(rng, (2, 3, 8, 8))
    half[0, 0, 0] *= 1.004  # off by ~4e-3: ingest accepts it from a float16 dump (1e-2), never from a float32 one
    write_dump(folder / "a0.npz", half.astype(np.float16))
    for i in range(1, 4):
        write_dump(folder / f"a{i}.npz", softmax_rows(rng, (2, 3, 8, 8)))
    path = tmp_path / "s.zarr"
    assert ingest([folder], path).ok  # a float32 store
    files = _manifest(path)["files"]
    assert {os.path.basename(rel): e["dtype"] for rel, e in files.items()} == {"a0.npz": "float16", "a1.npz": "float32", "a2.npz": "float32", "a3.npz": "float32"}
    assert store_problems(path) == []  # used to flag batch 0 at 1e-3
    before = store_snapshot(path)
    out = cli("check", path, "--repair", "--force")  # used to drop batch 0 and every later one
    assert out.exit_code == 0 and _manifest(path)["committed"] == 4
    report = ingest([folder], path)
    assert report.batches_added == 0 and report.files_unchanged == 4
    np.testing.assert_array_equal(store_snapshot(path)["attention"], before["attention"])
    # a store written before dtypes were recorded: the loosest tolerance, no false alarm
    _edit(path / store.MANIFEST, lambda m: [e.pop("dtype") for e in m["files"].values()])
    assert store_problems(path) == []
    # a float32 dump's batch off by the same amount is damage, at the float32 tolerance
    _edit(path / store.MANIFEST, lambda m: [e.update(dtype=dt) for e, dt in zip(m["files"].values(), ("float16", *["float32"] * 3))])
    attention = zarr.open_array(str(path / "attention"), mode="r+")
    attention[2, 1, 1, 3, :] = half[1, 1, 3] * 1.004
    text = _lines(store_problems(path))
    assert "attention batch 2 layer 1: rows do not sum to 1 (off by 0.004" in text
    assert f"tolerance {dumps.row_sum_tolerance('float32', 'float32'):.3g})" in text and "tolerance 0.001)" in text
    # and ingest refuses a float32 dump off by that much, by the same rule
    write_dump(tmp_path / "bad" / "b.npz", half)
    rejected = ingest([tmp_path / "bad"], tmp_path / "other.zarr").rejected
    assert len(rejected) == 1 and "tolerance 0.001" in rejected[0].reason


def test_one_tolerance_rule():
    assert dumps.row_sum_tolerance("float16") == 1e-2
    assert dumps.row_sum_tolerance(np.float32) == dumps.row_sum_tolerance("float64") == 1e-3
    assert dumps.row_sum_tolerance(None) == dumps.row_sum_tolerance("not a dtype") == max(dumps.ROW_SUM_TOLERANCE.values())
    assert dumps.row_sum_tolerance("float32", "float16") == 1e-3 + float(np.finfo(np.float16).eps)


def test_float32_dumps_in_a_float16_store_pass_check(tmp_path, rng):
    """Rounding to the store's float16 moves row sums by up to ~5e-4: within the rule's allowance."""
    folder = tmp_path / "d"
    for i in range(6):
        att = softmax_rows(rng, (2, 3, 40, 40), dtype=np.float64)
        att[:, :, :, 0] += 9.9e-4 * att[:, :, :, 0] / att[:, :, :, 0].sum(axis=-1, keepdims=True).clip(1e-9)
        write_dump(folder / f"f{i}.npz", att.astype(np.float32))
    path = tmp_path / "s.zarr"
    assert ingest([folder], path, dtype="float16").ok
    assert store_problems(path) == []


# ---------------------------------------------------------------- item 7: repair never drops a claimed batch without --force


def test_committed_lowered_keeps_claimed_batches_until_force(built, cli):
    folder, path, clean = built
    files = _manifest(path)["files"]
    past = sorted(rel for rel, e in files.items() if e["stop"] > 20)
    first = min(files[rel]["start"] for rel in past)
    _edit(path / store.MANIFEST, lambda m: m.update(committed=20))
    problems = store_problems(path)
    assert all(p.fix in (check.DROP, check.STATS) for p in problems), _lines(problems)
    assert "batches past the last commit" not in _lines(problems)  # they are claimed, not leftovers
    store_problems(path, repair=True)  # without --force: nothing a file entry claims is dropped
    assert zarr.open_array(str(path / "attention"), mode="r").shape[0] == 24
    assert _manifest(path)["files"] == files
    out = cli("check", path, "--repair", "--force")
    assert out.exit_code == 0, out.output
    note = (f"--force: dropped committed batches {first}..19 and batches 20..23 that file entries claimed past the commit"
            f" and rewound the manifest to {first} batches; ingest again to restore {len(past)} files")
    assert note in out.stderr
    assert not set(past) & set(_manifest(path)["files"])
    assert ingest([folder], path).ok  # the files come back (it used to say "unchanged" and restore nothing)
    assert_same_store(path, clean)
    assert store_problems(path) == []


def test_committed_lowered_to_a_file_boundary_says_the_right_range(built):
    folder, path, clean = built
    files = _manifest(path)["files"]
    last = max(files, key=lambda rel: files[rel]["start"])
    start = files[last]["start"]
    _edit(path / store.MANIFEST, lambda m: m.update(committed=start))
    problems = store_problems(path, repair=True, force=True)
    note = next(p.repaired for p in problems if p.fix == check.DROP)
    assert note.startswith(f"--force: dropped batches {start}..23 that file entries claimed past the commit"
                           f" and rewound the manifest to {start} batches")
    assert f"{start}..{start - 1}" not in note
    assert ingest([folder], path).ok
    assert_same_store(path, clean)


# ---------------------------------------------------------------- item 8: one line for a bad stats chunk; --storage-option


def test_stats_chunk_failing_its_checksum_is_one_line(built, cli):
    _, path, _ = built
    chunk = path / "stats/entropy_mean/c.0.0.0"
    data = bytearray(chunk.read_bytes())
    data[len(data) // 2] ^= 0x40
    chunk.write_bytes(bytes(data))
    problems = store_problems(path)
    assert [str(p) for p in problems] == [
        "stats/entropy_mean/c.0.0.0: does not decode (crc32c checksum mismatch: the bytes on disk changed)"
    ]
    out = cli("stats", path)
    assert out.exit_code == 1
    assert _one_line_each(out) == [
        f"error: {path}: a chunk of the statistics fails its crc32c checksum (the bytes on disk changed);"
        " fastattn check names it, and repairing the store has fastattn stats recompute them"
    ]
    with pytest.raises(StoreError, match="fails its crc32c checksum"), read_errors(path):
        open_stats(path).entropy_mean.values
    assert all(p.repaired for p in store_problems(path, repair=True))
    assert cli("stats", path).exit_code == 0 and store_problems(path) == []


def test_check_takes_storage_options(built, cli, monkeypatch):
    _, path, _ = built
    import fsspec

    memory = fsspec.filesystem("memory")
    memory.put(str(path), "/damage/s.zarr", recursive=True)
    try:
        out = cli("check", "memory://damage/s.zarr", "--storage-option", "skip_instance_cache=true")
        assert out.exit_code == 0, out.output
        assert out.stderr.startswith("memory://damage/s.zarr: ok (24 committed batches")
        seen = []
        original = store.Location.__init__

        def spy(self, location, storage_options=None):
            seen.append(storage_options)
            original(self, location, storage_options)

        monkeypatch.setattr(store.Location, "__init__", spy)
        cli("check", "memory://damage/s.zarr", "--storage-option", "client_kwargs.region_name=x", "--storage-option", "anon=true")
        assert seen[0] == {"client_kwargs": {"region_name": "x"}, "anon": True}
        out = cli("check", "memory://damage/s.zarr", "--storage-option", "novalue")
        assert out.exit_code == 2 and out.stderr.strip() == "error: --storage-option takes KEY=VALUE (KEY may be a.b for a nested option), not 'novalue'"
    finally:
        memory.rm("/damage", recursive=True)


# ---------------------------------------------------------------- never a traceback, whatever metadata is broken


#: Statistics arrays broken in turn: a per-query variable, a flag, a coordinate (all ~30 are laid
#: out alike; every one's missing chunk is tested above).
STATS_SAMPLE = ("stats/entropy/zarr.json", "stats/uniform/zarr.json", "stats/rank/zarr.json")


def _metadata_files(root: Path) -> list[str]:
    """Every node's zarr.json but the root's, with the statistics arrays sampled."""
    every = sorted(p.relative_to(root).as_posix() for p in root.rglob("zarr.json") if p.parent != root)
    assert len(every) == len(store.ARRAYS) + 1 + 1 + len(STATS_SCHEMA) + 1 + 5  # the schema, _fastattn, stats, rollout
    return [rel for rel in every if not rel.startswith("stats/") or rel.count("/") == 1 or rel in STATS_SAMPLE]


DAMAGE = ("{}", "not json", "deleted")


def test_any_broken_metadata_is_lines_and_repair_recovers(built, cli):
    """Every array and group metadata file of the store (statistics sampled) broken in turn (as `{}`, as text
    that is not JSON, or deleted, by turns): check and repair give lines, never a traceback;
    what repair cannot restore, --force and a re-ingest can."""
    folder, path, clean = built
    want = store_snapshot(clean)  # the clean store is read-only: one snapshot for the 22 comparisons
    files = _metadata_files(clean)
    assert len(files) == 22
    for i, rel in enumerate(files):
        damage = DAMAGE[i % len(DAMAGE)]
        shutil.rmtree(path)
        shutil.copytree(clean, path)
        target = path / rel
        if damage == "deleted":
            target.unlink()
        else:
            target.write_text(damage)
        result = run_check(path)
        # without its metadata a rollout group has no record (uncommitted: nothing trusts it), and
        # fastattn's own group is no group (nothing reads it as one)
        harmless = rel in ("rollout/zarr.json", f"{store.META}/zarr.json") and damage == "deleted"
        assert not result.ok or harmless, (rel, damage)
        out = cli("check", path, "--repair", "--force")
        _one_line_each(out)
        assert out.exit_code in (0, 1), (rel, damage, out.output)
        assert ingest([folder], path).ok, (rel, damage)
        remaining = store_problems(path)
        assert remaining == [], (rel, damage, _lines(remaining))
        assert_same_store(path, want)
