"""The HTML report: self-contained (no network, no scripts), right numbers, figures first
then the findings, and every embedded image decodes in a real headless browser."""

from __future__ import annotations

import base64
import fcntl
import html
import io
import json
import os
import re
import select
import shutil
import subprocess
import sys
import time
from pathlib import Path

import click
import numpy as np
import pytest
from click.testing import CliRunner
from matplotlib.image import imread

from fastattn import report, store, summary
from fastattn.errors import FastattnError
from fastattn.ingest import ingest
from fastattn.synth import synthesize

try:
    from fastattn.stats import open_stats
except ImportError as exc:  # pragma: no cover - only before fastattn.stats exists
    pytestmark = pytest.mark.skip(reason=f"the report needs fastattn.stats, not available yet ({exc})")

LAYERS, HEADS = 2, 4


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """A ragged store without statistics, and its report (written through the CLI)."""
    root = tmp_path_factory.mktemp("report")
    synthesize(root / "dumps", files=6, layers=LAYERS, heads=HEADS, seq="12-24", batch=4, seed=3, jobs=2)
    path = str(root / "store.zarr")
    assert ingest([str(root / "dumps")], path, jobs=2).ok
    assert store.checked_manifest(store.Location(path)).stats_committed == 0

    from fastattn_cli.plot_cmd import register

    app = click.Group()
    register(app)
    out = root / "report.html"
    result = CliRunner().invoke(app, ["report", path, "-o", str(out), "--dpi", "50"])
    assert result.exit_code == 0, result.output
    return {"store": path, "html": out, "text": out.read_text(encoding="utf-8")}


def data_uris(text: str) -> list[bytes]:
    return [base64.b64decode(m) for m in re.findall(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', text)]


def test_report_computes_missing_statistics(built):
    manifest = store.checked_manifest(store.Location(built["store"]))
    assert manifest.stats_committed == manifest.committed == 24
    assert open_stats(built["store"]).sizes["batch"] == 24


def test_report_is_self_contained(built):
    text = built["text"]
    assert text.startswith("<!DOCTYPE html>")
    lowered = text.lower()
    for forbidden in ("<script", "<link", "@import", "url(", "<iframe", "<object", "<embed", "http://", "https://", "//cdn"):
        assert forbidden not in lowered, forbidden
    sources = re.findall(r'\b(?:src|href)\s*=\s*"([^"]*)"', text)
    assert sources and all(s.startswith("data:image/png;base64,") for s in sources)
    images = data_uris(text)
    # corpus: entropy map + one `batches` per layer; sample: overview, layers, one heads grid per layer
    assert len(images) == 1 + LAYERS + 2 + LAYERS
    for png in images:
        pixels = imread(io.BytesIO(png))[..., :3]
        assert pixels.std() > 0.05 and (~np.all(pixels > 0.98, axis=-1)).mean() > 0.05


def test_report_content(built):
    text = built["text"]
    stats = open_stats(built["store"])
    ds = store.open_store(built["store"])
    batch = report.representative_batch(ds.length.values)
    assert np.sort(ds.length.values)[(24 - 1) // 2] == ds.length.values[batch]
    assert f"Representative sample: batch {batch}</h2>" in text
    assert "24 (statistics for 24)" in text and f"{LAYERS} layers x {HEADS} heads" in text
    # the layer x head table: one row per head, mean entropy as in the statistics
    rows = re.findall(r"<tr(?: class=\"layer-start\")?><td>(\d+)</td><td>(\d+)</td><td>([0-9.]+)</td>", text)
    assert [(int(l), int(h)) for l, h, _ in rows] == [(l, h) for l in range(LAYERS) for h in range(HEADS)]
    entropy = stats.entropy_mean.mean("batch").transpose("layer", "head").values
    np.testing.assert_allclose([float(e) for *_, e in rows], entropy.ravel(), atol=6e-4)
    # the findings, one line each, after every figure and before the store and the table
    found = summary.findings(summary.head_table(stats))
    assert found, "synthetic sink/local heads make findings"
    items = re.findall(r'<ul class="findings">(.*?)</ul>', text, flags=re.S)
    assert len(items) == 1
    assert re.findall(r"<li>(.*?)</li>", items[0]) == [html.escape(summary.finding_line(f)) for f in found]
    figures = [m.start() for m in re.finditer("<figure>", text)]
    sections = [text.index(f"<h2>{name}</h2>") for name in ("Whole corpus", "Findings", "Store", "Every head")]
    assert sections == sorted(sections)
    assert sections[0] < figures[0] and figures[-1] < sections[1]  # the figures come first


def test_report_reads_each_attention_chunk_of_its_sample_once(built, tmp_path, monkeypatch):
    """The overview, the layers figure and the heads grids share one read of each plane:
    each chunk holding the sample is read once (its statistics are in the store already)."""
    import zarr.storage

    read = []
    original = zarr.storage.LocalStore.get

    async def counting_get(self, key, *args, **kwargs):
        if key.startswith("attention/c."):
            read.append(key)
        return await original(self, key, *args, **kwargs)

    monkeypatch.setattr(zarr.storage.LocalStore, "get", counting_get)
    report.write_report(built["store"], tmp_path / "again.html", dpi=40)
    ds = store.open_store(built["store"])
    batch = report.representative_batch(ds.length.values)
    chunk = batch // ds.attention.encoding["chunks"][0]
    assert sorted(read) == [f"attention/c.{chunk}.{layer}.0.0.0" for layer in range(LAYERS)]


def test_representative_batch_is_the_median_length():
    assert report.representative_batch(np.array([30, 12, 20, 0, 25])) == 2
    assert report.representative_batch(np.array([5, 5, 5])) == 0
    with pytest.raises(FastattnError, match="length 0"):
        report.representative_batch(np.array([0, 0]))


def test_report_errors_are_one_line(tmp_path, built):
    from fastattn_cli.plot_cmd import register

    app = click.Group()
    register(app)
    runner = CliRunner()
    result = runner.invoke(app, ["report", str(tmp_path / "none.zarr"), "-o", str(tmp_path / "r.html")])
    assert result.exit_code == 1 and result.output.strip() == f"error: {tmp_path / 'none.zarr'}: no such store"
    result = runner.invoke(app, ["report", built["store"], "--batch", "99", "-o", str(tmp_path / "r.html")])
    assert result.exit_code == 1
    assert result.output.strip() == "error: batch 99 out of range: the store has 24 batches (0-23)"


# ---------------------------------------------------------------- a real browser


class DevTools:
    """Just enough of the Chrome DevTools protocol over `--remote-debugging-pipe`
    (fd 3: commands in, fd 4: replies and events out, each JSON message ending in NUL)."""

    def __init__(self, binary: str, user_data_dir: Path, net_log: Path):
        # our ends of two pipes, numbered from 10 up so they never collide with 3 and 4
        to_child_r, self.to_child = (_high(fd) for fd in os.pipe())
        self.from_child, from_child_w = (_high(fd) for fd in os.pipe())
        flags = [
            "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
            "--disable-background-networking", "--disable-component-update", "--disable-sync",
            "--disable-dev-shm-usage", f"--user-data-dir={user_data_dir}", f"--log-net-log={net_log}",
            "--remote-debugging-pipe", "--host-resolver-rules=MAP * ~NOTFOUND", "about:blank",
        ]  # fmt: skip
        # a tiny launcher puts the child's pipe ends on fds 3 and 4, then becomes chromium (same pid)
        launcher = (
            "import os, sys; r, w = int(sys.argv[1]), int(sys.argv[2]); os.dup2(r, 3); os.dup2(w, 4);"
            " os.close(r); os.close(w); os.execv(sys.argv[3], sys.argv[3:])"
        )
        self.process = subprocess.Popen(
            [sys.executable, "-c", launcher, str(to_child_r), str(from_child_w), binary, *flags],
            pass_fds=(to_child_r, from_child_w),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        os.close(to_child_r)
        os.close(from_child_w)
        self.buffer = b""
        self.next_id = 0
        self.events: list[dict] = []

    def _read_message(self, deadline: float) -> dict:
        while b"\0" not in self.buffer:
            left = deadline - time.monotonic()
            ready, _, _ = select.select([self.from_child], [], [], max(0.0, left))
            if not ready:
                raise TimeoutError("chromium did not answer in time")
            chunk = os.read(self.from_child, 1 << 20)
            if not chunk:
                raise RuntimeError("chromium closed the DevTools pipe")
            self.buffer += chunk
        message, self.buffer = self.buffer.split(b"\0", 1)
        return json.loads(message)

    def send(self, method: str, params: dict | None = None, session: str | None = None, timeout: float = 30) -> dict:
        self.next_id += 1
        body = {"id": self.next_id, "method": method, "params": params or {}}
        if session:
            body["sessionId"] = session
        os.write(self.to_child, json.dumps(body).encode() + b"\0")
        deadline = time.monotonic() + timeout
        while True:
            message = self._read_message(deadline)
            if message.get("id") == self.next_id:
                if "error" in message:
                    raise RuntimeError(f"{method}: {message['error']}")
                return message.get("result", {})
            self.events.append(message)

    def wait_event(self, method: str, timeout: float = 30) -> dict:
        deadline = time.monotonic() + timeout
        for i, event in enumerate(self.events):
            if event.get("method") == method:
                return self.events.pop(i)
        while True:
            message = self._read_message(deadline)
            if message.get("method") == method:
                return message
            self.events.append(message)

    def close(self) -> None:
        try:
            self.send("Browser.close", timeout=5)
        except Exception:
            pass
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()  # the chromium we started (the launcher exec'd into it: same pid)
            self.process.wait()
        os.close(self.to_child)
        os.close(self.from_child)


def _high(fd: int) -> int:
    """`fd` moved to a number >= 10 (close-on-exec, like every fd Python makes)."""
    moved = fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 10)
    os.close(fd)
    return moved


CHECK_IMAGES = """JSON.stringify({
  images: Array.from(document.images).map(i => ({complete: i.complete, width: i.naturalWidth,
                                                 height: i.naturalHeight, shown: i.getBoundingClientRect().width,
                                                 scheme: i.currentSrc.split(':')[0]})),
  scripts: document.scripts.length,
  resources: performance.getEntriesByType('resource').map(r => r.name),
  title: document.title,
})"""


CONTROL_URL = "http://fastattn-control.invalid/probe.png"


def page_requests_in_net_log(path: Path) -> list[str]:
    """Network URLs that a page (not the browser itself) started, from chromium's --log-net-log.

    The browser's own background requests (network time, updater, accounts) carry the
    initiator "not an origin"; a page's carry its origin ("null" for a file:// page)."""
    text = path.read_text(errors="replace").rstrip()
    try:
        log = json.loads(text)
    except ValueError:  # a log cut short by the browser's exit: close the events list
        log = json.loads(text.rstrip(",") + "]}")
    names = {number: name for name, number in log["constants"]["logEventTypes"].items()}
    urls = []
    for event in log["events"]:
        params = event.get("params", {})
        if names.get(event["type"]) == "URL_REQUEST_START_JOB" and re.match(r"(?:https?|wss?)://", params.get("url", "")):
            if params.get("initiator") != "not an origin":
                urls.append(params["url"])
    return urls


@pytest.mark.skipif(shutil.which("chromium") is None, reason="chromium is not on PATH (apt-get install -y chromium)")
def test_report_in_a_headless_browser(built, tmp_path):
    net_log = tmp_path / "net-log.json"
    control = tmp_path / "control.html"  # proves the network checks see a page's request
    control.write_text(f'<!DOCTYPE html><html><body><img src="{CONTROL_URL}"></body></html>')
    browser = DevTools(shutil.which("chromium"), tmp_path / "profile", net_log)
    try:
        target = browser.send("Target.createTarget", {"url": "about:blank"})["targetId"]
        session = browser.send("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
        browser.send("Network.enable", session=session)
        browser.send("Page.enable", session=session)
        browser.send("Page.navigate", {"url": built["html"].resolve().as_uri()}, session=session)
        browser.wait_event("Page.loadEventFired", timeout=60)
        result = browser.send("Runtime.evaluate", {"expression": CHECK_IMAGES, "returnByValue": True}, session=session)
        page = json.loads(result["result"]["value"])
        requested = [e["params"]["request"]["url"] for e in browser.events if e.get("method") == "Network.requestWillBeSent"]
        browser.events.clear()
        browser.send("Page.navigate", {"url": control.as_uri()}, session=session)
        browser.wait_event("Page.loadEventFired", timeout=60)
        control_requested = [
            e["params"]["request"]["url"] for e in browser.events if e.get("method") == "Network.requestWillBeSent"
        ]
    finally:
        browser.close()

    assert page["title"].startswith("fastattn report")
    assert page["scripts"] == 0
    images = page["images"]
    assert len(images) == 1 + LAYERS + 2 + LAYERS
    for image in images:
        assert image["complete"] and image["width"] > 100 and image["height"] > 100, image  # decoded
        assert image["shown"] > 100 and image["scheme"] == "data"
    assert page["resources"] == []  # no subresource was fetched at all
    assert requested[0] == built["html"].resolve().as_uri()
    assert all(url.startswith("data:image/png;base64,") for url in requested[1:]), requested
    assert CONTROL_URL in control_requested
    assert page_requests_in_net_log(net_log) == [CONTROL_URL]  # only the control page went for the network
