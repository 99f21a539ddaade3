"""The statistics every audit check shares: signed comparisons, equivalence decisions, Monte-Carlo error,
decisions that do not depend on the resampling seed, and what each decision catches at its sizes (its operating
characteristics), checked against simulations of the decision itself."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.audit.stats import (
    Criterion,
    adjusted_confidence,
    bound_mc_error,
    compare,
    decide,
    operating,
    p_value_mc_error,
    standard_error,
)
from pipeline.params import ReportSettings

pytestmark = pytest.mark.fast  # the unit tier: `make test-fast`

SETTINGS = ReportSettings(max_memorization_gap=0.25, n_boot=1000, max_n_boot=32000)
EQUIVALENCE = Criterion(0.10, "higher")
ACCURACY = Criterion(0.05, "lower")
ONE_SIDED = Criterion(0.25, "higher", equivalence=False)


def test_equivalence_passes_only_within_the_band_and_fails_only_beyond_it_in_the_harmful_direction():
    assert decide(-0.05, 0.08, EQUIVALENCE) == "pass"
    assert decide(0.12, 0.30, EQUIVALENCE) == "fail"
    assert decide(0.05, 0.15, EQUIVALENCE) == "inconclusive"
    assert decide(-0.30, -0.12, EQUIVALENCE) == "inconclusive", "better than the reference: not a harm, not equal"
    assert decide(-0.12, 0.05, EQUIVALENCE) == "inconclusive"
    assert decide(float("nan"), 0.1, EQUIVALENCE) == "inconclusive"
    # accuracy: lower is worse
    assert decide(-0.20, -0.06, ACCURACY) == "fail" and decide(0.06, 0.20, ACCURACY) == "inconclusive"
    assert decide(-0.04, 0.03, ACCURACY) == "pass"
    # one-sided (memorization, held-out domains): doing better is no harm
    assert decide(-0.40, 0.20, ONE_SIDED) == "pass" and decide(0.26, 0.40, ONE_SIDED) == "fail"
    assert decide(0.20, 0.30, ONE_SIDED) == "inconclusive"
    lower = Criterion(0.10, "lower", equivalence=False)
    assert decide(-0.08, 0.50, lower) == "pass" and decide(-0.30, -0.11, lower) == "fail"


def test_confidence_is_adjusted_for_the_number_of_comparisons():
    assert adjusted_confidence(0.95, 1, "bonferroni") == 0.95
    assert adjusted_confidence(0.95, 4, "bonferroni") == pytest.approx(0.9875)
    assert adjusted_confidence(0.95, 4, "sidak") == pytest.approx(0.95 ** 0.25)
    assert adjusted_confidence(0.95, 4, "none") == 0.95


def test_the_mc_error_of_a_percentile_bound_covers_its_spread_over_seeds():
    """The 2.5% point of B draws from N(0, 1), repeated over 2,000 seeds: its spread is what bound_mc_error
    predicts from one draw (the half-width of a 99.9% interval is 3.29 standard errors)."""
    rng = np.random.default_rng(0)
    draws = rng.normal(size=(2000, 2000))
    bounds = np.percentile(draws, 2.5, axis=1)
    errors = np.array([bound_mc_error(row, 0.025) for row in draws[:200]])
    assert np.median(errors) / 3.29 == pytest.approx(bounds.std(), rel=0.15)
    assert np.mean(np.abs(bounds - (-1.959964)) <= np.median(errors)) > 0.995
    assert p_value_mc_error(0.05, 10_000) == pytest.approx(3.2905 * np.sqrt(0.05 * 0.95 / 10_000), rel=1e-4)


def gamma(mean: float, n: int, rng: np.random.Generator) -> np.ndarray:
    return rng.gamma(4, mean / 4, n)


def test_signed_intervals_of_equal_groups_reach_below_zero_and_pass_equivalence():
    """An absolute gap |a - b| can never have an interval reaching zero; the signed difference can, so a truly
    equal model can show a clean pass."""
    rng = np.random.default_rng(1)
    result = compare(gamma(0.01, 2000, rng), gamma(0.01, 2000, rng), "relative", EQUIVALENCE, SETTINGS, seed=0)
    low, high = result.interval
    assert low < 0 < high and result.status == "pass"
    assert result.test == "equivalence" and result.harmful == "higher"
    assert result.adjustment.model_dump() == {"method": "none", "comparisons": 1, "family_confidence": 0.95}
    assert len(result.mc_error) == 2 and all(0 < e < 0.01 for e in result.mc_error)
    assert result.reason is None


def test_the_standard_error_at_a_planted_gap_follows_the_normal_formulas():
    rng = np.random.default_rng(2)
    a, b = rng.normal(0.7, 0.2, 800), rng.normal(0.7, 0.3, 500)
    assert standard_error(a, b, "difference", False, 0.3) == pytest.approx(
        np.sqrt(a.var(ddof=1) / 800 + b.var(ddof=1) / 500))
    hits, misses = np.ones(60), np.zeros(40)
    reference = np.concatenate([hits, misses])  # accuracy 0.6: a planted gap of -0.1 has variance 0.5 x 0.5
    assert standard_error(reference, reference, "difference", False, -0.1) == pytest.approx(
        np.sqrt(0.24 / 99 * 100 / 100 * 100 / 100 + 0.25 / 100), rel=0.02)
    errors = gamma(0.01, 400, rng)
    at_zero = standard_error(errors, errors, "relative", False, 0.0)
    assert standard_error(errors, errors, "relative", False, 1.0) == pytest.approx(2 * at_zero), \
        "a ratio's error scales with the ratio"


def test_operating_characteristics_state_the_gate_at_these_sizes():
    """The issue's case: accuracy 0.5, 100 against 858 images, tolerance 0.05: a pass is out of reach, and a fail at
    twice the tolerance is rare; the sizes that would change that are stated."""
    rng = np.random.default_rng(3)
    reference, sample = (rng.random(858) < 0.5).astype(float), (rng.random(100) < 0.5).astype(float)
    result = operating(reference, sample, "difference", ACCURACY, 0.95, False, float(sample.mean() - reference.mean()))
    points = {p.label: p for p in result.points}
    assert [p.value for p in result.points] == [0.0, -0.05, -0.10]
    assert points["no gap"].p_pass < 0.01
    assert points["tolerance"].p_fail == pytest.approx(0.025, abs=0.003), "at the tolerance: the interval's tail"
    assert 0.05 < points["twice the tolerance"].p_fail < 0.25
    assert result.for_pass.sample > 1000 and result.for_pass.reference == pytest.approx(
        result.for_pass.sample * 8.58, rel=0.01)
    assert result.for_fail.sample < result.for_pass.sample
    superiority = operating(reference, sample, "difference", Criterion(0.0, "lower", equivalence=False), 0.95,
                            False, 0.1)
    assert [p.label for p in superiority.points] == ["no gap", "observed"] and superiority.for_pass is None


def simulated(reference_draw, sample_draw, statistic: str, criterion: Criterion, settings, replications: int,
              paired: bool = False) -> dict[str, float]:
    """The share of each outcome of `compare` itself over fresh samples of the same populations."""
    outcomes = [compare(reference_draw(np.random.default_rng([7, r])), sample_draw(np.random.default_rng([8, r])),
                        statistic, criterion, settings, seed=r, paired=paired).status for r in range(replications)]
    return {status: outcomes.count(status) / replications for status in ("pass", "fail")}


def close(predicted: float, observed: float, replications: int) -> bool:
    """Within three binomial standard errors of the simulation, and 0.04 for the approximation itself."""
    return abs(predicted - observed) <= 3 * np.sqrt(max(predicted * (1 - predicted), 0.01) / replications) + 0.04


# the decision as it runs, but for a lower cap on the resamples (a bound within its Monte-Carlo error of the threshold
# is inconclusive, which the approximation leaves out: the cap keeps that band narrow)
FAST = ReportSettings(max_memorization_gap=0.25, n_boot=500, max_n_boot=8000)
REPLICATIONS = 100


@pytest.mark.parametrize("n_reference,n_sample", [(858, 100), (479, 479)])
def test_stated_operating_characteristics_agree_with_simulations_of_the_accuracy_decision(n_reference, n_sample):
    """Accuracy 0.5 in the reference; the sample's true accuracy planted at no gap, the tolerance and twice it. The
    probabilities `operating` states from one run's values are what repeated runs of the decision show."""
    one = np.random.default_rng(11)
    reference, sample = (one.random(n_reference) < 0.5).astype(float), (one.random(n_sample) < 0.5).astype(float)
    stated = operating(reference, sample, "difference", ACCURACY, 0.95, False, 0.0)
    for point in stated.points:
        shown = simulated(lambda rng: (rng.random(n_reference) < 0.5).astype(float),
                          lambda rng, v=point.value: (rng.random(n_sample) < 0.5 + v).astype(float),
                          "difference", ACCURACY, FAST, REPLICATIONS)
        assert close(point.p_fail, shown["fail"], REPLICATIONS), (point, shown)
        assert close(point.p_pass, shown["pass"], REPLICATIONS), (point, shown)


def test_stated_operating_characteristics_agree_with_simulations_of_a_relative_error_decision():
    """Reconstruction errors (gamma, skewed) of 400 against 150 images, equivalence at ±0.10 on error ratio - 1."""
    one = np.random.default_rng(12)
    reference, sample = gamma(0.01, 400, one), gamma(0.01, 150, one)
    stated = operating(reference, sample, "relative", EQUIVALENCE, 0.95, False, 0.0)
    for point in stated.points:
        shown = simulated(lambda rng: gamma(0.01, 400, rng), lambda rng, v=point.value: gamma(0.01 * (1 + v), 150, rng),
                          "relative", EQUIVALENCE, FAST, REPLICATIONS)
        assert close(point.p_fail, shown["fail"], REPLICATIONS), (point, shown)
        assert close(point.p_pass, shown["pass"], REPLICATIONS), (point, shown)


def test_a_small_skewed_group_keeps_its_coverage():
    """Memorization's case: a ratio of mean errors over 100 unseen against 200 training images of one group, errors
    skewed (log-normal). The interval (BCa at these sizes) covers the true ratio in at least 93% of samples."""
    replications, covered = 300, 0
    for r in range(replications):
        rng = np.random.default_rng([13, r])
        result = compare(rng.lognormal(0, 0.6, 200), rng.lognormal(0, 0.6, 100), "relative", ONE_SIDED, FAST, seed=r)
        covered += result.interval[0] <= 0 <= result.interval[1]
    assert result.interval_method == "BCa"
    assert covered / replications >= 0.93


BORDERLINE_SEEDS = range(10)


def borderline(multiplier: float) -> tuple[np.ndarray, np.ndarray]:
    """Training and unseen errors whose memorization upper bound (unseen / training - 1) lies near 0.25."""
    rng = np.random.default_rng(0)
    return gamma(0.01, 300, rng), gamma(0.01, 200, rng) * multiplier


def test_a_borderline_bound_decides_the_same_under_every_bootstrap_seed():
    """As in the issue: an upper bound about 0.006 below a 0.25 threshold, whose fixed 1,000-resample decision
    depends on the seed. Adapted resamples decide it the same way under every seed."""
    seen, unseen = borderline(1.18)
    fixed = SETTINGS.model_copy(update={"max_n_boot": 1000})
    naive = {decide(*compare(seen, unseen, "relative", ONE_SIDED, fixed, seed=s).interval, ONE_SIDED)
             for s in BORDERLINE_SEEDS}
    assert naive == {"pass", "inconclusive"}, "the case is borderline at 1,000 resamples"
    results = [compare(seen, unseen, "relative", ONE_SIDED, SETTINGS, seed=s) for s in BORDERLINE_SEEDS]
    assert {r.status for r in results} == {"pass"}, results
    assert max(r.n_boot for r in results) > 1000, "resamples were added where the bound was close"
    for r in results:
        assert 0.25 - r.interval[1] > r.mc_error[1], "decided only once the bound is clear of its MC error"


def test_a_bound_on_the_threshold_is_inconclusive_under_every_seed_and_says_why():
    seen, unseen = borderline(1.1875)
    results = [compare(seen, unseen, "relative", ONE_SIDED, SETTINGS, seed=s) for s in BORDERLINE_SEEDS]
    assert {r.status for r in results} == {"inconclusive"}
    for r in results:
        assert abs(r.interval[1] - 0.25) <= r.mc_error[1] and r.n_boot == SETTINGS.max_n_boot
        assert "within its Monte-Carlo error" in r.reason and "upper bound" in r.reason


def test_a_statistic_undefined_on_its_resamples_is_inconclusive_not_an_error():
    result = compare(np.zeros(40), np.ones(40), "relative", EQUIVALENCE, SETTINGS, seed=0)
    assert result.status == "inconclusive" and result.operating.for_pass is None
    assert "undefined" in result.reason and result.n_boot == SETTINGS.n_boot


def test_a_paired_ratio_resamples_each_unit_with_its_pair():
    """The corruption check: each image's clean error and its corrupted error are one pair. The ratio of means is
    the statistic; resampling the pairs together keeps their correlation, so the interval is narrower than
    resampling each side on its own, and both contain the value."""
    rng = np.random.default_rng(6)
    clean = gamma(0.01, 300, rng)
    corrupted = clean * rng.normal(2.0, 0.1, 300)  # each image about twice as bad, tightly tied to its clean error
    threshold = Criterion(3.0, "higher", equivalence=False)
    paired = compare(clean, corrupted, "ratio", threshold, SETTINGS, seed=0, paired=True)
    apart = compare(clean, corrupted, "ratio", threshold, SETTINGS, seed=0)
    assert paired.value == pytest.approx(corrupted.mean() / clean.mean())
    assert paired.interval[0] < paired.value < paired.interval[1] and paired.status == "pass"
    assert paired.interval[1] - paired.interval[0] < 0.5 * (apart.interval[1] - apart.interval[0])
    worse = compare(clean, clean * 4, "ratio", threshold, SETTINGS, seed=0, paired=True)
    assert worse.status == "fail" and worse.test == "non-inferiority"
