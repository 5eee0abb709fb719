"""Corpus-level analyses: rollout, head similarity, comparing stores, head roles, streaming summaries.

Every function takes xarray Datasets (a store from `open_store`, statistics from
`compute_stats`/`open_stats`) or a store path, stays lazy through dask where the data is
large, and never prints. Formulas (natural log throughout) are in docs/corpus.md.

- `rollout(ds, keep_matrix=False)`: attention rollout (Abnar & Zuidema 2020) per sample;
  `write_rollout(store)` / `open_rollout(store)` keep it in the store's `rollout` group.
- `head_similarity(ds, eps=1e-3, weight="sample"|"token")`: Jensen–Shannon divergence
  between every pair of heads, `mds(similarity, method="classical"|"smacof")` a 2-D
  embedding and `stress` its fit, `head_map(similarity, stats)` a figure (in `fastattn.plot`).
- `compare(a, b, match="position")`: what changed per head between two stores,
  `ranked_changes(cmp)` the heads that changed most, `compare_map(cmp)` a heatmap (in `fastattn.plot`).
- `head_roles(stats)`: a role per head from per-batch rules (`ROLE_RULES`) on the attention
  mass, with the share of batches supporting it; `batch_roles(stats)` the per-batch labels.
- `corpus_stats(store, entropy_smoothing=1e-4)`: the statistics these analyses read, with
  Clark et al. 2019's smoothed entropy on request (`smoothed_entropy`).
- `streaming_summary(store)`: per-head moments and histograms in one chunked pass,
  with mergeable accumulators (`Moments`, `SummaryAccumulator`).

One module per analysis: `rollouts`, `similarity`, `comparison`, `roles`, `summaries`;
`statistics` (`corpus_stats`) feeds them, `common` holds what they share. Every public
name is importable from `fastattn.corpus`.
"""

from __future__ import annotations

from ..choices import COMPARE_MATCHES, JS_WEIGHTS, MDS_METHODS
from ..errors import FastattnError
from ..summary import POSITION_MASS, SINK_SHARE
from .common import BLOCK_BYTES, DEFAULT_EPS, HEAD_DIMS, _batch_step
from .comparison import (
    CHANGE_FIELDS,
    LN2,
    compare,
    compare_stats,
    js_divergence,
    match_batches,
    ranked_changes,
)
from .roles import (
    ARGMAX_EVIDENCE,
    BROAD_ENTROPY,
    EVIDENCE,
    LOCAL_DISTANCE,
    MASS_EVIDENCE,
    MIN_LENGTH,
    ROLE_INPUTS,
    ROLE_RULES,
    ROLE_SHARE,
    ROLES,
    batch_roles,
    evidence_arrays,
    head_roles,
    role_evidence,
)
from .rollouts import open_rollout, rollout, rollout_summary, write_rollout
from .similarity import (
    SMACOF_SETTINGS,
    head_similarity,
    mds,
    mds_dissimilarity,
    similarity_table,
    stress,
)
from .statistics import corpus_stats, smoothed_entropy
from .summaries import (
    SUMMARY_VARS,
    Moments,
    SummaryAccumulator,
    histogram_counts,
    streaming_summary,
    summary_blocks,
)

#: The figures of these analyses live with the others in `fastattn.plot` (matplotlib is
#: imported only when one is asked for).
_FIGURES = ("head_map", "compare_map")


def __getattr__(name: str):
    if name in _FIGURES:
        from .. import plot

        return getattr(plot, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
