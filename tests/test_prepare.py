"""Splits: stratified, deterministic, held-out domains kept apart, and no image in two splits."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pandas as pd
import pytest
import yaml

from pipeline.cards import DataCard
from pipeline.params import PrepareSettings
from pipeline.prepare import assign_splits, leaks
from pipeline.sources.records import pixels_sha256
from tests.conftest import ROOT, Workspace

CARD = DataCard.model_validate(yaml.safe_load((ROOT / "data_cards" / "synthetic.yaml").read_text()))
SETTINGS = PrepareSettings(seed=0, val_fraction=0.15, test_fraction=0.15)


def table(n: int = 2000, seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    return pd.DataFrame({
        "record_id": [f"r{i:05d}" for i in range(n)],
        "sha256": [f"{i:064x}" for i in range(n)],
        "domain": rng.choice(["site_north", "site_south", "site_east"], size=n, p=[0.45, 0.4, 0.15]),
        "group": rng.choice(["group_a", "group_b"], size=n, p=[0.9, 0.1]),
    })


def test_splits_are_deterministic_and_independent_of_row_order():
    frame = table()
    first = assign_splits(frame, CARD, SETTINGS)
    shuffled = frame.sample(frac=1, random_state=3)
    again = assign_splits(shuffled, CARD, SETTINGS)
    assert first.equals(again.sort_index())
    other_seed = assign_splits(frame, CARD, PrepareSettings(seed=1, val_fraction=0.15, test_fraction=0.15))
    assert not first.equals(other_seed)


def test_held_out_domains_never_reach_training():
    frame = table()
    split = assign_splits(frame, CARD, SETTINGS)
    assert (split[frame.domain == "site_east"] == "heldout").all()
    assert not (split[frame.domain != "site_east"] == "heldout").any()


def test_every_group_and_domain_keeps_its_share_in_each_split():
    frame = table(4000)
    frame["split"] = assign_splits(frame, CARD, SETTINGS)
    kept = frame[frame.split != "heldout"]
    for (domain, group), part in kept.groupby(["domain", "group"]):
        shares = part.split.value_counts(normalize=True)
        assert abs(shares["test"] - 0.15) < 0.01 + 1 / len(part), (domain, group)
        assert abs(shares["val"] - 0.15) < 0.01 + 1 / len(part), (domain, group)


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


def test_prepare_writes_aligned_pixels_and_sizes_deterministically(validated: Workspace):
    result = validated.run("prepare")
    assert result.returncode == 0, result.stderr
    out = validated.root / "data" / "prepared"
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


def test_prepare_refuses_unvalidated_data(workspace: Workspace):
    validated = workspace
    summary_file = validated.root / "reports" / "validation" / "summary.json"
    summary_file.parent.mkdir(parents=True)
    summary_file.write_text(json.dumps({"passed": False, "failed_critical": 3, "failed_warning": 0, "datasets": {}}))
    result = validated.run("prepare")
    assert result.returncode == 2
    assert "summary.json: validation failed (3 critical)" in result.stderr
    assert not (validated.root / "data" / "prepared").exists()
    shutil.rmtree(validated.root / "reports")
    result = validated.run("prepare")
    assert result.returncode == 2 and "run `dvc repro validate` first" in result.stderr
