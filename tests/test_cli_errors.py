"""Every command, given bad arguments, answers with one line (or click's usage message) and
exit code 1 or 2: never a traceback. Library messages name parameters; the CLI shows flags.
(`ingest` and `check` report instead: a line per bad file or problem, then their summary.)"""

from __future__ import annotations

import numpy as np
import pytest
from conftest import softmax_rows, write_dump


@pytest.fixture(scope="module")
def stores(tmp_path_factory):
    """A folder of two small dumps and its store."""
    from fastattn.ingest import ingest

    root = tmp_path_factory.mktemp("cli-errors")
    rng = np.random.default_rng(3)
    for i in range(2):
        write_dump(root / "dumps" / f"d{i}.npz", softmax_rows(rng, (2, 2, 6, 6)))
    ingest(root / "dumps", root / "s.zarr")
    return root


BAD = [
    ("synth {d}/out --seq 5-2", "--seq: the range 5-2 must satisfy"),
    ("synth {d}/out --seq abc", "--seq: takes a length like 64"),
    ("synth {d}/out --files 0", None),
    ("ingest {d}/missing {d}/x.zarr", "missing: no such file or folder"),
    ("ingest {d}/dumps {d}/y.zarr --dtype int8", "'int8' is not one of 'float32', 'float16'"),
    ("ingest {d}/dumps {d}/y.zarr --layout nonsense", None),
    ("info {d}/missing.zarr", "missing.zarr"),
    ("stats {d}/missing.zarr", "missing.zarr"),
    ("stats {d}/s.zarr --format xml", "'xml' is not one of 'table', 'json', 'csv'"),
    ("stats {d}/s.zarr --layer 9", "layer 9 out of range"),
    ("stats {d}/s.zarr -k 0", None),
    ("plot {d}/s.zarr nokind -o {d}/f.png", "'nokind' is not one of 'overview'"),
    ("plot {d}/s.zarr overview -o {d}/f.txt", None),
    ("report {d}/missing.zarr -o {d}/r.html", "missing.zarr"),
    ("check {d}/missing.zarr", "missing.zarr: no such store"),
    ("compare {d}/s.zarr {d}/s.zarr --match nothing", "'nothing' is not one of 'position', 'source'"),
    ("compare {d}/s.zarr {d}/s.zarr --format xml", "'xml' is not one of 'table', 'json'"),
    ("roles {d}/missing.zarr", "missing.zarr"),
    ("similarity {d}/s.zarr --format xml", None),
    ("similarity {d}/s.zarr --weight doc", "'doc' is not one of 'sample', 'token'"),
    ("similarity {d}/s.zarr --mds tsne", "'tsne' is not one of 'classical', 'smacof'"),
    ("roles {d}/s.zarr --format xml", None),
    ("rollout {d}/s.zarr --format xml", None),
    ("rollout {d}/missing.zarr", "missing.zarr"),
    ("stats {d}/s.zarr --storage-option nonsense", "--storage-option takes KEY=VALUE"),
    ("stats {d}/s.zarr --token-class x=((", "--token-class: class x: '((' is not a regular expression (missing )"),
    ("stats {d}/s.zarr --token-class nonsense", "--token-class: takes NAME=REGEX, not 'nonsense'"),
    ("stats {d}/s.zarr --token-class 9x=a", "--token-class: class name '9x' must be a word"),
    ("stats {d}/s.zarr --token-class num=[0-9]+", "s.zarr: the store has no token strings"),
    ("stats {d}/s.zarr --sep-sep", "s.zarr: the store has no token strings"),
    ("stats {d}/s.zarr --token-class a=x --token-class a=y", "--token-class: class a given twice"),
]


@pytest.mark.parametrize("command, says", BAD, ids=[c.split()[0] + ":" + " ".join(c.split()[2:]) for c, _ in BAD])
def test_bad_arguments_get_one_line_and_no_traceback(cli, stores, command, says):
    result = cli(*command.format(d=stores).split())
    assert result.exit_code in (1, 2), (result.exit_code, result.output)
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    assert "Traceback" not in result.output
    reports = command.split()[0] in ("ingest", "check") and "error: " not in result.output
    if result.exit_code == 1 and not reports:  # the library's or the command's own error: one line
        lines = [line for line in result.output.splitlines() if line.strip()]
        assert len(lines) == 1 and lines[0].startswith("error: "), result.output
    if says:
        assert says in result.output, result.output


def test_library_messages_name_parameters_not_flags():
    """The library says `dtype`; only the command line speaks of --dtype."""
    from fastattn.errors import FastattnError
    from fastattn.ingest import ingest
    from fastattn.synth import parse_seq
    from fastattn.tokens import class_rules

    with pytest.raises(FastattnError) as dtype:
        ingest("nowhere", "nowhere.zarr", dtype="int8")
    with pytest.raises(FastattnError) as seq:
        parse_seq("5-2")
    with pytest.raises(FastattnError) as classes:
        class_rules({"x": "(("})
    for exc, parameter in ((dtype.value, "dtype"), (seq.value, "seq"), (classes.value, "classes")):
        assert exc.parameter == parameter and str(exc).startswith(f"{parameter}: ") and "--" not in str(exc)


def test_ctrl_c_is_one_line_and_exit_code_130(cli, tmp_path, monkeypatch):
    """An interrupted command says so in one line and exits 130 (click alone would print
    "Aborted!" and exit 1)."""
    from fastattn import synth

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(synth, "synthesize", interrupted)
    result = cli("synth", tmp_path / "out", "--files", 2)
    assert result.exit_code == 130, result.output
    assert result.output.strip() == "interrupted; the store still opens at its last commit"
    assert not (tmp_path / "out").exists()
