"""What the recorded sign-offs of a version add up to, against today's files, keys, waivers and withdrawals:
pure, so `review`, `verify`, `release` and the report stage all decide it the same way.

A sign-off holds when a listed, unrevoked key's signature verifies, every digest it names matches what is there now
(and it names everything there is now), and it is about this version. The version is approved when no holding
sign-off rejects it, `required_signoffs` distinct reviewers with the approve role approve it, every blocking check
is covered by a holding waiver, and no withdrawal touches its training records.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import date

from pipeline.contracts import Release, Review, SignoffView, Waiver
from pipeline.params import ReportSettings
from pipeline.review.signoff import Opened, waiver_problem


@dataclass(frozen=True)
class Recorded:
    """One stored sign-off: where it lies (artifact path), the digest of its envelope, and it opened."""

    where: str
    envelope_sha256: str
    opened: Opened


def subject_problems(signed: dict[str, dict[str, str]], now: dict[str, dict[str, str]], reviewer: str) -> list[str]:
    """One line per file (or commit) whose digest differs from what `reviewer` signed, or that one side lacks."""
    problems = []
    for name in sorted(signed.keys() | now.keys()):
        if name not in now:
            problems.append(f"{name}: signed by {reviewer} but not there now")
        elif name not in signed:
            problems.append(f"{name}: not covered by the sign-off of {reviewer}")
        elif signed[name] != now[name]:
            problems.append(f"{name}: changed since {reviewer} signed it")
    return problems


def signoff_problems(record: Recorded, now: dict[str, dict[str, str]], release: Release, settings: ReportSettings,
                     run_user: str | None, today: date) -> list[str]:
    opened, predicate = record.opened, record.opened.predicate
    problems = list(opened.problems)
    if predicate is None or opened.reviewer is None:
        return problems
    model = release.model
    if (predicate.registered_model, predicate.version, predicate.run_id) != (model.registered_model, model.version,
                                                                             model.run_id):
        problems.append(f"{record.where}: signs {predicate.registered_model} version {predicate.version} (run "
                        f"{predicate.run_id}), not version {model.version} (run {model.run_id})")
    needed = "waive" if predicate.decision == "waive" else "approve"
    if needed not in opened.reviewer.roles:
        problems.append(f"{record.where}: {opened.reviewer.name} lacks the {needed} role")
    if predicate.waivers and "waive" not in opened.reviewer.roles:
        problems.append(f"{record.where}: {opened.reviewer.name} grants waivers without the waive role")
    if settings.forbid_self_signoff and run_user and run_user in (opened.reviewer.mlflow_user, opened.reviewer.name):
        problems.append(f"{record.where}: {opened.reviewer.name} trained this model (run user {run_user}) and "
                        "report.forbid_self_signoff is true")
    problems += subject_problems(opened.subjects, now, predicate.reviewer)
    problems += [p for w in predicate.waivers if (p := waiver_problem(w, release, today))]
    return problems


def evaluate(records: list[Recorded], now: dict[str, dict[str, str]], release: Release, settings: ReportSettings,
             withdrawn: list[str], withdrawals_file: str, run_user: str | None, today: date) -> Review:
    """The review of this version: each sign-off with why it does not hold, and the state they add up to."""
    views, holding = [], []
    for record in sorted(records, key=lambda r: (r.opened.predicate.time if r.opened.predicate else "", r.where)):
        problems = signoff_problems(record, now, release, settings, run_user, today)
        predicate = record.opened.predicate
        if predicate is not None:
            views.append(SignoffView(reviewer=predicate.reviewer, time=predicate.time, decision=predicate.decision,
                                     comment=predicate.comment, waivers=predicate.waivers,
                                     envelope_sha256=record.envelope_sha256, problems=problems))
        if not problems:
            holding.append(predicate)
    # a sign-off that no longer holds is shown, and named as a problem only while the version is not approved
    void = [p for view in views for p in view.problems]
    void += [p for r in records if r.opened.predicate is None for p in r.opened.problems]
    if not settings.require_signoff:
        state, problems = "not required", void
    elif any(p.decision == "reject" for p in holding):
        state = "rejected"
        problems = void + [f"rejected by {p.reviewer} on {p.time}" for p in holding if p.decision == "reject"]
    else:
        problems = state_problems(holding, release, settings, withdrawn, withdrawals_file)
        state = "awaiting sign-off" if problems else "approved"
        problems = void + problems if problems else []
    return Review(required=settings.require_signoff, required_signoffs=settings.required_signoffs, state=state,
                  signoffs=views, problems=problems)


def waivers_in_force(holding) -> dict[str, Waiver]:
    return {w.check: w for p in holding for w in p.waivers}


def state_problems(holding, release: Release, settings: ReportSettings, withdrawn: list[str],
                   withdrawals_file: str) -> list[str]:
    """Why holding sign-offs do not (yet) approve the version."""
    approvers = {p.reviewer for p in holding if p.decision == "approve"}
    problems = []
    if len(approvers) < settings.required_signoffs:
        problems.append(f"sign-off: {len(approvers)} of {settings.required_signoffs} required approvals "
                        f"(report.required_signoffs)")
    waived = waivers_in_force(holding)
    problems += [f"{check}: blocks the release and no holding waiver covers it" for check in release.blocked_by
                 if check not in waived]
    if withdrawn:
        shown = ", ".join(withdrawn[:5]) + (" ..." if len(withdrawn) > 5 else "")
        problems.append(f"{withdrawals_file}: {len(withdrawn)} training records of this version withdrawn: {shown}")
    return problems
