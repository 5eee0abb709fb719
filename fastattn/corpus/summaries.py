"""Per-head moments and histograms of a whole corpus in one chunked pass, with mergeable accumulators."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import xarray as xr

from ..errors import FastattnError
from .common import _batch_step
from .statistics import corpus_stats


@dataclass
class Moments:
    """Count, mean and M2 (sum of squared deviations) per cell; mergeable (Chan et al. 1979).

    Merging `a` and `b`: `n = n_a + n_b`, `δ = mean_b − mean_a`,
    `mean = mean_a + δ·n_b/n`, `M2 = M2_a + M2_b + δ²·n_a·n_b/n`. NaN values are skipped.
    """

    count: np.ndarray
    mean: np.ndarray
    m2: np.ndarray

    @classmethod
    def empty(cls, shape) -> Moments:
        return cls(np.zeros(shape, dtype=np.int64), np.zeros(shape), np.zeros(shape))

    @classmethod
    def of(cls, values: np.ndarray, axis: int = 0) -> Moments:
        """The moments of one block along `axis` (two-pass within the block)."""
        x = np.asarray(values, dtype=np.float64)
        ok = ~np.isnan(x)
        count = ok.sum(axis)
        total = np.where(ok, x, 0.0).sum(axis)
        mean = np.divide(total, count, out=np.zeros(count.shape), where=count > 0)
        dev = np.where(ok, x - np.expand_dims(mean, axis), 0.0)
        return cls(count.astype(np.int64), mean, (dev * dev).sum(axis))

    def merge(self, other: Moments) -> Moments:
        n = self.count + other.count
        delta = other.mean - self.mean
        safe = np.where(n > 0, n, 1)
        mean = np.where(n > 0, self.mean + delta * other.count / safe, 0.0)
        m2 = self.m2 + other.m2 + np.where(n > 0, delta * delta * self.count * other.count / safe, 0.0)
        return Moments(n, mean, m2)

    @property
    def variance(self) -> np.ndarray:
        """Population variance M2 / n (NaN where n = 0)."""
        with np.errstate(divide="ignore", invalid="ignore"):
            return np.where(self.count > 0, self.m2 / np.where(self.count > 0, self.count, 1), np.nan)

    @property
    def mean_or_nan(self) -> np.ndarray:
        return np.where(self.count > 0, self.mean, np.nan)


def histogram_counts(values: np.ndarray, edges: np.ndarray) -> np.ndarray:
    """Counts per cell of `values (batch, *cell)` in the bins `edges` (like np.histogram:
    half-open bins, the last one closed; values outside the edges and NaN are dropped)."""
    x = np.asarray(values, dtype=np.float64)
    bins = len(edges) - 1
    cells = int(np.prod(x.shape[1:], dtype=np.int64))
    flat = x.reshape(x.shape[0], cells)
    ok = ~np.isnan(flat) & (flat >= edges[0]) & (flat <= edges[-1])
    index = np.searchsorted(edges, np.where(ok, flat, edges[0]), side="right") - 1
    index = np.clip(index, 0, bins - 1)
    target = (np.arange(cells)[None, :] * bins + index)[ok]
    counts = np.bincount(target, minlength=cells * bins)
    return counts.reshape(x.shape[1:] + (bins,))


@dataclass
class SummaryAccumulator:
    """Everything `streaming_summary` keeps: per (layer, head) moments of entropy (nats),
    normalised entropy and peak key, and histograms of normalised entropy and peak key.
    `update(block)` adds a block of batches; `merge(other)` combines two accumulators
    (for chunks summarised separately, e.g. on several workers)."""

    entropy_edges: np.ndarray
    keys: int
    entropy: Moments | None = None
    entropy_norm: Moments | None = None
    peak_key: Moments | None = None
    entropy_hist: np.ndarray | None = None
    peak_hist: np.ndarray | None = None
    batches: int = 0
    shape: tuple = field(default=())

    def _init(self, shape) -> None:
        self.shape = tuple(shape)
        self.entropy = Moments.empty(shape)
        self.entropy_norm = Moments.empty(shape)
        self.peak_key = Moments.empty(shape)
        self.entropy_hist = np.zeros(self.shape + (len(self.entropy_edges) - 1,), dtype=np.int64)
        self.peak_hist = np.zeros(self.shape + (self.keys,), dtype=np.int64)

    def update(self, entropy: np.ndarray, entropy_norm: np.ndarray, peak_key: np.ndarray) -> SummaryAccumulator:
        """Add a block of `(batch, layer, head)` values (peak keys < 0 are skipped)."""
        if self.entropy is None:
            self._init(np.shape(entropy)[1:])
        peak = np.asarray(peak_key)
        peak_f = np.where(peak >= 0, peak, np.nan).astype(np.float64)
        self.entropy = self.entropy.merge(Moments.of(entropy))
        self.entropy_norm = self.entropy_norm.merge(Moments.of(entropy_norm))
        self.peak_key = self.peak_key.merge(Moments.of(peak_f))
        self.entropy_hist += histogram_counts(entropy_norm, self.entropy_edges)
        self.peak_hist += histogram_counts(peak_f, np.arange(self.keys + 1, dtype=np.float64) - 0.5)
        self.batches += int(np.shape(entropy)[0])
        return self

    def merge(self, other: SummaryAccumulator) -> SummaryAccumulator:
        if other.entropy is None:
            return self
        if self.entropy is None:
            return other
        out = SummaryAccumulator(self.entropy_edges, self.keys)
        out.shape = self.shape
        out.entropy = self.entropy.merge(other.entropy)
        out.entropy_norm = self.entropy_norm.merge(other.entropy_norm)
        out.peak_key = self.peak_key.merge(other.peak_key)
        out.entropy_hist = self.entropy_hist + other.entropy_hist
        out.peak_hist = self.peak_hist + other.peak_hist
        out.batches = self.batches + other.batches
        return out

    def result(self) -> xr.Dataset:
        if self.entropy is None:
            raise FastattnError("nothing to summarise: no batches")
        dims = ("layer", "head")
        centres = 0.5 * (self.entropy_edges[:-1] + self.entropy_edges[1:])
        return xr.Dataset(
            {
                "count": (dims, self.entropy_norm.count),
                "entropy_mean": (dims, self.entropy.mean_or_nan),
                "entropy_var": (dims, self.entropy.variance),
                "entropy_norm_mean": (dims, self.entropy_norm.mean_or_nan),
                "entropy_norm_var": (dims, self.entropy_norm.variance),
                "peak_key_mean": (dims, self.peak_key.mean_or_nan),
                "peak_key_var": (dims, self.peak_key.variance),
                "entropy_norm_hist": (dims + ("bin",), self.entropy_hist),
                "peak_key_hist": (dims + ("key",), self.peak_hist),
            },
            coords={
                "layer": np.arange(self.shape[0]),
                "head": np.arange(self.shape[1]),
                "bin": centres,
                "bin_lower": ("bin", self.entropy_edges[:-1]),
                "bin_upper": ("bin", self.entropy_edges[1:]),
                "key": np.arange(self.keys),
            },
            attrs={"batches": self.batches, "variance": "population (M2 / n)"},
        )


SUMMARY_VARS = ("entropy_mean", "entropy_norm", "peak_key")


def summary_blocks(stats: xr.Dataset, batch_chunk: int | None = None):
    """Yield `(entropy, entropy_norm, peak_key)` numpy blocks of `(batch, layer, head)`,
    `batch_chunk` batches at a time (default: whole stored chunks, up to BLOCK_BYTES)."""
    n = stats.sizes["batch"]
    batch_chunk = _batch_step(stats, list(SUMMARY_VARS), batch_chunk)
    view = stats[list(SUMMARY_VARS)].transpose("batch", "layer", "head")
    for start in range(0, n, batch_chunk):
        block = view.isel(batch=slice(start, min(n, start + batch_chunk))).compute()
        yield tuple(np.asarray(block[name].values) for name in SUMMARY_VARS)


def streaming_summary(source, bins: int = 20, *, batch_chunk: int | None = None,
                      keys: int | None = None, entropy_smoothing: float = 0.0) -> xr.Dataset:
    """Per (layer, head) moments and histograms over the whole corpus, in one chunked pass.

    `source` is a store path (its committed `stats` group) or a statistics Dataset. Reads
    `batch_chunk` batches at a time (default: whole stored chunks, at most BLOCK_BYTES =
    32 MB) and folds each block into a `SummaryAccumulator`, so memory is one block plus
    the accumulators, whatever the number of batches. Returns `count`, `entropy_mean/var` (nats), `entropy_norm_mean/var`,
    `peak_key_mean/var` (population variances), `entropy_norm_hist (layer, head, bin)`
    (`bins` equal bins over [0, 1]) and `peak_key_hist (layer, head, key)` (one bin per key).
    `entropy_smoothing` > 0 summarises Clark et al. 2019's entropy of smoothed rows instead
    (`corpus_stats`; computed from the attention, block by block).
    """
    if entropy_smoothing:
        stats = corpus_stats(source, entropy_smoothing=entropy_smoothing)
    elif isinstance(source, xr.Dataset):
        stats = source
    else:
        from ..stats import open_stats

        stats = open_stats(source)
    if bins < 1:
        raise ValueError(f"bins must be at least 1, not {bins}")
    if keys is None:
        keys = int(stats.sizes.get("key") or stats.sizes.get("query") or 0)
        if not keys:
            raise ValueError("cannot tell the number of keys: pass keys=")
    acc = SummaryAccumulator(np.linspace(0.0, 1.0, bins + 1), keys)
    for block in summary_blocks(stats, batch_chunk):
        acc.update(*block)
    out = acc.result()
    out.attrs["entropy_smoothing"] = float(entropy_smoothing)
    return out
