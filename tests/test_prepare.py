"""Splits: each record's own hash decides it (stable under withdrawals and additions), stratified within the
stated binomial tolerance, deterministic, held-out domains kept apart, and no image in two splits."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pandas as pd
import pytest
import yaml

from pipeline.artifacts import Layout
from pipeline.cards import DataCard
from pipeline.params import PrepareSettings
from pipeline.prepare import GROUP, assign_splits, leaks, stratum_shares
from pipeline.sources.records import pixels_sha256
from tests.conftest import ROOT, Workspace, default_params

CARD = DataCard.model_validate(yaml.safe_load((ROOT / "data_cards" / "synthetic.yaml").read_text()))
SETTINGS = PrepareSettings(seed=0, val_fraction=0.15, test_fraction=0.15)


def table(n: int = 2000, seed: int = 0, first: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    ids = range(first, first + n)
    return pd.DataFrame({
        "record_id": [f"r{i:05d}" for i in ids],
        "sha256": [f"{i:064x}" for i in ids],
        "domain": rng.choice(["site_north", "site_south", "site_east"], size=n, p=[0.45, 0.4, 0.15]),
        "group": rng.choice(["group_a", "group_b"], size=n, p=[0.9, 0.1]),
    })


@pytest.fixture(scope="module")
def default_manifest(tmp_path_factory) -> pd.DataFrame:
    """The synthetic dataset as the shipped params.yaml ingests it (about 8 s)."""
    space = Workspace(tmp_path_factory.mktemp("default"))
    shutil.copytree(ROOT / "data_cards", space.root / "data_cards")
    space.write_params(default_params())
    space.run_ok(("ingest", "synthetic"))
    return pd.read_parquet(space.ingested("synthetic") / "manifest.parquet")


@pytest.mark.fast
def test_splits_are_deterministic_and_independent_of_row_order():
    frame = table()
    first = assign_splits(frame, CARD, SETTINGS)
    shuffled = frame.sample(frac=1, random_state=3)
    assert first.equals(assign_splits(shuffled, CARD, SETTINGS).sort_index())
    assert first.equals(assign_splits(frame, CARD, SETTINGS))


@pytest.mark.fast
def test_the_seed_changes_the_assignment():
    frame = table()
    kept = frame.domain != "site_east"
    first = assign_splits(frame, CARD, SETTINGS)[kept]
    other = assign_splits(frame, CARD, SETTINGS.model_copy(update={"seed": 1}))[kept]
    # independent draws disagree on 1 - (0.7² + 0.15² + 0.15²) = 46% of records
    assert 0.40 < (first != other).mean() < 0.52


def test_withdrawing_or_adding_records_moves_no_other_record(default_manifest: pd.DataFrame):
    before = assign_splits(default_manifest, CARD, SETTINGS)
    rng = np.random.default_rng(7)
    for fraction in (0.001, 0.1, 0.5):
        kept = default_manifest.drop(index=rng.choice(default_manifest.index, int(len(default_manifest) * fraction),
                                                      replace=False))
        assert assign_splits(kept, CARD, SETTINGS).equals(before[kept.index])
    added = pd.concat([default_manifest, table(1000, first=10**6)], ignore_index=True)
    assert assign_splits(added, CARD, SETTINGS)[:len(default_manifest)].equals(before)


@pytest.mark.fast
def test_the_same_image_gets_the_same_split_in_every_dataset():
    frame = table().assign(dataset="a")
    copy = frame.sample(frac=1, random_state=5).assign(dataset="b", record_id=lambda f: "copy-" + f.record_id)
    both = pd.concat([frame, copy], ignore_index=True)
    both["split"] = assign_splits(both, CARD, SETTINGS)
    assert leaks(both).empty
    # a held-out domain is the card's choice, not the image's: the same image held out in one dataset and not
    # in the other is still a leak, and the check still finds it
    moved = both.assign(domain=np.where(both.dataset == "b", "site_north", both.domain))
    moved["split"] = assign_splits(moved, CARD, SETTINGS)
    assert set(leaks(moved).sha256) == set(frame.sha256[frame.domain == "site_east"])


@pytest.mark.fast
def test_held_out_domains_never_reach_training():
    frame = table()
    split = assign_splits(frame, CARD, SETTINGS)
    assert (split[frame.domain == "site_east"] == "heldout").all()
    assert not (split[frame.domain != "site_east"] == "heldout").any()


def test_default_data_is_stratified_within_the_stated_tolerance(default_manifest: pd.DataFrame):
    assigned = default_manifest.assign(split=assign_splits(default_manifest, CARD, SETTINGS))
    shares = stratum_shares(assigned, CARD, SETTINGS)
    assert set(shares.stratum) == {f"{d}|{g}" for d in ("site_north", "site_south") for g in ("group_a", "group_b")}
    assert shares.within.all(), shares[~shares.within]
    assert (shares.groupby("stratum")["count"].sum() == shares.groupby("stratum")["n"].first()).all()
    # the check bites: a stratum sent wholly to training is outside the interval in every split
    skewed = assigned.assign(split=assigned.split.mask(assigned.group.eq("group_b") & assigned.split.ne("heldout"),
                                                       "train"))
    outside = stratum_shares(skewed, CARD, SETTINGS).query("not within")
    assert set(outside.stratum) == {"site_north|group_b", "site_south|group_b"} and len(outside) == 6


@pytest.mark.fast
def test_leak_check_finds_an_image_in_two_splits():
    frame = pd.DataFrame({"dataset": ["a", "a", "b"], "record_id": ["1", "2", "3"],
                          "sha256": ["x", "y", "x"], "split": ["train", "test", "test"]})
    found = leaks(frame)
    assert set(found.record_id) == {"1", "3"}
    assert leaks(frame.assign(split="train")).empty


@pytest.fixture
def validated(workspace: Workspace) -> Workspace:
    workspace.run_ok(("ingest", "synthetic"), ("ingest", "sklearn_digits"), ("validate",))
    return workspace


def test_prepare_writes_aligned_pixels_deterministically_and_a_withdrawal_moves_no_other_record(validated: Workspace):
    result = validated.run("prepare")
    assert result.returncode == 0, result.stderr
    out = Layout(validated.root).prepared()
    sizes = json.loads((out / "split_sizes.json").read_text())
    manifest = pd.read_parquet(validated.ingested("synthetic") / "manifest.parquet")
    parts = {split: pd.read_parquet(out / "synthetic" / f"{split}.parquet") for split in sizes["synthetic"]}
    assert sum(len(p) for p in parts.values()) == len(manifest), "every accepted record lands in one split"
    for split, part in parts.items():
        pixels = np.load(out / "synthetic" / f"{split}.npy")
        assert pixels.shape == (len(part), 32, 32, 3) and sizes["synthetic"][split]["total"] == len(part)
        assert [pixels_sha256(p) for p in pixels] == part.sha256.tolist()
        assert part.split_index.tolist() == list(range(len(part)))
    assert set(parts["heldout"].domain) == {"site_east"}
    assert np.load(out / "sklearn_digits" / "heldout.npy").shape == (0, 16, 16, 1)

    first = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    assert validated.run("prepare").returncode == 0
    second = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    assert first == second

    # a training record withdrawn and the data re-ingested: it leaves training, and no other record moves (one
    # without near-duplicates: a group's members share its split, tests/test_near_duplicates.py)
    every = pd.concat(parts.values())
    alone = every.groupby(GROUP)[GROUP].transform("size") == 1
    withdrawn = every[alone & every.split.eq("train")].record_id.iloc[0]
    with (validated.root / "data_cards" / "withdrawals.csv").open("a") as handle:
        handle.write(f"{withdrawn},2026-01-01,\n")
    validated.run_ok(("ingest", "synthetic"), ("validate",), ("prepare",))
    before = pd.concat(parts.values()).set_index("record_id")["split"]
    after = pd.concat(pd.read_parquet(out / "synthetic" / f"{split}.parquet") for split in parts)
    assert after.set_index("record_id")["split"].sort_index().equals(before.drop(withdrawn).sort_index())


def test_prepare_refuses_unvalidated_data(workspace: Workspace):
    validated = workspace
    layout = Layout(validated.root)
    with layout.writing(layout.validation) as staged:
        staged(layout.validation_file).write_text(
            json.dumps({"passed": False, "failed_critical": 3, "failed_warning": 0, "datasets": {}}))
    result = validated.run("prepare")
    assert result.returncode == 2
    assert "summary.json: validation failed (3 critical)" in result.stderr
    assert not Layout(validated.root).prepared().exists()
    shutil.rmtree(validated.root / "reports")
    result = validated.run("prepare")
    assert result.returncode == 2 and "summary.json: not found; run `dvc repro validate`" in result.stderr
