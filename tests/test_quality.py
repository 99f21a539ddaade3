"""Model quality (issue 27 item 0): the model against trivial baselines on the same unseen images, a release check."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from pydantic import ValidationError

from pipeline.audit.quality import quality_checks
from pipeline.audit.stats import Criterion, compare, decide, inconclusive_reason
from pipeline.contracts import AREAS, Check
from pipeline.params import ReportSettings
from pipeline.report.judge import decide_release
from pipeline.report.markdown import quality_statement

pytestmark = pytest.mark.fast  # the unit tier: `make test-fast`

SETTINGS = ReportSettings(max_memorization_gap=0.25, n_boot=200, max_n_boot=1600, advisory=["shift.drift.*"])
IDS = ["model.reconstruction.patch_mean", "model.probe.random_init", "model.probe.raw_pixels",
       "model.knn.random_init", "model.knn.raw_pixels"]


def samples(error_ratio: float, mae_accuracy: float, baseline_accuracy: float, n: int = 400,
            seed: int = 0) -> pd.DataFrame:
    """Unseen images (and training ones, which the checks ignore) whose model error is `error_ratio` times the
    patch-mean predictor's, and whose classifiers are right with the given probabilities; raw-pixel predictions for
    every third image only, as evaluate's seeded sample leaves them."""
    rng = np.random.default_rng(seed)
    patch_mean = rng.gamma(4, 0.01 / 4, n)
    table = {"split": ["val", "test", "train", "test"] * (n // 4), "label": rng.integers(0, 3, n),
             "recon_mse_patch_mean": patch_mean, "recon_mse": patch_mean * error_ratio * rng.lognormal(0, 0.1, n)}
    for method in ("probe", "knn"):
        table[f"{method}_correct"] = (rng.random(n) < mae_accuracy).astype(float)
        for baseline in ("random_init", "raw_pixels"):
            table[f"{method}_correct_{baseline}"] = (rng.random(n) < baseline_accuracy).astype(float)
        table[f"{method}_correct_raw_pixels"][np.arange(n) % 3 != 0] = np.nan
    frame = pd.DataFrame(table)
    train = frame["split"] == "train"
    frame.loc[train, [c for c in frame if c.endswith("_correct") or "_correct_" in c]] = np.nan
    return frame


def test_a_model_that_clearly_beats_its_baselines_passes_loses_fails_and_ties_is_inconclusive():
    better = quality_checks(samples(0.7, 0.8, 0.4), SETTINGS)
    assert [c.id for c in better] == IDS and {c.area for c in better} == {"model"}
    assert [c.status for c in better] == ["pass"] * 5, better
    worse = quality_checks(samples(1.3, 0.3, 0.7), SETTINGS)
    assert [c.status for c in worse] == ["fail"] * 5, worse
    tied = quality_checks(samples(1.0, 0.5, 0.5), SETTINGS)
    assert [c.status for c in tied] == ["inconclusive"] * 5, tied
    assert all(c.reason for c in tied), "an inconclusive check says why"

    reconstruction, probe = better[0], better[1]
    assert reconstruction.harmful == "higher" and probe.harmful == "lower"
    assert reconstruction.test == probe.test == "non-inferiority" and reconstruction.threshold == 0.0
    assert reconstruction.value == pytest.approx(-0.3, abs=0.02) and reconstruction.interval[1] < 0
    assert "wholly above 0 (pass) nor wholly below 0 (fail)" in tied[1].reason, "0, not -0"


def test_pairs_are_the_same_unseen_images_and_raw_pixels_only_where_its_sample_has_them():
    table = samples(0.7, 0.8, 0.4)
    checks = {c.id: c for c in quality_checks(table, SETTINGS)}
    unseen = table[table["split"] != "train"]
    assert f"same {len(unseen):,} unseen images" in checks["model.probe.random_init"].reference
    raw = unseen["probe_correct_raw_pixels"].notna()
    assert f"same {raw.sum():,} unseen images" in checks["model.probe.raw_pixels"].reference
    assert "left out of the pairs" in checks["model.probe.raw_pixels"].reference
    assert "sample only" in checks["model.probe.raw_pixels"].statistic
    expected = unseen.loc[raw, "probe_correct"].mean() - unseen.loc[raw, "probe_correct_raw_pixels"].mean()
    assert checks["model.probe.raw_pixels"].value == pytest.approx(expected)
    paired = compare(unseen["recon_mse_patch_mean"], unseen["recon_mse"], "relative",
                     Criterion(0.0, "higher", equivalence=False), SETTINGS, seed=[SETTINGS.seed, 1, 0], paired=True)
    assert checks["model.reconstruction.patch_mean"].interval == paired.interval, "a paired bootstrap"


def test_without_labels_the_classifier_checks_are_not_applicable_and_a_margin_moves_the_threshold():
    table = samples(0.7, 0.8, 0.4)
    table[[c for c in table if "_correct" in c]] = np.nan
    checks = quality_checks(table, SETTINGS)
    assert [c.status for c in checks] == ["pass"] + ["not_applicable"] * 4
    assert "no labels" in checks[1].reason

    demanding = SETTINGS.model_copy(update={"min_margin_over_baselines": SETTINGS.min_margin_over_baselines.model_copy(
        update={"reconstruction": 0.5, "probe": 0.5})})
    checks = {c.id: c for c in quality_checks(samples(0.7, 0.8, 0.4), demanding)}
    assert checks["model.reconstruction.patch_mean"].status == "fail", "30% better, not the 50% demanded"
    assert checks["model.reconstruction.patch_mean"].threshold == -0.5
    assert checks["model.probe.random_init"].status == "fail" and checks["model.knn.random_init"].status == "pass"
    with pytest.raises(ValidationError, match="finite"):
        ReportSettings(max_memorization_gap=0.25, min_margin_over_baselines={"probe": float("nan")})


def test_a_zero_threshold_is_a_superiority_test_an_interval_touching_zero_does_not_pass():
    for harmful in ("higher", "lower"):
        criterion = Criterion(0.0, harmful, equivalence=False)
        assert decide(0.0, 0.0, criterion) == "inconclusive"
        assert decide(*((-0.1, 0.0) if harmful == "higher" else (0.0, 0.1)), criterion) == "inconclusive"
        assert decide(*((-0.1, -0.01) if harmful == "higher" else (0.01, 0.1)), criterion) == "pass"
        assert decide(*((0.01, 0.1) if harmful == "higher" else (-0.1, -0.01)), criterion) == "fail"
        assert decide(*((0.0, 0.1) if harmful == "higher" else (-0.1, 0.0)), criterion) == "inconclusive"
    lower = Criterion(0.0, "lower", equivalence=False)
    assert inconclusive_reason(-0.1, 0.1, [0.001, 0.001], lower, 1000).startswith(
        "the interval [-0.1000, 0.1000] lies neither wholly above 0 (pass) nor wholly below 0 (fail)")
    assert "of 0 after" in inconclusive_reason(-0.1, 0.0005, [0.001, 0.001], lower, 1000)
    same = np.r_[np.ones(50), np.zeros(50)]
    assert compare(same, same, "difference", lower, SETTINGS, seed=0, paired=True).status == "inconclusive", \
        "a model exactly as good as its baseline does not beat it"
    assert decide(-0.1, 0.1, Criterion(0.1, "higher")) == "pass", "a tolerance still includes its edge"


def test_a_failing_model_check_blocks_the_release_and_the_report_says_so_first():
    failed = quality_checks(samples(1.3, 0.3, 0.7), SETTINGS)
    others = [Check(id="bias.x", area="bias", status="pass", statistic="x", detail="x")]
    release = decide_release(failed + others, SETTINGS)
    assert release.decision == "blocked" and release.blocked_by == IDS
    assert list(release.areas) == list(AREAS) and AREAS[0] == "model" and release.areas["model"].status == "fail"
    statement = quality_statement(release.checks)
    assert statement[0].startswith("**The model does not beat trivial baselines on images it never saw**")
    assert "`model.probe.random_init`" in statement[0] and "(fail)" in statement[0]

    tied = decide_release(quality_checks(samples(1.0, 0.5, 0.5), SETTINGS) + others, SETTINGS)
    assert tied.decision == "blocked", "a model that cannot be shown to beat its baselines is not released"
    assert "(inconclusive)" in quality_statement(tied.checks)[0]
    passed = decide_release(quality_checks(samples(0.7, 0.8, 0.4), SETTINGS) + others, SETTINGS)
    assert passed.decision == "eligible" and quality_statement(passed.checks) == []
