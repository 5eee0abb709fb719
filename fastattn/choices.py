"""The named choices of the library's parameters, once, in a module that imports nothing heavy.

The library checks its arguments against these tuples (`check_choice`), and the command line
makes its `click.Choice`s of them, so parsing `fastattn --help` loads none of the modules that use them."""

from __future__ import annotations

from .errors import FastattnError

#: Storage dtypes of the attention: ingest's and capture's `dtype`, the manifest's `dtype`.
STORE_DTYPES = ("float32", "float16")
#: The figures `fastattn.plot` draws for `fastattn plot KIND`.
PLOT_KINDS = ("overview", "layers", "heads", "batches", "entropy")
#: How `corpus.compare` pairs the batches of two stores (`match`).
COMPARE_MATCHES = ("position", "source")
#: How `corpus.head_similarity` weighs the samples in the corpus average (`weight`).
JS_WEIGHTS = ("sample", "token")
#: The embeddings `corpus.mds` computes (`method`).
MDS_METHODS = ("classical", "smacof")


def check_choice(parameter: str, value, choices: tuple[str, ...]) -> None:
    """A one-line FastattnError unless `value` is one of `choices`."""
    if value not in choices:
        raise FastattnError(f"{parameter} must be one of {', '.join(choices)}, not '{value}'")
