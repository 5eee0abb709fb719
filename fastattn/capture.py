"""Capture attention straight from a model into dumps (or a store).

Optional: needs PyTorch, and `transformers` for Hugging Face models
(`pip install 'fastattn[torch]'`). Neither is imported until a function here runs,
so `import fastattn` stays light.

- `record(model, batches, out)`: a Hugging Face `transformers` model, run with
  `output_attentions=True` (eager attention forced for the run) under `torch.no_grad()`.
- `record_module(model, inputs, out)`: any PyTorch module, through hooks on its
  `nn.MultiheadAttention` layers or on named submodules that output attention weights.
- `load_model(folder)`, `load_texts(path)`, `batched(texts, size)`: the pieces the
  `fastattn capture` command needs; `repeated_batches(tokenizer, run, samples, size)`: the
  classic induction-head input (a random run of token ids repeated twice) as model inputs.

Each batch becomes one dump `attention_batch_NNNNN.npz` (uncompressed `np.savez`,
written to a temporary name and renamed into place): `attention_weights`
`(layer, batch, head, query, key)`, `attention_mask` int8 `(batch, seq)`, `input_ids`
int32 `(batch, seq)` and, with a tokenizer, `tokens` (str, padding included). Only
one batch's attention is held at a time. An `out` ending in `.zarr` is a store: the
dumps go to a temporary folder beside it and are ingested as they accumulate.
"""

from __future__ import annotations

import contextlib
import glob
import inspect
import json
import os
import secrets
import shutil
import sys
import tempfile
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np

from .choices import STORE_DTYPES
from .errors import FastattnError, first_line

Progress = Callable[[int, "int | None"], None]  # (batches done, batches in all or None)

DUMP_PATTERN = "attention_batch_{:05d}.npz"
INSTALL_HINT = "pip install 'fastattn[torch]' (with torch==2.13.0 first for the CPU build)"
#: In `.zarr` mode, ingest the temporary dumps once they add up to this many bytes.
INGEST_EVERY_BYTES = 256 << 20


class CaptureError(FastattnError, ValueError):
    """A model, input or output that cannot be captured; the message is one line."""


@dataclass
class CaptureResult:
    """What one capture wrote."""

    out: str
    dumps: list[str] = field(default_factory=list)  # paths written (empty for a store: they were temporary)
    batches: int = 0
    samples: int = 0
    layers: int = 0  # layers kept per dump
    heads: int = 0  # heads kept per layer
    ingests: list = field(default_factory=list)  # fastattn.ingest.IngestReport per ingest, for a store

    @property
    def store_batches(self) -> int | None:
        """Samples in the store after the capture (None when `out` is a folder)."""
        return self.ingests[-1].committed if self.ingests else None


# ---------------------------------------------------------------- optional imports


def _torch():
    try:
        import torch
    except ImportError:
        raise CaptureError(f"PyTorch is not installed: {INSTALL_HINT}") from None
    return torch


def _transformers():
    _torch()
    try:
        import transformers
    except ImportError:
        raise CaptureError(f"transformers is not installed: {INSTALL_HINT}") from None
    return transformers


def _one_line(exc: BaseException) -> str:
    line = first_line(exc)
    return line if len(line) <= 300 else line[:297] + "..."


@contextlib.contextmanager
def _quiet():
    """Silence transformers' own logging and progress bars for the duration (the library never prints)."""
    if "transformers" not in sys.modules:
        yield
        return
    from transformers.utils import logging as hf_logging

    level, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)
        if bars:
            hf_logging.enable_progress_bar()


# ---------------------------------------------------------------- inputs


def load_texts(path: str | os.PathLike) -> list[str]:
    """The inputs of a text file (one per line, blank lines skipped) or a `.jsonl` file
    (one JSON object per line with a string field `text`)."""
    path = os.fspath(path)
    try:
        with open(path, encoding="utf-8") as f:
            lines = f.read().splitlines()
    except UnicodeDecodeError as exc:
        raise CaptureError(f"{path}: not UTF-8 text (byte {exc.start})") from None
    except OSError as exc:
        reason = {
            FileNotFoundError: "no such file",
            IsADirectoryError: "is a folder; give a text file with one input per line, or a .jsonl",
        }.get(type(exc), f"cannot read it ({exc.strerror})")
        raise CaptureError(f"{path}: {reason}") from None
    texts: list[str] = []
    jsonl = path.lower().endswith(".jsonl")
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        if not jsonl:
            texts.append(line)
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise CaptureError(f"{path}:{number}: not JSON ({exc.msg})") from None
        if not isinstance(record, dict) or not isinstance(record.get("text"), str):
            raise CaptureError(f'{path}:{number}: expected an object with a string field "text"')
        texts.append(record["text"])
    if not texts:
        raise CaptureError(f"{path}: no inputs (the file is empty or has only blank lines)")
    return texts


def batched(items: Sequence, size: int) -> list[list]:
    """Consecutive batches of `size` items (the last may be shorter)."""
    if size < 1:
        raise CaptureError(f"batch size must be at least 1, not {size}")
    return [list(items[i : i + size]) for i in range(0, len(items), size)]


def repeated_ids(tokenizer, run: int, samples: int, *, seed: int = 0) -> np.ndarray:
    """The classic input of induction-head studies (Olsson et al. 2022; TransformerLens's
    `detect_head` examples): per sample a run of `run` random token ids, then the same run again.

    int64 `(samples, length)`. Each run draws `run` distinct ids (so only the second run repeats
    anything) uniformly from the tokenizer's vocabulary without its special tokens, with NumPy's
    generator seeded by `seed`. The runs are framed the way the tokenizer frames a text
    (`[CLS] … [SEP]` for BERT); a tokenizer that adds nothing gets its BOS token in front, as
    TransformerLens prepends it. Every sample has the same length: no padding.
    """
    if run < 1 or samples < 1:
        raise CaptureError(f"a repeated run needs run >= 1 and samples >= 1, not run={run}, samples={samples}")
    special = {int(i) for i in (getattr(tokenizer, "all_special_ids", None) or [])}
    allowed = np.array([i for i in range(len(tokenizer)) if i not in special], dtype=np.int64)
    if allowed.size < run:
        raise CaptureError(f"the tokenizer has {allowed.size} ordinary tokens, fewer than a run of {run}")
    prefix, suffix = _framing(tokenizer)
    rng = np.random.default_rng(seed)
    rows = []
    for _ in range(samples):
        half = rng.choice(allowed, size=run, replace=False)
        rows.append(np.concatenate([prefix, half, half, suffix]))
    return np.stack(rows).astype(np.int64)


def _framing(tokenizer) -> tuple[np.ndarray, np.ndarray]:
    """The ids the tokenizer puts before and after a text's own (BOS when it puts none)."""
    try:
        full = list(tokenizer("a")["input_ids"])
        own = list(tokenizer("a", add_special_tokens=False)["input_ids"])
    except Exception as exc:
        raise CaptureError(f"the tokenizer cannot encode a word ({_one_line(exc)})") from None
    start = next((i for i in range(len(full) - len(own) + 1) if full[i : i + len(own)] == own), None) if own else None
    prefix, suffix = (full[:start], full[start + len(own):]) if start is not None else ([], [])
    bos = getattr(tokenizer, "bos_token_id", None)
    if not prefix and not suffix and bos is not None:
        prefix = [bos]
    return np.array(prefix, dtype=np.int64), np.array(suffix, dtype=np.int64)


def repeated_batches(tokenizer, run: int, samples: int, size: int, *, seed: int = 0) -> list[dict]:
    """`repeated_ids` as batches of model inputs (`input_ids`, `attention_mask` all ones) of
    `size` samples each, for `record`."""
    if size < 1:
        raise CaptureError(f"batch size must be at least 1, not {size}")
    ids = repeated_ids(tokenizer, run, samples, seed=seed)
    parts = [ids[i : i + size] for i in range(0, samples, size)]
    return [{"input_ids": part, "attention_mask": np.ones_like(part)} for part in parts]


def load_model(model_dir: str | os.PathLike, *, eager: bool = True):
    """`(model, tokenizer)` from a local folder saved by `save_pretrained` (never the hub).

    The model is the base model (`AutoModel`, no task head), in eval mode, with the eager
    attention implementation so that it can return its attention weights. A tokenizer
    without a padding token pads with its end-of-sequence token.
    """
    model_dir = os.fspath(model_dir)
    if not os.path.isdir(model_dir):
        raise CaptureError(f"{model_dir}: no such folder; give a local model folder (saved by save_pretrained)")
    if not os.path.isfile(os.path.join(model_dir, "config.json")):
        raise CaptureError(f"{model_dir}: not a model folder (no config.json); give a folder saved by save_pretrained")
    transformers = _transformers()
    kwargs: dict[str, Any] = {"local_files_only": True}
    if eager:
        kwargs["attn_implementation"] = "eager"
    with _quiet():
        try:
            model = transformers.AutoModel.from_pretrained(model_dir, **kwargs)
        except Exception as exc:  # transformers raises OSError, ValueError, KeyError, ... for unusable folders
            raise CaptureError(f"{model_dir}: cannot load the model ({_one_line(exc)})") from None
        try:
            tokenizer = transformers.AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
        except Exception as exc:
            raise CaptureError(f"{model_dir}: cannot load its tokenizer ({_one_line(exc)})") from None
    if isinstance(tokenizer, bool) or not callable(tokenizer):
        raise CaptureError(f"{model_dir}: no tokenizer in the folder")
    if getattr(tokenizer, "pad_token", None) is None:
        fallback = getattr(tokenizer, "eos_token", None) or getattr(tokenizer, "unk_token", None)
        if fallback is not None:
            tokenizer.pad_token = fallback
    model.eval()
    return model, tokenizer


# ---------------------------------------------------------------- output


def _check_dtype(dtype) -> np.dtype:
    try:
        result = np.dtype(dtype)
    except TypeError:
        result = None
    if result is None or result.name not in STORE_DTYPES:
        raise CaptureError(f"dtype must be float32 or float16, not {dtype}")
    return result


def _selection(wanted, available: int, what: str) -> list[int]:
    """Sorted, de-duplicated indices (negative ones count from the end), checked against `available`."""
    if wanted is None:
        return list(range(available))
    chosen = set()
    for index in wanted:
        if isinstance(index, bool) or not isinstance(index, (int, np.integer)):
            raise CaptureError(f"{what}s must be integers, not {index!r}")
        if not -available <= index < available:
            raise CaptureError(f"{what} {index} does not exist: the model has {available} {what}s (0-{available - 1})")
        chosen.add(int(index) % available)
    if not chosen:
        raise CaptureError(f"no {what}s selected")
    return sorted(chosen)


class _Writer:
    """Writes numbered dumps into a folder, or into a store through a temporary folder."""

    def __init__(self, out, *, dtype: np.dtype, overwrite: bool):
        self.out = os.fspath(out)
        self.dtype = dtype
        self.result = CaptureResult(out=self.out)
        self.store = self.out.rstrip("/\\").lower().endswith(".zarr")
        self.pending_bytes = 0
        if self.store:
            self._ingest = _ingest_function()
            local = "://" not in self.out
            parent = os.path.dirname(os.path.abspath(self.out)) if local else None
            if parent:
                os.makedirs(parent, exist_ok=True)
            self.tmp_root = tempfile.mkdtemp(prefix=".fastattn-capture-", dir=parent)
            run = f"capture-{time.strftime('%Y%m%dT%H%M%S')}-{secrets.token_hex(3)}"
            self.folder = os.path.join(self.tmp_root, run)
            os.makedirs(self.folder)
            return
        self.folder = self.out
        if os.path.exists(self.folder) and not os.path.isdir(self.folder):
            raise CaptureError(f"{self.folder}: exists and is not a folder")
        try:
            os.makedirs(self.folder, exist_ok=True)
        except OSError as exc:
            raise CaptureError(f"{self.folder}: cannot create the folder ({exc.strerror})") from None
        existing = glob.glob(os.path.join(glob.escape(self.folder), "attention_batch_*.npz"))
        if existing and not overwrite:
            raise CaptureError(
                f"{self.folder}: already holds {len(existing)} dumps (attention_batch_*.npz);"
                " choose another folder or overwrite them"
            )
        for path in existing:
            os.remove(path)

    def write(self, index: int, arrays: dict[str, np.ndarray]) -> None:
        path = os.path.join(self.folder, DUMP_PATTERN.format(index))
        tmp = os.path.join(self.folder, f".{os.path.basename(path)}.{secrets.token_hex(4)}.tmp")
        try:
            with open(tmp, "wb") as f:
                np.savez(f, **arrays)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException as exc:  # an interrupt too: leave no temporary file behind
            with contextlib.suppress(OSError):
                os.remove(tmp)
            if isinstance(exc, OSError):
                raise CaptureError(f"{path}: writing failed ({exc.strerror or exc})") from None
            raise
        attention = arrays["attention_weights"]
        self.result.batches += 1
        self.result.samples += attention.shape[1]
        self.result.layers, self.result.heads = attention.shape[0], attention.shape[2]
        if not self.store:
            self.result.dumps.append(path)
            return
        self.pending_bytes += os.path.getsize(path)
        if self.pending_bytes >= INGEST_EVERY_BYTES or self.result.batches == 1:
            self.flush()  # the first batch at once: a store that cannot take it fails before the long run

    def flush(self) -> None:
        """Store mode: ingest the dumps written so far and delete them."""
        if not self.store or not self.pending_bytes:
            return
        report = self._ingest([self.tmp_root], self.out, dtype=str(self.dtype))
        self.result.ingests.append(report)
        if report.rejected:
            first = report.rejected[0]
            raise CaptureError(f"{self.out}: ingest rejected {os.path.basename(first.path)}: {first.reason}")
        for name in os.listdir(self.folder):
            if name.endswith(".npz"):
                os.remove(os.path.join(self.folder, name))
        self.pending_bytes = 0

    def close(self) -> None:
        if self.store:
            shutil.rmtree(self.tmp_root, ignore_errors=True)


def _ingest_function():
    try:
        from .ingest import ingest
    except ImportError as exc:  # pragma: no cover - ingest ships with fastattn
        raise CaptureError(f"writing into a .zarr store needs fastattn.ingest ({_one_line(exc)})") from None
    return ingest


def _run(writer: _Writer, steps: Iterable, total: int | None, progress: Progress | None) -> CaptureResult:
    """Write each batch that `steps` yields, flushing a store at the end; cleans up on any exit."""
    try:
        done = 0
        for arrays in steps:
            writer.write(done, arrays)
            done += 1
            if progress is not None:
                progress(done, total)
        if done == 0:
            raise CaptureError("no batches to capture")
        writer.flush()
    finally:
        writer.close()
    return writer.result


def _stack(per_layer: list, layers: list[int], heads: list[int], dtype: np.dtype) -> np.ndarray:
    """`(layer, batch, head, query, key)` numpy array of the chosen layers and heads.

    Empties `per_layer` as it goes, so each tensor is freed once copied."""
    torch = _torch()
    batch, _, query, key = per_layer[layers[0]].shape
    keep = set(layers)
    for j in range(len(per_layer)):
        if j not in keep:
            per_layer[j] = None
    attention = np.empty((len(layers), batch, len(heads), query, key), dtype=dtype)
    for i, layer in enumerate(layers):
        weights = per_layer[layer].detach()
        per_layer[layer] = None
        if weights.dtype not in (torch.float32, torch.float16):
            weights = weights.float()  # bfloat16, float64: numpy cannot take them as they are
        attention[i] = weights.cpu().numpy()[:, heads]
    return attention


def _length(obj) -> int | None:
    try:
        return len(obj)
    except TypeError:
        return None


# ---------------------------------------------------------------- Hugging Face models


def record(
    model,
    batches: Iterable,
    out: str | os.PathLike,
    *,
    layers: Sequence[int] | None = None,
    heads: Sequence[int] | None = None,
    dtype: str = "float32",
    tokenizer=None,
    progress: Progress | None = None,
    max_length: int | None = None,
    overwrite: bool = False,
) -> CaptureResult:
    """Run a Hugging Face `transformers` model over `batches` and write one dump per batch.

    Each batch is a list of texts (tokenized here with `tokenizer`: padded to the batch's
    longest text, truncated to `max_length`, by default the tokenizer's limit) or a mapping
    of model inputs such as a tokenizer's output (`input_ids`, `attention_mask`, ...).
    `layers` and `heads` keep a subset (sorted; negative indices count from the end);
    `dtype` is float32 or float16. `out` is a folder (it must hold no `attention_batch_*`
    dump unless `overwrite`), or a path ending in `.zarr` to ingest into that store.
    Encoder-decoder models record their encoder's self-attention. A batch padded on the
    left (decoder tokenizers) is given position ids counted from each text's first token,
    as `generate()` gives them, unless it brings its own.

    The model runs in eval mode under `torch.no_grad()`; its attention implementation is
    switched to eager for the run when needed, and both are restored afterwards.
    Raises `CaptureError` when the model cannot return attention weights.
    """
    torch = _torch()
    dtype = _check_dtype(dtype)
    if getattr(getattr(model, "config", None), "is_encoder_decoder", False) and hasattr(model, "get_encoder"):
        model = model.get_encoder()
    total = _length(batches)
    limit = max_length if max_length is not None else _model_max_length(model, tokenizer)
    with _quiet(), _eager(model), _eval(model), torch.no_grad():
        steps = (
            _hf_batch(model, batch, i, layers, heads, dtype, tokenizer, limit) for i, batch in enumerate(batches)
        )
        return _run(_Writer(out, dtype=dtype, overwrite=overwrite), steps, total, progress)


def _model_max_length(model, tokenizer) -> int | None:
    limit = getattr(tokenizer, "model_max_length", None)
    if isinstance(limit, int) and 0 < limit < 1_000_000:
        return limit
    limit = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    return limit if isinstance(limit, int) and limit > 0 else None


@contextlib.contextmanager
def _eval(model):
    """Eval mode (no dropout on the weights) for the run; each submodule's own mode restored after."""
    modes = [(m, m.training) for m in model.modules()] if hasattr(model, "modules") else []
    model.eval()
    try:
        yield
    finally:
        for module, training in modes:
            module.training = training


@contextlib.contextmanager
def _eager(model):
    """Switch a transformers model to eager attention (sdpa and flash kernels return no weights)."""
    config = getattr(model, "config", None)
    before = getattr(config, "_attn_implementation", None)
    if before in (None, "eager"):
        yield
        return
    try:
        if hasattr(model, "set_attn_implementation"):
            model.set_attn_implementation("eager")
        else:
            config._attn_implementation = "eager"
    except Exception as exc:
        raise CaptureError(
            f"{type(model).__name__} cannot switch to eager attention, so it cannot return attention weights"
            f" ({_one_line(exc)})"
        ) from None
    try:
        yield
    finally:
        with contextlib.suppress(Exception):
            if hasattr(model, "set_attn_implementation"):
                model.set_attn_implementation(before)
            else:
                config._attn_implementation = before


def _device(model):
    try:
        return next(model.parameters()).device
    except (StopIteration, AttributeError, TypeError):
        return _torch().device("cpu")


def _hf_inputs(batch, index: int, tokenizer, limit: int | None) -> dict:
    torch = _torch()
    if isinstance(batch, str):
        batch = [batch]
    if isinstance(batch, Mapping):
        return {k: v if isinstance(v, torch.Tensor) else torch.as_tensor(v) for k, v in batch.items()}
    if isinstance(batch, Sequence) and batch and all(isinstance(t, str) for t in batch):
        if tokenizer is None:
            raise CaptureError("batches of texts need a tokenizer (tokenizer=...)")
        if len(batch) > 1 and getattr(tokenizer, "pad_token", None) is None:
            raise CaptureError("the tokenizer has no padding token; set tokenizer.pad_token (e.g. to its eos_token)")
        encoded = tokenizer(
            list(batch), padding=True, truncation=limit is not None, max_length=limit, return_tensors="pt"
        )
        return dict(encoded)
    raise CaptureError(
        f"batch {index} is {type(batch).__name__}; expected a non-empty list of texts or a mapping of model inputs"
    )


def _left_padded_positions(mask):
    """Position ids counted from each sample's first token when padding comes before a token
    (left padding, as decoder tokenizers pad), else None.

    Without them a model numbers positions 0..seq-1 whatever the mask, so a left-padded text
    would start at position `pads` and its attention would depend on the other texts of its
    batch. These are the position ids `generate()` passes (padding gets 0), so each text is
    seen as if alone. Right padding needs none: the tokens already come first."""
    if mask is None or mask.ndim != 2:
        return None
    valid = mask != 0
    if not (~valid[:, :-1] & valid[:, 1:]).any():
        return None
    return (valid.long().cumsum(-1) - 1).masked_fill(~valid, 0)


def _parameters(model):
    """The parameters of the model's forward (empty when it has no readable signature)."""
    try:
        return inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return {}


def _add_positions(inputs: dict, parameters) -> None:
    """Left-padded inputs get their position ids (`_left_padded_positions`), unless the batch
    brings its own or the model takes none."""
    positions = _left_padded_positions(inputs.get("attention_mask"))
    if positions is not None and "position_ids" not in inputs and "position_ids" in parameters:
        inputs["position_ids"] = positions


def _hf_batch(model, batch, index, layers, heads, dtype, tokenizer, limit) -> dict[str, np.ndarray]:
    torch = _torch()
    inputs = _hf_inputs(batch, index, tokenizer, limit)
    ids = inputs.get("input_ids")
    if ids is None or ids.ndim != 2:
        raise CaptureError(f"batch {index} has no 2-D input_ids (batch, seq)")
    parameters = _parameters(model)
    _add_positions(inputs, parameters)
    device = _device(model)
    inputs = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in inputs.items()}
    kwargs = {"output_attentions": True, "return_dict": True}
    if "use_cache" in parameters:
        kwargs["use_cache"] = False  # no key/value cache: it would only cost memory
    try:
        output = model(**inputs, **kwargs)
    except (RuntimeError, TypeError, ValueError, IndexError) as exc:
        raise CaptureError(f"{type(model).__name__} failed on batch {index} ({_one_line(exc)})") from None
    per_layer = getattr(output, "attentions", None)
    del output
    if not per_layer or any(a is None for a in per_layer):
        raise CaptureError(
            f"{type(model).__name__} returns no attention weights with output_attentions=True"
            " (a model without attention layers, or an attention kernel that cannot return them)"
        )
    batch_size, seq = ids.shape
    if any(a.ndim != 4 or a.shape[0] != batch_size for a in per_layer):
        shape = tuple(per_layer[0].shape)
        raise CaptureError(f"{type(model).__name__} returned attention of shape {shape}; expected (batch, head, query, key)")
    per_layer = list(per_layer)
    layer_index = _selection(layers, len(per_layer), "layer")
    head_index = _selection(heads, per_layer[0].shape[1], "head")
    attention = _stack(per_layer, layer_index, head_index, dtype)
    mask = inputs.get("attention_mask")
    mask = np.ones((batch_size, seq), np.int8) if mask is None else (mask.cpu().numpy() != 0).astype(np.int8)
    input_ids = ids.cpu().numpy()
    arrays = {"attention_weights": attention, "attention_mask": mask, "input_ids": input_ids.astype(np.int32)}
    if tokenizer is not None:
        rows = [[t if isinstance(t, str) else "" for t in tokenizer.convert_ids_to_tokens(row)] for row in input_ids.tolist()]
        arrays["tokens"] = np.array(rows, dtype=str).reshape(batch_size, seq)
    return arrays


# ---------------------------------------------------------------- plain PyTorch modules


_MHA_ARGS = ("query", "key", "value", "key_padding_mask", "need_weights", "attn_mask", "average_attn_weights", "is_causal")


def record_module(
    model,
    inputs_iter: Iterable,
    out: str | os.PathLike,
    *,
    modules: Sequence | None = None,
    layers: Sequence[int] | None = None,
    heads: Sequence[int] | None = None,
    dtype: str = "float32",
    progress: Progress | None = None,
    overwrite: bool = False,
) -> CaptureResult:
    """Capture attention from a plain PyTorch module through hooks; one dump per input.

    Without `modules`, every `nn.MultiheadAttention` in the model is captured, each asked
    for per-head weights (`need_weights=True, average_attn_weights=False`; when the model
    has an `nn.TransformerEncoderLayer`, whose fused fast path skips its attention module,
    `torch.backends.mha` fast paths are turned off for the run). `modules` names submodules instead (names from
    `model.named_modules()`, or the modules themselves) whose output, or `output[1]` when
    it is a tuple, is the attention weights `(batch, head, query, key)`. Each captured
    module is one layer, in model order, and must run exactly once per forward.

    Each item of `inputs_iter` is passed as `model(x)` (a tensor), `model(*x)` (a tuple or
    list) or `model(**x)` (a mapping). A 2-D integer input (the first positional one, or `input_ids`) is saved as `input_ids`; the
    first captured `nn.MultiheadAttention`'s `key_padding_mask`, if any, as `attention_mask`.
    """
    torch = _torch()
    dtype = _check_dtype(dtype)
    targets = _targets(model, modules)
    total = _length(inputs_iter)
    captured: dict[int, list] = {i: [] for i in range(len(targets))}
    padding: list = []
    handles = []
    try:
        for i, (_, module) in enumerate(targets):
            if isinstance(module, torch.nn.MultiheadAttention):
                handles.append(module.register_forward_pre_hook(_force_weights(padding, i == 0), with_kwargs=True))
            handles.append(module.register_forward_hook(_keep_weights(captured[i])))
        fastpath = torch.backends.mha.get_fastpath_enabled()
        # nn.TransformerEncoder(Layer)'s fused fast path never calls its self_attn: turn it off for the run.
        # Elsewhere it stays as the model has it, so the weights are those the module itself returns.
        encoder = (torch.nn.TransformerEncoderLayer, torch.nn.TransformerEncoder)
        if any(isinstance(m, encoder) for m in model.modules()):
            torch.backends.mha.set_fastpath_enabled(False)
        try:
            with _eval(model), torch.no_grad():
                steps = (
                    _module_batch(model, item, index, targets, captured, padding, layers, heads, dtype)
                    for index, item in enumerate(inputs_iter)
                )
                return _run(_Writer(out, dtype=dtype, overwrite=overwrite), steps, total, progress)
        finally:
            torch.backends.mha.set_fastpath_enabled(fastpath)
    finally:
        for handle in handles:
            handle.remove()


def _targets(model, modules) -> list[tuple[str, Any]]:
    torch = _torch()
    if not isinstance(model, torch.nn.Module):
        raise CaptureError(f"record_module needs a torch.nn.Module, not {type(model).__name__}")
    named = list(model.named_modules())
    if modules is None:
        targets = [(name, m) for name, m in named if isinstance(m, torch.nn.MultiheadAttention)]
        if not targets:
            raise CaptureError(
                f"{type(model).__name__} has no nn.MultiheadAttention; name the submodules that output"
                " attention weights with modules=[...]"
            )
        return targets
    if isinstance(modules, (str, torch.nn.Module)):
        modules = [modules]
    by_name = dict(named)
    order = {id(m): n for n, (_, m) in enumerate(named)}
    chosen = []
    for wanted in modules:
        if isinstance(wanted, str):
            if wanted not in by_name:
                some = ", ".join(repr(n) for n, _ in named[1:6])
                raise CaptureError(f"{type(model).__name__} has no submodule {wanted!r} (its submodules: {some}, ...)")
            module = by_name[wanted]
        else:
            module = wanted
            if id(module) not in order:
                raise CaptureError(f"the {type(module).__name__} given in modules is not part of the model")
        name = next(n for n, m in named if m is module)
        if all(m is not module for _, m in chosen):
            chosen.append((name, module))
    if not chosen:
        raise CaptureError("modules names no submodule")
    return sorted(chosen, key=lambda nm: order[id(nm[1])])


def _force_weights(padding: list, first: bool):
    """Forward pre-hook: per-head weights from nn.MultiheadAttention, whatever its caller asked."""

    def hook(module, args, kwargs):
        if len(args) > 3:
            kwargs.update(zip(_MHA_ARGS[3:], args[3:]))
            args = args[:3]
        kwargs["need_weights"] = True
        kwargs["average_attn_weights"] = False
        if first:
            padding.append(kwargs.get("key_padding_mask"))
        return args, kwargs

    return hook


def _keep_weights(store: list):
    def hook(module, args, output):
        weights = output[1] if isinstance(output, (tuple, list)) and len(output) > 1 else output
        store.append(weights)

    return hook


def _call(model, item):
    if isinstance(item, Mapping):
        return model(**item)
    if isinstance(item, (tuple, list)):
        return model(*item)
    return model(item)


def _module_batch(model, item, index, targets, captured, padding, layers, heads, dtype) -> dict[str, np.ndarray]:
    torch = _torch()
    for store in captured.values():
        store.clear()
    padding.clear()
    try:
        _call(model, item)
    except (RuntimeError, TypeError, ValueError, IndexError) as exc:
        raise CaptureError(f"{type(model).__name__} failed on input {index} ({_one_line(exc)})") from None
    per_layer = []
    for i, (name, _) in enumerate(targets):
        calls = captured[i]
        if len(calls) != 1:
            ran = "did not run" if not calls else f"ran {len(calls)} times"
            raise CaptureError(f"submodule {name!r} {ran} during the forward of input {index}; it must run once")
        weights = calls[0]
        if not isinstance(weights, torch.Tensor):
            raise CaptureError(f"submodule {name!r} output no attention weights tensor (got {type(weights).__name__})")
        if weights.ndim == 3:
            weights = weights.unsqueeze(0)  # an unbatched sample: (head, query, key)
        if weights.ndim != 4:
            raise CaptureError(
                f"submodule {name!r} output weights of shape {tuple(weights.shape)}; expected (batch, head, query, key)"
            )
        if per_layer and weights.shape != per_layer[0].shape:
            raise CaptureError(
                f"submodule {name!r} output weights of shape {tuple(weights.shape)},"
                f" the first one {tuple(per_layer[0].shape)}; all captured layers must match"
            )
        per_layer.append(weights)
    for store in captured.values():
        store.clear()
    layer_index = _selection(layers, len(per_layer), "layer")
    head_index = _selection(heads, per_layer[0].shape[1], "head")
    attention = _stack(per_layer, layer_index, head_index, dtype)
    batch, _, query, key = attention.shape[1:]
    arrays = {"attention_weights": attention}
    kpm = padding[0] if padding else None
    if query == key:
        if isinstance(kpm, torch.Tensor) and kpm.ndim in (1, 2) and kpm.shape[-1] == key:
            valid = ~kpm if kpm.dtype == torch.bool else kpm == 0
            arrays["attention_mask"] = valid.reshape(-1, key).expand(batch, key).cpu().numpy().astype(np.int8)
        else:
            arrays["attention_mask"] = np.ones((batch, key), np.int8)
    if isinstance(item, Mapping):
        ids = item.get("input_ids")
    else:
        ids = item[0] if isinstance(item, (tuple, list)) and item else item
    if isinstance(ids, torch.Tensor) and ids.ndim == 2 and not ids.is_floating_point() and ids.shape[0] == batch:
        arrays["input_ids"] = ids.cpu().numpy().astype(np.int32)
    return arrays
