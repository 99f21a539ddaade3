"""Statistics every audit check shares, so bias, shift and memorization decide the same way.

- `compare`: a signed statistic of a sample against a stated reference (difference, relative difference or ratio
  of means), with a percentile bootstrap interval (each side resampled on its own, or, for paired measurements of
  the same units, the pairs resampled together), adjusted for multiple comparisons. It is the one bootstrap of a
  difference in the pipeline: bias, shift (domains and corruptions) and memorization all call it.
- `decide`: an equivalence test (pass only when the whole interval lies within ±threshold) or a one-sided
  non-inferiority test (where doing better is no harm); fail only when the whole interval lies beyond the
  threshold in the harmful direction; otherwise inconclusive.
- Monte-Carlo stability: a percentile bound is an order statistic of the bootstrap distribution, so its
  Monte-Carlo error follows from the binomial distribution of its rank. When a bound lies within that error
  of a threshold (another resampling seed could decide differently), the resamples are doubled up to a cap;
  a bound still that close leaves the check inconclusive, with a reason that says so.
- `min_detectable`: the smallest true difference the sample could tell from none, for checks that found nothing.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal, Sequence, get_args

import numpy as np

from pipeline.contracts import Adjustment as AdjustmentInfo
from pipeline.contracts import Comparison, MinDetectable
from pipeline.params import Adjustment, BootstrapSettings

MC_LEVEL = 0.999  # the Monte-Carlo error of a bound: the half-width of its 99.9% Monte-Carlo interval


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


def min_detectable(distribution: np.ndarray, confidence: float, power: float) -> float:
    """(z at the two-sided confidence + z at the power) x the bootstrap standard error."""
    from scipy.stats import norm

    z = norm.ppf(1 - (1 - confidence) / 2) + norm.ppf(power)
    return float(z * np.std(distribution, ddof=1))


def compare(reference: np.ndarray, sample: np.ndarray, statistic: str, criterion: Criterion,
            settings: BootstrapSettings, seed: int | Sequence[int], comparisons: int = 1,
            adjustment: Adjustment = "none", paired: bool = False) -> Comparison:
    """`statistic` ("difference": mean(sample) - mean(reference); "relative": mean(sample) / mean(reference) - 1;
    "ratio": mean(sample) / mean(reference)) with a percentile bootstrap interval at the confidence adjusted for
    `comparisons`, decided against `criterion`. Each side is resampled on its own, unless `paired` (sample[i] and
    reference[i] measure the same unit, which is then resampled as a pair). Resamples start at settings.n_boot
    and double while a bound sits within its Monte-Carlo error of the threshold, up to settings.max_n_boot."""
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
    quantiles = ((1 - confidence) / 2, (1 + confidence) / 2)
    rng = np.random.default_rng(seed)
    with np.errstate(divide="ignore", invalid="ignore"):
        value = float(function(reference, sample))
        result, added = None, settings.n_boot
        while True:
            result = bootstrap((reference, sample), function, n_resamples=added, batch=1000, vectorized=True,
                               paired=paired, confidence_level=confidence, method="percentile",
                               bootstrap_result=result, rng=rng)
            distribution = result.bootstrap_distribution
            low, high = (float(v) for v in (result.confidence_interval.low, result.confidence_interval.high))
            n_boot = len(distribution)
            finite = bool(np.isfinite(distribution).all())
            errors = [bound_mc_error(distribution, q) if finite else math.nan for q in quantiles]
            if not finite or settled(low, high, errors, criterion) or n_boot >= settings.max_n_boot:
                break
            added = min(n_boot, settings.max_n_boot - n_boot)
    status = decide(low, high, criterion) if finite and settled(low, high, errors, criterion) else "inconclusive"
    return Comparison(
        status=status, value=value, interval=(low, high), confidence=confidence,
        adjustment=AdjustmentInfo(method=adjustment, comparisons=comparisons, family_confidence=settings.confidence),
        mc_error=tuple(errors), n_boot=n_boot, test=criterion.test, harmful=criterion.harmful,
        min_detectable=MinDetectable(
            value=min_detectable(distribution, confidence, settings.power) if finite else None,
            definition=f"smallest true difference ({statistic}) the interval would tell from none with "
                       f"{settings.power:.0%} power: (z at {confidence:.2%} two-sided + z at {settings.power:.0%}) x "
                       "bootstrap standard error"),
        reason=inconclusive_reason(low, high, errors, criterion, n_boot) if status == "inconclusive" else None)
