"""Statistics straight from a model, for attention too large to store.

`record_stats(model, texts, "store.zarr", tokenizer=...)` runs a Hugging Face model batch by
batch and, for every layer as soon as its attention weights exist, runs the statistics kernel
of `fastattn stats` (`fastattn.kernels.stats.fill`, the same call `write_stats` makes) on
them, then drops them. The store gets the `stats` group `write_stats` lays out (same schema,
names, dtypes and chunks) and the per-sample arrays (`length`, `source`, `source_index`,
`token`), but no `attention` array: its manifest says `stats_only`, so `open_store` and the
commands that need the maps refuse it in one line, and `fastattn check` checks it without one.

How a layer's weights are taken. Eager attention computes each layer's weights whatever
`output_attentions` says; transformers only collects them, through forward hooks on the
modules its model class lists in `can_record_outputs["attentions"]`. Here a forward hook on
each of those modules takes the weights (`output[index]`), computes the layer's statistics and
returns the output with the weights replaced by None, and the model runs with
`output_attentions=False`: memory holds one layer's maps of one batch, never the tuple of all
layers. A model class that lists no such modules runs with `output_attentions=True` instead,
and its tuple is taken layer by layer, each map dropped once used: that holds every layer's
maps of the batch at the end of the forward. On a GPU each layer's map is copied to host
memory and the CPU kernels run on it (a GPU kernel is not implemented here).

The manifest's file entries are texts: keyed by `text:` and the sha256 of their UTF-8 bytes,
`source` the input file's name and the text's number in it. A text already in the store is
skipped, so a killed capture, run again, computes only the texts it had not committed, and
the store equals that of one uninterrupted run. Batches are committed as they finish (at most
every `commit_seconds`, and whenever `COMMIT_BYTES` of statistics are pending), through the
manifest's atomic write, like an ingest.

Keeping a few maps whole. `keep_layers`/`keep_heads` name layers and heads whose full maps go
into the store's `kept` group (schema.KEPT) beside the statistics, which still cover every layer
and head: `attention (batch, kept_layer, kept_head, query, key)`, NaN outside each sample's valid
block as ingest stores maps, its `kept_layer`/`kept_head` coordinates the store's layer and head
numbers it holds. A group of its own, not the store's `attention` array holding a few layers: the
root's `layer`/`head` dims (and the statistics') count every layer and head, and one dim name
cannot have two sizes in one xarray Dataset. Each kept layer's planes are copied out as its hook
runs (the rest of its map is dropped) and written with the batch's statistics, in the same
commit (`Manifest.kept_committed`, `kept_layers`, `kept_heads`). `open_kept` reads them.
"""

from __future__ import annotations

import hashlib
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from . import capture
from .capture import CaptureError

#: Commit when the statistics waiting for it take this many bytes (memory stays bounded).
COMMIT_BYTES = 64 << 20
#: ... or when the last commit is this old (a kill loses at most this much work).
COMMIT_SECONDS = 10.0
#: The stats group's attribute recording how its statistics were captured (a later run must match).
ATTRIBUTE = "fastattn_capture"
#: The settings a run into an existing store must share with the runs before it.
SETTINGS = ("model", "max_length", "layers", "heads", "k", "window", "stride", "keep_layers", "keep_heads")
#: The group the kept maps go into (schema.KEPT).
KEPT = "kept"

#: (texts done, texts in all, tokens run so far this run)
LiveProgress = Callable[[int, int, int], None]


@dataclass
class LiveResult:
    """What one `record_stats` run did."""

    out: str
    texts: int = 0  # inputs given
    computed: int = 0  # texts run through the model now
    skipped: int = 0  # texts already in the store, or repeated in the inputs
    tokens: int = 0  # tokens run through the model now
    batches: int = 0  # forward passes
    commits: int = 0
    committed: int = 0  # samples with statistics in the store after the run
    layers: int = 0
    heads: int = 0
    hooks: bool = True  # per-layer hooks (False: the output_attentions tuple, taken layer by layer)
    seconds: float = 0.0


def text_key(text: str) -> str:
    """A text's manifest key: its content hash."""
    return "text:" + hashlib.sha256(text.encode("utf-8")).hexdigest()


def record_stats(
    model,
    texts: Sequence[str],
    out: str | os.PathLike,
    *,
    tokenizer,
    batch_size: int = 8,
    max_length: int | None = None,
    k: int = 5,
    layers: Sequence[int] | None = None,
    heads: Sequence[int] | None = None,
    source: str = "texts",
    jobs: int | None = None,
    progress: LiveProgress | None = None,
    commit_seconds: float = COMMIT_SECONDS,
    after_batch: Callable[[int], None] | None = None,
    window: int | None = None,
    stride: int | None = None,
    keep_layers: Sequence[int] | None = None,
    keep_heads: Sequence[int] | None = None,
) -> LiveResult:
    """Run `model` over `texts` and commit every layer's statistics into the store `out`.

    `texts` are strings; each is one sample, `source` `"{source}:{number}"` (1-based). With
    `window` W, each text is cut into windows of W tokens (special tokens added to each) that
    start `stride` tokens apart (default W), the last ending at the text's end or before: each
    window is a sample, its `source_index` the window's number, so its first token is token
    `source_index × stride` of the text (without special tokens).
    `max_length` truncates (default: the tokenizer's limit), `k` is the top-k kept, `layers`
    and `heads` keep a subset, as in `capture.record`. `keep_layers` and `keep_heads` (model
    numbers, among those captured; either alone: every captured head, or layer, of the other)
    store those layers x heads' full maps beside the statistics (`open_kept` reads them).
    The store is created, or resumed when it holds statistics captured with the same model and
    settings (a store with attention maps, or other settings, is an error). `after_batch(batches run)` is called after each forward
    pass (tests stop a run there). Returns a `LiveResult`.
    """
    from . import store

    torch = capture._torch()
    started = time.perf_counter()
    if not 1 <= k <= 64:
        raise CaptureError(f"k must be between 1 and 64, not {k}")
    if batch_size < 1:
        raise CaptureError(f"batch size must be at least 1, not {batch_size}")
    if window is None and stride is not None:
        raise CaptureError("applies to windows only; give a window too", parameter="stride")
    if window is not None:
        stride = window if stride is None else stride
        if window < 1 or not 1 <= stride <= window:
            raise CaptureError(f"must be at least 1, with the stride between 1 and it; not {window} and stride {stride}",
                               parameter="window")
    texts = list(texts)
    if not texts or not all(isinstance(t, str) for t in texts):
        raise CaptureError("texts must be a non-empty list of strings")
    if getattr(getattr(model, "config", None), "is_encoder_decoder", False) and hasattr(model, "get_encoder"):
        model = model.get_encoder()
    limit = max_length if max_length is not None else capture._model_max_length(model, tokenizer)
    result = LiveResult(out=os.fspath(out), texts=len(texts))
    loc = store.as_location(out)
    loc.check_reachable()
    if not loc.is_new() and not store.is_fastattn(loc):
        raise CaptureError(f"{loc}: exists and is not a fastattn store; refusing to write into it")
    loc.check_writable()
    with capture._quiet(), capture._eager(model), capture._eval(model), torch.no_grad(), store.Lock(loc, "fastattn capture"):
        targets = _attention_modules(model)
        result.hooks = bool(targets)
        total_layers = len(targets) if targets else _count_layers(model)
        layer_index = capture._selection(layers, total_layers, "layer")
        head_index = capture._selection(heads, _count_heads(model), "head")
        kept = _kept_selection(keep_layers, keep_heads, (layer_index, total_layers), (head_index, _count_heads(model)))
        settings = {"model": _model_name(model), "max_length": limit, "layers": layer_index, "heads": head_index, "k": k,
                    "window": window, "stride": stride, "keep_layers": kept and kept[0], "keep_heads": kept and kept[1]}
        todo = _plan(texts, tokenizer, limit, store.read_manifest(loc), source, result, window, stride)
        longest = max((s.length for s in todo), default=1)
        writer = _Writer(loc, settings, len(layer_index), len(head_index), longest, commit_seconds)
        result.layers, result.heads = len(layer_index), len(head_index)
        done = result.skipped
        if progress is not None:
            progress(done, len(texts), 0)
        try:
            for start in range(0, len(todo), batch_size):
                batch = todo[start : start + batch_size]
                if window is None:
                    inputs = capture._hf_inputs([s.text for s in batch], result.batches, tokenizer, limit)
                else:
                    inputs = dict(tokenizer.pad({"input_ids": [s.ids for s in batch]}, padding=True, return_tensors="pt"))
                mask = _mask(inputs)
                ids = inputs["input_ids"].cpu().numpy()
                run = _BatchStats(mask, ids, layer_index, head_index, k, jobs, total_layers, kept)
                _forward(model, inputs, targets, run, result.batches)
                tokens = [[t if isinstance(t, str) else "" for t in tokenizer.convert_ids_to_tokens(row)] for row in ids.tolist()]
                writer.add(run.finish(writer.query), batch, run.valid_tokens(tokens))
                result.batches += 1
                finished = sum(s.index == s.count - 1 for s in batch)  # texts whose last window ran
                result.computed += finished
                result.tokens += int(run.lengths.sum())
                done += finished
                if progress is not None:
                    progress(done, len(texts), result.tokens)
                if after_batch is not None:
                    after_batch(result.batches)
                result.commits += writer.maybe_commit()
        finally:
            result.commits += writer.commit()  # what finished before an interrupt stays committed
        result.committed = writer.manifest.committed if writer.manifest else 0
    result.seconds = time.perf_counter() - started
    return result


def _kept_selection(keep_layers, keep_heads, layers: tuple[list[int], int], heads: tuple[list[int], int]):
    """The store positions `(layers, heads)` of the maps to keep, None for none: model layer and head
    numbers checked against the model's (`layers`, `heads`: the captured numbers and how many the
    model has), and found among the captured ones."""
    if keep_layers is None and keep_heads is None:
        return None
    chosen = []
    for wanted, (index, available), what in ((keep_layers, layers, "layer"), (keep_heads, heads, "head")):
        if wanted is None:
            chosen.append(list(range(len(index))))
            continue
        numbers = capture._selection(wanted, available, what)
        missing = [n for n in numbers if n not in index]
        if missing:
            raise CaptureError(f"{what} {missing[0]} is not among the {what}s captured ({index})",
                               parameter=f"keep_{what}s")
        chosen.append([index.index(n) for n in numbers])
    return chosen[0], chosen[1]


def open_kept(location, *, storage_options: dict | None = None):
    """The full maps a stats-only capture kept (`keep_layers`, `keep_heads`), of the committed
    batches, as a lazy `xarray.Dataset`: `attention (batch, kept_layer, kept_head, query, key)`,
    NaN outside each sample's valid block as in `open_store`, and each sample's `length`;
    `kept_layer`/`kept_head` hold the store's layer and head numbers (`.sel(kept_layer=3)`).
    A StoreError when the store keeps none."""
    from . import store
    from .store.schema import KEPT as SPEC

    loc = store.as_location(location, storage_options)
    manifest, record = store.derived_committed(loc, SPEC)
    size = manifest.max_length
    ds = store.open_committed(loc, {"batch": record["batches"], "query": size, "key": size}, group=SPEC.name)
    store.require_variables(loc, SPEC, record, ds.variables)
    ds = ds.assign(length=store.open_store(loc, attention=False)["length"]).chunk({"query": -1, "key": -1})
    ds.attrs = {"store": str(loc), **record}
    return ds


# ---------------------------------------------------------------- planning


@dataclass
class _Sample:
    """One sample to run: a text, or one window of it (`index` of `count`)."""

    text: str
    key: str
    source: str
    length: int  # tokens, special tokens included
    index: int = 0
    count: int = 1
    ids: list | None = None  # a window's token ids (a whole text is tokenized with its batch)


def _plan(texts, tokenizer, limit, manifest, source: str, result: LiveResult, window=None, stride=None) -> list[_Sample]:
    """The samples to run: the texts not in the store already, each once (by content hash),
    whole or cut into windows."""
    if manifest is not None and not manifest.stats_only and manifest.committed:
        raise CaptureError(
            f"{result.out}: holds attention maps; statistics captured from a model go into a store of their own"
        )
    seen = set(manifest.files) if manifest is not None else set()
    todo = []
    for number, text in enumerate(texts, start=1):
        key = text_key(text)
        if key in seen:
            result.skipped += 1
            continue
        seen.add(key)
        todo.append((text, key, f"{source}:{number}"))
    if not todo:
        return []
    if window is None:
        encoded = tokenizer([t for t, _, _ in todo], truncation=limit is not None, max_length=limit)
        return [_Sample(text, key, name, len(ids)) for (text, key, name), ids in zip(todo, encoded["input_ids"])]
    prefix, suffix = _special_tokens(tokenizer)
    specials = len(prefix) + len(suffix)
    if limit is not None and window + specials > limit:
        raise CaptureError(f"a window of {window} tokens and {specials} special tokens is longer than the limit, {limit}",
                           parameter="window")
    samples = []
    for (text, key, name), ids in zip(todo, tokenizer([t for t, _, _ in todo], add_special_tokens=False)["input_ids"]):
        starts = list(range(0, max(1, len(ids) - window + stride), stride))
        for index, offset in enumerate(starts):
            piece = prefix + list(ids[offset : offset + window]) + suffix
            samples.append(_Sample(text, key, name, len(piece), index, len(starts), piece))
    return samples


def _special_tokens(tokenizer) -> tuple[list[int], list[int]]:
    """The ids the tokenizer puts before and after a text's own tokens ([CLS] and [SEP], a BOS,
    or none), found by tokenizing one word with and without them."""
    probe = "a"
    whole = list(tokenizer(probe)["input_ids"])
    own = list(tokenizer(probe, add_special_tokens=False)["input_ids"])
    for start in range(len(whole) - len(own) + 1):
        if whole[start : start + len(own)] == own:
            return whole[:start], whole[start + len(own) :]
    raise CaptureError("cannot tell which special tokens the tokenizer adds, so windows cannot be cut")


def _model_name(model) -> str:
    config = getattr(model, "config", None)
    name = getattr(config, "_name_or_path", "") or ""
    return f"{type(model).__name__} {os.path.basename(str(name).rstrip('/'))}".strip()


def _config_count(model, names: tuple[str, ...], what: str) -> int:
    """A positive count from the model's config, under the first of `names` it has."""
    config = getattr(model, "config", None)
    for name in names:
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    raise CaptureError(f"{type(model).__name__}: its config names no number of {what}")


def _count_heads(model) -> int:
    return _config_count(model, ("num_attention_heads", "n_head", "num_heads"), "attention heads")


def _count_layers(model) -> int:
    return _config_count(model, ("num_hidden_layers", "n_layer", "num_layers"), "layers")


def _mask(inputs) -> np.ndarray:
    ids = inputs.get("input_ids")
    mask = inputs.get("attention_mask")
    if mask is None:
        return np.ones(tuple(ids.shape), dtype=bool)
    return mask.cpu().numpy() != 0


# ---------------------------------------------------------------- the forward pass


def _attention_modules(model) -> list[tuple[object, int]]:
    """`(module, index)` of every module whose `output[index]` is a layer's attention weights, in
    model order: the modules transformers records `attentions` from (see the module docstring);
    [] when the model class declares none."""
    specs = getattr(model, "can_record_outputs", None)
    specs = (specs or {}).get("attentions") if isinstance(specs, dict) else None
    if specs is None:
        return []
    found = []
    for spec in specs if isinstance(specs, list) else [specs]:
        target = getattr(spec, "target_class", spec if isinstance(spec, type) else None)
        class_name = getattr(spec, "class_name", spec if isinstance(spec, str) else None)
        layer_name = getattr(spec, "layer_name", None)
        index = getattr(spec, "index", 1)
        for name, module in model.named_modules():
            dotted = f".{name}."
            if not ((target is not None and isinstance(module, target)) or (class_name and name.endswith(class_name))):
                continue
            if layer_name is not None and f".{layer_name.strip('.')}." not in dotted:
                continue
            found.append((name, module, index))
    order = {name: i for i, (name, _) in enumerate(model.named_modules())}
    return [(module, index) for name, module, index in sorted(found, key=lambda f: order[f[0]])]


def _forward(model, inputs, targets, run: _BatchStats, index: int) -> None:
    """One forward pass, each layer's weights handed to `run.layer` as soon as they exist."""
    torch = capture._torch()
    device = capture._device(model)
    parameters = capture._parameters(model)
    capture._add_positions(inputs, parameters)  # left padding: positions from each text's first token
    inputs = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in inputs.items()}
    kwargs = {"return_dict": True, "output_attentions": not targets}
    if "use_cache" in parameters:
        kwargs["use_cache"] = False
    handles = []
    calls = [0]

    def hook(position: int):
        def take(module, args, output):
            weights = output[position] if isinstance(output, tuple) and len(output) > position else None
            if weights is None:
                return None
            run.layer(calls[0], weights)
            calls[0] += 1
            return (*output[:position], None, *output[position + 1 :])  # the map is dropped here

        return take

    try:
        for module, position in targets:
            handles.append(module.register_forward_hook(hook(position)))
        try:
            output = model(**inputs, **kwargs)
        except (RuntimeError, TypeError, ValueError, IndexError) as exc:
            raise CaptureError(f"{type(model).__name__} failed on batch {index} ({capture._one_line(exc)})") from None
    finally:
        for handle in handles:
            handle.remove()
    if not targets:
        per_layer = list(getattr(output, "attentions", None) or ())
        del output
        for i in range(len(per_layer)):
            if per_layer[i] is not None:
                run.layer(calls[0], per_layer[i])
                calls[0] += 1
            per_layer[i] = None  # dropped once used
    if calls[0] != run.total_layers:
        raise CaptureError(
            f"{type(model).__name__} returned attention weights of {calls[0]} layers on batch {index}, expected"
            f" {run.total_layers} (an attention kernel that cannot return them, or a model that is not supported)"
        )


class _BatchStats:
    """The statistics of one batch, filled layer by layer by the kernel `write_stats` runs."""

    def __init__(self, mask: np.ndarray, ids: np.ndarray, layers: list[int], heads: list[int], k: int, jobs: int | None,
                 total_layers: int, kept: tuple[list[int], list[int]] | None = None):
        from .kernels import stats as kernel

        self.mask = mask
        self.batch, self.seq = mask.shape
        self.layers = {layer: i for i, layer in enumerate(layers)}
        self.heads = heads
        self.total_layers = total_layers  # how many layers the forward must give
        self.k, self.jobs = k, jobs
        self.lengths = mask.sum(axis=1).astype(np.int32)
        if np.any(self.lengths == 0):
            raise CaptureError(f"sample {int(np.argmin(self.lengths))} of a batch has no token")
        prefix = np.arange(self.seq)[None, :] < self.lengths[:, None]
        self.order = None if np.array_equal(mask, prefix) else [np.flatnonzero(row) for row in mask]
        self.shape = (self.batch, len(layers), len(heads))
        self.out = kernel.empty_buffers(int(np.prod(self.shape)), self.seq, self.seq, k, np.float32)
        self.planes = np.arange(int(np.prod(self.shape))).reshape(self.shape)
        # the token ids as ingest stores them (`input_id`: each sample's valid ones first, -1 after),
        # and their repeats, for the duplicate-token and induction scores of every layer
        self.ids = np.full((self.batch, self.seq), -1, dtype=np.int32)
        for b, valid in enumerate(mask):
            own = ids[b][valid]
            self.ids[b, : own.size] = own
        self.repeats = kernel.repeats(self.ids[:, None, None, :], self.shape)
        # the kept layers x heads' maps (store positions), copied out as each kept layer runs
        self.kept_layers = {layer: i for i, layer in enumerate(kept[0])} if kept else {}
        self.kept_heads = kept[1] if kept else []
        self.kept = np.full((self.batch, len(self.kept_layers), len(self.kept_heads), self.seq, self.seq), np.nan,
                            dtype=np.float32) if kept else None

    def layer(self, number: int, weights) -> None:
        """Layer `number`'s weights `(batch, head, query, key)`: its statistics, then nothing kept."""
        from .kernels import stats as kernel
        from .kernels._jit import kernel_threads

        if number >= self.total_layers:
            return  # counted (and reported) by the caller
        position = self.layers.get(number)
        if position is None:
            return
        torch = capture._torch()
        if weights.ndim != 4 or tuple(weights.shape) != (self.batch, weights.shape[1], self.seq, self.seq):
            raise CaptureError(
                f"layer {number} gave attention weights of shape {tuple(weights.shape)};"
                f" expected (batch, head, query, key) = ({self.batch}, heads, {self.seq}, {self.seq})"
            )
        weights = weights.detach()
        if weights.dtype not in (torch.float32, torch.float16):
            weights = weights.float()
        a = weights.cpu().numpy()  # host memory: the CPU kernels (no copy on a CPU model)
        if len(self.heads) != a.shape[1]:
            a = a[:, self.heads]
        if self.order is not None:  # each sample's valid tokens first, NaN after: as ingest stores them
            from .dumps import _compact

            a = _compact(a[:, None], None, None, self.order, self.lengths)[0][:, 0]  # (batch, layer=1, head, q, k)
        dest = self.planes[:, position].ravel()
        with kernel_threads(self.jobs):
            kernel.fill(self.out, a, self.lengths, dest, parallel=True, repeats=self.repeats)
        self._check_rows(number, a.dtype, dest)
        if position in self.kept_layers:
            self._keep(self.kept_layers[position], a)

    def _keep(self, position: int, a: np.ndarray) -> None:
        """The kept heads' planes of one layer, each sample's valid block only (NaN outside, as ingest
        stores maps); float32 (a float16 model's weights exactly)."""
        for b, n in enumerate(self.lengths):
            self.kept[b, position, :, :n, :n] = a[b, self.kept_heads, :n, :n]

    def _check_rows(self, number: int, dtype, dest) -> None:
        """Rows must sum to 1 within ingest's tolerance: logits returned by mistake are an error, not
        statistics. (NaN weights are not caught here: the kernel is compiled with fastmath.)"""
        from .dumps import row_sum_tolerance
        from .kernels import stats as kernel

        error = self.out.plane[kernel.PLANE_STATS.index("row_sum_error"), dest]
        bad = np.flatnonzero(~(error <= row_sum_tolerance(dtype)))
        if bad.size:
            b, h = divmod(int(bad[0]), len(self.heads))
            raise CaptureError(
                f"layer {number}, head {self.heads[h]} of sample {b} of the batch has attention rows that do not sum"
                f" to 1 (off by {error[bad[0]]:.3g}): not attention weights (logits?)"
            )

    def finish(self, query: int) -> dict[str, np.ndarray]:
        """Every statistic of the batch, `(batch, layer, head, ...)`, padded to the store's
        `query` tokens as the store's statistics are (NaN, top-k index -1)."""
        from .kernels import stats as kernel

        arrays = kernel.named(self.out, self.shape)
        pad = query - self.seq
        result = {}
        for name, values in arrays.items():
            if values.ndim > 3 and pad:
                axis = 3  # query or key
                widths = [(0, 0)] * values.ndim
                widths[axis] = (0, pad)
                fill = -1 if values.dtype.kind == "i" else np.nan
                values = np.pad(values, widths, constant_values=fill)
            result[name] = np.ascontiguousarray(values)
        result["length"] = self.lengths
        result["input_id"] = np.pad(self.ids, ((0, 0), (0, pad)), constant_values=-1)
        if self.kept is not None:
            result[KEPT] = np.pad(self.kept, ((0, 0),) * 3 + ((0, pad),) * 2, constant_values=np.nan)
        self.out = self.kept = None
        return result

    def valid_tokens(self, tokens: list[list[str]]) -> list[list[str]]:
        """Each sample's token strings at its valid positions, in order (padding dropped)."""
        return [[row[i] for i in np.flatnonzero(valid)] for row, valid in zip(tokens, self.mask)]


# ---------------------------------------------------------------- the store


class _Writer:
    """Creates or resumes the store, and commits finished batches to it."""

    def __init__(self, loc, settings: dict, layers: int, heads: int, longest: int, commit_seconds: float):
        from . import store

        self.loc, self.settings, self.commit_seconds = loc, settings, commit_seconds
        self.pending: list[dict] = []  # statistics of the batches run since the last commit
        self.samples: list[_Sample] = []  # and their samples, in order
        self.tokens: list[list[str]] = []
        self.pending_bytes = 0
        self.last = time.monotonic()
        self.manifest = store.read_manifest(loc)
        self.run_entry: dict | None = None
        self.started = time.perf_counter()
        if self.manifest is not None and self.manifest.committed:
            self._resume(layers, heads, longest)
        else:
            self._create(layers, heads, longest)

    @property
    def query(self) -> int:
        return self.manifest.max_length

    def _create(self, layers: int, heads: int, longest: int) -> None:
        from . import store

        self.manifest = store.create(self.loc, layers=layers, heads=heads, query=longest, key=longest,
                                     dtype="float32", stats_only=True)
        self.group = store.open_group(self.loc)
        self.manifest.stats_k = self.settings["k"]  # the stats group is laid out by the first commit

    def _layout(self, n: int) -> None:
        """The stats group as `write_stats` lays it out, for the first `n` batches."""
        from . import stats

        m = self.manifest
        block = stats._block_batches(m, m.max_length, m.max_length)
        stats._create_layout(self.group, n, self.settings["k"], block, shape=(m.layers, m.heads, m.max_length, m.max_length))
        self.group[stats.GROUP].attrs[ATTRIBUTE] = self.settings
        if self.settings["keep_layers"]:
            self._layout_kept(n)

    def _layout_kept(self, n: int) -> None:
        """The `kept` group (schema.KEPT) for `n` batches: the attention chunked as the store's would be
        (`schema.attention_chunks` at the kept heads), its coordinates one chunk each."""
        from . import store

        layers, heads, size = self.settings["keep_layers"], self.settings["keep_heads"], self.manifest.max_length
        chunks = store.attention_chunks(len(heads), size, size, 4)
        group = self.group.require_group(KEPT)
        group.create_array("attention", shape=(n, len(layers), len(heads), size, size), chunks=chunks, dtype="float32",
                           fill_value=np.nan, dimension_names=("batch", "kept_layer", "kept_head", "query", "key"),
                           attributes=dict(store.ARRAYS[0].attributes), overwrite=True, compressors=store.compressors(weights=True),
                           chunk_key_encoding=store.CHUNK_KEYS)
        options = {"overwrite": True, "compressors": store.compressors(), "chunk_key_encoding": store.CHUNK_KEYS}  # the coordinates'
        for name, values, chunk in (("batch", np.arange(n), chunks[0]), ("kept_layer", layers, len(layers)),
                                    ("kept_head", heads, len(heads)), ("query", np.arange(size), size),
                                    ("key", np.arange(size), size)):
            array = group.create_array(name, shape=(len(values),), chunks=(max(1, chunk),), dtype="int32",
                                       dimension_names=(name,), **options)
            if len(values):
                array[:] = np.asarray(values, dtype=np.int32)

    def _resume(self, layers: int, heads: int, longest: int) -> None:
        from . import stats, store

        self.group = store.open_group(self.loc)
        recorded = dict(self.group[stats.GROUP].attrs).get(ATTRIBUTE) if stats.GROUP in self.group else None
        if not isinstance(recorded, dict):
            raise CaptureError(f"{self.loc}: its statistics do not say how they were captured; capture into a new store")
        for name in SETTINGS:
            if recorded.get(name) != self.settings[name]:
                raise CaptureError(
                    f"{self.loc}: its statistics were captured with {name}={recorded.get(name)!r}, this run has"
                    f" {self.settings[name]!r}; use the same, or another store",
                )
        keep = self.settings["keep_layers"]
        if keep and self.manifest.kept_committed != self.manifest.committed:
            raise CaptureError(
                f"{self.loc}: its kept maps cover {self.manifest.kept_committed} of its {self.manifest.committed} batches"
                " (removed by a repair?); capture into a new store to keep maps"
            )
        if longest > self.manifest.max_length:
            self._grow(longest)

    def _grow(self, longest: int) -> None:
        """Longer texts than the store has seen: every query/key dim grows (old values stay; the
        new positions of committed batches hold what the kernel writes there: the fill value, written
        as whole chunks, and -1 for the top-k index)."""
        from . import stats, store

        n = self.manifest.committed
        arrays = [a for name in ("", stats.GROUP, KEPT) if not name or name in self.group
                  for _, a in (self.group[name] if name else self.group).arrays()]
        for array in arrays:
            dims = tuple(array.metadata.dimension_names or ())
            if dims in (("query",), ("key",)):
                array.resize((longest,))
                array[:] = np.arange(longest, dtype=np.int32)
            elif "query" in dims or "key" in dims:
                old = tuple(array.shape)
                array.resize(tuple(longest if d in ("query", "key") else s for d, s in zip(dims, old)))
                if array.path.endswith("topk_index"):  # past a query's keys the kernel writes -1, not the fill value 0
                    array[:n, :, :, old[3]:] = -1
                else:
                    store.WholeChunks(self.loc, array).fill_new_chunks(old, n)
        self.manifest.max_length = longest

    def add(self, st: dict, samples: list[_Sample], tokens) -> None:
        self.pending.append(st)
        self.samples += samples
        self.tokens += tokens
        self.pending_bytes += sum(v.nbytes for v in st.values())

    def maybe_commit(self) -> int:
        if self.pending_bytes >= COMMIT_BYTES or time.monotonic() - self.last >= self.commit_seconds:
            return self.commit()
        return 0

    def commit(self) -> int:
        """Write the pending batches and commit them: one atomic manifest write."""
        import zarr

        from . import stats, store

        # whole texts only: a text's windows are committed together, under its one file entry
        count = max((i + 1 for i, s in enumerate(self.samples) if s.index == s.count - 1), default=0)
        if not count:
            return 0
        n0 = self.manifest.committed
        n1 = n0 + count
        both = {name: np.concatenate([p[name] for p in self.pending]) for name in self.pending[0]}
        st = {name: values[:count] for name, values in both.items()}
        entries, tokens = self.samples[:count], self.tokens[:count]
        query = self.manifest.max_length
        token = np.full((count, query), "", dtype=object)
        for i, row in enumerate(tokens):
            token[i, : len(row)] = row
        with store.nothing_committed(self.loc, "writing the statistics"), zarr.config.set({"array.write_empty_chunks": True}):
            store.resize(self.group, batch=n1)
            if n0 == 0:
                self._layout(n1)
            kept = st.pop(KEPT, None)
            for path in (stats.GROUP, KEPT) if kept is not None else (stats.GROUP,):
                for name, array in self.group[path].arrays():
                    if "batch" in (array.metadata.dimension_names or ()):
                        array.resize((n1, *array.shape[1:]))
                        if name == "batch":
                            array[:] = np.arange(n1, dtype=array.dtype)
            group = self.group[stats.GROUP]
            per_sample = {
                "length": st["length"],
                "source": np.array([s.source for s in entries], dtype=object),
                "source_index": np.array([s.index for s in entries], dtype=np.int32),
                "token": token,
                "input_id": st.pop("input_id"),
            }
            store.write_all((self.group[name], slice(n0, n1), values) for name, values in per_sample.items())
            stats._write_block(dict(group.arrays()), st, n0, n1)
            if kept is not None:  # every chunk written, NaN ones too: a missing chunk is damage
                stats._write_block({"attention": self.group[KEPT]["attention"]}, {"attention": kept}, n0, n1)
        for i, s in enumerate(entries):
            if s.index == 0:
                self.manifest.files[s.key] = store.FileEntry(len(s.text.encode("utf-8")), 0, s.key[len("text:"):],
                                                             n0 + i, n0 + i + s.count, source=s.source, dtype="float32")
        self.manifest.committed = self.manifest.stats_committed = n1
        self.manifest.stats_k = self.settings["k"]
        if kept is not None:
            self.manifest.kept_committed = n1
            self.manifest.kept_layers, self.manifest.kept_heads = self.settings["keep_layers"], self.settings["keep_heads"]
        self._record_run(sum(s.index == 0 for s in entries), count)
        store.commit(self.loc, self.manifest)
        rest = {name: values[count:] for name, values in both.items()}
        self.pending = [rest] if len(rest["length"]) else []
        self.samples, self.tokens = self.samples[count:], self.tokens[count:]
        self.pending_bytes, self.last = sum(v.nbytes for v in rest.values()), time.monotonic()
        return 1

    def _record_run(self, texts: int, count: int) -> None:
        """This run's entry in the manifest's `ingests`, updated at each commit."""
        from . import store

        if self.run_entry is None:
            self.run_entry = {"time": store.now(), "capture": "stats_only", "files": 0, "batches": 0, "rejected": 0,
                              "seconds": 0.0}
            self.manifest.ingests.append(self.run_entry)
        self.run_entry["files"] += texts
        self.run_entry["batches"] += count
        self.run_entry["seconds"] = round(time.perf_counter() - self.started, 3)
