"""The store package's own pieces: the typed manifest (written byte for byte as before), and the
two kinds of Location behind one interface."""

from __future__ import annotations

import json
import pickle
import uuid

import pytest
from conftest import DATA

from fastattn import store
from fastattn.errors import StoreError, first_line
from fastattn.store import FileEntry, Manifest, Status

LEGACY_MANIFEST = DATA / "store_v1" / "store.zarr" / store.MANIFEST


def test_a_manifest_of_before_is_written_back_byte_for_byte():
    raw = LEGACY_MANIFEST.read_bytes()
    manifest = Manifest.from_json(raw)
    assert all(isinstance(e, FileEntry) and e.status is Status.INGESTED for e in manifest.files.values())
    assert manifest.to_json() == raw


def test_entries_of_every_kind_round_trip_unchanged():
    body = json.loads(LEGACY_MANIFEST.read_bytes())
    first, second, third = body["files"].values()
    del first["source"], first["layout"], first["dtype"]  # an entry of the first stores
    first["written_by_a_newer_fastattn"] = [1, 2]
    second["status"] = f"duplicate of {next(iter(body['files']))}"
    third["status"] = "quarantined"
    raw = json.dumps(body, indent=1).encode()
    manifest = Manifest.from_json(raw)
    a, b, c = manifest.files.values()
    assert (a.source, a.layout, a.dtype, a.extra) == (None, None, None, {"written_by_a_newer_fastattn": [1, 2]})
    assert a.source_name("/abs/key.npz") == "/abs/key.npz" and b.source_name("k") == "attention_batch_0001.npz"
    assert (b.status, b.duplicate_of, b.ingested) == (Status.DUPLICATE, next(iter(body["files"])), False)
    assert (c.status, c.status_text) == (Status.UNKNOWN, "quarantined")
    assert manifest.claimed() == 2  # only ingested entries claim batches
    assert manifest.to_json() == raw


@pytest.mark.parametrize(
    ("field", "value", "says"),
    [("start", "0", "['start'] is '0', not int"), ("layout", 5, "['layout'] is 5, not str"),
     ("status", None, "['status'] is None, not str")],
)
def test_a_file_entry_of_the_wrong_type_is_named(field, value, says):
    body = json.loads(LEGACY_MANIFEST.read_bytes())
    key = next(iter(body["files"]))
    body["files"][key][field] = value
    with pytest.raises(StoreError, match=rf"^damaged: files\['{key}'\]" + says.replace("[", r"\[").replace("]", r"\]")):
        Manifest.from_json(json.dumps(body).encode())


@pytest.fixture(params=["local", "remote"])
def location(request, tmp_path):
    if request.param == "local":
        yield store.Location(tmp_path / "s.zarr")
        return
    url = f"memory://{uuid.uuid4().hex}/s.zarr"
    loc = store.Location(url)
    yield loc
    folder = loc.root.rsplit("/", 1)[0]
    if loc.fs.exists(folder):
        loc.fs.rm(folder, recursive=True)


def test_both_locations_do_the_same_file_operations(location):
    expected = store.RemoteLocation if str(location).startswith("memory://") else store.LocalLocation
    assert type(location) is expected and store.as_location(location) is location
    assert location.is_new() and not location.exists()
    location.write_atomic("zarr.json", b"{}")
    location.write_atomic("stats/a/zarr.json", b"12345")  # a folder that is not there yet
    location.write_atomic("stats/a/c/0", b"x" * 10)
    location.write_atomic(f"{store.META}/manifest.json", b"[]")
    assert location.keys() == ["_fastattn/manifest.json", "stats/a/c/0", "stats/a/zarr.json", "zarr.json"]
    assert location.read("stats/a/zarr.json") == b"12345" and location.read("missing") is None
    assert location.nbytes("stats") == 15 and location.exists("stats/a/c/0") and not location.is_new()
    assert location.leftovers() == []
    location.delete("stats/a/c/0")
    location.delete("stats/a/c/0")  # missing: nothing
    assert not location.exists("stats/a/c/0") and location.exists("stats/a/zarr.json")
    location.remove_prefix("stats")
    assert location.keys() == ["_fastattn/manifest.json", "zarr.json"]
    assert (location.local_path(store.LOCK) is None) == (expected is store.RemoteLocation)
    again = pickle.loads(pickle.dumps(location))  # what a dask worker gets
    assert type(again) is expected and again.read("zarr.json") == b"{}"
    location.remove()
    assert location.is_new()


def test_local_leftovers_are_the_temporary_files_of_interrupted_writes(tmp_path):
    loc = store.Location(tmp_path)
    for rel in ("zarr.json", "a/c/0.partial", "a/c/0", "_fastattn/.manifest.json.99.tmp", "a/tmp"):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_bytes(b"x")
    assert loc.leftovers() == ["_fastattn/.manifest.json.99.tmp", "a/c/0.partial"]


def test_storage_options_on_a_local_path_are_refused(tmp_path):
    with pytest.raises(StoreError, match="storage_options apply to store URLs"):
        store.as_location(tmp_path, {"anon": True})


def test_first_line():
    assert first_line(ValueError("  one\ntwo")) == "one"
    assert first_line(KeyError()) == "KeyError" and first_line(OSError("  ")) == "OSError"
