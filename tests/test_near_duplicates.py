"""Near-duplicates: banded pairing finds exactly the pairs all-pairs would, every planted kind of near-copy is found,
unrelated images of the default data are rarely paired, validate warns with the pairs, prepare keeps each group
in one split."""

from __future__ import annotations

import json
from collections import defaultdict

import numpy as np
import pandas as pd
import pytest
import yaml

from pipeline import PipelineError
from pipeline.cards import DataCard
from pipeline.contracts import ValidationSummary
from pipeline.near_duplicates import group_keys, groups, hash_values, pairs
from pipeline.params import DefectRates, IngestSettings, PrepareSettings, SyntheticSettings, load_params
from pipeline.prepare import GROUP, assign_splits, near_duplicate_groups
from pipeline.sources import synthetic
from pipeline.sources.records import perceptual_hash
from pipeline.validate import near_duplicate_column, near_duplicate_pairs
from tests.conftest import ROOT, Workspace, default_params, small_params

CARD = DataCard.model_validate(yaml.safe_load((ROOT / "data_cards" / "synthetic.yaml").read_text()))
DISTANCE = default_params()["validation"]["near_duplicate_distance"]
SETTINGS = PrepareSettings(seed=0, val_fraction=0.15, test_fraction=0.15)


def distance(a: str, b: str) -> int:
    return (int(a, 16) ^ int(b, 16)).bit_count()


def test_banded_pairs_are_exactly_the_pairs_within_the_distance():
    rng = np.random.default_rng(0)
    hashes = rng.integers(0, 2**64 - 1, size=2000, dtype=np.uint64, endpoint=True)
    for copy, original, flips in ((10, 3, 0b1), (11, 10, 0b1011 << 60), (12, 4, 0xF0F), (13, 5, 2**63 | 1)):
        hashes[copy] = hashes[original] ^ np.uint64(flips)  # near-copies with 1, 3, 8 and 2 bits changed
    every = np.bitwise_count(hashes[:, None] ^ hashes[None, :])
    for max_distance in (0, 1, 2, 4, 8, 12):
        first, second = np.nonzero(np.triu(every <= max_distance, 1))
        expected = np.stack([first, second, every[first, second]], axis=1)
        assert np.array_equal(pairs(hashes, max_distance), expected), max_distance
    assert hash_values([f"{int(h):016x}" for h in hashes]).tolist() == hashes.tolist()
    # a copy of a copy joins its original's group; the group is named by its smallest image hash
    labels = groups(len(hashes), pairs(hashes, 4))
    assert labels[3] == labels[10] == labels[11] and labels[3] != labels[13]
    records = pd.DataFrame({"phash": [f"{int(h):016x}" for h in hashes], "sha256": [f"{i:064x}" for i in
                                                                                     range(len(hashes), 0, -1)]})
    keys = group_keys(records, 4)
    assert keys[3] == keys[10] == keys[11] == records.sha256[11] and keys[0] == records.sha256[0]


def _hashed(**changes) -> tuple[list, dict]:
    settings = SyntheticSettings.model_validate({**default_params()["datasets"]["synthetic"], **changes})
    ingest = IngestSettings.model_validate(default_params()["ingest"])
    records = list(synthetic.records(CARD, settings, ingest))
    return records, {r.record_id: perceptual_hash(r.pixels) for r in records}


def test_every_kind_of_planted_near_copy_is_found_at_the_configured_distance():
    """2000 images, half of them planted near-copies (about 250 per kind). Measured within 4 bits: re-encoded
    94.5%, resized 97.9%, brightness-shifted 97.3%, cropped 86.9%."""
    defects = {**default_params()["datasets"]["synthetic"]["defects"], "near_duplicate": 0.5}
    records, hashes = _hashed(num_images=2000, defects=defects)
    found = defaultdict(list)
    for record in records:
        if record.planted and record.planted.defect == "near_duplicate":
            found[record.planted.kind].append(distance(hashes[record.record_id], hashes[record.planted.original]))
    assert set(found) == set(synthetic.NEAR_COPIES)
    recall = {kind: np.mean(np.array(d) <= DISTANCE) for kind, d in found.items()}
    floors = {"reencoded": 0.93, "resized": 0.96, "brightness": 0.95, "cropped": 0.84}
    assert all(recall[kind] >= floor for kind, floor in floors.items()), recall
    assert all(len(d) > 200 for d in found.values())


def test_unrelated_images_of_the_default_data_are_rarely_paired():
    """The default synthetic data without planted copies: every pair is unrelated. Measured: 197 of its 8.0 million
    pairs (2.5e-5) lie within 4 bits, look-alikes (same shape, place and size; other colours and texture)."""
    records, hashes = _hashed(defects=DefectRates().model_dump())
    assert not any(r.planted for r in records)
    found = pairs(hash_values(hashes.values()), DISTANCE)
    n = len(records)
    assert len(found) / (n * (n - 1) / 2) < 3e-5, len(found)
    sizes = np.bincount(groups(n, found))
    assert sizes.max() <= 8, "false pairs do not chain into large groups"


def test_pairs_across_datasets_are_reported_on_both_sides_and_grouped_together():
    a = pd.DataFrame({"record_id": ["a1", "a2", "a3"], "sha256": ["f" * 64, "e" * 64, "d" * 64],
                      "phash": ["0123456789abcdef", "ffff000000000000", "0123456789abcdee"]})
    b = pd.DataFrame({"record_id": ["b1"], "sha256": ["1" * 64], "phash": ["0123456789abcd0f"]})
    near = near_duplicate_pairs({"a": a, "b": b}, 4)
    assert near.values.tolist() == [["a", "a1", "a", "a3", 1], ["a", "a1", "b", "b1", 3], ["a", "a3", "b", "b1", 4]]
    assert near_duplicate_column(a, "a", near).tolist() == [
        "a1 ~ a/a3 (distance 1); b/b1 (distance 3)", None, "a3 ~ a/a1 (distance 1); b/b1 (distance 4)"]
    assert near_duplicate_column(b, "b", near).tolist() == ["b1 ~ a/a1 (distance 3); a/a3 (distance 4)"]
    keys = near_duplicate_groups({"a": a, "b": b}, 4)
    assert keys["a"].tolist() == ["1" * 64, "e" * 64, "1" * 64] and keys["b"].tolist() == ["1" * 64]
    # a malformed hash fails its own check in validate and pairs with nothing
    assert near_duplicate_pairs({"a": a.assign(phash="not a hash"), "b": b}, 4).empty


def test_a_group_shares_one_split_and_a_withdrawal_moves_only_its_own_group():
    rng = np.random.default_rng(1)
    hashes = rng.integers(0, 2**64 - 1, size=3000, dtype=np.uint64, endpoint=True)
    hashes[:10] = hashes[0] ^ (np.uint64(1) << np.arange(10, dtype=np.uint64))  # ten near-copies of one image
    frame = pd.DataFrame({"sha256": [f"{i:064x}" for i in rng.permutation(3000)], "domain": "site_north",
                          "group": "group_a", "phash": [f"{int(h):016x}" for h in hashes]})

    def split(records: pd.DataFrame) -> pd.Series:
        return assign_splits(records.assign(**{GROUP: group_keys(records, 4)}), CARD, SETTINGS, key=GROUP)

    before = split(frame)
    assert before.loc[:9].nunique() == 1 and before.nunique() == 3
    # withdrawn: the image that names the group, and one record outside it
    named_by = frame.sha256.loc[:9].idxmin()
    after = split(frame.drop(index=[named_by, 20]))
    assert after.loc[:9].nunique() == 1
    assert after.loc[10:].equals(before.loc[10:].drop(index=20)), "no record outside the group moves"


def test_bad_near_duplicate_params_are_one_line_errors(workspace: Workspace):
    params = small_params()
    params["validation"]["near_duplicate_distance"] = -1
    workspace.write_params(params)
    result = workspace.run("prepare")
    assert result.returncode == 2
    assert result.stderr.strip() == ("error: params.yaml: validation.near_duplicate_distance: Input should be greater "
                                     "than or equal to 0")
    for rate, message in ((1.0, "less than 1"), (-0.1, "greater than or equal to 0")):
        params = small_params()
        params["datasets"]["synthetic"]["defects"]["near_duplicate"] = rate
        path = workspace.write_params(params)
        with pytest.raises(PipelineError, match=rf"^{path}: datasets\.synthetic\.defects\.near_duplicate: "
                                                rf"Input should be {message}$"):
            load_params(path)


def test_ingest_hashes_validate_warns_with_the_pairs_and_prepare_keeps_copies_with_originals(workspace: Workspace):
    params = small_params(300)
    params["datasets"]["synthetic"]["defects"]["near_duplicate"] = 0.1
    workspace.write_params(params)
    workspace.run_ok(("ingest", "synthetic"), ("ingest", "sklearn_digits"), ("validate",), ("prepare",))

    manifest = pd.read_parquet(workspace.ingested("synthetic") / "manifest.parquet").set_index("record_id")
    assert manifest.phash.str.fullmatch(r"[0-9a-f]{16}").all()
    planted = json.loads((workspace.ingested("synthetic") / "planted.json").read_text())
    copies = {record_id: p for record_id, p in planted.items() if p["defect"] == "near_duplicate"}
    assert {p["kind"] for p in copies.values()} == set(synthetic.NEAR_COPIES)
    assert set(copies) <= set(manifest.index), "near-copies are accepted, their originals too"
    assert {p["original"] for p in copies.values()} <= set(manifest.index)
    found = {c for c, p in copies.items() if distance(manifest.phash[c], manifest.phash[p["original"]]) <= DISTANCE}
    assert len(found) >= 0.85 * len(copies)

    report = workspace.root / "reports" / "validation"
    summary = ValidationSummary.model_validate_json((report / "summary.json").read_text())
    assert summary.passed, "near-duplicates are a warning"
    [check] = [c for c in summary.datasets["synthetic"].checks if c.check == "identity.no_near_duplicates"]
    involved = found | {copies[c]["original"] for c in found}
    assert not check.success and check.severity == "warning" and check.unexpected_count >= len(involved)
    assert all(" ~ " in example and "(distance " in example for example in check.examples)
    near = pd.read_csv(report / "near_duplicates.csv")
    listed = set(zip(near.record_id, near.other_record_id)) | set(zip(near.other_record_id, near.record_id))
    assert all((c, copies[c]["original"]) in listed for c in found)
    assert "near_duplicates.csv" in (report / "index.html").read_text()

    prepared = workspace.root / "data" / "prepared" / "synthetic"
    splits = pd.concat(pd.read_parquet(prepared / f"{s}.parquet") for s in ("train", "val", "test", "heldout"))
    splits = splits.set_index("record_id")
    assert all(splits.split[c] == splits.split[copies[c]["original"]] for c in found)
    outside_held_out = splits[splits.split != "heldout"]
    assert (outside_held_out.groupby(GROUP).split.nunique() == 1).all()
    assert (splits[GROUP] != splits.sha256).sum() >= len(found)
