"""The report's own checks and the release decision: pure functions, typed evidence in, checks and a decision out.

Validation and consent are judged here; model quality and memorization by their owners (pipeline.audit.quality,
pipeline.audit.memorization); bias and shift checks come from the audits as they wrote them, every field kept.
"""

from __future__ import annotations

import fnmatch

import pandas as pd

from pipeline.artifacts import GOVERNANCE, INGESTED, QUARANTINE, VALIDATION
from pipeline.audit import overall_status
from pipeline.audit.memorization import memorization
from pipeline.audit.quality import quality_checks
from pipeline.cards import DataCard
from pipeline.contracts import (
    AREAS,
    AreaStatus,
    BiasResult,
    Check,
    Counts,
    MemorizationRow,
    ReleaseDecision,
    ReleasePolicy,
    ShiftResult,
    ValidationSummary,
)
from pipeline.params import Params, ReportSettings
from pipeline.policy import RecordFacts, decide
from pipeline.registry import Approved
from pipeline.report.regression import regression_checks


def validation_check(summary: ValidationSummary) -> Check:
    return Check(id="validation.critical", area="validation", status="pass" if summary.passed else "fail",
                 statistic="failed critical expectations", value=summary.failed_critical, threshold=0,
                 detail=f"{VALIDATION}/index.html", warnings=summary.failed_warning)


def _text(value: object) -> str | None:
    """A manifest cell that may be null (None, or NaN where pandas chose a float column)."""
    return value if isinstance(value, str) else None


def consent_checks(dataset: str, card: DataCard, params: Params, counts: Counts, training: pd.DataFrame,
                   withdrawn: frozenset[str]) -> list[Check]:
    """For one dataset that trained the model: every record accounted for, every one of its training records still
    allowed under today's policy and withdrawals file, and whether consent is documented at all."""
    refused: dict[str, int] = {}
    for row in training.itertuples(index=False):
        facts = RecordFacts(row.record_id, row.sha256, row.source_sha256, row.license, row.consent_status,
                            _text(getattr(row, "c2pa_state", None)), _text(getattr(row, "c2pa_training", None)))
        verdict = decide(facts, card, params.policy, withdrawn)
        if not verdict.accepted:
            refused[verdict.reason] = refused.get(verdict.reason, 0) + 1
    unaccounted = counts.read - counts.accepted - counts.quarantined
    detail = f"{GOVERNANCE}/report.md#consent; {INGESTED}/{dataset}/{QUARANTINE}"
    return [
        Check(id=f"consent.accounted.{dataset}", area="consent", status="fail" if unaccounted else "pass",
              statistic="read - accepted - quarantined", value=unaccounted, threshold=0, detail=detail),
        Check(id=f"consent.training_records.{dataset}", area="consent", status="fail" if refused else "pass",
              statistic="training records the policy refuses today", value=sum(refused.values()), threshold=0,
              detail=detail, reasons=dict(sorted(refused.items())), training_records=len(training)),
        Check(id=f"consent.documented.{dataset}", area="consent",
              status="inconclusive" if card.consent.basis == "undocumented" else "pass", statistic="consent basis",
              value=card.consent.basis, threshold="documented", detail=detail),
    ]


def judge(params: Params, dataset: str, cards: dict[str, DataCard], counts: dict[str, Counts],
          validation: ValidationSummary, training: pd.DataFrame, samples: pd.DataFrame, bias: BiasResult,
          shift: ShiftResult, withdrawn: frozenset[str], approved: Approved | None, run_id: str
          ) -> tuple[list[Check], dict[str, MemorizationRow]]:
    """Every check of the release, in the order the report shows them, and the memorization table: first whether
    the model beats trivial baselines, last the candidate against the approved model (`approved`, None when no
    version is approved). `dataset` is the one evaluated and audited; consent is judged for every dataset in
    `counts` (each one the model trained on), on its rows of `training`."""
    attributes = [a.name for a in cards[dataset].sensitive_attributes]
    memorized, table = memorization(samples, attributes, params.report, params.audit_bias.min_group_size)
    checks = quality_checks(samples, params.report) + [validation_check(validation)]
    for name, read in counts.items():
        checks += consent_checks(name, cards[name], params, read, training[training["dataset"] == name], withdrawn)
    checks += bias.checks + shift.checks + memorized
    return checks + regression_checks(samples, checks, attributes, approved, run_id, params.report), table


def _worst(statuses: list[str]) -> str:
    decided = [s for s in statuses if s != "not_applicable"]
    return overall_status(decided) if decided or not statuses else "not_applicable"


def _matches(check_id: str, patterns: list[str]) -> bool:
    return any(fnmatch.fnmatchcase(check_id, p) for p in patterns)


def decide_release(checks: list[Check], settings: ReportSettings) -> ReleaseDecision:
    """Eligible (for a person's sign-off) only when no blocking check has a status that blocks it (report.block_on:
    per status, the check ids it blocks; by default any fail, and an inconclusive of a check that protects people
    or of the model's quality: absence of evidence does not approve); advisory checks are shown, not counted, and
    so are not_applicable ones (an area with nothing else is not_applicable). The gate proposes; only a sign-off
    (pipeline.review) approves."""
    decided = [c.model_copy(update={"blocking": not _matches(c.id, settings.advisory)}) for c in checks]
    block_on = settings.block_on.model_dump()
    blockers = [c.id for c in decided if c.blocking and _matches(c.id, block_on.get(c.status, []))]
    areas = {}
    for area in AREAS:
        blocking = [c.status for c in decided if c.area == area and c.blocking]
        advisory = [c.status for c in decided if c.area == area and not c.blocking]
        areas[area] = AreaStatus(status=_worst(blocking), advisory=_worst(advisory) if advisory else None)
    return ReleaseDecision(decision="blocked" if blockers else "eligible", blocked_by=blockers, areas=areas,
                    policy=ReleasePolicy(block_on=block_on, advisory=list(settings.advisory)),
                    checks=decided)
