"""Broken stores, paths and URLs give ONE line naming the path and the problem, never a
traceback, and leave the store as it was: through the command line (exit 1; 2 for usage)
and, for library entry points, as a FastattnError subclass."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
from conftest import SAMPLES, batched_dump, free_port

import fastattn
from fastattn import corpus, store
from fastattn.errors import StoreError
from fastattn.stats import write_stats

DUMPS = SAMPLES / "fixed"


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """The MiniLM samples ingested, with statistics: a store every command accepts."""
    path = tmp_path_factory.mktemp("built") / "s.zarr"
    assert fastattn.ingest([SAMPLES], path).ok
    write_stats(path)
    return path


@pytest.fixture
def path(built, tmp_path):
    """A fresh copy of the built store, to damage."""
    target = tmp_path / "s.zarr"
    shutil.copytree(built, target, symlinks=True)
    return target


def _tree(root) -> dict:
    """Every file (its bytes) and folder under root: to show that nothing was written."""
    if not os.path.lexists(root) or not os.path.isdir(root):
        return {}
    return {
        os.path.relpath(p, root): (open(p, "rb").read() if os.path.isfile(p) else "dir")
        for p in (os.path.join(d, n) for d, dirs, files in os.walk(root) for n in dirs + files)
    }


def _one_line(result, message: str, code: int = 1) -> None:
    """The command failed with exactly `error: message` on stderr, and nothing else."""
    assert "Traceback" not in result.output, result.output
    assert result.exit_code == code, (result.exit_code, result.output, result.exception)
    assert result.stderr.splitlines() == [f"error: {message}"], result.stderr


#: Each command that reads or writes a store, as run against STORE (and what it would write).
COMMANDS = {
    "info": lambda s, tmp: ["info", s],
    "stats": lambda s, tmp: ["stats", s],
    "plot": lambda s, tmp: ["plot", s, "overview", "-o", tmp / "fig.png"],
    "ingest": lambda s, tmp: ["ingest", DUMPS, s],
}


def _run_everywhere(cli, location, tmp_path, message: str, *, info: str | None = None) -> None:
    """info, stats, plot, ingest and `fastattn.open_store` all say `message` about `location`."""
    for name, args in COMMANDS.items():
        _one_line(cli(*args(location, tmp_path)), info if name == "info" and info else message)
    assert not (tmp_path / "fig.png").exists()
    with pytest.raises(StoreError) as caught:
        fastattn.open_store(location)
    assert str(caught.value) == message


# ---------------------------------------------------------------- damaged manifests


def _cut_in_half(path) -> str:
    manifest = path / store.MANIFEST
    data = manifest.read_bytes()
    manifest.write_bytes(data[: len(data) // 2])
    try:
        json.loads(data[: len(data) // 2])
    except ValueError as exc:
        return f"damaged: not valid JSON ({exc})"
    raise AssertionError("half a manifest parsed")


def _wrong_types(path) -> str:
    (path / store.MANIFEST).write_text('{"format":"fastattn-manifest","committed":"x"}')
    return "damaged: 'committed' is 'x', not a count (a whole number >= 0)"


def _files_a_list(path) -> str:
    body = json.loads((path / store.MANIFEST).read_text())
    body["files"] = list(body["files"])
    (path / store.MANIFEST).write_text(json.dumps(body))
    return "damaged: 'files' is a list, not a mapping of file entries"


def _entry_field(path) -> str:
    body = json.loads((path / store.MANIFEST).read_text())
    rel = sorted(body["files"])[0]
    body["files"][rel]["start"] = "0"
    (path / store.MANIFEST).write_text(json.dumps(body))
    return f"damaged: files['{rel}']['start'] is '0', not int"


@pytest.mark.parametrize("damage", [_cut_in_half, _wrong_types, _files_a_list, _entry_field])
def test_a_damaged_manifest_is_one_line(cli, path, tmp_path, damage):
    problem = damage(path)
    before = _tree(path)
    _run_everywhere(cli, str(path), tmp_path, f"{path}/{store.MANIFEST}: {problem}")
    assert _tree(path) == before


# ---------------------------------------------------------------- store paths that are no folder


def test_a_store_path_that_is_a_file(cli, tmp_path):
    target = tmp_path / "notes.txt"
    target.write_text("not a store\n")
    _run_everywhere(
        cli, str(target), tmp_path, f"{target}: a file, not a store (a store is a folder)",
        info=f"{target}: a file that is neither a store (a folder) nor an .npz dump: not an .npz archive (no zip signature)",
    )
    assert target.read_text() == "not a store\n"


def test_a_dangling_symlink(cli, tmp_path):
    link = tmp_path / "s.zarr"
    link.symlink_to(tmp_path / "gone.zarr")
    _run_everywhere(cli, str(link), tmp_path, f"{link}: a symbolic link to {tmp_path / 'gone.zarr'}, which does not exist")
    assert not os.path.lexists(tmp_path / "gone.zarr")  # ingest created nothing through the link


def test_a_symlink_loop(cli, tmp_path):
    a, b = tmp_path / "a.zarr", tmp_path / "b.zarr"
    a.symlink_to(b)
    b.symlink_to(a)
    _run_everywhere(cli, str(a), tmp_path, f"{a}: a loop of symbolic links, which leads to no folder")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.zarr", "b.zarr"]


def test_a_path_through_a_file(cli, tmp_path):
    (tmp_path / "plain").write_text("x")
    target = tmp_path / "plain" / "s.zarr"
    _one_line(cli("ingest", DUMPS, target), f"{target}: a part of the path is a file, not a folder")
    _one_line(cli("stats", target), f"{target}: a part of the path is a file, not a folder")


# ---------------------------------------------------------------- read-only stores

_RUN_CLI = """
import json, sys
from click.testing import CliRunner
from fastattn_cli.main import app
results = []
for args in json.loads(sys.argv[1]):
    r = CliRunner().invoke(app, args)
    results.append({"code": r.exit_code, "stdout": r.stdout, "stderr": r.stderr, "output": r.output})
print(json.dumps(results))
"""

#: How a store is made read-only for a process that runs as root here (where chmod stops nothing):
#: a read-only bind mount in a mount namespace of its own (EROFS), or `chmod -R a-w` seen by an
#: unprivileged user (a user namespace maps root, the files' owner, to uid 1000 without capabilities).
READ_ONLY = {
    "read-only mount": (["unshare", "-m", "sh", "-c", 'mount --bind -o ro "$0" "$0" && exec "$@"', "{store}"],
                        "it is on a read-only file system"),
    "chmod a-w, unprivileged": (["unshare", "-U", "--map-user=1000", "--map-group=1000"], "no permission to write it"),
}


class _Result:
    def __init__(self, body: dict):
        self.exit_code, self.stdout, self.stderr, self.output = body["code"], body["stdout"], body["stderr"], body["output"]
        self.exception = None


def _run_read_only(how: str, store_path, commands: list[list]) -> list[_Result]:
    """Run each command line through the CLI in one child process that cannot write the store."""
    prefix, _ = READ_ONLY[how]
    prefix = [part.replace("{store}", str(store_path)) for part in prefix]
    args = json.dumps([[str(a) for a in c] for c in commands])
    done = subprocess.run([*prefix, sys.executable, "-c", _RUN_CLI, args], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    return [_Result(body) for body in json.loads(done.stdout)]


@pytest.mark.parametrize("how", list(READ_ONLY))
def test_a_read_only_store(path, tmp_path, rng, how):
    new = batched_dump(rng, tmp_path / "new" / "extra.npz", [9, 6], layers=6, heads=12)
    if how.startswith("chmod"):
        subprocess.run(["chmod", "-R", "a-w", str(path)], check=True)
    before = _tree(path)
    try:
        ingest, stats_done, stats_todo, repair, rollout = _run_read_only(how, path, [
            ["ingest", new.parent, path],
            ["stats", path, "--format", "json"],  # every batch has statistics: nothing to write
            ["stats", path, "-k", "3"],  # another k: every batch must be computed again
            ["check", path, "--repair"],
            ["rollout", path],
        ])
    finally:
        subprocess.run(["chmod", "-R", "u+w", str(path)], check=True)
    message = f"{path}: cannot write the store: {READ_ONLY[how][1]}; nothing was changed"
    for result in (ingest, stats_todo, repair, rollout):
        _one_line(result, message)
    assert stats_done.exit_code == 0, stats_done.output
    body = json.loads(stats_done.stdout)
    assert body["batches"] == 11 and body["computed"] == 0 and len(body["heads"]) == 6 * 12
    assert _tree(path) == before


def test_stats_with_nothing_to_do_takes_no_lock(path, monkeypatch):
    """The library side of the read-only promise: a store whose statistics are complete is
    answered from the manifest, without the lock or any write."""

    def no_lock(*args):
        raise AssertionError("the lock was taken")

    monkeypatch.setattr(store.Lock, "__enter__", no_lock)
    assert write_stats(path) == {"computed": 0, "total": 11}
    with pytest.raises(AssertionError, match="the lock was taken"):
        write_stats(path, k=3)


def test_a_new_store_under_a_read_only_folder(tmp_path):
    folder = tmp_path / "ro"
    folder.mkdir()
    code = "import fastattn, sys; fastattn.ingest([sys.argv[1]], sys.argv[2])"
    cmd = ["unshare", "-m", "sh", "-c", 'mount --bind -o ro "$0" "$0" && exec "$@"', str(folder),
           sys.executable, "-c", code, str(DUMPS), str(folder / "s.zarr")]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 1
    last = done.stderr.strip().splitlines()[-1]
    assert last == (f"fastattn.errors.StoreError: {folder / 's.zarr'}: cannot write the store ({folder}):"
                    " it is on a read-only file system; nothing was changed")
    assert list(folder.iterdir()) == []


# ---------------------------------------------------------------- URLs and storage options


@pytest.fixture
def no_aws_credentials(monkeypatch, tmp_path):
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")


def test_an_unknown_protocol(cli, tmp_path):
    url = "foo://x/s.zarr"
    _run_everywhere(cli, url, tmp_path, f"{url}: unknown protocol 'foo://' (fsspec has no filesystem for it)")


def test_s3_without_credentials(cli, s3, no_aws_credentials):
    url = "s3://attn/s.zarr"
    message = (f"{url}: no credentials found (Unable to locate credentials); give key and secret in the storage"
               " options, or set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY")
    option = f"endpoint_url={s3['endpoint_url']}"
    _one_line(cli("stats", url, "--storage-option", option), message)
    _one_line(cli("ingest", DUMPS, url, "--storage-option", option), message)
    with pytest.raises(StoreError) as caught:
        fastattn.open_store(url, storage_options={"endpoint_url": s3["endpoint_url"]})
    assert str(caught.value) == message


def test_s3_endpoint_that_does_not_answer(cli, no_aws_credentials, monkeypatch):
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")  # botocore's retries of a refused connection: ~15 s of back-off
    url, endpoint = "s3://attn/s.zarr", f"http://127.0.0.1:{free_port()}"
    options = ["--storage-option", f"endpoint_url={endpoint}", "--storage-option", "key=a", "--storage-option", "secret=b"]
    result = cli("stats", url, *options)
    assert result.exit_code == 1 and "Traceback" not in result.output
    [line] = result.stderr.splitlines()
    assert line.startswith(f"error: {url}: cannot reach the store (EndpointConnectionError: Could not connect to the endpoint URL: \"{endpoint}/")
    with pytest.raises(StoreError, match=f"^{url}: cannot reach the store .*{endpoint}"):
        fastattn.ingest([DUMPS], url, storage_options={"endpoint_url": endpoint, "key": "a", "secret": "b"})


def test_storage_options_of_the_wrong_kind(cli, s3, built):
    url = "s3://attn/s.zarr"
    real = [f"--storage-option={k}={v}" for k, v in s3.items()]
    message = f"{url}: storage_options['client_kwargs'] must be a mapping of options, not 'oops' (e.g. {{'client_kwargs': {{'region_name': ...}}}})"
    _one_line(cli("stats", url, *real, "--storage-option", "client_kwargs=oops"), message)
    _one_line(cli("ingest", DUMPS, url, *real, "--storage-option", "client_kwargs=oops"), message)
    with pytest.raises(StoreError) as caught:
        fastattn.open_store(url, storage_options={**s3, "client_kwargs": "oops"})
    assert str(caught.value) == message
    # an option the filesystem does not know is found when its client is made
    _one_line(
        cli("stats", url, *real, "--storage-option", "color=blue"),
        f"{url}: storage options not accepted (AioSession.__init__() got an unexpected keyword argument 'color')",
    )
    # options for a local path are a mistake, not something to ignore
    _one_line(cli("stats", built, "--storage-option", "client_kwargs=oops"),
              f"{built}: storage_options apply to store URLs (s3://...), not to a local path")


@pytest.mark.parametrize(
    "options,message",
    [
        (["client_kwargs=oops", "client_kwargs.region_name=eu"], "--storage-option client_kwargs.region_name=eu: client_kwargs was given a value, so it cannot hold options"),
        (["client_kwargs.region_name=eu", "client_kwargs=oops"], "--storage-option client_kwargs=oops: client_kwargs holds nested options (client_kwargs.NAME=VALUE), it cannot be a value"),
        (["anon"], "--storage-option takes KEY=VALUE (KEY may be a.b for a nested option), not 'anon'"),
        (["client_kwargs.=x"], "--storage-option takes KEY=VALUE (KEY may be a.b for a nested option), not 'client_kwargs.=x'"),
    ],
)
def test_storage_option_usage_errors(cli, options, message):
    args = [a for o in options for a in ("--storage-option", o)]
    _one_line(cli("stats", "s3://attn/s.zarr", *args), message, code=2)


# ---------------------------------------------------------------- a store that commits no batch


def test_roles_and_compare_on_a_store_with_no_batches(cli, path, built):
    body = json.loads((path / store.MANIFEST).read_text())
    body.update(committed=0, stats_committed=0, files={})  # what `check --repair --force` leaves when the first file is damaged
    (path / store.MANIFEST).write_text(json.dumps(body))
    message = f"{path}: the store has no committed batches (run fastattn ingest)"
    _one_line(cli("roles", path), message)
    _one_line(cli("compare", path, built), message)
    _one_line(cli("compare", built, path), message)
    _one_line(cli("stats", path), message)
    for call in (corpus.corpus_stats, lambda p: corpus.compare(built, p), fastattn.open_stats):
        with pytest.raises(StoreError) as caught:
            call(path)
        assert str(caught.value) == message
    empty = fastattn.open_store(path)
    assert empty.sizes["batch"] == 0
    with pytest.raises(fastattn.FastattnError, match=f"^{path}: no batches to analyse$"):
        corpus.corpus_stats(empty)


# ---------------------------------------------------------------- an edited dtype


@pytest.mark.parametrize("dtype", ["int32", "float64"])
def test_an_edited_dtype(cli, built, path, tmp_path, dtype):
    meta_path = path / "attention" / "zarr.json"
    meta = json.loads(meta_path.read_text())
    assert meta["data_type"] == "float32"
    meta["data_type"] = dtype
    meta_path.write_text(json.dumps(meta))
    message = f"{meta_path}: data_type is '{dtype}', but the manifest says float32 (restore data_type to float32)"
    with pytest.raises(StoreError) as caught:
        fastattn.open_store(path)
    assert str(caught.value) == message
    _one_line(cli("plot", path, "overview", "-o", tmp_path / "fig.png"), message)
    assert not (tmp_path / "fig.png").exists()
    meta["data_type"] = "float32"  # restored, the store reads as before: nothing was damaged
    meta_path.write_text(json.dumps(meta))
    np.testing.assert_array_equal(fastattn.open_store(path).attention.values, fastattn.open_store(built).attention.values)


def test_an_unforeseen_os_error_is_still_one_line(cli, built, monkeypatch):
    """The CLI's last resort (every case above has its own message): an OSError from the
    library becomes `path: reason`."""
    from fastattn import summary

    def unreadable(path, **kwargs):
        raise PermissionError(13, "Permission denied", f"{path}/attention/zarr.json")

    monkeypatch.setattr(summary, "store_info", unreadable)
    _one_line(cli("info", built), f"{built}/attention/zarr.json: Permission denied")
