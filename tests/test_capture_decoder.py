"""Capture from a decoder: a GPT-2-style model with random weights and a tokenizer that pads
on the left, through `fastattn capture`, `ingest`, `stats` and `plot`. The store must hold
each text's attention bit for bit as the model gives it, causal (upper triangle exactly 0),
and the statistics must equal the float64 NumPy reference on the model's own output."""

from __future__ import annotations

import json

import numpy as np
import zarr
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")

from fastattn import capture  # noqa: E402

from benchmarks import reference as ref  # noqa: E402
from corpus_reference import tl_scores  # noqa: E402

WORDS = (
    "the a cat dog sat on mat ran to house big small red blue and bird tree saw under over "
    "green old new fast slow"
).split()
PAD, EOS = "<pad>", "<|endoftext|>"
_rng = np.random.default_rng(7)
_random = " ".join(_rng.choice(WORDS, 6))
# Three batches of three (--batch-size 3): two ragged, so left padded (one text a single
# token; one random words repeated twice, the classic induction input), and one of equal
# lengths, with no padding at all.
TEXTS = [
    "the cat sat on the mat",
    "a dog",
    "big red house and small blue house to the dog",
    "the bird saw a tree",
    f"{_random} {_random}",
    "cat",
    "the old dog ran fast",
    "a small bird sat under",
    "green tree over the house",
]
BATCH = 3
LAYERS, HEADS = 2, 4


def load(path) -> dict[str, np.ndarray]:
    with np.load(path, allow_pickle=False) as z:
        return {k: z[k] for k in z.files}


@pytest.fixture(scope="module")
def decoder(tmp_path_factory):
    """(model folder, the model in memory, its tokenizer in memory): random weights, seeded."""
    vocab = {PAD: 0, "<unk>": 1, EOS: 2, **{w: i + 3 for i, w in enumerate(WORDS)}}
    backend = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    tokenizer = transformers.PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token=PAD, unk_token="<unk>", bos_token=EOS, eos_token=EOS, padding_side="left"
    )
    config = transformers.GPT2Config(
        n_layer=LAYERS, n_head=HEADS, n_embd=64, vocab_size=len(vocab), n_positions=32,
        bos_token_id=vocab[EOS], eos_token_id=vocab[EOS], pad_token_id=vocab[PAD], attn_implementation="eager",
    )
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(config).eval()
    folder = tmp_path_factory.mktemp("gpt2") / "model"
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder, model, tokenizer


def positions(mask: np.ndarray) -> np.ndarray:
    """Each text's positions 0..n-1 on its own tokens (left padding: the last n), 0 on padding."""
    out = np.zeros(mask.shape, dtype=np.int64)
    for row, m in zip(out, mask):
        n = int(m.sum())
        assert m[len(m) - n :].all()  # left padded: the tokens come last
        row[len(m) - n :] = np.arange(n)
    return out


def own_attention(model, encoded, position_ids=None) -> np.ndarray:
    """The model's own output_attentions, (layer, batch, head, query, key), without the key/value
    cache as capture runs it (with the cache, keys sit in another memory layout and some weights
    round 1 ulp apart)."""
    extra = {} if position_ids is None else {"position_ids": torch.as_tensor(position_ids)}
    with torch.no_grad():
        out = model.transformer(**encoded, **extra, output_attentions=True, use_cache=False)
    return np.stack([a.numpy() for a in out.attentions])


@pytest.fixture(scope="module")
def pipeline(decoder, tmp_path_factory):
    """`fastattn capture`, `ingest`, `stats --format json` on the decoder, run once."""
    from click.testing import CliRunner

    from fastattn_cli.main import app

    folder, _, _ = decoder
    work = tmp_path_factory.mktemp("pipeline")
    texts = work / "texts.txt"
    texts.write_text("\n".join(TEXTS) + "\n", encoding="utf-8")
    runner = CliRunner()
    invoke = lambda *args: runner.invoke(app, [str(a) for a in args])  # noqa: E731
    results = {
        "capture": invoke("capture", folder, texts, work / "dumps", "--batch-size", BATCH),
        "ingest": invoke("ingest", work / "dumps", work / "store.zarr", "-j", 1),
        "stats": invoke("stats", work / "store.zarr", "--format", "json", "-j", 1),
    }
    for name, result in results.items():
        assert result.exit_code == 0, (name, result.output)
    return work, results, invoke


def test_decoder_capture_round_trips_bit_for_bit_through_the_store(decoder, pipeline):
    from fastattn.store import open_store

    _, model, tokenizer = decoder
    work, results, _ = pipeline
    wrote = f"wrote 3 dumps (9 texts, {LAYERS} layers x {HEADS} heads) to {work / 'dumps'}"
    assert results["capture"].stderr.strip() == wrote
    ds = open_store(work / "store.zarr")
    assert ds.sizes["batch"] == len(TEXTS)
    left_padded = 0
    for i in range(len(TEXTS) // BATCH):
        texts = TEXTS[i * BATCH : (i + 1) * BATCH]
        encoded = tokenizer(texts, padding=True, return_tensors="pt")
        mask = encoded["attention_mask"].numpy()
        expected = own_attention(model, encoded, positions(mask))
        dump = load(work / "dumps" / f"attention_batch_{i:05d}.npz")
        assert np.array_equal(dump["input_ids"], encoded["input_ids"].numpy())  # left padded, as the tokenizer gave it
        assert np.array_equal(dump["attention_mask"], mask)
        assert dump["attention_weights"].dtype == np.float32
        assert np.array_equal(dump["attention_weights"], expected)  # every row, padding included
        seq = mask.shape[1]
        for j, text in enumerate(texts):
            b = i * BATCH + j
            n = len(text.split())
            assert int(mask[j].sum()) == n and int(ds["length"][b]) == n
            left_padded += n < seq
            block = expected[:, j, :, seq - n :, seq - n :]  # the valid block: at the end of both axes
            stored = ds["attention"][b].values
            assert np.array_equal(stored[:, :, :n, :n], block)  # moved to the start, bit for bit
            assert np.isnan(stored[:, :, n:]).all() and np.isnan(stored[:, :, :, n:]).all()
            assert ds["token"][b, :n].values.tolist() == text.split()
            # causal: every weight above the diagonal is exactly 0, the diagonal never is
            assert not np.triu(block, 1).any() and (np.diagonal(block, axis1=-2, axis2=-1) > 0).all()
            # padded queries see no token at all: GPT-2 gives them a uniform row over every key
            np.testing.assert_allclose(expected[:, j, :, : seq - n], 1.0 / seq, rtol=1e-6)
    assert left_padded == 4  # the ragged batches were compared, not only the full rows


def test_left_padded_texts_are_numbered_from_their_first_token(decoder, pipeline):
    """Each text's stored attention is its attention alone (float rounding apart); without the
    position ids capture passes, a left-padded text would start at position `pads`."""
    from fastattn.store import open_store

    _, model, tokenizer = decoder
    ds = open_store(pipeline[0] / "store.zarr")
    shifted = 0.0
    for b in range(2 * BATCH):  # the ragged batches
        text = TEXTS[b]
        n = len(text.split())
        alone = own_attention(model, tokenizer([text], return_tensors="pt"))[:, 0]
        np.testing.assert_allclose(ds["attention"][b, :, :, :n, :n].values, alone, rtol=0, atol=1e-6)
        batch = tokenizer(TEXTS[b - b % BATCH : b - b % BATCH + BATCH], padding=True, return_tensors="pt")
        default = own_attention(model, batch)[:, b % BATCH, :, -n:, -n:]  # positions 0..seq-1
        shifted = max(shifted, float(np.abs(default - alone).max()))
    assert shifted > 1e-3  # the model's default positions would not have been that text alone


def test_decoder_statistics_equal_the_numpy_reference(decoder, pipeline):
    from fastattn.stats import read_planes

    _, model, tokenizer = decoder
    work, results, _ = pipeline
    seq = max(len(t.split()) for t in TEXTS)
    expected = np.full((len(TEXTS), LAYERS, HEADS, seq, seq), np.nan, dtype=np.float32)
    lengths = np.array([len(t.split()) for t in TEXTS])
    ids = np.full((len(TEXTS), seq), -1, dtype=np.int32)
    for i in range(len(TEXTS) // BATCH):
        encoded = tokenizer(TEXTS[i * BATCH : (i + 1) * BATCH], padding=True, return_tensors="pt")
        own = own_attention(model, encoded, positions(encoded["attention_mask"].numpy()))
        for j in range(BATCH):
            n = lengths[i * BATCH + j]
            expected[i * BATCH + j, :, :, :n, :n] = own[:, j, :, -n:, -n:]
            ids[i * BATCH + j, :n] = encoded["input_ids"][j, -n:].numpy()
    want = ref.summaries(expected, lengths)
    got = read_planes(work / "store.zarr", [*ref.PLANE_STATS, "peak_key", *ref.FLAGS])
    # the token ids moved with their attention (left padding), -1 after each text
    np.testing.assert_array_equal(zarr.open_array(str(work / "store.zarr" / "input_id"), mode="r")[...], ids)
    # TransformerLens's duplicate-token and induction scores (its head_detector.py, ported), per plane
    for b, n in enumerate(lengths):
        for layer in range(LAYERS):
            for head in range(HEADS):
                want["duplicate_token"][b, layer, head], want["induction"][b, layer, head] = tl_scores(
                    expected[b, layer, head, :n, :n], ids[b, :n]
                )
    assert np.isfinite(want["induction"][4]).all()  # TEXTS[4], a run repeated twice: scored
    for name in ref.PLANE_STATS:
        np.testing.assert_allclose(got[name], want[name], rtol=1e-6, atol=1e-12, err_msg=name)
    np.testing.assert_array_equal(got["peak_key"], want["peak_key"])
    for flag in ref.FLAGS:
        np.testing.assert_array_equal(got[flag], want[flag], err_msg=flag)
    table = json.loads(results["stats"].stdout)
    assert table["batches"] == len(TEXTS) and len(table["heads"]) == LAYERS * HEADS
    for row in table["heads"]:
        mean = np.nanmean(want["prev_token"][:, row["layer"], row["head"]])
        assert row["prev_token"] == pytest.approx(mean, rel=1e-6)


def test_decoder_plots(pipeline):
    work, _, invoke = pipeline
    for kind in ("overview", "entropy", "batches"):
        out = work / f"{kind}.png"
        result = invoke("plot", work / "store.zarr", kind, "--dpi", 40, "-o", out)
        assert result.exit_code == 0, result.output
        assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_padding_inference_leaves_causal_maps_whole(pipeline, tmp_path):
    """Without its mask, a causal dump's last key column is 0 in every row but the last: not
    padding. The unpadded batch keeps its full length and the very same values; the
    left-padded one too (its zero columns lead, and padded queries weight every key)."""
    import fastattn
    from fastattn.store import open_store

    work, _, _ = pipeline
    for i in (2, 0):  # the batch of equal lengths, then a left-padded one
        dump = load(work / "dumps" / f"attention_batch_{i:05d}.npz")
        weights = dump["attention_weights"]
        seq = weights.shape[-1]
        tokens = dump["attention_mask"].astype(bool)
        assert (i == 0) == (not tokens.all())
        for b in range(BATCH):
            last = weights[:, b, :, tokens[b], seq - 1]  # (query, layer, head): token queries on the last key
            assert not last[:-1].any() and last[-1].all()  # only the last query weights it
        folder = tmp_path / f"maskless{i}"
        folder.mkdir()
        np.savez(folder / "dump.npz", attention_weights=weights, tokens=dump["tokens"])
        report = fastattn.ingest([folder], tmp_path / f"maskless{i}.zarr", jobs=1)
        assert report.ok and report.inferred_lengths == 0
        ds = open_store(tmp_path / f"maskless{i}.zarr")
        assert ds["length"].values.tolist() == [seq] * BATCH
        assert np.array_equal(ds["attention"].values, weights.transpose(1, 0, 2, 3, 4))


def test_record_leaves_position_ids_it_was_given_and_right_padding_alone(decoder, tmp_path):
    folder, model, tokenizer = decoder
    base, _ = capture.load_model(folder)
    texts = TEXTS[:BATCH]
    encoded = dict(tokenizer(texts, padding=True, return_tensors="pt"))
    encoded["position_ids"] = torch.arange(encoded["input_ids"].shape[1]).expand_as(encoded["input_ids"])
    capture.record(base, [encoded], tmp_path / "given")
    got = load(tmp_path / "given" / "attention_batch_00000.npz")["attention_weights"]
    assert np.array_equal(got, own_attention(model, {k: encoded[k] for k in ("input_ids", "attention_mask")}))
    tokenizer.padding_side = "right"
    try:
        right = tokenizer(texts, padding=True, return_tensors="pt")
        capture.record(base, [right], tmp_path / "right")
    finally:
        tokenizer.padding_side = "left"
    got = load(tmp_path / "right" / "attention_batch_00000.npz")["attention_weights"]
    assert np.array_equal(got, own_attention(model, right))  # the model's own call: no position ids added


def test_a_right_padded_decoder_dump_without_its_mask_gets_its_lengths(decoder, tmp_path):
    """Right padding leaves no query without a token to see, so the padded keys are 0 in every
    row: inferred from the zero trailing columns, the lengths and values are the mask's."""
    import fastattn
    from fastattn.store import open_store

    folder, _, tokenizer = decoder
    base, _ = capture.load_model(folder)
    tokenizer.padding_side = "right"
    try:
        right = tokenizer(TEXTS[:BATCH], padding=True, return_tensors="pt")
    finally:
        tokenizer.padding_side = "left"
    dump = load(capture.record(base, [right], tmp_path / "dumps").dumps[0])
    (tmp_path / "maskless").mkdir()
    np.savez(tmp_path / "maskless" / "dump.npz", attention_weights=dump["attention_weights"])
    fastattn.ingest([tmp_path / "dumps"], tmp_path / "masked.zarr", jobs=1)
    report = fastattn.ingest([tmp_path / "maskless"], tmp_path / "inferred.zarr", jobs=1)
    assert report.inferred_lengths == 2  # the two padded samples
    masked, inferred = open_store(tmp_path / "masked.zarr"), open_store(tmp_path / "inferred.zarr")
    assert inferred["length"].values.tolist() == [len(t.split()) for t in TEXTS[:BATCH]]
    assert np.array_equal(inferred["attention"].values, masked["attention"].values, equal_nan=True)


def test_stats_only_capture_of_left_padded_texts_equals_the_stored_path(decoder, pipeline):
    """`capture --stats-only` runs the left-padded batches with the same position ids as the
    dump path: every per-plane statistic equals capture → ingest → stats, and no map is kept."""
    from fastattn.stats import read_planes

    folder, _, _ = decoder
    work, _, invoke = pipeline
    result = invoke("capture", folder, work / "texts.txt", work / "live.zarr", "--stats-only", "--batch-size", BATCH)
    assert result.exit_code == 0, result.output
    assert not (work / "live.zarr" / "attention").exists()
    names = [*ref.PLANE_STATS, "peak_key", "duplicate_token", "induction"]
    got, want = read_planes(work / "live.zarr", names), read_planes(work / "store.zarr", names)
    for name in names:
        np.testing.assert_allclose(got[name], want[name], rtol=1e-6, atol=1e-7, err_msg=name)
    assert np.isfinite(got["induction"][4]).all()  # the repeated run has its ids, and its scores
