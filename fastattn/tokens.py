"""Token classes: which stored tokens are special, punctuation, or match a user's pattern, and
how much attention each class receives (Clark et al. 2019's attention to [CLS], [SEP] and
punctuation, and [SEP]→[SEP]).

Per plane (batch, layer, head) of a sample of n valid tokens, A its n × n block:

    to_<class> = Σ_q Σ_{k ∈ class} A[q, k] / n = Σ_{k ∈ class} col_sum[k] / n
    sep_sep    = Σ_{q ∈ SEP} Σ_{k ∈ SEP} A[q, k] / |SEP|          (NaN without a separator)

`to_<class>` is the mean over the valid queries of the attention on the class, read from the
statistics' `col_sum` (no attention is read again); `sep_sep` is the mean over the separator
queries of their attention on separators, read from the attention at those rows and columns
alone. Clark et al. divide `sep_sep` by 2, the number of [SEP] in each of their documents
(a pair of segments); dividing by |SEP| gives the same there and a mean anywhere else.

A token belongs to a class by its string as stored (`fastattn capture` saves the tokenizer's
strings, subword markers included): `special` is the tokenizer's special tokens when given
(`special=`), else `SPECIAL`; `punct` a token whose text, after a subword marker (`Ġ`, `▁`,
`##`), is punctuation only (`is_punct`); a user class a regular expression that the whole
token string must match (`re.fullmatch`). Nothing here is stored: the numbers are computed
when asked, from the committed statistics and the store's `token` array.
"""

from __future__ import annotations

import math
import re
import unicodedata
from typing import Callable, Iterable, Mapping

import numpy as np

from .errors import FastattnError

#: Special tokens when the tokenizer's are not known: BERT's bracketed ones, RoBERTa's and
#: SentencePiece's angle-bracketed ones, GPT-style `<|...|>`.
SPECIAL = re.compile(
    r"\[(?:CLS|SEP|PAD|UNK|MASK|BOS|EOS)\]|</?s>|<(?:pad|unk|mask|cls|sep|bos|eos)>|<\|[^|\s]+\|>"
)
#: The separators of `sep_sep`: BERT's [SEP] and RoBERTa's </s>.
SEPARATORS = frozenset({"[SEP]", "</s>"})
#: Subword markers stripped before the punctuation test: GPT-2's space (Ġ), SentencePiece's
#: space (▁), WordPiece's continuation (##).
MARKERS = ("##", "Ġ", "▁")
_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


#: The separators' entry among the classes `token_class_stats` matches (not a class name a user can give).
_SEPARATOR = "[separator]"


class NoTokenStrings(FastattnError):
    """A store without token strings (or of cross-attention): it has no token classes."""


def _punct_char(c: str) -> bool:
    """BERT's `_is_punctuation`: every printable non-alphanumeric ASCII character (so `$`, `+`,
    `^` too) and every Unicode punctuation character (category P*)."""
    o = ord(c)
    return 33 <= o <= 47 or 58 <= o <= 64 or 91 <= o <= 96 or 123 <= o <= 126 or unicodedata.category(c).startswith("P")


def is_punct(token: str) -> bool:
    """A token of punctuation only, once a leading subword marker is stripped (`Ġ,`, `▁.`, `##!`);
    a token that is only a marker is tested whole."""
    text = token
    for marker in MARKERS:
        if text.startswith(marker) and len(text) > len(marker):
            text = text[len(marker):]
            break
    return bool(text) and all(_punct_char(c) for c in text)


def parse_token_classes(specs: Iterable[str]) -> dict[str, str]:
    """`NAME=REGEX` strings (the command line's form) as `{name: regex}`, each regex checked,
    each name once."""
    out: dict[str, str] = {}
    for spec in specs:
        name, sep, pattern = spec.partition("=")
        if not sep:
            raise FastattnError(f"takes NAME=REGEX, not {spec!r}", parameter="token_class")
        if name in out:
            raise FastattnError(f"class {name} given twice", parameter="token_class")
        _check_class(name, pattern, "token_class")
        out[name] = pattern
    return out


def _check_class(name: str, pattern, parameter: str) -> re.Pattern:
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise FastattnError(f"class name {name!r} must be a word of letters, digits and _", parameter=parameter)
    if isinstance(pattern, re.Pattern):
        return pattern
    try:
        return re.compile(pattern)
    except (re.error, TypeError) as exc:
        raise FastattnError(f"class {name}: {pattern!r} is not a regular expression ({exc})", parameter=parameter) from None


def class_rules(classes: Mapping[str, str | re.Pattern] | None = None, special: Iterable[str] | None = None
                ) -> dict[str, Callable[[str], bool]]:
    """Every class's membership test, by name: `special`, `punct`, then `classes` (name ->
    regex the whole token must match; a user class named `special` or `punct` replaces it).
    `special`: the tokenizer's special tokens (e.g. `tokenizer.all_special_tokens`), else
    the `SPECIAL` pattern."""
    if special is not None:
        if isinstance(special, str):
            raise FastattnError("must be a collection of token strings, not one string", parameter="special")
        known = frozenset(special)
        rules: dict[str, Callable[[str], bool]] = {"special": known.__contains__}
    else:
        rules = {"special": lambda token: SPECIAL.fullmatch(token) is not None}
    rules["punct"] = is_punct
    if classes is not None and not isinstance(classes, Mapping):
        raise FastattnError("must map class names to regular expressions", parameter="classes")
    for name, pattern in (classes or {}).items():
        regex = _check_class(name, pattern, "classes")
        rules[name] = lambda token, regex=regex: regex.fullmatch(token) is not None
    return rules


def members(tokens: np.ndarray, lengths: np.ndarray, rules: Mapping[str, Callable[[str], bool]]) -> dict[str, np.ndarray]:
    """Per rule, (batch, position) bool: the valid tokens (position < length) it holds for.
    Each distinct string is tested once; the empty string (no token saved) is in no class."""
    valid = np.arange(tokens.shape[1]) < np.asarray(lengths)[:, None]
    distinct, which = np.unique(np.asarray(tokens)[valid], return_inverse=True)
    out = {}
    for name, rule in rules.items():
        holds = np.array([bool(token) and bool(rule(str(token))) for token in distinct], dtype=bool)
        member = np.zeros(tokens.shape, dtype=bool)
        member[valid] = holds[which.ravel()]
        out[name] = member
    return out


def class_mass(col_sum: np.ndarray, lengths: np.ndarray, member: np.ndarray) -> np.ndarray:
    """(batch, layer, head) float64: Σ_{k ∈ class} col_sum[k] / n, from `col_sum` (batch, layer,
    head, key) and `member` (batch, key); NaN for an empty sample."""
    keys = col_sum.shape[-1]
    inside = member[:, :keys] & (np.arange(keys) < np.asarray(lengths)[:, None])
    total = np.where(inside[:, None, None, :], col_sum.astype(np.float64), 0.0).sum(axis=-1)
    n = np.asarray(lengths, dtype=np.float64)[:, None, None]
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(n > 0, total / n, np.nan)


def separator_mass(attention, separator: np.ndarray, b0: int, layers: np.ndarray, heads: np.ndarray) -> np.ndarray:
    """(batch, layer, head) float64 `sep_sep` of the batches [b0, b0 + len(separator)) of a
    store's `attention` (a zarr array), `separator` (batch, position) marking their valid
    separators: only the separator rows and columns are read (one orthogonal read)."""
    out = np.full((len(separator), len(layers), len(heads)), np.nan)
    rows = np.flatnonzero(separator.any(axis=0))
    if rows.size == 0:
        return out
    block = attention.get_orthogonal_selection((slice(b0, b0 + len(separator)), layers, heads, rows, rows))
    for i in range(len(separator)):
        mine = np.flatnonzero(separator[i, rows])
        if mine.size:
            sub = block[i][:, :, mine][:, :, :, mine].astype(np.float64)
            out[i] = sub.sum(axis=(-2, -1)) / mine.size
    return out


_NO_TOKENS = "{loc}: the store has no token strings (its dumps were saved without `tokens`)"


def token_class_stats(
    location,
    *,
    classes: Mapping[str, str | re.Pattern] | None = None,
    special: Iterable[str] | None = None,
    sep_sep: bool = True,
    layer: list[int] | None = None,
    head: list[int] | None = None,
    storage_options: dict | None = None,
) -> dict[str, np.ndarray]:
    """Attention on token classes of a store's committed statistics (run `write_stats` first).

    Returns `to_<class>` for `special`, `punct` and each of `classes` (name -> regex), and
    `sep_sep`, each (batch, layer, head) float64 at the `layer` and `head` positions given
    (default all); those positions as "layer" and "head"; "count_<class>", the class's valid
    tokens per sample (batch,). `sep_sep=False` leaves out `sep_sep`, the one number that
    reads the attention again (the chunks holding the separators' rows and columns); the
    classes read only `col_sum`. `special`: the tokenizer's special tokens, else `SPECIAL`.
    A one-line `NoTokenStrings` error when the store has no token strings or holds
    cross-attention. Formulas: the module's docstring."""
    from . import store
    from .stats import GROUP, read_errors, read_planes

    rules = class_rules(classes, special)
    loc = store.as_location(location, storage_options)
    manifest = store.checked_manifest(loc)  # first: a store without token strings answers before any read
    if manifest.cross:
        raise NoTokenStrings(f"{loc}: token classes need self-attention; this store holds cross-attention")
    files = [entry for entry in manifest.files.values() if entry.ingested]
    if files and all(entry.tokens is False for entry in files):  # recorded at ingest: nothing to read
        raise NoTokenStrings(_NO_TOKENS.format(loc=loc))
    # checks the committed statistics and the layer/head selection; its per-plane read is small
    planes = read_planes(loc, ["peak_key"], layer=layer, head=head)
    picks = (planes["layer"], planes["head"])
    group = store.open_group(loc, "r")
    n = planes["peak_key"].shape[0]
    lengths = np.asarray(group["length"][:n], dtype=np.int64)
    token = group["token"]
    # the classes' members, (batch, position) bool, from the token strings read a block at a time
    rules = {**rules, _SEPARATOR: SEPARATORS.__contains__}
    classes_of = {name: np.zeros((n, token.shape[1]), dtype=bool) for name in rules}
    known = np.zeros(n, dtype=bool)  # samples saved with token strings
    for b0, b1 in _steps(n, token.chunks[0], token.shape[1] * 16):
        block, lens = token[b0:b1], lengths[b0:b1]
        known[b0:b1] = ((block != "") & (np.arange(block.shape[1]) < lens[:, None])).any(axis=1)
        for name, member in members(block, lens, rules).items():
            classes_of[name][b0:b1] = member
    if not known.any():
        raise NoTokenStrings(_NO_TOKENS.format(loc=loc))
    separator = classes_of.pop(_SEPARATOR)
    rules.pop(_SEPARATOR)
    out: dict[str, np.ndarray] = {"layer": planes["layer"], "head": planes["head"]}
    col_sum = group[f"{GROUP}/col_sum"]
    for name in rules:
        out[f"to_{name}"] = np.full((n, *map(len, picks)), np.nan)
        out[f"count_{name}"] = classes_of[name].sum(axis=1)
    for b0, b1 in _steps(n, col_sum.chunks[0], math.prod(map(len, picks)) * col_sum.shape[-1] * 8):
        block = col_sum.get_orthogonal_selection((slice(b0, b1), *picks))  # (batch, layer, head, key), a block at a time
        for name in rules:
            out[f"to_{name}"][b0:b1] = class_mass(block, lengths[b0:b1], classes_of[name][b0:b1])
    for name in rules:
        out[f"to_{name}"][~known] = np.nan
    if sep_sep:
        attention = group["attention"]
        per_batch = math.prod(map(len, picks)) * attention.shape[3] ** 2 * attention.dtype.itemsize
        with read_errors(loc, "attention"):  # a damaged chunk here is the attention's, not the statistics'
            out["sep_sep"] = np.concatenate(
                [separator_mass(attention, separator[b0:b1], b0, *picks) for b0, b1 in _steps(n, attention.chunks[0], per_batch)]
            )
    return out


def _steps(n: int, chunk: int, per_batch: int) -> list[tuple[int, int]]:
    """[0, n) in blocks of whole `chunk`s of batches, each at most ~BLOCK_BYTES (at least one chunk)."""
    from .stats import BLOCK_BYTES

    step = max(1, BLOCK_BYTES // max(1, per_batch * chunk)) * chunk
    return [(b0, min(n, b0 + step)) for b0 in range(0, n, step)]


def class_names(scores: Mapping[str, np.ndarray]) -> list[str]:
    """The per-plane scores of `token_class_stats`' result, in order: `to_<class>`..., `sep_sep` if there."""
    return [name for name in scores if name.startswith("to_") or name == "sep_sep"]


def add_to_table(table: dict, scores: Mapping[str, np.ndarray]) -> dict:
    """`table` (`summary.store_head_table`) with the mean over the batches of each token-class
    score (layer, head), ignoring NaN (a sample without a separator), and their names under
    "token_means": what `summary.head_rows` and `summary.findings` then report."""
    import warnings

    names = class_names(scores)
    with warnings.catch_warnings():  # a head with no separator in any batch: NaN
        warnings.simplefilter("ignore", RuntimeWarning)
        for name in names:
            table[name] = np.nanmean(scores[name], axis=0)
    table["token_means"] = names
    return table
