"""Statistics every audit check shares, so bias, shift and memorization decide the same way.

- `compare`: a signed statistic of a sample against a stated reference (difference, relative difference or ratio
  of means), with a bootstrap interval (each side resampled on its own, or, for paired measurements of the same
  units, the pairs resampled together), adjusted for multiple comparisons. The interval is BCa (bias-corrected and
  accelerated) while every side holds at most `BCA_MAX_N` values: a ratio of means over a group of a hundred
  images is skewed, and the percentile interval then covers 0.91-0.92 where BCa keeps 0.93 or more
  (tests/test_stats.py); above that the percentile interval, whose coverage is nominal at such sizes and whose
  cost stays linear (BCa's jackknife is quadratic). It is the one bootstrap of a difference in the pipeline:
  bias, shift (domains and corruptions), memorization and the model-quality checks all call it.
- `decide`: an equivalence test (pass only when the whole interval lies within ±threshold) or a one-sided
  non-inferiority test (where doing better is no harm); fail only when the whole interval lies beyond the
  threshold in the harmful direction; otherwise inconclusive.
- Monte-Carlo stability: a percentile bound is an order statistic of the bootstrap distribution, so its
  Monte-Carlo error follows from the binomial distribution of its rank. When a bound lies within that error
  of a threshold (another resampling seed could decide differently), the resamples are doubled up to a cap;
  a bound still that close leaves the check inconclusive, with a reason that says so.
- `operating`: what the decision itself catches at these sizes: P(fail) and P(pass) if the true statistic were
  at no gap, at the tolerance and at twice it, and the images that an 80% pass at no gap and an 80% fail at twice
  the tolerance would need. A normal approximation to the decision (the interval as estimate ± z x standard
  error, the standard error from the run's own per-record values planted at each gap); tests/test_stats.py
  checks it against simulations of `compare` itself.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal, get_args

import numpy as np

from pipeline.contracts import Adjustment as AdjustmentInfo
from pipeline.contracts import Comparison, Needed, Operating, OperatingPoint
from pipeline.params import Adjustment, BootstrapSettings

MC_LEVEL = 0.999  # the Monte-Carlo error of a bound: the half-width of its 99.9% Monte-Carlo interval
BCA_MAX_N = 5000  # BCa intervals while every side holds at most this many values (its jackknife is quadratic)
TARGET = 0.8  # the probability of the intended outcome that the sizes `operating` names would give


def _difference(reference, sample, axis=-1):
    return sample.mean(axis=axis) - reference.mean(axis=axis)


def _relative(reference, sample, axis=-1):
    return sample.mean(axis=axis) / reference.mean(axis=axis) - 1


def _ratio(reference, sample, axis=-1):
    return sample.mean(axis=axis) / reference.mean(axis=axis)


STATISTICS = {"difference": _difference, "relative": _relative, "ratio": _ratio}


@dataclass(frozen=True)
class Criterion:
    """What a signed statistic is judged against. `threshold` > 0 is the tolerance (0: none, a superiority test,
    which an interval that reaches 0 does not pass; below 0: a margin to beat the reference by); `harmful` the
    direction in which a difference hurts; `equivalence` whether a pass needs the interval within ±threshold (a
    disparity between groups) or only short of +threshold in the harmful direction (non-inferiority: doing better
    than the reference is no harm)."""

    threshold: float
    harmful: Literal["higher", "lower"]
    equivalence: bool = True

    @property
    def test(self) -> str:
        return "equivalence" if self.equivalence else "non-inferiority"

    def harm(self, low: float, high: float) -> tuple[float, float]:
        """The interval oriented so that larger is more harmful."""
        return (low, high) if self.harmful == "higher" else (-high, -low)


def decide(low: float, high: float, criterion: Criterion) -> str:
    """pass | fail | inconclusive for a signed interval (see the module docstring)."""
    if any(math.isnan(v) for v in (low, high)):
        return "inconclusive"
    low, high = criterion.harm(low, high)
    if low > criterion.threshold:
        return "fail"
    within = high < 0 if criterion.threshold == 0 else high <= criterion.threshold
    if within and (not criterion.equivalence or low >= -criterion.threshold):
        return "pass"
    return "inconclusive"


def adjusted_confidence(confidence: float, comparisons: int, method: str) -> float:
    """The per-comparison confidence that keeps `confidence` for the family of `comparisons` intervals."""
    if comparisons <= 1 or method == "none":
        return confidence
    if method == "bonferroni":
        return 1 - (1 - confidence) / comparisons
    if method == "sidak":
        return confidence ** (1 / comparisons)
    raise ValueError(f"unknown adjustment {method!r}; choose one of {', '.join(get_args(Adjustment))}")


def bound_mc_error(distribution: np.ndarray, quantile: float) -> float:
    """Half-width of the 99.9% Monte-Carlo interval of a percentile bound (order-statistic method): the number
    of resamples below the true `quantile` of the bootstrap distribution is Binomial(B, quantile), so the
    bound lies, but for one seed in a thousand, between the order statistics at that count's 0.05% and 99.95%
    points."""
    from scipy.stats import binom

    ordered = np.sort(distribution)
    last = len(ordered) - 1
    low, high = binom.ppf([(1 - MC_LEVEL) / 2, (1 + MC_LEVEL) / 2], len(ordered), quantile)
    return float(ordered[int(min(max(high, 0), last))] - ordered[int(min(max(low - 1, 0), last))]) / 2


def p_value_mc_error(p_value: float, permutations: int) -> float:
    """Half-width of the 99.9% Monte-Carlo interval of a permutation p-value (binomial, normal approximation)."""
    from scipy.stats import norm

    return float(norm.ppf((1 + MC_LEVEL) / 2) * math.sqrt(p_value * (1 - p_value) / permutations))


def settled(low: float, high: float, errors: Sequence[float], criterion: Criterion) -> bool:
    """True when moving either bound by its Monte-Carlo error cannot change the decision."""
    status = decide(low, high, criterion)
    return all(decide(low + a * errors[0], high + b * errors[1], criterion) == status
               for a in (-1, 1) for b in (-1, 1))


def edges(criterion: Criterion) -> tuple[float, ...]:
    """The thresholds a signed interval is compared with: ±threshold, or the harmful side only."""
    t = criterion.threshold
    if criterion.equivalence:
        return (0.0 - t, t)
    return (t,) if criterion.harmful == "higher" else (0.0 - t,)  # 0.0 - t: a zero threshold reads 0, not -0


def inconclusive_reason(low: float, high: float, errors: Sequence[float], criterion: Criterion,
                        n_boot: int) -> str:
    if any(math.isnan(v) for v in (low, high, *errors)):
        return "the statistic is undefined on this sample or on some of its resamples"
    if not settled(low, high, errors, criterion):
        name, bound, error, edge = min(((name, bound, error, edge) for name, bound, error in
                                        (("lower", low, errors[0]), ("upper", high, errors[1]))
                                        for edge in edges(criterion)), key=lambda b: abs(b[1] - b[3]))
        return (f"the {name} bound {bound:.4f} lies within its Monte-Carlo error (±{error:.4f}) of {edge:g} after "
                f"{n_boot} resamples: the resampling seed, not the data, would decide")
    t = criterion.threshold
    if criterion.equivalence:
        band = f"within ±{t:g}"
    else:
        band = f"below {t:g}" if criterion.harmful == "higher" else f"above {0.0 - t:g}"
    beyond = f"above {t:g}" if criterion.harmful == "higher" else f"below {0.0 - t:g}"
    return (f"the interval [{low:.4f}, {high:.4f}] lies neither wholly {band} (pass) nor wholly {beyond} (fail): "
            "more data would decide")


# ---------------------------------------------------------------- what the decision catches at these sizes

NO_GAP = {"difference": 0.0, "relative": 0.0, "ratio": 1.0}


def _binary(values: np.ndarray) -> bool:
    return bool(len(values)) and bool(np.isin(values, (0.0, 1.0)).all())


def standard_error(reference: np.ndarray, sample: np.ndarray, statistic: str, paired: bool, value: float) -> float:
    """The standard error of `statistic` if its true value were `value`, from the run's own per-record values with
    the sample planted at that value: shifted (a difference of means; 0/1 values keep a binomial variance at the
    planted rate) or scaled (a ratio of means, whose coefficients of variation a scaling keeps: the delta method).
    Paired values are planted the same way on the sample side and keep their pairing."""
    n_ref, n = len(reference), len(sample)
    if n < 2 or n_ref < 2:
        return math.nan
    if statistic == "difference":
        if paired:
            return float(np.std(sample - reference, ddof=1) / math.sqrt(n))
        var_sample = float(np.var(sample, ddof=1))
        if _binary(sample) and _binary(reference):
            rate = min(max(float(reference.mean()) + value, 0.0), 1.0)
            var_sample = rate * (1 - rate)
        return math.sqrt(np.var(reference, ddof=1) / n_ref + var_sample / n)
    ratio = value + 1 if statistic == "relative" else value
    mean_ref, mean_sample = float(reference.mean()), float(sample.mean())
    if not mean_ref or not mean_sample:
        return math.nan
    if paired:
        planted = sample * (ratio * mean_ref / mean_sample)
        return float(np.std(planted - ratio * reference, ddof=1) / (math.sqrt(n) * abs(mean_ref)))
    cv_ref, cv_sample = np.std(reference, ddof=1) / mean_ref, np.std(sample, ddof=1) / mean_sample
    return float(abs(ratio) * math.sqrt(cv_ref ** 2 / n_ref + cv_sample ** 2 / n))


def outcome_probabilities(value: float, error: float, criterion: Criterion, z: float) -> tuple[float, float]:
    """(P(pass), P(fail)) of `decide` on the interval estimate ± z x error, the estimate normal around `value`."""
    from scipy.special import ndtr  # the normal CDF, without scipy.stats' per-call overhead

    harm = value if criterion.harmful == "higher" else -value
    t = criterion.threshold
    if error == 0:  # every record alike: the estimate is the true value
        inside = harm < t and (not criterion.equivalence or harm > -t)
        return float(inside), float(harm > t)
    if not error > 0:
        return math.nan, math.nan
    p_fail = float(ndtr((harm - t) / error - z))
    p_pass = float(ndtr((t - harm) / error - z))
    if criterion.equivalence:
        p_pass = max(p_pass - float(ndtr((-t - harm) / error + z)), 0.0)
    return p_pass, p_fail


def gaps(statistic: str, criterion: Criterion, observed: float) -> list[tuple[str, float]]:
    """The true values the operating characteristics are stated at: no gap, the tolerance and twice it in the
    harmful direction; a check whose tolerance is no gap at all (beating a baseline) is stated at no gap and at
    the value observed."""
    null = NO_GAP[statistic]
    sign = 1 if criterion.harmful == "higher" else -1
    at = criterion.threshold if statistic == "ratio" else null + sign * criterion.threshold
    if at == null:
        return [("no gap", null), ("observed", observed)]
    return [("no gap", null), ("tolerance", at), ("twice the tolerance", null + 2 * (at - null))]


def _scale_for(probability, target: float) -> float | None:
    """The smallest factor k on every side's size with probability(k) >= target (bisection on log k)."""
    low, high = 1e-3, 1e5
    if not probability(high) >= target:
        return None
    if probability(low) >= target:
        return low
    for _ in range(60):
        middle = math.sqrt(low * high)
        low, high = (low, middle) if probability(middle) >= target else (middle, high)
    return high


def operating(reference: np.ndarray, sample: np.ndarray, statistic: str, criterion: Criterion, confidence: float,
              paired: bool, observed: float) -> Operating:
    """What this decision catches at these sizes (see the module docstring): P(pass) and P(fail) at each of
    `gaps`, and the sizes for a TARGET pass at no gap and a TARGET fail at twice the tolerance, every side scaled
    alike (for a paired check, the pairs)."""
    from scipy.special import ndtri

    z = float(ndtri((1 + confidence) / 2))
    points = []
    for label, value in gaps(statistic, criterion, observed):
        p_pass, p_fail = outcome_probabilities(value, standard_error(reference, sample, statistic, paired, value),
                                               criterion, z)
        points.append(OperatingPoint(label=label, value=value, p_pass=p_pass, p_fail=p_fail))

    def needed(value: float, index: int) -> Needed | None:
        error = standard_error(reference, sample, statistic, paired, value)
        scale = _scale_for(lambda k: outcome_probabilities(value, error / math.sqrt(k), criterion, z)[index], TARGET)
        if scale is None or math.isnan(error):
            return None
        return Needed(sample=math.ceil(scale * len(sample)), reference=math.ceil(scale * len(reference)))

    labels = dict(gaps(statistic, criterion, observed))
    return Operating(
        points=points, standard_error=standard_error(reference, sample, statistic, paired, observed),
        n_reference=len(reference), n_sample=len(sample), paired=paired,
        for_pass=needed(labels["no gap"], 0) if "tolerance" in labels else None,
        for_fail=needed(labels["twice the tolerance"], 1) if "tolerance" in labels else None,
        method=f"normal approximation to this decision: the {confidence:.2%} interval as estimate ± {z:.3f} x "
               "standard error, the estimate normal around the true value; the standard error from this run's "
               "per-record values with the sample planted at each true value (shifted for a difference, scaled for "
               "a ratio); sizes scale every side alike. Checked against simulations of the decision in "
               "tests/test_stats.py")


def settle_sentence(operating: Operating | None) -> str:
    """One sentence on what would settle an inconclusive check."""
    if operating is None or (operating.for_pass is None and operating.for_fail is None):
        return ""
    parts = []
    if operating.for_pass is not None:
        parts.append(f"{operating.for_pass.sample} images on the compared side "
                     f"(reference {operating.for_pass.reference}) "
                     f"would pass it with {TARGET:.0%} probability if there were no gap")
    if operating.for_fail is not None:
        parts.append(f"{operating.for_fail.sample} (reference {operating.for_fail.reference}) would fail it with "
                     f"{TARGET:.0%} probability at twice the tolerance")
    return "; ".join(parts) + f" (now {operating.n_sample} and {operating.n_reference})"


def mean_interval(values: np.ndarray, confidence: float, n_boot: int, seed: int | Sequence[int]) -> tuple[float, float]:
    """A bootstrap interval of one group's mean, by the same method as the comparisons (BCa, or percentile above
    BCA_MAX_N values): what a group's own value is known to, not a decision."""
    import warnings

    from scipy.stats import bootstrap

    values = np.asarray(values, dtype=np.float64)
    values = values[~np.isnan(values)]
    if len(values) < 2 or np.ptp(values) == 0:  # every resample the same: the mean is exact
        return (float(values.mean()),) * 2 if len(values) else (math.nan, math.nan)
    method = "BCa" if len(values) <= BCA_MAX_N else "percentile"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = bootstrap((values,), np.mean, n_resamples=n_boot, batch=1000, vectorized=True,
                           confidence_level=confidence, method=method, rng=np.random.default_rng(seed))
    return float(result.confidence_interval.low), float(result.confidence_interval.high)


def compare(reference: np.ndarray, sample: np.ndarray, statistic: str, criterion: Criterion,
            settings: BootstrapSettings, seed: int | Sequence[int], comparisons: int = 1,
            adjustment: Adjustment = "none", paired: bool = False) -> Comparison:
    """`statistic` ("difference": mean(sample) - mean(reference); "relative": mean(sample) / mean(reference) - 1;
    "ratio": mean(sample) / mean(reference)) with a bootstrap interval (BCa, or percentile above BCA_MAX_N values
    a side) at the confidence adjusted for `comparisons`, decided against `criterion`. Each side is resampled on
    its own, unless `paired` (sample[i] and reference[i] measure the same unit, which is then resampled as a pair).
    Resamples start at settings.n_boot and double while a bound sits within its Monte-Carlo error of the threshold,
    up to settings.max_n_boot."""
    import warnings

    from scipy.stats import bootstrap

    reference = np.asarray(reference, dtype=np.float64)
    sample = np.asarray(sample, dtype=np.float64)
    if paired:
        kept = ~(np.isnan(reference) | np.isnan(sample))
        reference, sample = reference[kept], sample[kept]
    else:
        reference, sample = reference[~np.isnan(reference)], sample[~np.isnan(sample)]
    function = STATISTICS[statistic]
    confidence = adjusted_confidence(settings.confidence, comparisons, adjustment)
    method = "BCa" if max(len(reference), len(sample)) <= BCA_MAX_N else "percentile"
    rng = np.random.default_rng(seed)
    with np.errstate(divide="ignore", invalid="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a degenerate BCa interval is NaN, and inconclusive below
        value = float(function(reference, sample))
        result, added = None, settings.n_boot
        while True:
            result = bootstrap((reference, sample), function, n_resamples=added, batch=1000, vectorized=True,
                               paired=paired, confidence_level=confidence, method=method,
                               bootstrap_result=result, rng=rng)
            distribution = result.bootstrap_distribution
            low, high = (float(v) for v in (result.confidence_interval.low, result.confidence_interval.high))
            if np.isfinite(distribution).all() and np.ptp(distribution) == 0:  # no spread: BCa's NaN means exact
                low = high = float(distribution[0])
            n_boot = len(distribution)
            finite = bool(np.isfinite(distribution).all()) and not math.isnan(low) and not math.isnan(high)
            # a bound is the order statistic at its (for BCa: adjusted) level of the bootstrap distribution
            errors = [bound_mc_error(distribution, float(np.mean(distribution < bound))) if finite else math.nan
                      for bound in (low, high)]
            if not finite or settled(low, high, errors, criterion) or n_boot >= settings.max_n_boot:
                break
            added = min(n_boot, settings.max_n_boot - n_boot)
    status = decide(low, high, criterion) if finite and settled(low, high, errors, criterion) else "inconclusive"
    characteristics = operating(reference, sample, statistic, criterion, confidence, paired, value)
    reason = None
    if status == "inconclusive":
        settle = settle_sentence(characteristics)
        reason = inconclusive_reason(low, high, errors, criterion, n_boot) + (f"; {settle}" if settle else "")
    return Comparison(
        status=status, value=value, interval=(low, high), confidence=confidence,
        adjustment=AdjustmentInfo(method=adjustment, comparisons=comparisons, family_confidence=settings.confidence),
        mc_error=tuple(errors), n_boot=n_boot, interval_method=method, test=criterion.test,
        harmful=criterion.harmful, operating=characteristics, reason=reason)
