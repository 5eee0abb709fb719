"""Plain float64 NumPy references for fastattn.corpus: loops over samples, written for
clarity, not speed. Inputs are `(batch, layer, head, S, S)` attention arrays (anything
outside each sample's `length × length` block is ignored) and `(batch,)` lengths."""

from __future__ import annotations

import numpy as np


def block(att, lengths, b):
    """Sample b's valid block, float64: (layer, head, n, n)."""
    n = int(lengths[b])
    return np.asarray(att[b], dtype=np.float64)[:, :, :n, :n]


# ---------------------------------------------------------------- rollout


def rollout(att, lengths):
    """(incoming (B, L, S), matrix (B, L, S, S)), NaN outside the valid block."""
    B, L, H, S, _ = att.shape
    incoming = np.full((B, L, S), np.nan)
    matrix = np.full((B, L, S, S), np.nan)
    for b in range(B):
        a = block(att, lengths, b)
        n = a.shape[-1]
        if n == 0:
            continue
        r = None
        for layer in range(L):
            hat = a[layer].mean(axis=0) + np.eye(n)
            hat = hat / hat.sum(axis=1, keepdims=True)
            r = hat if r is None else hat @ r
            matrix[b, layer, :n, :n] = r
            incoming[b, layer, :n] = r.mean(axis=0)
    return incoming, matrix


# ---------------------------------------------------------------- Jensen–Shannon


def kl(p, q):
    p, q = np.asarray(p, dtype=np.float64), np.asarray(q, dtype=np.float64)
    total = 0.0
    for x, y in zip(p, q):
        if x > 0:
            total += x * np.log(x / y)
    return total


def js(p, q):
    m = 0.5 * (np.asarray(p, dtype=np.float64) + np.asarray(q, dtype=np.float64))
    return 0.5 * kl(p, m) + 0.5 * kl(q, m)


def head_similarity(att, lengths, eps=1e-3, per_batch=False):
    """(N, N) mean over samples of the mean over valid queries of JS between smoothed rows."""
    B, L, H, S, _ = att.shape
    N = L * H
    out = np.zeros((B, N, N))
    for b in range(B):
        a = block(att, lengths, b).reshape(N, int(lengths[b]), int(lengths[b]))
        n = a.shape[-1]
        for q in range(n):
            rows = (1 - eps) * a[:, q, :] + eps / n  # (N, n), all > 0 when eps > 0
            p, r = rows[:, None, :], rows[None, :, :]
            m = 0.5 * (p + r)
            with np.errstate(divide="ignore", invalid="ignore"):
                kl_p = np.where(p > 0, p * np.log(p / m), 0.0).sum(axis=-1)
                kl_r = np.where(r > 0, r * np.log(r / m), 0.0).sum(axis=-1)
            out[b] += 0.5 * kl_p + 0.5 * kl_r
        if n == 0:
            out[b] = np.nan
            continue
        out[b] /= n
        np.fill_diagonal(out[b], 0.0)
    return out if per_batch else np.nanmean(out, axis=0)


def mds(d2, dims=2):
    """Classical (Torgerson) MDS of squared distances, axes signed like fastattn.corpus.mds."""
    d2 = np.asarray(d2, dtype=np.float64)
    n = len(d2)
    centred = d2 - d2.mean(axis=0, keepdims=True) - d2.mean(axis=1, keepdims=True) + d2.mean()
    gram = -0.5 * centred
    w, v = np.linalg.eigh(gram)
    idx = np.argsort(w)[::-1][:dims]
    x = v[:, idx] * np.sqrt(np.maximum(w[idx], 0))
    for c in range(dims):
        if x[np.argmax(np.abs(x[:, c])), c] < 0:
            x[:, c] *= -1
    return x


# ---------------------------------------------------------------- per-plane statistics


def plane_stats(att, lengths):
    """What the roles and compare need, per (batch, layer, head), from the attention."""
    B, L, H, S, _ = att.shape
    out = {
        name: np.full((B, L, H), np.nan)
        for name in ("entropy_mean", "entropy_norm", "self_attention", "distance_mean", "prev_token", "next_token",
                     "first_token", "last_token", "peak", "prev_argmax", "next_argmax", "self_argmax")
    }
    out["peak_key"] = np.full((B, L, H), -1, dtype=np.int64)
    out["col_sum"] = np.full((B, L, H, S), np.nan)
    for b in range(B):
        a = block(att, lengths, b)
        n = a.shape[-1]
        if n == 0:
            continue
        q = np.arange(n)
        for layer in range(L):
            for head in range(H):
                p = a[layer, head]
                with np.errstate(divide="ignore", invalid="ignore"):
                    ent = -np.where(p > 0, p * np.log(p), 0.0).sum(axis=1)
                out["entropy_mean"][b, layer, head] = ent.mean()
                out["entropy_norm"][b, layer, head] = ent.mean() / np.log(n) if n > 1 else np.nan
                out["self_attention"][b, layer, head] = np.diag(p).mean()
                out["distance_mean"][b, layer, head] = (p * np.abs(q[:, None] - q[None, :])).sum(axis=1).mean()
                out["prev_token"][b, layer, head] = sum(p[i, i - 1] for i in range(1, n)) / n
                out["next_token"][b, layer, head] = sum(p[i, i + 1] for i in range(n - 1)) / n
                col = p.sum(axis=0)
                out["col_sum"][b, layer, head, :n] = col
                out["peak_key"][b, layer, head] = int(np.argmax(col))
                top = np.argmax(p, axis=1)  # ties: the lower key, like fastattn's top-k
                out["prev_argmax"][b, layer, head] = np.mean(top[1:] == q[1:] - 1) if n > 1 else np.nan
                out["next_argmax"][b, layer, head] = np.mean(top[:-1] == q[:-1] + 1) if n > 1 else np.nan
                out["self_argmax"][b, layer, head] = np.mean(top == q)
                out["first_token"][b, layer, head] = col[0] / n
                out["last_token"][b, layer, head] = col[n - 1] / n
                out["peak"][b, layer, head] = col.max() / n
    return out


# ---------------------------------------------------------------- roles

RULES = ("previous-token", "next-token", "self", "first-token", "last-token", "single-key", "local", "broad")


def batch_label(ps, b, layer, head, lengths):
    """The first rule that holds for one plane (None: no rule; 'short': not classified)."""
    from fastattn.corpus import BROAD_ENTROPY, LOCAL_DISTANCE, MIN_LENGTH, POSITION_MASS, SINK_SHARE

    n = int(lengths[b])
    if n < MIN_LENGTH:
        return "short"
    v = {name: ps[name][b, layer, head] for name in ps if name not in ("col_sum",)}
    if v["prev_token"] >= POSITION_MASS:
        return "previous-token"
    if v["next_token"] >= POSITION_MASS:
        return "next-token"
    if v["self_attention"] >= POSITION_MASS:
        return "self"
    if v["first_token"] >= SINK_SHARE:
        return "first-token"
    if v["last_token"] >= SINK_SHARE:
        return "last-token"
    if v["peak"] >= SINK_SHARE:
        return "single-key"
    if v["distance_mean"] <= min(LOCAL_DISTANCE, n / 8):
        return "local"
    if v["entropy_norm"] >= BROAD_ENTROPY:
        return "broad"
    return None


def roles(att, lengths, share=0.5):
    """(layer, head) array of role names and of supports."""
    B, L, H = att.shape[:3]
    ps = plane_stats(att, lengths)
    names = np.empty((L, H), dtype=object)
    support = np.zeros((L, H))
    for layer in range(L):
        for head in range(H):
            labels = [batch_label(ps, b, layer, head, lengths) for b in range(B)]
            labels = [x for x in labels if x != "short"]
            best, best_count = None, 0
            for rule in RULES:  # in priority order: a tie goes to the earlier rule
                c = labels.count(rule)
                if c > best_count:
                    best, best_count = rule, c
            support[layer, head] = best_count / len(labels) if labels else 0.0
            names[layer, head] = best if best and support[layer, head] >= share else "mixed"
    return names, support


# ---------------------------------------------------------------- compare


def compare(pa, pb):
    """Per (layer, head) changes between the plane statistics of matched batches."""
    L, H = pa["entropy_mean"].shape[1:]
    keys = max(pa["col_sum"].shape[-1], pb["col_sum"].shape[-1])
    out = {name: np.zeros((L, H)) for name in ("d_entropy", "d_entropy_norm", "d_self", "peak_tv", "incoming_js", "score")}
    for layer in range(L):
        for head in range(H):
            ea, eb = np.nanmean(pa["entropy_mean"][:, layer, head]), np.nanmean(pb["entropy_mean"][:, layer, head])
            na, nb = np.nanmean(pa["entropy_norm"][:, layer, head]), np.nanmean(pb["entropy_norm"][:, layer, head])
            sa, sb = np.nanmean(pa["self_attention"][:, layer, head]), np.nanmean(pb["self_attention"][:, layer, head])
            ha = np.bincount(pa["peak_key"][:, layer, head], minlength=keys)[:keys] / len(pa["peak_key"])
            hb = np.bincount(pb["peak_key"][:, layer, head], minlength=keys)[:keys] / len(pb["peak_key"])
            ia = np.zeros(keys)
            ib = np.zeros(keys)
            ca = np.nan_to_num(pa["col_sum"][:, layer, head]).sum(axis=0)
            cb = np.nan_to_num(pb["col_sum"][:, layer, head]).sum(axis=0)
            ia[: len(ca)] = ca
            ib[: len(cb)] = cb
            ia, ib = ia / ia.sum(), ib / ib.sum()
            out["d_entropy"][layer, head] = eb - ea
            out["d_entropy_norm"][layer, head] = nb - na
            out["d_self"][layer, head] = sb - sa
            out["peak_tv"][layer, head] = 0.5 * np.abs(ha - hb).sum()
            out["incoming_js"][layer, head] = js(ia, ib)
            out["score"][layer, head] = (
                abs(nb - na) + abs(sb - sa) + out["peak_tv"][layer, head] + out["incoming_js"][layer, head] / np.log(2)
            )
    return out


# ---------------------------------------------------------------- summaries


def summary(entropy, entropy_norm, peak_key, bins, keys):
    """One-shot NumPy moments and histograms over the batch axis (NaN skipped)."""
    L, H = entropy.shape[1:]
    out = {
        "entropy_mean": np.nanmean(entropy, axis=0),
        "entropy_var": np.nanvar(entropy, axis=0),
        "entropy_norm_mean": np.nanmean(entropy_norm, axis=0),
        "entropy_norm_var": np.nanvar(entropy_norm, axis=0),
        "peak_key_mean": peak_key.mean(axis=0),
        "peak_key_var": peak_key.var(axis=0),
        "entropy_norm_hist": np.zeros((L, H, bins), dtype=np.int64),
        "peak_key_hist": np.zeros((L, H, keys), dtype=np.int64),
    }
    for layer in range(L):
        for head in range(H):
            x = entropy_norm[:, layer, head]
            out["entropy_norm_hist"][layer, head] = np.histogram(x[~np.isnan(x)], bins=bins, range=(0.0, 1.0))[0]
            out["peak_key_hist"][layer, head] = np.bincount(peak_key[:, layer, head], minlength=keys)
    return out


# ---------------------------------------------------------------- other tools' formulas
#
# Ports of Clark et al. 2019 (clarkkev/attention-analysis: General_Analysis.ipynb's average
# attention and entropies, head_distances.py) and of TransformerLens's head_detector.py, run
# on each sample's valid block as if it were one of their documents.


def clark_average_attention(att, lengths):
    """General_Analysis.ipynb's `avg_attns` for the position selectors: (L, H) each, the sum
    over documents of (attns * selector).sum(-1).sum(-1) / (n_docs * n_tokens)."""
    docs = [b for b in range(len(lengths)) if lengths[b] > 0]
    L, H = att.shape[1:3]
    out = {key: np.zeros((L, H)) for key in ("self", "right", "left", "first", "last")}
    for b in docs:
        attns = block(att, lengths, b)
        n_tokens = attns.shape[-1]
        first, last = np.zeros((n_tokens, n_tokens)), np.zeros((n_tokens, n_tokens))
        first[:, 0] = 1  # the [CLS] selector with [CLS] at position 0
        last[:, -1] = 1  # the [SEP] selector with one [SEP], at the end
        selectors = {
            "self": np.eye(n_tokens, n_tokens),
            "right": np.eye(n_tokens, n_tokens, 1),
            "left": np.eye(n_tokens, n_tokens, -1),
            "first": first,
            "last": last,
        }
        for key, selector in selectors.items():
            out[key] += (attns * selector[np.newaxis, np.newaxis]).sum(-1).sum(-1) / (len(docs) * n_tokens)
    return out


def clark_entropies(att, lengths, smoothing=0.0001):
    """General_Analysis.ipynb's `entropies` (L, H): smoothed rows, mean over queries, mean over documents."""
    docs = [b for b in range(len(lengths)) if lengths[b] > 0]
    entropies = np.zeros(att.shape[1:3])
    for b in docs:
        attns = block(att, lengths, b)
        attns = (1 - smoothing) * attns + (smoothing / attns.shape[-1])
        entropies -= (attns * np.log(attns)).sum(-1).mean(-1)
    return entropies / len(docs)


def clark_head_distances(att, lengths):
    """head_distances.py: the JS divergence of every pair of heads summed over all tokens of
    all documents, (N, N), and the number of tokens it summed over."""
    B, L, H = att.shape[:3]
    N = L * H
    js_distances = np.zeros([N, N])
    tokens = 0
    for b in range(B):
        if lengths[b] == 0:
            continue
        attns = block(att, lengths, b)
        tokens += attns.shape[-1]
        attns_flat = attns.reshape([N, attns.shape[2], attns.shape[3]])
        for head in range(N):
            head_attns = np.expand_dims(attns_flat[head], 0)
            head_attns_smoothed = (0.001 / head_attns.shape[1]) + (head_attns * 0.999)
            attns_flat_smoothed = (0.001 / attns_flat.shape[1]) + (attns_flat * 0.999)
            m = (head_attns_smoothed + attns_flat_smoothed) / 2
            js = -head_attns_smoothed * np.log(m / head_attns_smoothed)
            js += -attns_flat_smoothed * np.log(m / attns_flat_smoothed)
            js /= 2
            js = js.sum(-1).sum(-1)
            js_distances[head] += js
    return js_distances, tokens


def transformer_lens_previous_token(att, lengths):
    """head_detector.py's previous-token score with its defaults (error_measure "mul", no
    exclusions), per sample, averaged over samples as detect_head does for a list: (L, H)."""
    docs = [b for b in range(len(lengths)) if lengths[b] > 1]
    L, H = att.shape[1:3]
    scores = np.zeros((len(docs), L, H))
    for i, b in enumerate(docs):
        attns = block(att, lengths, b)
        n = attns.shape[-1]
        detection_pattern = np.zeros((n, n))
        detection_pattern[1:, :-1] = np.eye(n - 1)
        detection_pattern = np.tril(detection_pattern)
        for layer in range(L):
            for head in range(H):
                pattern = attns[layer, head]
                scores[i, layer, head] = (pattern * detection_pattern).sum() / pattern.sum()
    return scores.mean(axis=0)


# ---------------------------------------------------------------- metric MDS


def stress1(coords, delta):
    """Kruskal's stress-1 of coordinates against target distances, over the pairs i < j."""
    x = np.asarray(coords, dtype=np.float64)
    total, misfit = 0.0, 0.0
    for i in range(len(x)):
        for j in range(i + 1, len(x)):
            d = np.sqrt(((x[i] - x[j]) ** 2).sum())
            misfit += (d - delta[i, j]) ** 2
            total += delta[i, j] ** 2
    return np.sqrt(misfit / total)


def guttman_transform(coords, delta):
    """One SMACOF step (de Leeuw 1977): X' = (1/N) B(X) X with B_ij = −δ_ij / d_ij (i ≠ j,
    0 where d_ij = 0) and B_ii = −Σ_{j≠i} B_ij. Converged coordinates are its fixed point."""
    x = np.asarray(coords, dtype=np.float64)
    n = len(x)
    d = np.sqrt(((x[:, None, :] - x[None, :, :]) ** 2).sum(-1))
    with np.errstate(divide="ignore", invalid="ignore"):
        b = np.where(d > 0, -np.asarray(delta, dtype=np.float64) / d, 0.0)
    np.fill_diagonal(b, 0.0)
    np.fill_diagonal(b, -b.sum(axis=1))
    return b @ x / n


# ---------------------------------------------------------------- TransformerLens's duplicate-token and induction detectors


def tl_duplicate_pattern(ids: np.ndarray) -> np.ndarray:
    """`get_duplicate_token_head_detection_pattern`: the tokens repeated as rows, compared with
    their transpose, the diagonal zeroed, the lower triangle kept."""
    n = ids.shape[-1]
    token_pattern = np.tile(ids, (n, 1))
    eq_mask = np.equal(token_pattern, token_pattern.T).astype(int)
    np.fill_diagonal(eq_mask, 0)
    return np.tril(eq_mask.astype(np.float64))


def tl_induction_pattern(ids: np.ndarray) -> np.ndarray:
    """`get_induction_head_detection_pattern`: the duplicate pattern rolled one column to the
    right, its first column replaced by zeros, the lower triangle kept."""
    duplicate = tl_duplicate_pattern(ids)
    shifted = np.roll(duplicate, shift=1, axis=1)
    result = np.concatenate([np.zeros((duplicate.shape[0], 1)), shifted[:, 1:]], axis=1)
    return np.tril(result)


def tl_score(attention: np.ndarray, pattern: np.ndarray) -> float:
    """`compute_head_attention_similarity_score` with `error_measure="mul"` and nothing excluded
    (detect_head's defaults); NaN (fastattn's convention) where the pattern marks nothing."""
    if not pattern.any():
        return np.nan
    return float((attention * pattern).sum() / attention.sum())


def tl_scores(attention: np.ndarray, ids: np.ndarray) -> tuple[float, float]:
    """(duplicate-token, induction) of one plane's float64 valid block and its ids."""
    block = attention.astype(np.float64)
    return tl_score(block, tl_duplicate_pattern(ids)), tl_score(block, tl_induction_pattern(ids))
