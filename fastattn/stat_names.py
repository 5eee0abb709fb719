"""The statistics kernel's output names, in its buffers' order: what the store's `stats`
group holds. Apart from the kernel (`fastattn.kernels.stats`) so that reading or checking
statistics imports no Numba."""

#: Per-query statistics: the rows of ``StatsBuffers.rows``, in this order.
ROW_STATS = ("row_sum", "entropy", "max_weight", "distance", "diag", "sq_sum")
#: Per-plane float statistics: the rows of ``StatsBuffers.plane``, in this order.
PLANE_STATS = (
    "entropy_mean", "entropy_norm", "self_attention", "diag_share", "peak_incoming", "confidence",
    "distance_mean", "row_sum_error", "prev_token", "next_token", "first_token", "last_token",
    "duplicate_token", "induction",
)
#: Pattern flags: the rows of ``StatsBuffers.flags``, in this order.
FLAGS = ("uniform", "diagonal_only", "dominant_key", "weak", "critical_key", "strong_self")
