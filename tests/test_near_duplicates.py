"""Near-duplicates: banded pairing finds exactly the pairs all-pairs would, every planted near-copy is found and no
unrelated image paired, unrelated images of the default data are rarely paired, validate warns with the pairs,
prepare keeps each group in one split."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import yaml
from scipy.ndimage import gaussian_filter

from pipeline import PipelineError
from pipeline.artifacts import Layout
from pipeline.cards import DataCard
from pipeline.contracts import ValidationSummary
from pipeline.near_duplicates import correlations, group_keys, hash_values, near_pairs, pairs, thumbnails
from pipeline.params import (
    DefectRates,
    IngestSettings,
    NearDuplicateSettings,
    PrepareSettings,
    SyntheticSettings,
    load_params,
)
from pipeline.prepare import GROUP, assign_splits, near_duplicate_groups
from pipeline.sources import synthetic
from pipeline.sources.records import perceptual_hash
from pipeline.validate import near_duplicate_column, near_duplicate_pairs
from tests.conftest import ROOT, Workspace, default_params, small_params

CARD = DataCard.model_validate(yaml.safe_load((ROOT / "data_cards" / "synthetic.yaml").read_text()))
DETECTION = NearDuplicateSettings.model_validate(default_params()["validation"]["near_duplicates"])
SETTINGS = PrepareSettings(seed=0, val_fraction=0.15, test_fraction=0.15)


def as_pairs(found: np.ndarray) -> np.ndarray:
    return np.rec.fromarrays([found[:, 0], found[:, 1]], names="i,j")


def in_memory(images: np.ndarray):
    """An ImageReader over images held in memory, the frame's index being each record's position in `images`."""
    return lambda records: iter([(np.arange(len(records)), images[records.index.to_numpy()])])


@pytest.mark.fast
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
    sha256 = pd.Series([f"{i:064x}" for i in range(len(hashes), 0, -1)])
    keys = group_keys(sha256, as_pairs(pairs(hashes, 4)))
    assert keys[3] == keys[10] == keys[11] == sha256[11] and keys[0] == sha256[0] and keys[13] != keys[3]


def _planted(**changes) -> tuple[pd.DataFrame, np.ndarray, list]:
    """Synthetic records as ingest hashes them (frame indexed by position), their pixels, and the planted ones."""
    settings = SyntheticSettings.model_validate({**default_params()["datasets"]["synthetic"], **changes})
    ingest = IngestSettings.model_validate(default_params()["ingest"])
    records = list(synthetic.records(CARD, settings, ingest))
    frame = pd.DataFrame({"record_id": [r.record_id for r in records],
                          "phash": [perceptual_hash(r.pixels) for r in records]})
    return frame, np.stack([r.pixels for r in records]), records


@pytest.mark.fast
def test_every_planted_near_copy_is_found_and_no_unrelated_pair():
    """1500 images, half of them planted near-copies (every kind): each is paired with its original, and no two
    images outside one planted group are paired."""
    defects = {**DefectRates().model_dump(), "near_duplicate": 0.5}
    frame, images, records = _planted(num_images=1500, defects=defects)
    position = {record_id: i for i, record_id in enumerate(frame.record_id)}
    planted = {(position[r.planted.original], i): r.planted.kind for i, r in enumerate(records) if r.planted}
    assert set(planted.values()) == set(synthetic.NEAR_COPIES) and len(planted) > 600
    found = near_pairs(frame, in_memory(images), DETECTION)
    found_pairs = set(zip(found["i"].tolist(), found["j"].tolist()))
    missed = {pair: kind for pair, kind in planted.items() if pair not in found_pairs}
    assert not missed, missed
    planted_groups = group_keys(frame.record_id, as_pairs(np.array(sorted(planted))))
    unrelated = [(i, j) for i, j in found_pairs if planted_groups[i] != planted_groups[j]]
    assert not unrelated, unrelated


def test_unrelated_images_of_the_default_data_are_rarely_paired():
    """The default synthetic data without planted copies: every pair is unrelated. Measured: 3 of its 8.0 million
    pairs (3.8e-7) are judged near-copies, look-alikes (same shape, place and size; other colours and texture)."""
    frame, images, records = _planted(defects=DefectRates().model_dump())
    assert not any(r.planted for r in records)
    found = near_pairs(frame, in_memory(images), DETECTION)
    n = len(frame)
    assert len(found) / (n * (n - 1) / 2) < 1e-5, len(found)


def _smooth_images(count: int, size: int, channels: int, seed: int) -> np.ndarray:
    """Unrelated images: low-frequency noise, each its own."""
    noise = np.random.default_rng(seed).normal(0, 1, size=(count, size, size, channels))
    smooth = gaussian_filter(noise, sigma=(0, size / 8, size / 8, 0))
    smooth = smooth / smooth.std(axis=(1, 2, 3), keepdims=True)
    return np.clip(128 + 40 * smooth, 0, 255).astype(np.uint8)


def _write_dataset(folder, images: np.ndarray, ids: list[str]) -> pd.DataFrame:
    folder.mkdir(parents=True)
    np.save(folder / "pixels-00000.npy", images)
    return pd.DataFrame({"record_id": ids, "sha256": [f"{i:064x}" for i in range(len(ids))],
                         "phash": [perceptual_hash(image) for image in images],
                         "pixels_file": "pixels-00000.npy", "pixels_index": np.arange(len(ids), dtype=np.int32)})


@pytest.mark.fast
def test_pairs_across_datasets_are_reported_on_both_sides_and_grouped_together(tmp_path):
    images = _smooth_images(4, 32, 3, seed=0)
    images[0] = _smooth_images(1, 32, 1, seed=1)  # a1 grey, so that a grey copy of it is a near-copy
    images[2] = np.clip(images[0].astype(np.int16) + 20, 0, 255)  # a3: a1 brightened
    a = _write_dataset(tmp_path / "a", images[:3], ["a1", "a2", "a3"]).assign(sha256=["f" * 64, "e" * 64, "d" * 64])
    grey = images[0].astype(np.float64) @ np.array([0.299, 0.587, 0.114])
    small = np.round(grey.reshape(16, 2, 16, 2).mean(axis=(1, 3)))[None, :, :, None].astype(np.uint8)
    b = _write_dataset(tmp_path / "b", small, ["b1"]).assign(sha256=["1" * 64])  # b1: a1 in grey at half size
    folders = {"a": tmp_path / "a", "b": tmp_path / "b"}
    near = near_duplicate_pairs({"a": a, "b": b}, folders, DETECTION)
    assert near[["dataset", "record_id", "other_dataset", "other_record_id"]].values.tolist() == [
        ["a", "a1", "a", "a3"], ["a", "a1", "b", "b1"], ["a", "a3", "b", "b1"]]
    assert (near.correlation >= DETECTION.min_correlation).all()
    column = near_duplicate_column(a, "a", near)
    assert column[0].startswith("a1 ~ ") and "a/a3 (distance " in column[0] and "b/b1 (distance " in column[0]
    assert column[1] is None and "correlation " in column[2]
    keys = near_duplicate_groups({"a": a, "b": b}, folders, DETECTION)
    assert keys["a"].tolist() == ["1" * 64, "e" * 64, "1" * 64] and keys["b"].tolist() == ["1" * 64]
    # a malformed hash fails its own check in validate; the record is still paired on its pixels
    malformed = near_duplicate_pairs({"a": a.assign(phash="not a hash"), "b": b}, folders, DETECTION)
    assert len(malformed) == 3 and (malformed.distance == -1).sum() == 3


@pytest.mark.fast
def test_thumbnails_ignore_brightness_and_contrast_and_flat_images_pair_with_nothing():
    image = _smooth_images(1, 24, 3, seed=1)  # 24 pixels: cells that cut pixels
    brighter = np.clip(image.astype(np.float64) * 0.8 + 30, 0, 255).round().astype(np.uint8)
    thumbs = thumbnails(np.concatenate([image, brighter, np.full_like(image, 77)]))
    assert correlations(thumbs[:1], thumbs[1:2])[0] > 0.999 and not thumbs[2].any()


@pytest.mark.fast
def test_a_group_shares_one_split_and_a_withdrawal_moves_only_its_own_group():
    rng = np.random.default_rng(1)
    hashes = rng.integers(0, 2**64 - 1, size=3000, dtype=np.uint64, endpoint=True)
    hashes[:10] = hashes[0] ^ (np.uint64(1) << np.arange(10, dtype=np.uint64))  # ten near-copies of one image
    frame = pd.DataFrame({"sha256": [f"{i:064x}" for i in rng.permutation(3000)], "domain": "site_north",
                          "group": "group_a"})

    def split(kept: pd.Index) -> pd.Series:
        records = frame.loc[kept].reset_index(drop=True)
        keys = group_keys(records.sha256, as_pairs(pairs(hashes[kept.to_numpy()], 4))).to_numpy()
        return assign_splits(records.assign(**{GROUP: keys}), CARD, SETTINGS, key=GROUP).set_axis(kept)

    before = split(frame.index)
    assert before.loc[:9].nunique() == 1 and before.nunique() == 3
    # withdrawn: the image that names the group, and one record outside it
    named_by = frame.sha256.loc[:9].idxmin()
    after = split(frame.index.drop([named_by, 20]))
    assert after.loc[:9].nunique() == 1
    assert after.loc[10:].equals(before.loc[10:].drop(index=20)), "no record outside the group moves"


@pytest.mark.fast
def test_bad_near_duplicate_params_are_one_line_errors(workspace: Workspace):
    params = small_params()
    params["validation"]["near_duplicates"]["hash_distance"] = -1
    workspace.write_params(params)
    result = workspace.run("prepare")
    assert result.returncode == 2
    assert result.stderr.strip() == ("error: params.yaml: validation.near_duplicates.hash_distance: Input should be "
                                     "greater than or equal to 0")
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
    found = set(copies)  # every one of them

    report = Layout(workspace.root).validation
    summary = ValidationSummary.model_validate_json((report / "summary.json").read_text())
    assert summary.passed, "near-duplicates are a warning"
    [check] = [c for c in summary.datasets["synthetic"].checks if c.check == "identity.no_near_duplicates"]
    involved = found | {copies[c]["original"] for c in found}
    assert not check.success and check.severity == "warning" and check.unexpected_count >= len(involved)
    assert all(" ~ " in example and ", correlation " in example for example in check.examples)
    near = pd.read_csv(report / "near_duplicates.csv")
    listed = set(zip(near.record_id, near.other_record_id)) | set(zip(near.other_record_id, near.record_id))
    assert all((c, copies[c]["original"]) in listed for c in found)
    assert "near_duplicates.csv" in (report / "index.html").read_text()

    prepared = Layout(workspace.root).prepared("synthetic")
    splits = pd.concat(pd.read_parquet(prepared / f"{s}.parquet") for s in ("train", "val", "test", "heldout"))
    splits = splits.set_index("record_id")
    assert all(splits.split[c] == splits.split[copies[c]["original"]] for c in found)
    outside_held_out = splits[splits.split != "heldout"]
    assert (outside_held_out.groupby(GROUP).split.nunique() == 1).all()
    assert (splits[GROUP] != splits.sha256).sum() >= len(found)
