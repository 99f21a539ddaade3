"""What changed since the approved version: the delta a reviewer reads before the checks. Training records added
and removed per dataset (and how many of the removed were withdrawn), params whose value differs, the commits
between the two, the checks whose status moved, and the regression checks by status. Pure: the caller reads the
approved version's artifacts (pipeline.registry.approved_version) and the git log."""

from __future__ import annotations

import json
from collections import Counter

import pandas as pd

from pipeline.contracts import Changes, Check, ParamChange, RecordChange, StatusChange
from pipeline.registry import ID_COLUMNS, PARAMS_ARTIFACT, RECORDS_ARTIFACT, RELEASE_ARTIFACT, Approved


def record_changes(approved: pd.DataFrame, candidate: pd.DataFrame, withdrawn: frozenset[str]) -> list[RecordChange]:
    """Per dataset either side trained on, by record id. A removed record counts as withdrawn when the withdrawals
    file lists any of its ids (record id, pixel or source sha256)."""
    changes = []
    for dataset in sorted(set(approved["dataset"]) | set(candidate["dataset"])):
        before = approved[approved["dataset"] == dataset]
        after = candidate[candidate["dataset"] == dataset]
        kept = set(after["record_id"])
        removed = before[~before["record_id"].isin(kept)]
        hit = removed[[c for c in ID_COLUMNS if c in removed]].isin(withdrawn).any(axis=1)
        changes.append(RecordChange(dataset=dataset, approved=len(before), candidate=len(after),
                                    added=int((~after["record_id"].isin(set(before["record_id"]))).sum()),
                                    removed=len(removed), removed_withdrawn=int(hit.sum())))
    return changes


def flatten(params: dict, prefix: str = "") -> dict[str, str]:
    """Dotted key -> the value as canonical JSON; lists are leaves (an edited list is one change)."""
    flat = {}
    for key, value in params.items():
        path = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            flat.update(flatten(value, f"{path}."))
        else:
            flat[path] = json.dumps(value, sort_keys=True, default=str)
    return flat


def param_changes(approved: dict, candidate: dict) -> list[ParamChange]:
    before, after = flatten(approved), flatten(candidate)
    return [ParamChange(key=key, approved=before.get(key), candidate=after.get(key))
            for key in sorted(set(before) | set(after)) if before.get(key) != after.get(key)]


def status_changes(approved: list[Check], candidate: list[Check]) -> list[StatusChange]:
    """Checks whose status differs, new checks and checks gone; the regression area is left out (it compares the
    two versions, so the approved one has none of its own to move)."""
    before = {c.id: c.status for c in approved if c.area != "regression"}
    after = {c.id: c.status for c in candidate if c.area != "regression"}
    return [StatusChange(check=key, approved=before.get(key), candidate=after.get(key))
            for key in sorted(set(before) | set(after)) if before.get(key) != after.get(key)]


def changes(approved: Approved, candidate_records: pd.DataFrame, candidate_params: dict, checks: list[Check],
            withdrawn: frozenset[str], candidate_commit: str, commits: list[str] | None) -> Changes:
    """The delta; a part is None where the approved version did not record what it needs (`missing` says so)."""
    missing = [approved.lacks(a) for a, found in ((RECORDS_ARTIFACT, approved.records),
                                                  (PARAMS_ARTIFACT, approved.params),
                                                  (RELEASE_ARTIFACT, approved.release)) if found is None]
    approved_commit = approved.release.model.git_commit if approved.release is not None else "unknown"
    if commits is None:
        missing.append(f"the commits {approved_commit[:12]}..{candidate_commit[:12]} (not both in this repository)")
    regression = Counter(c.status for c in checks if c.area == "regression")
    return Changes(
        approved_version=approved.version, approved_run_id=approved.run_id,
        records=None if approved.records is None else record_changes(approved.records, candidate_records, withdrawn),
        params=None if approved.params is None else param_changes(approved.params, candidate_params),
        commits=commits, commits_between=(approved_commit, candidate_commit),
        statuses=status_changes(approved.release.checks, checks) if approved.release is not None else [],
        regression=dict(sorted(regression.items())), missing=missing)


def summary(delta: Changes) -> str:
    """One sentence for the version's MLflow description."""
    parts = []
    if delta.records is not None:
        added, removed = sum(r.added for r in delta.records), sum(r.removed for r in delta.records)
        withdrawn = sum(r.removed_withdrawn for r in delta.records)
        parts.append(f"{added} training records added, {removed} removed ({withdrawn} withdrawn)")
    if delta.params is not None:
        parts.append(f"{len(delta.params)} params changed")
    if delta.commits is not None:
        parts.append(f"{len(delta.commits)} commits")
    parts.append(f"{len(delta.statuses)} checks changed status")
    regression = ", ".join(f"{n} {status}" for status, n in delta.regression.items()) or "none"
    return (f"Since approved version {delta.approved_version}: {'; '.join(parts)}; regression checks: {regression}"
            + (f"; not recorded: {len(delta.missing)}" if delta.missing else "") + ".")
