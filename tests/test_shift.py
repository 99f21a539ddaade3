"""Domain-shift audit: corruptions, a calibrated drift test, and the planted held-out site end to end."""

from __future__ import annotations

import json

import numpy as np
import pytest

from pipeline.audit.shift import CORRUPTIONS, SEVERITIES, corrupt, domain_auc, mmd_test
from tests.conftest import Workspace


def textured(channels: int, seed: int = 0) -> np.ndarray:
    """Mid-grey images with texture, so no corruption saturates at severity 1."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:32, 0:32]
    wave = 0.5 + 0.2 * np.sin(x / 2.0 + y / 3.0)[None, :, :, None]
    return np.clip((wave + rng.normal(0, 0.05, (4, 32, 32, channels))) * 255, 0, 255).astype(np.uint8)


@pytest.mark.parametrize("channels", [1, 2, 3])
@pytest.mark.parametrize("name", list(CORRUPTIONS))
def test_corruptions_are_deterministic_and_damage_grows_with_severity(name: str, channels: int):
    images = textured(channels)
    damage = []
    for severity in SEVERITIES:
        corrupted = corrupt(images, name, severity, seed=0)
        assert corrupted.dtype == np.uint8 and corrupted.shape == images.shape
        assert np.array_equal(corrupted, corrupt(images, name, severity, seed=0)), "same seed, same pixels"
        damage.append(float(np.mean((corrupted.astype(float) - images) ** 2)))
    assert damage[0] > 0
    assert all(later >= earlier for earlier, later in zip(damage, damage[1:])), damage
    assert damage[-1] > 1.5 * damage[0], damage


def test_drift_test_false_positive_rate_stays_near_alpha_and_it_detects_a_shift():
    alpha, trials = 0.05, 60
    p_values = []
    for seed in range(trials):
        rng = np.random.default_rng(seed)
        x, y = rng.normal(size=(60, 8)), rng.normal(size=(60, 8))
        p_values.append(mmd_test(x, y, permutations=200, seed=seed)["p_value"])
    p_values = np.array(p_values)
    # under the null the permutation p-value is uniform: with 60 trials at alpha 0.05 we expect 3 rejections;
    # 8 or more happens with probability below 0.5%
    assert (p_values < alpha).sum() <= 7, p_values
    assert 0.35 < p_values.mean() < 0.65 and (p_values < 0.5).mean() == pytest.approx(0.5, abs=0.2)

    rng = np.random.default_rng(99)
    shifted = mmd_test(rng.normal(size=(60, 8)), rng.normal(0.7, 1, size=(60, 8)), permutations=200, seed=0)
    assert shifted["p_value"] < alpha


def test_domain_classifier_auc_is_chance_on_one_distribution_and_high_on_two():
    rng = np.random.default_rng(0)
    same = domain_auc(rng.normal(size=(200, 8)), rng.normal(size=(200, 8)), folds=5, seed=0)
    apart = domain_auc(rng.normal(size=(200, 8)), rng.normal(1.0, 1, size=(200, 8)), folds=5, seed=0)
    assert abs(same - 0.5) < 0.1 and apart > 0.9


def test_audit_shift_flags_the_held_out_site_and_not_the_in_distribution_split(audited: Workspace):
    evaluated = audited
    report = json.loads((evaluated.root / "reports" / "shift" / "shift.json").read_text())
    checks = {c["id"]: c for c in report["checks"]}
    assert checks["shift.drift.site_east"]["status"] == "fail", checks["shift.drift.site_east"]
    assert checks["shift.drift.in_distribution"]["status"] == "pass", checks["shift.drift.in_distribution"]
    assert report["drift"]["site_east"]["auc"] > report["drift"]["in_distribution (control)"]["auc"]
    assert {"shift.error.site_east", "shift.accuracy.site_east", "shift.corruptions"} <= set(checks)
    curves = report["corruptions"]["curves"]
    assert set(curves) == set(CORRUPTIONS) and all(len(curve) == 5 for curve in curves.values())
    assert report["domains"]["worst_domain"] in {"site_east"}
    for name in ("shift.md", "corruption_curves.png", "overtrust.png"):
        assert (evaluated.root / "reports" / "shift" / name).is_file()
