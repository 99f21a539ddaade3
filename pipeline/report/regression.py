"""The candidate against the approved model (the version under alias `approved`), one check per decided metric, as
TFX's Evaluator and MLflow's validation thresholds judge a candidate against the model in production.

- Reconstruction error (overall and per sensitive group) and probe / kNN accuracy come from the two per-sample
  tables (evaluate's `samples.parquet`, logged to each model's run): on the unseen records (val, test) both models
  were evaluated on, a paired bootstrap (`compare(..., paired=True)`, the record the unit); where they share none,
  each side's own unseen records, resampled on their own.
- Bias, shift and memorization checks come from the approved version's release.json: for each check of the
  candidate that the approved release has too (same id, a direction of harm), the growth of its harm (the size of a
  gap for an equivalence test, the signed value in the harmful direction for a one-sided one). Its interval is the
  difference of the two checks' harm intervals, [candidate low - approved high, candidate high - approved low]:
  wider than a joint bootstrap, so a fail is never claimed on less evidence than the two audits hold.

Every check is one-sided against `report.max_regression.<metric>` (an improvement is no harm) and decides like every
other: fail only when the whole interval lies beyond the threshold. With no approved version, or when the candidate
is itself the approved version, every check is `not_applicable` and says why.
"""

from __future__ import annotations

import pandas as pd

from pipeline.artifacts import GOVERNANCE, UNSEEN
from pipeline.audit.stats import Criterion, compare, decide
from pipeline.contracts import Check, Interval
from pipeline.params import ReportSettings
from pipeline.registry import RELEASE_ARTIFACT, SAMPLES_ARTIFACT, Approved

DETAIL = f"{GOVERNANCE}/report.md#regression"
SAMPLE_METRICS = {  # metric -> (column, statistic, harmful, what the statistic is)
    "reconstruction_error": ("recon_mse", "relative", "higher", "candidate / approved unseen error - 1"),
    "probe_accuracy": ("probe_correct", "difference", "lower", "candidate - approved unseen accuracy"),
    "knn_accuracy": ("knn_correct", "difference", "lower", "candidate - approved unseen accuracy"),
}
AUDITED = ("bias", "shift", "memorization")  # areas whose checks are compared through release.json
NOT_APPLICABLE = "regression.approved_version"  # the one check when there is nothing to compare with


def regression_checks(samples: pd.DataFrame, checks: list[Check], attributes: list[str], approved: Approved | None,
                      run_id: str, settings: ReportSettings) -> list[Check]:
    """The candidate (`samples`, its per-sample table; `checks`, its other checks; trained by run `run_id`) against
    `approved`."""
    if approved is None or approved.run_id == run_id:
        reason = ("no version of the registered model has alias approved" if approved is None
                  else f"the candidate is itself the approved version {approved.version}")
        return [Check(id=NOT_APPLICABLE, area="regression", status="not_applicable", statistic="candidate vs approved",
                      detail=DETAIL, reason=reason)]
    against = f"approved version {approved.version} (run {approved.run_id})"
    found: list[Check] = []
    if approved.samples is None:
        found.append(Check(id="regression.samples", area="regression", status="inconclusive",
                           statistic="candidate vs approved", reference=against, detail=DETAIL,
                           reason=f"the approved run lacks {approved.lacks(SAMPLES_ARTIFACT)}"))
    else:
        found += sample_checks(samples, approved.samples, attributes, against, settings)
    if approved.release is None:
        found.append(Check(id="regression.audits", area="regression", status="inconclusive",
                           statistic="candidate vs approved", reference=against, detail=DETAIL,
                           reason=f"the approved run lacks {approved.lacks(RELEASE_ARTIFACT)}"))
    else:
        found += audited_checks(checks, approved.release.checks, against, settings)
    return found


def _unseen(table: pd.DataFrame) -> pd.DataFrame:
    return table[table["split"].isin(UNSEEN)]


def sample_checks(candidate: pd.DataFrame, approved: pd.DataFrame, attributes: list[str], against: str,
                  settings: ReportSettings) -> list[Check]:
    """Reconstruction error overall and per group, probe and kNN accuracy: bootstrap intervals from the two
    per-sample tables, paired on the records both evaluated."""
    candidate, approved = _unseen(candidate), _unseen(approved)
    parts = [("reconstruction_error", "overall", None, None)]
    parts += [("reconstruction_error", f"{attr}={value}", attr, value) for attr in attributes
              if attr in candidate for value in sorted(candidate[attr].dropna().unique())]
    parts += [("probe_accuracy", None, None, None), ("knn_accuracy", None, None, None)]
    checks = []
    for position, (metric, part, attr, value) in enumerate(parts):
        column, statistic, harmful, meaning = SAMPLE_METRICS[metric]
        fields = dict(id=f"regression.{metric}" + (f".{part}" if part else ""), area="regression", statistic=meaning,
                      threshold=getattr(settings.max_regression, metric), detail=DETAIL, reference=against,
                      metric=metric, grouping=attr, group=None if value is None else str(value))
        sides = []
        for table in (approved, candidate):
            rows = table if attr is None else table[table[attr] == value] if attr in table else table.iloc[:0]
            sides.append(rows[["record_id", column]].dropna() if column in rows else rows.iloc[:0])
        if min(len(sides[0]), len(sides[1])) < 2:  # a bootstrap needs two records a side
            status = "not_applicable" if column != "recon_mse" else "inconclusive"
            why = "no labels, so no classifier was evaluated" if column != "recon_mse" else "fewer than 2 records"
            checks.append(Check(status=status, reason=f"{why} on a side (approved {len(sides[0])}, candidate "
                                                      f"{len(sides[1])} unseen records)", **fields))
            continue
        shared = sides[0].merge(sides[1], on="record_id", suffixes=("_approved", "_candidate"))
        paired = len(shared) >= 2
        reference, sample = ((shared[f"{column}_approved"], shared[f"{column}_candidate"]) if paired
                             else (sides[0][column], sides[1][column]))
        comparison = compare(reference.to_numpy(dtype=float), sample.to_numpy(dtype=float), statistic,
                             Criterion(fields["threshold"], harmful, equivalence=False), settings,
                             seed=[settings.seed, 7, position], paired=paired)
        how = (f"paired on the {len(shared)} unseen records both models evaluated" if paired
               else "no unseen record in common: each side's own unseen records")
        checks.append(Check.decided(comparison, **{**fields, "reference": f"{against}; {how}"}))
    return checks


def harm(check: Check) -> tuple[float, Interval | None]:
    """A check's value and interval oriented so that larger is more harmful: the size of the gap for an equivalence
    test, the value in the harmful direction for a one-sided one."""
    value, interval = float(check.value), check.interval
    if check.test == "equivalence":
        if interval is None:
            return abs(value), None
        low, high = interval
        return abs(value), (max(low, -high, 0.0), max(-low, high))
    sign = 1.0 if check.harmful == "higher" else -1.0
    return sign * value, None if interval is None else tuple(sorted((sign * interval[0], sign * interval[1])))


def audited_checks(checks: list[Check], approved: list[Check], against: str,
                   settings: ReportSettings) -> list[Check]:
    """One check per bias, shift or memorization check that both releases decided on a value with a direction of
    harm (drift tests, counts and representation shares without one are not compared)."""
    previous = {c.id: c for c in approved}
    found = []
    for check in checks:
        before = previous.get(check.id)
        if check.area not in AUDITED or before is None or check.harmful is None or before.harmful is None \
                or not isinstance(check.value, float | int) or not isinstance(before.value, float | int):
            continue
        threshold = getattr(settings.max_regression, check.area)
        (now, now_interval), (then, then_interval) = harm(check), harm(before)
        fields = dict(id=f"regression.{check.id}", area="regression", value=now - then, threshold=threshold,
                      statistic=f"growth of the harm of {check.id} ({check.statistic})", detail=DETAIL,
                      reference=against, test="non-inferiority", harmful="higher", metric=check.metric,
                      grouping=check.grouping, group=check.group)
        if now_interval is None or then_interval is None:
            checks_reason = "a side has no interval (an undecided or insufficient-data check)"
            found.append(Check(status="inconclusive", reason=checks_reason, **fields))
            continue
        interval = (now_interval[0] - then_interval[1], now_interval[1] - then_interval[0])
        status = decide(*interval, Criterion(threshold, "higher", equivalence=False))
        found.append(Check(status=status, interval=interval, reason=None if status != "inconclusive" else
                           f"the interval [{interval[0]:.4f}, {interval[1]:.4f}] (the difference of the two checks' "
                           f"intervals) lies neither wholly below nor wholly above {threshold:g}", **fields))
    return found
