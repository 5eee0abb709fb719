"""`fastattn check`: every kind of damage is named in one line; --repair fixes what it can,
and drops committed batches only with --force."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import click
import pytest
import zarr
from click.testing import CliRunner
from conftest import SAMPLES, assert_same_store, ragged_dumps, softmax_rows, store_snapshot, write_dump

from fastattn import check, store
from fastattn.check import store_problems, run_check
from fastattn.errors import StoreError
from fastattn.ingest import ingest
from fastattn.stats import write_stats
from fastattn_cli.check_cmd import register

runner = CliRunner()


@pytest.fixture(autouse=True)
def small_chunks(monkeypatch):
    """A few batches per chunk, so small stores still span several chunks."""
    monkeypatch.setattr(store.schema, "CHUNK_BYTES", 8 << 10)


@pytest.fixture
def cli():
    app = click.Group()
    register(app)
    return lambda *args: runner.invoke(app, ["check", *map(str, args)])


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """Dumps over several chunks and the store a clean ingest makes of them (read-only)."""
    root = tmp_path_factory.mktemp("check")
    folder = ragged_dumps(root / "dumps", np.random.default_rng(7))
    clean = root / "clean.zarr"
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(store.schema, "CHUNK_BYTES", 8 << 10)
        assert ingest([folder], clean).ok
    manifest = store.read_manifest(store.Location(clean))
    assert manifest.committed == 24 and manifest.batch_chunk == 5, "several chunks needed"
    return folder, clean


@pytest.fixture
def built(corpus, tmp_path):
    """(dumps folder, a fresh copy of the clean store to damage, the clean store)."""
    folder, clean = corpus
    path = tmp_path / "s.zarr"
    shutil.copytree(clean, path)
    return folder, path, clean


def _flip(path: Path, offset: int | None = None) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2 if offset is None else offset] ^= 0x40
    path.write_bytes(bytes(data))


def _group(path) -> zarr.Group:
    return zarr.open_group(str(path), mode="r+", use_consolidated=False)


def _manifest(path) -> dict:
    return json.loads((Path(path) / store.MANIFEST).read_text())


def _write_manifest(path, body: dict) -> None:
    (Path(path) / store.MANIFEST).write_text(json.dumps(body))


def _lines(problems) -> str:
    return "\n".join(map(str, problems))


# ---------------------------------------------------------------- clean stores


def test_clean_stores_have_no_problems(built, tmp_path, cli):
    _, path, _ = built
    result = run_check(path)
    assert result.problems == [], _lines(result.problems)
    assert result.committed == 24 and result.batches == 24
    assert result.chunks >= 2 * 3 + 4 * 3  # attention (2 layers x 3 batch-chunks), per-batch arrays, coordinates
    out = cli(path)
    assert out.exit_code == 0, out.output
    assert out.stderr.strip() == f"{path}: ok (24 committed batches, {result.chunks} chunks decoded, every value checked)"
    # the real MiniLM samples (padding, masks), float16 and cross-attention stores
    real = tmp_path / "real.zarr"
    ingest([SAMPLES], real)
    half = tmp_path / "half.zarr"
    ingest([SAMPLES], half, dtype="float16")
    rng = np.random.default_rng(0)
    for i in range(4):
        write_dump(tmp_path / "cross" / f"c{i}.npz", softmax_rows(rng, (2, 3, 5, 7)))
    cross = tmp_path / "cross.zarr"
    ingest([tmp_path / "cross"], cross)
    for p in (real, half, cross):
        assert store_problems(p) == [], _lines(store_problems(p))


def test_reads_one_chunk_at_a_time(built, monkeypatch):
    _, path, _ = built
    attention = zarr.open_array(str(path / "attention"), mode="r")
    chunk_size = int(np.prod(attention.chunks))
    largest = []
    original = zarr.Array.__getitem__

    def spy(self, selection):
        values = original(self, selection)
        largest.append((self.path, np.size(values)))
        return values

    monkeypatch.setattr(zarr.Array, "__getitem__", spy)
    assert store_problems(path) == []
    sizes = [n for name, n in largest if name == "attention"]
    assert sizes and max(sizes) <= chunk_size < attention.size


# ---------------------------------------------------------------- damaged chunks


def test_flipped_byte_is_named_and_dropped_only_with_force(built, cli):
    folder, path, clean = built
    key = "attention/c.1.1.0.0.0"
    _flip(path / key)
    problems = store_problems(path)
    assert [p.where for p in problems] == [key], _lines(problems)
    assert "checksum" in problems[0].message and "--force" in problems[0].message
    with pytest.raises(ValueError, match="checksum"):
        store.open_store(path).attention.values  # never wrong numbers

    out = cli(path, "--repair")  # without --force nothing committed is deleted
    assert out.exit_code == 1
    assert out.stderr.splitlines()[0].startswith(f"{key}: does not decode")
    assert "1 remaining" in out.stderr.splitlines()[-1]
    assert _manifest(path)["committed"] == 24

    out = cli(path, "--repair", "--force")
    assert out.exit_code == 0, out.output
    line = out.stderr.splitlines()[0]
    chunk = _manifest(path)["batch_chunk"]
    cut = _manifest(path)["committed"]
    assert "[repaired: --force: dropped committed batches" in line and f"rewound the manifest to {cut} batches" in line
    assert cut <= chunk  # from the first file touching batch-chunk 1
    assert store_problems(path) == []
    assert ingest([folder], path).ok  # ingesting again restores the dropped files
    assert_same_store(path, clean)


def test_missing_chunk_and_force_without_repair(built, cli):
    _, path, _ = built
    os.remove(path / "attention/c.2.0.0.0.0")
    problems = store_problems(path)
    assert len(problems) == 1 and problems[0].where == "attention/c.2.0.0.0.0"
    assert problems[0].message.startswith("missing chunk")
    out = cli(path, "--force")
    assert out.exit_code == 1 and out.stderr.strip() == "error: --force only works with --repair"


def test_rebuildable_arrays_are_repaired_without_force(built):
    _, path, clean = built
    _flip(path / "source/c.1")  # a corrupt chunk of source
    group = _group(path)
    group["source_index"][5] = 7  # a wrong value, stored with a valid checksum
    group["layer"][1] = 9  # a wrong coordinate
    shutil.rmtree(path / "head")  # a missing coordinate array
    problems = store_problems(path)
    wheres = sorted(p.where for p in problems)
    assert wheres == ["head", "layer", "source/c.1", "source_index"], _lines(problems)
    assert "batch 5 says 7" in next(p for p in problems if p.where == "source_index").message
    problems = store_problems(path, repair=True)
    assert all(p.repaired for p in problems), _lines(problems)
    assert store_problems(path) == []
    assert_same_store(path, clean)


def test_corrupt_per_batch_and_token_chunks_need_force(built):
    _, path, _ = built
    _flip(path / "length/c.0")
    _flip(path / "token/c.2.0")
    problems = store_problems(path)
    assert {p.where for p in problems} == {"length/c.0", "token/c.2.0"}, _lines(problems)
    assert all(p.fix == check.DROP for p in problems)
    assert store_problems(path, repair=True, force=True)[0].repaired.startswith("--force: dropped committed batches 0..23")
    assert _manifest(path)["committed"] == 0 and store_problems(path) == []


# ---------------------------------------------------------------- values


def test_bad_values_name_batch_and_layer(built):
    _, path, _ = built
    group = _group(path)
    length = group["length"][:]
    attention = group["attention"]
    b = 10
    n = int(length[b])
    attention[b, 1, 2, 0, 0] = np.nan  # inside the valid block
    attention[b + 1, 0, 0, 0, int(length[b + 1])] = 0.0 if int(length[b + 1]) < attention.shape[-1] else np.nan
    row = attention[b + 2, 1, 1, 0, :]
    attention[b + 2, 1, 1, 0, :] = row * 1.5  # a row summing to 1.5
    group["length"][b + 3] = 99
    problems = store_problems(path)
    text = _lines(problems)
    assert f"attention batch {b} layer 1: NaN or Inf inside the valid {n} x {n} block (head 2, query 0, key 0)" in text
    assert f"attention batch {b + 2} layer 1: rows do not sum to 1 (off by 0.5" in text
    assert f"length[{b + 3}]: 99 outside 1..{attention.shape[-1]}" in text
    if int(length[b + 1]) < attention.shape[-1]:
        assert f"attention batch {b + 1} layer 0: a value outside the valid" in text
    assert all(p.fix == check.DROP for p in problems)


def test_float16_dumps_are_checked_at_the_float16_tolerance(tmp_path, rng):
    att = softmax_rows(rng, (2, 3, 8, 8))
    att[0, 0, 0] *= 1.004  # off by 4e-3: fine for a float16 dump, not for a float32 one
    write_dump(tmp_path / "d" / "a.npz", att.astype(np.float16))
    half = tmp_path / "half.zarr"
    assert ingest([tmp_path / "d"], half, dtype="float16").ok
    assert store_problems(half) == []
    full = tmp_path / "full.zarr"
    assert ingest([tmp_path / "d"], full).ok  # the dump is float16, validated at 1e-2...
    _group(full)["attention"][0, 0, 0, 0, :] = att[0, 0, 0]
    assert store_problems(full) == []  # ...and checked at 1e-2 in a float32 store too
    _group(full)["attention"][0, 0, 0, 0, :] = att[0, 0, 0] * 1.01  # now off by ~1.4e-2
    assert "rows do not sum to 1 (off by 0.014" in _lines(store_problems(full))


def test_many_problems_are_capped(built):
    _, path, _ = built
    group = _group(path)
    attention = group["attention"]
    attention[:, :, :, 0, 0] = np.nan  # every sample of every layer
    problems = store_problems(path)
    assert len(problems) == check.MAX_PER_KIND + 1
    assert problems[-1].message.startswith(f"{2 * 24 - check.MAX_PER_KIND} more problems of this kind")
    repaired = store_problems(path, repair=True, force=True)
    assert all(p.repaired for p in repaired)
    assert _manifest(path)["committed"] == 0


# ---------------------------------------------------------------- leftovers of interrupted runs


def test_interrupted_run_leftovers_are_repaired(built, cli):
    folder, path, clean = built
    group = _group(path)
    store.resize(group, batch=30)  # a killed append: arrays grown past the commit
    group["attention"][27:30] = np.ones((3, 2, 3, 11, 11), dtype=np.float32)
    (path / "attention/c.0.0.0.0.0.7f3a.partial").write_bytes(b"half a chunk")
    (path / "_fastattn/.manifest.json.4242.tmp").write_bytes(b"{")
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    lock = {"pid": int(dead.stdout), "host": socket.gethostname(), "since": "2026-01-01T00:00:00+00:00", "purpose": "fastattn ingest"}
    (path / store.LOCK).write_text(json.dumps(lock))
    problems = store_problems(path)
    text = _lines(problems)
    assert f"_fastattn/lock: stale lock left by fastattn ingest (pid {lock['pid']} on {lock['host']}" in text
    assert "attention: 6 batches past the last commit (24 committed), left by an interrupted run" in text
    assert "2 temporary files left by an interrupted write" in text
    assert "consolidated metadata is stale" in text
    assert all(p.fix not in (None, check.DROP) for p in problems)
    out = cli(path, "--repair")
    assert out.exit_code == 0, out.output
    assert out.stderr.count("[repaired:") == len(problems)
    assert not (path / store.LOCK).exists()
    assert not list(path.rglob("*.partial")) and not list(path.rglob(".*.tmp"))
    assert zarr.open_array(str(path / "attention"), mode="r").shape[0] == 24
    assert store_problems(path) == []
    assert_same_store(path, clean)
    assert ingest([folder], path).ok  # and an ingest after the repair adds nothing
    assert_same_store(path, clean)


def test_a_live_writer_is_left_alone(built, cli):
    _, path, _ = built
    store.resize(_group(path), batch=30)  # what a running ingest looks like
    with store.Lock(store.Location(path), "fastattn ingest"):
        assert store_problems(path) == []  # committed content is fine; past-commit data is the writer's
        out = cli(path, "--repair")
        assert out.exit_code == 1
        assert f"being written by fastattn ingest (pid {os.getpid()} on {socket.gethostname()} since" in out.stderr
    assert [p.fix for p in store_problems(path)] == [check.PAST, check.CONSOLIDATED]


# ---------------------------------------------------------------- the manifest


def test_manifest_inconsistencies(built):
    _, path, _ = built
    body = _manifest(path)
    files = body["files"]
    names = sorted(files, key=lambda r: files[r]["start"])
    first, second = files[names[0]], files[names[1]]
    second["start"] -= 1  # overlaps the first file's last batch
    files[names[-1]]["stop"] = 99  # past the committed batches
    files["copy.npz"] = dict(first, status="duplicate of gone.npz")
    _write_manifest(path, body)
    text = _lines(store_problems(path))
    assert f"{store.MANIFEST}: {names[1]} and {names[0]} both claim batch {first['stop'] - 1}" in text
    assert f"{names[-1]}: batches {files[names[-1]]['start']}..98 are not within the 24 committed" in text
    assert "copy.npz: duplicate of gone.npz, which is not an ingested file" in text
    assert "batches are claimed by no file" in text  # the overlapping file was not counted
    problems = store_problems(path, repair=True, force=True)
    assert all(p.repaired for p in problems), _lines(problems)
    assert _manifest(path)["committed"] == first["start"] + 0 and "copy.npz" not in _manifest(path)["files"]
    assert store_problems(path) == []


def test_unclaimed_batches_and_stats_count(built):
    _, path, _ = built
    body = _manifest(path)
    rel = max(body["files"], key=lambda r: body["files"][r]["start"])
    del body["files"][rel]
    body["stats_committed"] = 30
    _write_manifest(path, body)
    text = _lines(store_problems(path))
    assert "3 committed batches are claimed by no file (21..23)" in text
    assert "statistics are committed for 30 batches, but the store has 24" in text


def test_stats_group_is_checked(built):
    _, path, _ = built
    write_stats(path)
    assert _manifest(path)["stats_committed"] == 24
    assert store_problems(path) == []
    _flip(path / "stats/entropy/c.0.0.0.0")
    problems = store_problems(path)
    assert [p.where for p in problems] == ["stats/entropy/c.0.0.0.0"]
    problems = store_problems(path, repair=True)  # statistics can be recomputed: no --force needed
    assert problems[0].repaired.startswith("statistics uncommitted")
    assert _manifest(path)["stats_committed"] == 0 and _manifest(path)["committed"] == 24
    assert store_problems(path) == []


#: A derived group declared only here, as a new one would be in the schema: per batch and layer,
#: the mean weight of the valid block, times `scale`.
MEANS = store.schema.Derived(
    "means", "write_means", "attribute", ("scale",),
    layout=lambda record: {"mean": ("batch", "layer"), "batch": ("batch",), "layer": ("layer",)},
    extent=lambda manifest, record, dims: {"batch": (record["batches"],) * 2, "layer": (manifest.layers,) * 2},
    noun="the means", them="them",
)


def write_means(path, scale: float) -> None:
    """The group's writer: all it needs of the store are checked_manifest, writing_derived and commit_derived."""
    loc = store.as_location(path)
    store.checked_manifest(loc)
    with store.writing_derived(loc, MEANS) as manifest:
        means = store.open_store(loc).attention.mean(("head", "query", "key")) * scale
        means.astype(np.float64).to_dataset(name="mean").to_zarr(loc.zarr_store(), group=MEANS.name, mode="w", consolidated=False)
        store.commit_derived(loc, manifest, MEANS, manifest.committed, scale=scale)


def test_a_derived_group_declared_once_is_written_opened_checked_and_repaired(built, monkeypatch, tmp_path):
    _, path, _ = built
    monkeypatch.setitem(store.DERIVED, MEANS.name, MEANS)
    loc = store.Location(path)
    with pytest.raises(StoreError, match="no means yet .run write_means."):
        store.open_derived(loc, MEANS)
    write_means(path, scale=2.0)
    opened = store.open_derived(loc, MEANS)
    assert opened.attrs["batches"] == 24 and opened.attrs["scale"] == 2.0 and opened.attrs["ingests"] == 1
    attention = store.open_store(path).attention.values.astype(np.float64)
    valid = ~np.isnan(attention)
    want = 2.0 * np.where(valid, attention, 0).sum(axis=(2, 3, 4)) / valid.sum(axis=(2, 3, 4))
    np.testing.assert_allclose(opened["mean"].values, want, rtol=1e-6)
    assert store_problems(path) == []
    chunk = next(p for p in (path / "means" / "mean" / "c").rglob("*") if p.is_file())
    chunk.unlink()  # zarr would read it as fill values: check must name it
    problems = store_problems(path)
    key = chunk.relative_to(path).as_posix()
    assert [(p.where, p.fix) for p in problems] == [(key, "means")]
    assert "missing chunk" in problems[0].message
    repaired = store_problems(path, repair=True)
    assert [p.repaired for p in repaired] == ["means removed; write_means recomputes them"]
    assert not (path / "means").exists() and store_problems(path) == []
    write_means(path, scale=1.0)
    (path / "means" / "mean" / "zarr.json").write_text("{}")  # metadata the consolidation would choke on
    assert {p.fix for p in store_problems(path)} == {"means"}
    write_means(path, scale=1.0)
    extra = write_dump(tmp_path / "more" / "extra.npz", softmax_rows(np.random.default_rng(3), (2, 3, 11, 11)))
    assert ingest([extra], path).ok
    with pytest.raises(StoreError, match="out of date .the means of 24 batches, the store has 25"):
        store.open_derived(loc, MEANS)
    assert store_problems(path) == []  # a stale record is nothing anyone trusts: not a problem


@pytest.mark.parametrize(
    "damage,message",
    [
        ("no_manifest", "_fastattn/manifest.json: missing: no ingest was ever committed"),
        ("bad_manifest", "_fastattn/manifest.json: unreadable"),
        ("not_fastattn", "zarr.json: no fastattn attributes: not a fastattn store"),
        ("version", "zarr.json: store format 99, this fastattn reads 1"),
        ("not_zarr", "zarr.json: missing: not a Zarr store"),
        ("missing", "no such store"),
        ("dims", "attention: dims ('b', 'layer', 'head', 'query', 'key'), expected"),
    ],
)
def test_unusable_stores_are_one_line(built, cli, damage, message):
    _, path, _ = built
    if damage == "no_manifest":
        os.remove(path / store.MANIFEST)
    elif damage == "bad_manifest":
        (path / store.MANIFEST).write_text('{"format": "fastattn-manifest", "committed": "x"')
    elif damage in ("not_fastattn", "version"):
        root = json.loads((path / "zarr.json").read_text())
        if damage == "version":
            root["attributes"]["fastattn"]["format_version"] = 99
        else:
            del root["attributes"]["fastattn"]
        (path / "zarr.json").write_text(json.dumps(root))
    elif damage == "not_zarr":
        os.remove(path / "zarr.json")
    elif damage == "missing":
        shutil.rmtree(path)
    elif damage == "dims":
        meta = json.loads((path / "attention/zarr.json").read_text())
        meta["dimension_names"][0] = "b"
        (path / "attention/zarr.json").write_text(json.dumps(meta))
    before = sorted(str(p) for p in path.rglob("*")) if path.exists() else []
    out = cli(path, "--repair")
    assert out.exit_code == 1
    assert message in out.stderr.splitlines()[0], out.stderr
    assert "Traceback" not in out.output
    assert (sorted(str(p) for p in path.rglob("*")) if path.exists() else []) == before  # nothing written


def test_a_lock_record_from_another_host_that_nobody_holds_is_stale(built):
    """Only the flock says a writer works: a record alone (any host, any pid) is a leftover."""
    _, path, _ = built
    lock = {"pid": 1, "host": "gpu-node-7", "since": "2026-01-01T00:00:00+00:00", "purpose": "fastattn stats"}
    (path / store.LOCK).write_text(json.dumps(lock))
    problems = store_problems(path)
    assert [p.fix for p in problems] == [check.LOCK]
    assert "stale lock left by fastattn stats (pid 1 on gpu-node-7 since 2026-01-01" in str(problems[0])
    assert store_problems(path, repair=True)[0].repaired
    assert store_problems(path) == [] and not (path / store.LOCK).exists()
    assert store_snapshot(path)["committed"] == 24