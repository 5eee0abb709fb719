"""Findings (`summary.findings`): the heads grouped by what they do, one line per finding, on
synthetic heads whose roles are known, on the real MiniLM samples against a float64 NumPy
reference, and through `fastattn stats`."""

from __future__ import annotations

import json

import numpy as np
import pytest
from benchmarks import reference as ref
from conftest import SAMPLES

import fastattn
from fastattn import summary, synth
from fastattn.ingest import ingest

LAYERS, HEADS, SEED = 3, 6, 5  # this seed gives every synthetic role at least one head


def reference_planes(path) -> dict:
    """Per-plane statistics and flags of every (batch, layer, head) of a store, (batch, layer,
    head) arrays from the float64 valid block of its attention (`reference.plane_summary`)."""
    ds = fastattn.open_store(path)
    attention, lengths = ds.attention.values, ds.length.values
    batches, layers, heads = attention.shape[:3]
    out: dict[str, np.ndarray] = {}
    for b in range(batches):
        n = int(lengths[b])
        for layer in range(layers):
            for head in range(heads):
                plane = ref.plane_summary(attention[b, layer, head, :n, :n].astype(np.float64), n, True)
                for name, value in plane.items():
                    out.setdefault(name, np.zeros((batches, layers, heads), dtype=type(value)))[b, layer, head] = value
    return out


def expected_findings(planes: dict, share: float = summary.FLAG_SHARE) -> dict:
    """{(finding, key): {label: value}} written plainly from reference planes: a score's mean over
    the batches at or above its threshold; a flag in at least `share` of the batches, dominant
    and critical keys by the key most flagged batches peak at (None under half), critical
    leaving out the heads with a dominant key."""
    batches, layers, heads = planes["peak_key"].shape
    out: dict = {}
    for name, (threshold, _) in summary.SCORE_FINDINGS.items():
        mean = planes[name].mean(axis=0)
        for layer in range(layers):
            for head in range(heads):
                if mean[layer, head] >= threshold:
                    out.setdefault((name, None), {})[f"L{layer}H{head}"] = mean[layer, head]
    for name in summary.FLAG_FINDINGS:
        for layer in range(layers):
            for head in range(heads):
                flagged = planes[name][:, layer, head]
                if flagged.sum() < share * batches:
                    continue
                if name == "critical_key" and planes["dominant_key"][:, layer, head].sum() >= share * batches:
                    continue
                key = None
                if name in ("dominant_key", "critical_key"):
                    peaks = list(planes["peak_key"][flagged, layer, head])
                    top = max(set(peaks), key=lambda k: (peaks.count(k), -k))
                    key = top if peaks.count(top) >= 0.5 * len(peaks) else None
                out.setdefault((name, key), {})[f"L{layer}H{head}"] = flagged.sum() / batches
    return out


def as_groups(found: list[dict]) -> dict:
    return {(f["finding"], f.get("key")): {e["label"]: e["value"] for e in f["heads"]} for f in found}


def check_against_reference(found: list[dict], planes: dict) -> None:
    want = expected_findings(planes)
    got = as_groups(found)
    assert got.keys() == want.keys()
    for group in want:
        assert got[group].keys() == want[group].keys(), group
        for label, value in want[group].items():
            np.testing.assert_allclose(got[group][label], value, rtol=1e-9, err_msg=f"{group} {label}")
    for f in found:  # strongest first
        values = [e["value"] for e in f["heads"]]
        assert values == sorted(values, reverse=True)
        line = summary.finding_line(f)
        assert "\n" not in line and line.startswith(f"{f['what']} — {len(f['heads'])} head")


@pytest.fixture(scope="module")
def synth_store(tmp_path_factory):
    root = tmp_path_factory.mktemp("findings")
    synth.synthesize(root / "dumps", files=8, layers=LAYERS, heads=HEADS, seq="16-32", batch=3, seed=SEED, jobs=2)
    path = root / "s.zarr"
    assert ingest([root / "dumps"], path, jobs=2).ok
    fastattn.write_stats(path)
    return path


def test_synthetic_heads_are_found_by_their_role(synth_store):
    roles = synth.head_roles(LAYERS, HEADS, SEED)
    assert set(roles.ravel()) == set(synth.ROLES)
    having = {role: {f"L{l}H{h}" for l, h in np.argwhere(roles == role)} for role in synth.ROLES}
    found = summary.findings(summary.store_head_table(synth_store))
    groups = {group: set(heads) for group, heads in as_groups(found).items()}
    assert groups[("prev_token", None)] == having["previous-token"]
    assert groups[("first_token", None)] == having["first-token"]
    assert groups[("dominant_key", 0)] == having["first-token"]  # key 0 receives most of the attention
    assert groups[("diagonal_only", None)] == having["self"]
    # a critical key chosen anew for every file: one key that varies from batch to batch
    varying = groups.get(("dominant_key", None), set()) | groups.get(("critical_key", None), set())
    assert having["single-key"] <= varying
    assert not having["broad"] & set().union(*groups.values())
    check_against_reference(found, reference_planes(synth_store))


def test_minilm_findings_match_numpy(tmp_path, cli):
    path = tmp_path / "s.zarr"
    assert ingest([SAMPLES], path, jobs=2).ok
    result = cli("stats", path, "--format", "json")
    assert result.exit_code == 0, result.output
    body = json.loads(result.stdout)
    planes = reference_planes(path)
    check_against_reference(body["findings"], planes)
    groups = as_groups(body["findings"])
    assert "L0H2" in groups[("prev_token", None)]  # the known previous-token head (0.97 on q−1)
    assert "L1H8" in groups[("next_token", None)]  # and next-token head (0.64 on q+1)
    # the rows carry the mean scores too (json and csv; null where NaN: these dumps carry no input_ids)
    rows = {(r["layer"], r["head"]): r for r in body["heads"]}
    for name in summary.SCORE_FINDINGS:
        got = [[np.nan if rows[(l, h)][name] is None else rows[(l, h)][name] for h in range(12)] for l in range(6)]
        np.testing.assert_allclose(got, planes[name].mean(axis=0), rtol=1e-9, err_msg=name)
    csv = cli("stats", path, "--format", "csv")
    assert set(summary.SCORE_FINDINGS) <= set(csv.stdout.splitlines()[0].split(","))
    # the table: one line per finding, under the layer x head table
    text = cli("stats", path).stdout.splitlines()
    for finding in body["findings"]:
        assert text.count(summary.finding_line(finding)) == 1
    assert text[-len(body["findings"]) :] == [summary.finding_line(f) for f in body["findings"]]


def test_findings_group_by_key_and_cut_long_lists():
    """A hand-made table: dominant keys grouped by key, a critical key that varies, critical
    left out where a key dominates, a flag under the share left out, long lists cut."""
    batches, layers, heads = 10, 3, 4
    flags = {name: np.zeros((batches, layers, heads), dtype=bool) for name in summary.FLAG_WORDS}
    peaks = np.ones((batches, layers, heads), dtype=np.int64)
    flags["dominant_key"][:, 0, :3] = True  # L0H0-2 on key 0
    flags["dominant_key"][:9, 1, 0] = True  # L1H0 on key 5 in 9 of 10 batches
    flags["critical_key"][:, 0, 0] = True  # implied by its dominant key: not repeated
    flags["critical_key"][:, 2, 1] = True  # a key that changes with the batch
    flags["uniform"][:4, 2, 3] = True  # 40%: under the share
    peaks[:, 0, :3] = 0
    peaks[:, 1, 0] = 5
    peaks[:, 2, 1] = np.arange(batches) % 4
    means = {name: np.zeros((layers, heads)) for name in summary.MEANS}
    means["prev_token"][:] = np.linspace(0.2, 0.9, layers * heads).reshape(layers, heads)
    table = {
        **means, "batches": batches, "flags": flags, "flag_counts": {k: v.sum(axis=0) for k, v in flags.items()},
        "peaks": peaks, "peak_key": np.zeros((layers, heads), dtype=np.int64),
        "layer_ids": np.arange(layers), "head_ids": np.arange(heads),
    }
    found = summary.findings(table)
    lines = [summary.finding_line(f) for f in found]
    assert [(f["finding"], f.get("key")) for f in found] == [
        ("prev_token", None), ("dominant_key", 0), ("dominant_key", 5), ("critical_key", None)
    ]
    prev = [e["value"] for e in found[0]["heads"]]  # the 7 of 12 means at or above 0.5, strongest first
    assert prev == sorted(means["prev_token"][means["prev_token"] >= 0.5], reverse=True) and len(prev) == 7
    assert lines[0] == (
        "previous-token heads (≥ 0.5 of attention on q−1) — 7 heads: L2H3 (0.90), L2H2 (0.84), L2H1 (0.77),"
        " L2H0 (0.71), L1H3 (0.65), L1H2 (0.58), … and 1 more"
    )
    assert lines[1:] == [
        "most incoming attention on key 0 (over 3/8 of all attention, in ≥ 50% of batches) — 3 heads:"
        " L0H0 (100%), L0H1 (100%), L0H2 (100%)",
        "most incoming attention on key 5 (over 3/8 of all attention, in ≥ 50% of batches) — 1 head: L1H0 (90%)",
        "over 3/16 of all attention on one key that varies from batch to batch (in ≥ 50% of batches) — 1 head:"
        " L2H1 (100%)",
    ]
    # with layers and heads picked (--layer, --head), the labels are the store's positions
    table["layer_ids"], table["head_ids"] = np.array([1, 3, 4]), np.array([0, 2, 5, 7])
    assert [e["label"] for e in summary.findings(table)[1]["heads"]] == ["L1H0", "L1H2", "L1H5"]
