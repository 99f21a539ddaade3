"""Audits of the evaluated model (bias, domain shift): each check ends pass, fail or inconclusive.

A check compares a confidence interval with a threshold a reviewer accepts: it fails only when the whole
interval lies beyond the threshold, passes only when the whole interval lies within it, and is
inconclusive when the interval straddles it (more data would decide). So an alarm means the evidence
is there, and a pass means the data was enough to show it.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

STATUSES = ("pass", "inconclusive", "fail")


def interval_decision(low: float, high: float, threshold: float) -> str:
    """`low`..`high` bound a harm statistic (larger is worse); `threshold` is the largest acceptable value."""
    if any(math.isnan(v) for v in (low, high)):
        return "inconclusive"
    if low > threshold:
        return "fail"
    if high <= threshold:
        return "pass"
    return "inconclusive"


def overall_status(statuses: list[str]) -> str:
    """The worst status: any fail fails, else any inconclusive, else pass (no checks: inconclusive)."""
    if not statuses:
        return "inconclusive"
    return max(statuses, key=STATUSES.index)


def fmt(value, digits: int = 4) -> str:
    """A number, an interval or a missing value as report text."""
    if value is None:
        return "—"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(fmt(v, digits) for v in value) + "]"
    return f"{value:.{digits}f}" if isinstance(value, float) else str(value)


def write_report(folder: Path, name: str, result: dict, markdown: str, run_file: Path | None) -> None:
    """<name>.json and <name>.md beside the figures already in `folder`; all of them on the model's run."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{name}.json").write_text(json.dumps(result, indent=2, default=jsonable) + "\n")
    (folder / f"{name}.md").write_text(markdown)
    if run_file is not None:
        from pipeline.tracking import model_run

        with model_run(run_file) as mlflow:
            mlflow.log_artifacts(str(folder), f"audit/{name}")
            mlflow.set_tag(f"audit.{name}", result["status"])


def jsonable(value):
    """numpy scalars as plain numbers for json.dumps."""
    if hasattr(value, "item"):
        return value.item()
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")
