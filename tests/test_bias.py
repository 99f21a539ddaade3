"""Bias audit: decisions on per-sample tables of known disparity, small groups, intersections, end to end."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from pipeline.audit import interval_decision, overall_status
from pipeline.audit.bias import audit, required_group_size
from pipeline.cards import DataCard, load_card
from pipeline.params import BiasSettings
from tests.conftest import ROOT, Workspace

SETTINGS = BiasSettings(n_boot=200, max_relative_error_gap=0.10, max_accuracy_gap=0.05, min_group_size=30)


def card(**shares) -> DataCard:
    base = load_card(ROOT / "data_cards" / "synthetic.yaml").model_dump()
    base["sensitive_attributes"][0]["population_shares"] = shares or {"group_a": 0.5, "group_b": 0.5}
    return DataCard.model_validate(base)


def table(sizes: dict[str, int], error: dict[str, float], accuracy: dict[str, float], seed: int,
          split: str = "test") -> pd.DataFrame:
    """Per-sample rows like evaluate writes: errors around each group's mean, correct with its accuracy."""
    rng = np.random.default_rng(seed)
    parts = []
    for group, n in sizes.items():
        parts.append(pd.DataFrame({
            "split": split, "group": group,
            "recon_mse": rng.normal(error[group], 0.2 * error[group], n).clip(1e-4),
            "probe_correct": (rng.random(n) < accuracy[group]).astype(float),
            "knn_correct": (rng.random(n) < accuracy[group]).astype(float),
        }))
    return pd.concat(parts, ignore_index=True)


def with_training(samples: pd.DataFrame, train: dict[str, int]) -> pd.DataFrame:
    rows = [{"split": "train", "group": g, "recon_mse": 0.01, "probe_correct": np.nan, "knn_correct": np.nan}
            for g, n in train.items() for _ in range(n)]
    return pd.concat([samples, pd.DataFrame(rows)], ignore_index=True)


def status(result: dict, check_id: str) -> str:
    return next(c["status"] for c in result["checks"] if c["id"] == check_id)


def test_interval_decisions_fail_only_beyond_and_pass_only_within_the_threshold():
    assert interval_decision(0.12, 0.30, 0.10) == "fail"
    assert interval_decision(0.00, 0.08, 0.10) == "pass"
    assert interval_decision(0.05, 0.15, 0.10) == "inconclusive"
    assert interval_decision(float("nan"), 0.1, 0.1) == "inconclusive"
    assert overall_status(["pass", "inconclusive"]) == "inconclusive" and overall_status(["pass", "fail"]) == "fail"
    assert overall_status([]) == "inconclusive"


def test_a_real_gap_fails_the_worse_group_and_names_it():
    samples = table({"group_a": 400, "group_b": 400}, {"group_a": 0.010, "group_b": 0.013},
                    {"group_a": 0.80, "group_b": 0.60}, seed=0)
    result = audit(with_training(samples, {"group_a": 90, "group_b": 10}), card(), SETTINGS)
    check = next(c for c in result["checks"] if c["id"] == "bias.reconstruction_error.group")
    assert check["status"] == "fail" and check["worst_group"] == "group_b"
    assert check["interval"][0] > 0.10 and check["interval"][0] < check["value"] < check["interval"][1]
    assert check["value"] == pytest.approx(0.3, abs=0.05)
    assert status(result, "bias.probe_accuracy.group") == "fail"
    assert status(result, "bias.representation.group") == "fail"
    groups = result["groupings"]["group"]["metrics"]["reconstruction_error"]["groups"]
    assert groups["group_a"]["gap_to_best"] == 0 and groups["group_b"]["ratio_to_best"] == pytest.approx(1.3, abs=0.05)
    assert result["status"] == "fail"


@pytest.mark.parametrize("seed", range(5))
def test_equal_groups_raise_no_alarm(seed: int):
    samples = table({"group_a": 300, "group_b": 300}, {"group_a": 0.01, "group_b": 0.01},
                    {"group_a": 0.7, "group_b": 0.7}, seed=seed)
    result = audit(with_training(samples, {"group_a": 50, "group_b": 50}), card(), SETTINGS)
    assert "fail" not in {c["status"] for c in result["checks"]}
    assert status(result, "bias.reconstruction_error.group") == "pass", "300 per group is enough to show it"


def test_small_groups_are_withheld_and_get_the_size_that_would_decide():
    samples = table({"group_a": 200, "group_b": 12}, {"group_a": 0.01, "group_b": 0.02},
                    {"group_a": 0.7, "group_b": 0.2}, seed=1)
    result = audit(samples, card(), SETTINGS)
    report = result["groupings"]["group"]
    assert report["insufficient_data"] == ["group_b"] and report["counts"]["group_b"] == 12
    for metric in report["metrics"].values():
        assert metric["groups"]["group_b"] == {"count": 12, "status": "insufficient data"}, "no values that single out"
    assert {c["status"] for c in result["checks"] if c["metric"] != "representation"} == {"inconclusive"}


def test_required_group_size_matches_the_normal_approximation():
    # two-sided 95%, power 80%: n = 2 (1.95996 + 0.84162)^2 (sigma / delta)^2 = 15.70 for sigma = delta
    assert required_group_size(1.0, 1.0, 0.95, 0.8) == 16
    assert required_group_size(0.5, 0.05, 0.95, 0.8) == 1570
    assert required_group_size(1.0, 0.0, 0.95, 0.8) is None


def test_intersections_of_two_attributes_are_audited():
    base = card().model_dump()
    base["sensitive_attributes"].append({"name": "age_band", "values": ["young", "old"], "description": "x"})
    two = DataCard.model_validate(base)
    samples = table({"group_a": 240, "group_b": 240}, {"group_a": 0.01, "group_b": 0.01},
                    {"group_a": 0.7, "group_b": 0.7}, seed=2)
    samples["age_band"] = np.where(np.arange(len(samples)) % 2, "young", "old")
    samples.loc[(samples["group"] == "group_b") & (samples["age_band"] == "old"), "recon_mse"] *= 1.5
    result = audit(samples, two, SETTINGS)
    assert list(result["groupings"]) == ["group", "age_band", "group x age_band"]
    intersection = next(c for c in result["checks"] if c["id"] == "bias.reconstruction_error.group x age_band")
    assert intersection["status"] == "fail" and intersection["worst_group"] == "group_b & old"


def test_audit_bias_stage_end_to_end(audited: Workspace):
    evaluated = audited
    report = json.loads((evaluated.root / "reports" / "bias" / "bias.json").read_text())
    samples = pd.read_parquet(evaluated.root / "data" / "eval" / "samples.parquet")
    unseen = samples[samples["split"].isin(["val", "test"])]
    assert report["evaluated"] == len(unseen)
    assert report["groupings"]["group"]["counts"] == unseen["group"].value_counts().to_dict()
    assert {c["metric"] for c in report["checks"]} == {"reconstruction_error", "probe_accuracy", "knn_accuracy",
                                                       "representation"}
    assert status(report, "bias.representation.group") == "fail", "the default data under-represents group_b"
    assert (evaluated.root / "reports" / "bias" / "group.png").is_file()
    assert "# Bias audit: synthetic" in (evaluated.root / "reports" / "bias" / "bias.md").read_text()
