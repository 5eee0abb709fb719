"""Shared fixtures: real samples, small synthetic dumps, and store comparison."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest

DATA = Path(__file__).parent / "data"
SAMPLES = DATA / "minilm"


def pytest_configure(config):
    """Compiled kernels go to a cache of this test session (set before fastattn is imported, and
    inherited by the CLI and worker processes the tests start), never to the user's cache: runs
    stay hermetic, and each kernel compiles once per session instead of once per process."""
    os.environ["NUMBA_CACHE_DIR"] = tempfile.mkdtemp(prefix="fastattn-test-numba-")


def pytest_unconfigure(config):
    shutil.rmtree(os.environ["NUMBA_CACHE_DIR"], ignore_errors=True)


def softmax_rows(rng, shape, dtype=np.float32) -> np.ndarray:
    """Random attention: a softmax over the last axis of Gaussian logits (never all zeros)."""
    logits = rng.standard_normal(shape) * 2.0
    weights = np.exp(logits - logits.max(axis=-1, keepdims=True))
    return (weights / weights.sum(axis=-1, keepdims=True)).astype(dtype)


def write_dump(path, attention, **arrays) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(path, attention_weights=attention, **arrays)
    return path


def batched_dump(rng, path, lengths, layers=2, heads=3, size=None) -> Path:
    """A (layer, batch, head, q, k) dump with an attention_mask, padded keys weighted 0."""
    size = size or max(lengths)
    att = np.zeros((layers, len(lengths), heads, size, size), dtype=np.float32)
    mask = np.zeros((len(lengths), size), dtype=np.int8)
    for b, n in enumerate(lengths):
        att[:, b, :, :, :n] = softmax_rows(rng, (layers, heads, size, n))
        mask[b, :n] = 1
    return write_dump(path, att, attention_mask=mask)


def ragged_dumps(folder, rng, files: int = 8) -> Path:
    """Ragged batched dumps (with masks) and plain 4-d ones, 3 samples a file (8 files: 24)."""
    folder = Path(folder)
    for i in range(files):
        if i % 3 == 2:
            for j in range(3):
                write_dump(folder / f"d{i:02d}_{j}.npz", softmax_rows(rng, (2, 3, 9, 9)))
        else:
            batched_dump(rng, folder / f"d{i:02d}.npz", list(rng.integers(3, 12, size=3)), layers=2, heads=3, size=11)
    return folder


@pytest.fixture
def rng():
    return np.random.default_rng()


@pytest.fixture
def samples(tmp_path) -> Path:
    """A writable copy of the real MiniLM samples (fixed/ and batched/)."""
    target = tmp_path / "minilm"
    shutil.copytree(SAMPLES, target)
    for p in target.rglob("*"):
        os.chmod(p, 0o755 if p.is_dir() else 0o644)
    (target / "README.md").unlink(missing_ok=True)
    return target


def store_snapshot(path) -> dict:
    """Everything a reader can see of a store's committed content, as plain arrays."""
    from fastattn import store

    ds = store.open_store(path).compute()
    manifest = json.loads((Path(path) / store.MANIFEST).read_text())
    # by source name, not by key (the absolute path): stores of copies of the same dumps compare equal
    files = {
        entry.get("source", rel): {k: v for k, v in entry.items() if k != "mtime_ns"}
        for rel, entry in manifest["files"].items()
    }
    return {
        "attention": ds.attention.values,
        "length": ds.length.values,
        "source": ds.source.values.tolist(),
        "source_index": ds.source_index.values,
        "token": ds.token.values.tolist(),
        "input_id": ds.input_id.values if "input_id" in ds else None,  # a store from before input_id has none
        "committed": manifest["committed"],
        "files": files,
    }


def assert_same_store(a, b) -> None:
    """Stores `a` and `b` (paths, or a `store_snapshot` taken once for many comparisons) hold the same."""
    sa, sb = (x if isinstance(x, dict) else store_snapshot(x) for x in (a, b))
    assert sa["committed"] == sb["committed"]
    assert sa["files"] == sb["files"]
    assert sa["source"] == sb["source"] and sa["token"] == sb["token"]
    for name in ("length", "source_index", "input_id"):
        np.testing.assert_array_equal(sa[name], sb[name], err_msg=name)
    np.testing.assert_array_equal(sa["attention"], sb["attention"])  # NaNs compare equal here


@pytest.fixture(scope="session")
def cli():
    """Run the `fastattn` command line in-process: `cli("stats", path, "--format", "json")`."""
    from click.testing import CliRunner

    from fastattn_cli.main import app

    runner = CliRunner()

    def invoke(*args):
        return runner.invoke(app, [str(a) for a in args])

    return invoke


def free_port() -> int:
    """A loopback port nothing listens on (closed again at once)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def s3():
    """A moto S3 server on 127.0.0.1 that checks credentials, with a bucket `attn`: yields the
    storage options of a real user (endpoint_url, key, secret)."""
    import boto3

    port = free_port()
    env = {**os.environ, "INITIAL_NO_AUTH_ACTION_COUNT": "3", "AWS_DEFAULT_REGION": "us-east-1"}
    server = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    endpoint = f"http://127.0.0.1:{port}"
    try:
        for _ in range(100):
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
                break
            except OSError:
                time.sleep(0.1)
        iam = boto3.client("iam", endpoint_url=endpoint, region_name="us-east-1",
                           aws_access_key_id="x", aws_secret_access_key="x")
        iam.create_user(UserName="fastattn")
        policy = '{"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "*", "Resource": "*"}]}'
        iam.put_user_policy(UserName="fastattn", PolicyName="all", PolicyDocument=policy)
        key = iam.create_access_key(UserName="fastattn")["AccessKey"]
        options = {"endpoint_url": endpoint, "key": key["AccessKeyId"], "secret": key["SecretAccessKey"]}
        boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1", aws_access_key_id=options["key"],
                     aws_secret_access_key=options["secret"]).create_bucket(Bucket="attn")
        yield options
    finally:
        server.terminate()
        server.wait(timeout=10)
