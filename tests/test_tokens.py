"""Token classes (`fastattn.tokens`): attention on special tokens, punctuation and a user's
class, and [SEP]→[SEP], against a float64 port of Clark et al. 2019's `General_Analysis.ipynb`
(its `selectors`, `cls`/`sep`/`punct`, `sep_sep`) on the real MiniLM samples given token
strings, and on random ragged attention with random tokens; through `fastattn stats` too."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import pytest
from conftest import SAMPLES, softmax_rows, write_dump

import fastattn
from fastattn import store, summary, tokens
from fastattn.ingest import ingest

#: Every token string the tests use, with its classes written out by hand (not by the rules
#: under test): special tokens, punctuation with and without subword markers, and tokens that
#: look like either but are not.
SPECIAL = {"[CLS]", "[SEP]", "[PAD]", "[MASK]", "<s>", "</s>", "<pad>", "<unk>", "<|endoftext|>"}
PUNCT = {".", ",", "Ġ,", "▁.", "##!", "...", "—", "«", "$", "Ġ(", "?!", "::"}
WORDS = {"the", "Ġcat", "▁dog", "##ing", "2019", "Ġ42", "a.b", "Ġ", "é", "[sep]", "<s", "S.", "x,"}
NUMBERS = {"2019", "Ġ42"}  # the user class below: `num=Ġ?[0-9]+`
USER = {"num": r"Ġ?[0-9]+"}
SEPS = {"[SEP]", "</s>"}
VOCAB = sorted(SPECIAL | PUNCT | WORDS)


def clark(attns: np.ndarray, toks: list[str], denominator: float | None = None) -> dict[str, np.ndarray]:
    """Clark et al.'s per-document averages, float64, ported from `General_Analysis.ipynb`
    (selectors tiled over the queries, summed over keys and queries, divided by the length);
    the classes from the hand-written sets. `sep_sep` is divided by `denominator`: Clark's
    2 (the [SEP]s of each of his documents), by default the number of separators."""
    attns = attns.astype(np.float64)
    n = attns.shape[-1]
    out = {}
    for name, vocab in (("special", SPECIAL), ("punct", PUNCT), ("num", NUMBERS)):
        chosen = np.array([t in vocab for t in toks], dtype=np.float64)
        selector = np.tile(chosen[np.newaxis], [n, 1])
        out[f"to_{name}"] = (attns * selector[np.newaxis, np.newaxis]).sum(-1).sum(-1) / n
    seps = np.array([t in SEPS for t in toks], dtype=np.float64)
    sep_seps = np.ones((n, n)) * seps[np.newaxis] * seps[:, np.newaxis]
    with np.errstate(invalid="ignore", divide="ignore"):  # no separator: 0/0, NaN
        out["sep_sep"] = (attns * sep_seps[np.newaxis, np.newaxis]).sum(-1).sum(-1) / (denominator or seps.sum())
    return out


def clark_literal(attns: np.ndarray, toks: list[str]) -> dict[str, np.ndarray]:
    """Clark et al.'s own `cls`, `sep` and `punct` (`[CLS]`, `[SEP]`, `.` or `,` by string), as
    the notebook computes them for one document."""
    attns = attns.astype(np.float64)
    n_tokens = attns.shape[-1]
    seps, clss, puncts = (np.zeros(n_tokens) for _ in range(3))
    for position, token in enumerate(toks):
        if token == "[SEP]":
            seps[position] = 1
        if token == "[CLS]":
            clss[position] = 1
        if token == "." or token == ",":
            puncts[position] = 1
    selectors = {name: np.tile(mask[np.newaxis], [n_tokens, 1]) for name, mask in (("cls", clss), ("sep", seps), ("punct", puncts))}
    return {name: (attns * selector[np.newaxis, np.newaxis]).sum(-1).sum(-1) / n_tokens for name, selector in selectors.items()}


def reference(path) -> tuple[dict[str, np.ndarray], list[list[str]]]:
    """`clark` of every sample of a store (batch, layer, head), NaN for a sample saved without
    token strings; and each sample's valid tokens."""
    ds = fastattn.open_store(path)
    attention, lengths, token = ds.attention.values, ds.length.values, ds.token.values
    out: dict[str, np.ndarray] = {}
    samples = []
    for b, n in enumerate(lengths):
        toks = [str(t) for t in token[b, :n]]
        samples.append(toks)
        values = clark(attention[b, :, :, :n, :n], toks)
        for name, value in values.items():
            out.setdefault(name, np.full((len(lengths), *value.shape), np.nan))[b] = np.nan if not any(toks) else value
    return out, samples


def assert_matches(got: dict, want: dict) -> None:
    assert set(tokens.class_names(got)) == set(want)
    for name in want:
        assert np.isnan(got[name]).tolist() == np.isnan(want[name]).tolist(), name
        np.testing.assert_allclose(got[name], want[name], rtol=1e-6, atol=1e-12, err_msg=name)


def minilm_with_tokens(folder: Path, rng) -> Path:
    """The MiniLM samples (real attention; batched: ragged, masked; fixed: 32 tokens, no mask)
    given BERT-like token strings: [CLS] first, [SEP] last, words and punctuation between, a
    second [SEP] in the middle of every other batched sample (a pair of segments, as Clark's
    data), [PAD] after."""
    for source in sorted((SAMPLES / "fixed").glob("*.npz")):
        with np.load(source, allow_pickle=False) as data:
            attention = data["attention_weights"]
        toks = rng.choice(sorted(PUNCT | WORDS), attention.shape[-1]).astype("U16")
        toks[0], toks[-1] = "[CLS]", "[SEP]"
        write_dump(folder / f"fixed_{source.name}", attention, tokens=toks)
    for source in sorted((SAMPLES / "batched").glob("*.npz")):
        with np.load(source, allow_pickle=False) as data:
            attention, mask = data["attention_weights"], data["attention_mask"]
        batch, size = mask.shape
        toks = np.full((batch, size), "[PAD]", dtype="U16")
        for b in range(batch):
            n = int(mask[b].sum())
            toks[b, :n] = rng.choice(sorted(PUNCT | WORDS), n)
            toks[b, 0], toks[b, n - 1] = "[CLS]", "[SEP]"
            if b % 2:
                toks[b, n // 2] = "[SEP]"
        write_dump(folder / source.name, attention, attention_mask=mask, tokens=toks)
    return folder


@pytest.fixture(scope="module")
def minilm(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("tokens-minilm")
    minilm_with_tokens(root / "dumps", np.random.default_rng())
    ingest(root / "dumps", root / "s.zarr")
    fastattn.write_stats(root / "s.zarr")
    return root / "s.zarr"


def test_minilm_equals_clarks_formulas(minilm):
    want, samples = reference(minilm)
    got = tokens.token_class_stats(minilm, classes=USER)
    assert_matches(got, want)
    assert all(toks[0] == "[CLS]" and toks[-1] == "[SEP]" for toks in samples)  # the classes are not empty
    assert (got["to_special"] > 0).all() and (got["to_punct"] > 0).all() and np.isfinite(got["sep_sep"]).all()
    for name in ("special", "punct", "num"):
        vocab = {"special": SPECIAL, "punct": PUNCT, "num": NUMBERS}[name]
        assert got[f"count_{name}"].tolist() == [sum(t in vocab for t in toks) for toks in samples]
    # user classes that are Clark's own cls, sep and punct give his numbers
    own = tokens.token_class_stats(minilm, classes={"cls": r"\[CLS\]", "sep": r"\[SEP\]", "punct": "[.,]"}, sep_sep=False)
    attention = fastattn.open_store(minilm).attention.values
    for b, toks in enumerate(samples):
        n = len(toks)
        for name, value in clark_literal(attention[b, :, :, :n, :n], toks).items():
            np.testing.assert_allclose(own[f"to_{name}"][b], value, rtol=1e-6, atol=1e-12, err_msg=name)
    # Clark's own denominator, 2, on the samples with a pair of segments (two [SEP]): the same
    pairs = [b for b, toks in enumerate(samples) if toks.count("[SEP]") == 2]
    lengths = [len(t) for t in samples]
    assert len(samples) == 11 and len(pairs) == 4
    for b in pairs:
        n = lengths[b]
        literal = clark(attention[b, :, :, :n, :n], samples[b], denominator=2)["sep_sep"]
        np.testing.assert_allclose(got["sep_sep"][b], literal, rtol=1e-6)


def test_random_ragged_attention_and_tokens(tmp_path, monkeypatch):
    """Random softmax rows, ragged lengths in masked batched dumps and a 4-d dump, random tokens
    from the whole vocabulary (0 to 3 separators a sample); a dump without token strings
    gives NaN for its samples; a selection of layers and heads gives those planes."""
    rng = np.random.default_rng()
    layers, heads, size = 2, 3, 12
    for i in range(4):
        lengths = rng.integers(1, size + 1, size=3)
        lengths[0] = size
        att = np.zeros((layers, 3, heads, size, size), dtype=np.float32)
        mask = np.zeros((3, size), dtype=np.int8)
        toks = np.full((3, size), ",", dtype="U16")  # padding that would count as punctuation if read
        for b, n in enumerate(lengths):
            att[:, b, :, :, :n] = softmax_rows(rng, (layers, heads, size, n))
            mask[b, :n] = 1
            toks[b, :n] = rng.choice(VOCAB, n)
            toks[b, rng.choice(n, size=min(n, rng.integers(0, 4)), replace=False)] = rng.choice(sorted(SEPS))
        write_dump(tmp_path / "dumps" / f"d{i}.npz", att, attention_mask=mask, tokens=toks)
    write_dump(tmp_path / "dumps" / "d9_plain.npz", softmax_rows(rng, (layers, heads, size, size)))
    ingest(tmp_path / "dumps", tmp_path / "s.zarr")
    fastattn.write_stats(tmp_path / "s.zarr")
    want, samples = reference(tmp_path / "s.zarr")
    got = tokens.token_class_stats(tmp_path / "s.zarr", classes=USER)
    assert_matches(got, want)
    assert np.isnan(got["to_special"][-1]).all() and not any(samples[-1])  # the dump without tokens
    assert np.isnan(got["sep_sep"]).any() and np.isfinite(got["sep_sep"]).any()
    picked = tokens.token_class_stats(tmp_path / "s.zarr", classes=USER, layer=[1], head=[2, 0])
    masses = tokens.token_class_stats(tmp_path / "s.zarr", classes=USER, sep_sep=False)
    assert tokens.class_names(masses) == ["to_special", "to_punct", "to_num"]
    for name in tokens.class_names(got):
        np.testing.assert_array_equal(picked[name], got[name][:, [1]][:, :, [2, 0]], err_msg=name)
    monkeypatch.setattr(tokens, "_steps", lambda n, chunk, per_batch: [(b, min(n, b + 2)) for b in range(0, n, 2)])
    blocked = tokens.token_class_stats(tmp_path / "s.zarr", classes=USER)  # read two batches at a time
    for name in tokens.class_names(got):
        np.testing.assert_array_equal(blocked[name], got[name], err_msg=name)


def test_steps_are_whole_chunks_within_the_block_size(monkeypatch):
    import fastattn.stats

    monkeypatch.setattr(fastattn.stats, "BLOCK_BYTES", 400)
    assert tokens._steps(10, 2, 100) == [(0, 4), (4, 8), (8, 10)]
    assert tokens._steps(5, 2, 1000) == [(0, 2), (2, 4), (4, 5)]  # one chunk even when larger


def test_class_rules_by_hand():
    rules = tokens.class_rules(USER)
    for token in VOCAB:
        assert rules["special"](token) == (token in SPECIAL), token
        assert rules["punct"](token) == (token in PUNCT), token
        assert rules["num"](token) == (token in NUMBERS), token
    known = tokens.class_rules(special=["<|im_start|>", "[SEP]"])
    assert known["special"]("<|im_start|>") and not known["special"]("[CLS]")


def test_findings_and_cli(minilm, cli):
    """`fastattn stats` reports the classes (json, csv, table) and the heads with most attention
    on special tokens, the same heads as the port's means."""
    want, _ = reference(minilm)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        means = {name: np.nanmean(values, axis=0) for name, values in want.items()}
    result = cli("stats", minilm, "--format", "json", "--token-class", "num=Ġ?[0-9]+", "--sep-sep")
    assert result.exit_code == 0, result.output
    out = json.loads(result.output[result.output.index("{"):])
    for row in out["heads"]:
        for name, mean in means.items():
            np.testing.assert_allclose(row[name], mean[row["layer"], row["head"]], rtol=1e-6, err_msg=name)
    found = {f["finding"]: {e["label"]: e["value"] for e in f["heads"]} for f in out["findings"]}
    special = {f"L{l}H{h}": means["to_special"][l, h] for l, h in zip(*np.nonzero(means["to_special"] >= summary.CLASS_MASS))}
    assert special and found["to_special"].keys() == special.keys()
    for label, value in special.items():
        np.testing.assert_allclose(found["to_special"][label], value, rtol=1e-6)
    table = cli("stats", minilm, "--layer", "1")  # L1H11 gives key 0, [CLS], 0.75 of its attention
    assert table.exit_code == 0 and "most attention on special tokens (≥ 0.5 of all attention)" in table.output
    csv = cli("stats", minilm, "--format", "csv").output.splitlines()
    header = set(next(line for line in csv if line.startswith("layer,")).split(","))
    assert {"to_special", "to_punct"} <= header and "sep_sep" not in header and "to_num" not in header  # no --sep-sep


def test_store_without_tokens(tmp_path, cli, rng):
    """No token strings: `fastattn stats` prints no classes unless asked; asked, one line."""
    write_dump(tmp_path / "d" / "a.npz", softmax_rows(rng, (2, 2, 5, 5)))
    ingest(tmp_path / "d", tmp_path / "s.zarr")
    plain = cli("stats", tmp_path / "s.zarr", "--format", "json")
    assert plain.exit_code == 0 and "to_special" not in plain.output
    with pytest.raises(tokens.NoTokenStrings, match="no token strings"):
        tokens.token_class_stats(tmp_path / "s.zarr")
    with pytest.raises(fastattn.FastattnError, match=r"^classes: class bad: '\(\(' is not a regular expression"):
        tokens.token_class_stats(tmp_path / "s.zarr", classes={"bad": "(("})


def test_report_states_token_class_findings(tmp_path):
    """A small store whose head 0 puts 0.8 of every row on [CLS]: the report says so."""
    from fastattn.report import write_report

    rng = np.random.default_rng()
    att = softmax_rows(rng, (1, 2, 2, 6, 6)).astype(np.float64)
    att[:, :, 0] = 0.2 * att[:, :, 0]
    att[:, :, 0, :, 0] += 0.8
    att[:, :, 1, :, [0, 5]] *= 0.05  # head 1 all but ignores [CLS] and [SEP]: never a special-token head
    att[:, :, 1] /= att[:, :, 1].sum(-1, keepdims=True)
    toks = np.array([["[CLS]", "Ġcat", ",", "the", "2019", "[SEP]"]])
    write_dump(tmp_path / "d" / "a.npz", att.astype(np.float32), attention_mask=np.ones((2, 6), np.int8), tokens=toks.repeat(2, 0))
    ingest(tmp_path / "d", tmp_path / "s.zarr")
    page = Path(write_report(tmp_path / "s.zarr", tmp_path / "r.html", dpi=40)).read_text()
    assert "most attention on special tokens (≥ 0.5 of all attention) — 1 head: L0H0" in page


def test_the_manifest_says_which_dumps_had_token_strings(tmp_path, rng, monkeypatch):
    """Ingest records per file whether it had token strings; a store none of whose dumps had
    them answers NoTokenStrings without reading the `token` array, and one dump with tokens
    among others without is read as before."""
    write_dump(tmp_path / "d" / "a.npz", softmax_rows(rng, (2, 2, 5, 5)))
    ingest(tmp_path / "d", tmp_path / "s.zarr")
    fastattn.write_stats(tmp_path / "s.zarr")
    assert [e.tokens for e in store.checked_manifest(store.as_location(tmp_path / "s.zarr")).files.values()] == [False]
    read = []  # the token strings' classes, computed as they are read
    monkeypatch.setattr(tokens, "members", lambda *a, **k: read.append(1) or {})
    with pytest.raises(tokens.NoTokenStrings, match="no token strings"):
        tokens.token_class_stats(tmp_path / "s.zarr")
    assert read == []
    write_dump(tmp_path / "d" / "b.npz", softmax_rows(rng, (2, 2, 5, 5)), tokens=np.array([["[CLS]", "a", ".", "b", "[SEP]"]]))
    ingest(tmp_path / "d", tmp_path / "s.zarr")
    fastattn.write_stats(tmp_path / "s.zarr")
    assert sorted(e.tokens for e in store.checked_manifest(store.as_location(tmp_path / "s.zarr")).files.values()) == [False, True]
    monkeypatch.undo()
    scores = tokens.token_class_stats(tmp_path / "s.zarr")
    assert np.isnan(scores["to_special"][0]).all() and not np.isnan(scores["to_special"][1]).any()


def test_a_damaged_attention_chunk_under_sep_sep_is_named_as_attention(minilm, cli, tmp_path):
    """`--sep-sep` reads the attention again: a chunk of it failing its checksum is one line
    that says it is the attention's (the statistics are fine), and how to drop the batches."""
    import shutil

    path = tmp_path / "s.zarr"
    shutil.copytree(minilm, path)
    chunk = sorted((path / "attention").glob("c.*"))[0]
    data = bytearray(chunk.read_bytes())
    data[len(data) // 2] ^= 0x40
    chunk.write_bytes(bytes(data))
    assert cli("stats", path).exit_code == 0  # the statistics alone: nothing reads the attention
    out = cli("stats", path, "--sep-sep")
    assert out.exit_code == 1 and "Traceback" not in out.output
    assert out.stderr.splitlines() == [
        f"error: {path}: a chunk of the attention fails its crc32c checksum (the bytes on disk changed);"
        " fastattn check names it, and fastattn check --repair --force drops the damaged batches; ingest their dumps again"
    ]
