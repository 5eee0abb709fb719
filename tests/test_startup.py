"""Start-up: the compiled-kernel disk cache (on by default, off with FASTATTN_NUMBA_CACHE=0, safe
with processes starting at once) and the lazy imports that let `fastattn --help` answer at once.

Each check runs in fresh processes, with a cache directory of its own under tmp_path."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from benchmarks import reference as ref

#: Runs a kernel on random attention (argv: seed, dtype, "log" for fast_log alone (quick to
#: compile), or "parallel"/"serial" for plane_stats called so, and fast_log), saves the results
#: to argv[4], and prints whether that kernel was loaded from the cache or compiled.
WORKER = """
import json, sys
import numpy as np
from fastattn.kernels import stats
seed, dtype, which, out = int(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4]
a = np.random.default_rng(seed).random((3, 4, 24, 24)).astype(dtype)
a /= a.sum(axis=-1, keepdims=True)
results = {"log": stats.fast_log(a)}
kernel = stats._ln_array if which == "log" else stats._stats_planes
if which != "log":
    st = stats.plane_stats(a, np.array([24, 17, 1]), parallel=which == "parallel")
    results.update(entropy=st.entropy, col_sum=st.col_sum)
np.savez(out, **results)
print(json.dumps({"hits": sum(kernel.stats.cache_hits.values()), "misses": sum(kernel.stats.cache_misses.values())}))
"""

#: The heavy libraries a command that only parses its arguments must not load (rich: help is
#: click's plain formatter, and usage errors are plain lines).
HEAVY = ("numpy", "numba", "xarray", "zarr", "dask", "pandas", "distributed", "matplotlib", "scipy", "rich")
#: What `fastattn stats` on a local store must not load: it reads and writes through zarr alone.
NOT_FOR_STATS = ("xarray", "dask", "pandas", "distributed", "matplotlib")
#: What no command may load: typer, and the pydantic it builds a validator of every parameter
#: with on each run (~0.3 CPU-s); the command line is click alone.
NOT_FOR_ANY_COMMAND = ("typer", "pydantic")
#: The test session's cache (conftest), for processes whose cache is not what they test.
SESSION_CACHE = os.environ["NUMBA_CACHE_DIR"]


def environment(**env) -> dict:
    """os.environ without the cache settings (so the defaults apply), plus `env`."""
    base = {k: v for k, v in os.environ.items() if k not in ("NUMBA_CACHE_DIR", "FASTATTN_NUMBA_CACHE", "XDG_CACHE_HOME")}
    return {**base, **{k: str(v) for k, v in env.items()}}


def python(code: str, *args, env: dict) -> str:
    done = subprocess.run([sys.executable, "-c", code, *map(str, args)], env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


def start_worker(seed: int, dtype: str, variant: str, out: Path, env: dict) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-c", WORKER, str(seed), dtype, variant, str(out)],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )


def finish(proc: subprocess.Popen) -> dict:
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err
    return json.loads(out)


def load(path: Path) -> dict:
    with np.load(path, allow_pickle=False) as f:
        return {name: f[name] for name in f.files}


def check_against_reference(got: dict, seed: int, dtype: str) -> None:
    a = np.random.default_rng(seed).random((3, 4, 24, 24)).astype(dtype)
    a /= a.sum(axis=-1, keepdims=True)
    a64, lengths = a.astype(np.float64), np.array([24, 17, 1])
    rtol = 1e-5 if dtype == "float32" else 1e-12
    np.testing.assert_allclose(got["log"], np.log(a64).ravel(), rtol=rtol)
    if "entropy" in got:
        np.testing.assert_allclose(got["entropy"], ref.entropy(a64, lengths), rtol=rtol, atol=1e-12)
        np.testing.assert_allclose(got["col_sum"], ref.col_sum(a64, lengths), rtol=rtol, atol=1e-12)


def cache_files(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.suffix in (".nbi", ".nbc"))


def test_cache_dir_is_per_user_and_versioned(tmp_path):
    code = "import numba, numpy, fastattn; from fastattn.kernels import _jit; print(_jit.CACHE_DIR)"
    xdg = Path(python(code, env=environment(XDG_CACHE_HOME=tmp_path / "xdg")))
    assert xdg.parent == tmp_path / "xdg" / "fastattn" / "numba" and xdg.is_dir()
    home = Path(python(code, env=environment(HOME=tmp_path / "home")))
    assert home.parent == tmp_path / "home" / ".cache" / "fastattn" / "numba" and home.is_dir()
    numba_dir = Path(python(code, env=environment(NUMBA_CACHE_DIR=tmp_path / "nb", XDG_CACHE_HOME=tmp_path / "x2")))
    assert numba_dir.parent == tmp_path / "nb" / "fastattn"  # the user's numba-wide choice wins
    # An upgrade of fastattn, Numba or NumPy, or any change to a kernel source, starts a fresh directory.
    versions = python("import numba, numpy, fastattn; print(fastattn.__version__, numba.__version__, numpy.__version__)", env=environment(NUMBA_CACHE_DIR=SESSION_CACHE))
    fastattn_version, numba_version, numpy_version = versions.split()
    assert xdg.name.startswith(f"{fastattn_version}-numba{numba_version}-numpy{numpy_version}-")
    assert xdg.name == home.name == numba_dir.name


def test_cache_is_on_by_default_and_reused(tmp_path, rng):
    env, seed = environment(XDG_CACHE_HOME=tmp_path), int(rng.integers(2**32))
    first = finish(start_worker(seed, "float32", "log", tmp_path / "first.npz", env))
    assert first == {"hits": 0, "misses": 1}
    assert cache_files(tmp_path / "fastattn" / "numba")  # written where the user's caches live
    second = finish(start_worker(seed, "float32", "log", tmp_path / "second.npz", env))
    assert second == {"hits": 1, "misses": 0}  # loaded, not compiled
    got, again = load(tmp_path / "first.npz"), load(tmp_path / "second.npz")
    check_against_reference(got, seed, "float32")
    for name in got:
        np.testing.assert_array_equal(again[name], got[name], err_msg=name)


def test_cache_off_leaves_nothing(tmp_path, rng):
    env = environment(FASTATTN_NUMBA_CACHE=0, XDG_CACHE_HOME=tmp_path / "xdg", NUMBA_CACHE_DIR=tmp_path / "nb")
    seed = int(rng.integers(2**32))
    for out in ("first.npz", "second.npz"):
        assert finish(start_worker(seed, "float64", "log", tmp_path / out, env)) == {"hits": 0, "misses": 1}
        check_against_reference(load(tmp_path / out), seed, "float64")
    assert not (tmp_path / "xdg").exists() and not (tmp_path / "nb").exists()


def test_damaged_cache_files_mean_compiling_again(tmp_path, rng):
    env, seed = environment(NUMBA_CACHE_DIR=tmp_path), int(rng.integers(2**32))
    assert finish(start_worker(seed, "float64", "log", tmp_path / "first.npz", env)) == {"hits": 0, "misses": 1}
    files = cache_files(tmp_path)
    assert {p.suffix for p in files} == {".nbi", ".nbc"}
    for path in files:
        path.write_bytes(b"not a cache file")
    assert finish(start_worker(seed, "float64", "log", tmp_path / "second.npz", env)) == {"hits": 0, "misses": 1}
    check_against_reference(load(tmp_path / "second.npz"), seed, "float64")


def test_parallel_and_serial_calls_share_one_compiled_kernel(tmp_path, rng):
    """A parallel call runs the single-threaded kernel in threads: what a serial run compiled
    and saved, a parallel run loads (and the reverse), with the same results."""
    env, seed = environment(NUMBA_CACHE_DIR=tmp_path), int(rng.integers(2**32))
    # float32 serial then parallel, float64 parallel then serial: the two signatures' steps
    # run side by side (one process each at a time), so their two compiles overlap
    first = [start_worker(seed, "float32", "serial", tmp_path / "serial.npz", env),
             start_worker(seed, "float64", "parallel", tmp_path / "parallel64.npz", env)]
    assert [finish(p) for p in first] == [{"hits": 0, "misses": 1}] * 2
    then = [start_worker(seed, "float32", "parallel", tmp_path / "parallel.npz", env),
            start_worker(seed, "float64", "serial", tmp_path / "serial64.npz", env)]
    assert [finish(p) for p in then] == [{"hits": 1, "misses": 0}] * 2
    for out, dtype in (("serial", "float32"), ("parallel", "float32"), ("parallel64", "float64"), ("serial64", "float64")):
        check_against_reference(load(tmp_path / f"{out}.npz"), seed, dtype)
    for a, b in (("serial", "parallel"), ("serial64", "parallel64")):
        got, want = load(tmp_path / f"{a}.npz"), load(tmp_path / f"{b}.npz")
        for name in want:
            np.testing.assert_array_equal(got[name], want[name], err_msg=f"{a}: {name}")


def test_processes_starting_at_once_on_an_empty_cache(tmp_path, rng):
    """Four processes compile and save the same function at once, two signatures (float32 and
    float64) of it: all succeed, and every later process loads both, with the same results.

    The kernel is the quick-to-compile one ("log"): the processes then reach their saves
    within moments of each other, the race this checks, without four compiles of the
    statistics kernel (test_parallel_and_serial_calls_share_one_compiled_kernel saves that)."""
    env, seed = environment(NUMBA_CACHE_DIR=tmp_path / "cache"), int(rng.integers(2**32))
    dtypes = ["float32", "float64", "float32", "float64"]
    procs = [start_worker(seed, dtype, "log", tmp_path / f"run{i}.npz", env) for i, dtype in enumerate(dtypes)]
    reports = [finish(proc) for proc in procs]
    assert all(r["hits"] + r["misses"] == 1 for r in reports)
    later = {dtype: finish(start_worker(seed, dtype, "log", tmp_path / f"later-{dtype}.npz", env)) for dtype in ("float32", "float64")}
    assert later == {"float32": {"hits": 1, "misses": 0}, "float64": {"hits": 1, "misses": 0}}
    assert not list((tmp_path / "cache").rglob("*.tmp.*"))  # every write completed and was renamed
    for dtype in ("float32", "float64"):
        want = load(tmp_path / f"later-{dtype}.npz")
        check_against_reference(want, seed, dtype)
        for i, d in enumerate(dtypes):
            if d == dtype:
                got = load(tmp_path / f"run{i}.npz")
                for name in want:
                    np.testing.assert_array_equal(got[name], want[name], err_msg=f"run {i}: {name}")


# ------------------------------------------------------------- lazy imports

LOADED = "import sys; print(sorted({{m.split('.')[0] for m in sys.modules}} & {heavy!r}))".format(heavy=set(HEAVY))


@pytest.mark.parametrize(
    "argv, code",
    [(["--help"], 0), (["stats", "--help"], 0), (["ingest", "--help"], 0), (["stats"], 2), (["plot", "s.zarr"], 2)],
)
def test_help_and_usage_errors_load_no_heavy_library(argv, code):
    script = (
        f"import sys\nsys.argv = ['fastattn', *{argv!r}]\nfrom fastattn_cli.main import main\n"
        f"try:\n    main()\nexcept SystemExit as exc:\n    assert exc.code == {code}, exc.code\n{LOADED}"
    )
    out = python(script, env=environment(NUMBA_CACHE_DIR=SESSION_CACHE))
    assert out.splitlines()[-1] == "[]"
    if code == 0:
        assert "Usage: fastattn" in out


def test_import_fastattn_is_cheap_and_the_api_loads_on_use():
    code = (
        "import sys, fastattn\n" + LOADED + "\n"
        "print(callable(fastattn.open_store), callable(fastattn.ingest), 'zarr' in sys.modules, 'xarray' in sys.modules)\n"
        "import fastattn.ingest\n"  # the submodule of the same name: fastattn.ingest stays the function
        "print(callable(fastattn.ingest), sys.modules['fastattn.ingest'].ingest is fastattn.ingest, fastattn.stats.FLAGS[0])"
    )
    out = python(code, env=environment(NUMBA_CACHE_DIR=SESSION_CACHE)).splitlines()
    assert out == ["[]", "True True True False", "True True uniform"]  # xarray: when open_store runs


@pytest.mark.parametrize("order", ["import fastattn, xarray", "import xarray, fastattn"])
def test_accessor_works_whichever_is_imported_first(order, rng, tmp_path):
    a = rng.random((2, 5, 5))
    a /= a.sum(axis=-1, keepdims=True)
    np.save(tmp_path / "a.npy", a)
    code = (
        f"{order}\nimport numpy as np, xarray as xr\n"
        f"a = np.load({str(tmp_path / 'a.npy')!r}, allow_pickle=False)\n"
        "da = xr.DataArray(a, dims=('head', 'query', 'key'))\n"
        f"np.save({str(tmp_path / 'e.npy')!r}, da.attn.entropy().values)"
    )
    python(code, env=environment(NUMBA_CACHE_DIR=SESSION_CACHE))
    got = np.load(tmp_path / "e.npy", allow_pickle=False)
    np.testing.assert_allclose(got, ref.entropy(a), rtol=1e-6)  # the accessor gives float32


def run_cli(argv: list[str], env: dict) -> tuple[str, list[str]]:
    """`fastattn *argv` in a fresh process: its output, and which of NOT_FOR_STATS it imported."""
    script = (
        f"import sys\nsys.argv = ['fastattn', *{argv!r}]\nfrom fastattn_cli.main import main\n"
        "try:\n    main()\nexcept SystemExit as exc:\n    assert not exc.code, exc.code\n"
        f"print(sorted({{m.split('.')[0] for m in sys.modules}} & {set(NOT_FOR_STATS)!r}))"
    )
    *out, loaded = python(script, env=env).splitlines()
    return "\n".join(out), eval(loaded)


def test_stats_command_loads_no_xarray_dask_or_pandas(tmp_path, rng):
    """Computing the statistics, laying out the group and printing the table (json, csv and
    rich's) go through zarr and NumPy alone: no xarray, dask, pandas or distributed."""
    from conftest import batched_dump

    from fastattn.ingest import ingest

    batched_dump(rng, tmp_path / "d" / "a.npz", [7, 12, 3], layers=2, heads=3)
    ingest([tmp_path / "d"], tmp_path / "s.zarr")
    env = environment(NUMBA_CACHE_DIR=SESSION_CACHE)
    out, loaded = run_cli(["stats", str(tmp_path / "s.zarr"), "--format", "json"], env)
    assert loaded == []
    body = json.loads(out)
    assert (body["computed"], body["batches"], len(body["heads"])) == (3, 3, 6)
    for fmt in ("csv", "table"):  # nothing left to compute: the table alone
        out, loaded = run_cli(["stats", str(tmp_path / "s.zarr"), "--format", fmt, "--layer", "1"], env)
        assert loaded == []
        assert out.count("\n1,") == 3 if fmt == "csv" else "self-attn" in out


def test_commands_load_neither_typer_nor_pydantic(tmp_path, rng):
    """A command run to its end (stats on a store) and one that fails (check of a missing store,
    exit code 1), each in a fresh process, parse their arguments without typer or pydantic."""
    from conftest import batched_dump

    from fastattn.ingest import ingest

    batched_dump(rng, tmp_path / "d" / "a.npz", [6, 11], layers=2, heads=2)
    ingest([tmp_path / "d"], tmp_path / "s.zarr")
    missing = tmp_path / "missing.zarr"
    env = environment(NUMBA_CACHE_DIR=SESSION_CACHE)
    for argv, code in ((["stats", str(tmp_path / "s.zarr"), "--format", "json"], 0), (["check", str(missing)], 1)):
        script = (
            f"import sys\nsys.argv = ['fastattn', *{argv!r}]\nfrom fastattn_cli.main import main\n"
            "try:\n    main()\nexcept SystemExit as exc:\n    print(exc.code)\n"
            f"print(sorted({{m.split('.')[0] for m in sys.modules}} & {set(NOT_FOR_ANY_COMMAND)!r}))"
        )
        done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=600)
        *out, exit_code, loaded = done.stdout.splitlines()
        assert (done.returncode, int(exit_code), loaded) == (0, code, "[]"), done.stderr
        if code == 0:
            body = json.loads("\n".join(out))
            assert (body["computed"], body["batches"], len(body["heads"])) == (2, 2, 4)
        else:
            assert done.stderr.splitlines()[0] == f"{missing}: no such store"  # check's report of one problem


def help_paragraphs(text: str) -> list[list[str]]:
    """The description of a command's plain help, as paragraphs of lines: what comes between
    the usage line and the first section ("Positional arguments:", "Options:", "Commands:")."""
    body = text.split("\n\n", 1)[1]
    for section in ("\nPositional arguments:", "\nOptions:", "\nCommands:"):
        body = body.split(section)[0]
    return [block.splitlines() for block in body.strip("\n").split("\n\n")]


COMMANDS = ["synth", "ingest", "info", "stats", "plot", "report", "capture", "check", "compare", "roles", "similarity",
            "rollout"]


@pytest.mark.parametrize("command", ["", *COMMANDS])
def test_help_reflows_paragraphs(command):
    """Each paragraph of a command's help is filled to the width (no line ends early where the
    source had a line break, as rich's help did: "... pass per" / "chunk; ..."), and says every
    word of its source, in order."""
    import inspect

    from click.testing import CliRunner

    from fastattn_cli.main import app

    result = CliRunner().invoke(app, [*filter(None, [command]), "--help"])
    assert result.exit_code == 0 and result.output.startswith("Usage: fastattn")
    width = 80  # click's CliRunner formats help at 80 columns
    paragraphs = help_paragraphs(result.output)
    for lines in paragraphs:
        for line, after in zip(lines, lines[1:]):
            if not line.startswith("   ") and not after.startswith("   "):  # not a \\b block (kept as written)
                assert len(line) + 1 + len(after.split()[0]) > width, f"{command or 'fastattn'}: ends early: {line!r}"
    source = app.help if not command else app.commands[command].help
    said = "".join("".join(line.split()) for lines in paragraphs for line in lines)  # textwrap may break at a hyphen
    assert said == "".join(w for w in inspect.cleandoc(source).split() if w != "\b")
    listing = CliRunner().invoke(app, ["--help"]).output.split("\nCommands:\n")[1]
    assert COMMANDS == [line.split()[0] for line in listing.splitlines() if line[2:3] != " " and line.strip()]
