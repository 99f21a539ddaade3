"""Audits of the evaluated model (bias, domain shift, memorization): each check ends pass, fail or inconclusive.

A check compares the confidence interval of a signed difference against a stated reference with a tolerance a
reviewer accepts: it fails only when the whole interval lies beyond the tolerance in the harmful direction,
passes only when the whole interval lies within it, and is inconclusive otherwise (more data would decide),
or when a bound lies within its Monte-Carlo error of the tolerance (the resampling seed would decide). So an
alarm means the evidence is there, and a pass means the data was enough to show it. The statistics live in
pipeline.audit.stats; every check is a pipeline.contracts.Check.
"""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel

from pipeline.contracts import Status

STATUSES: tuple[Status, ...] = ("pass", "inconclusive", "fail")


def overall_status(statuses: list[str]) -> Status:
    """The worst status: any fail fails, else any inconclusive, else pass (no checks: inconclusive)."""
    if not statuses:
        return "inconclusive"
    return max(statuses, key=STATUSES.index)


def publish(folder: Path, name: str, result: BaseModel, markdown: str) -> None:
    """<name>.json (the typed result) and <name>.md beside the figures already in `folder`."""
    from pipeline.artifacts import write_json

    write_json(folder / f"{name}.json", result)
    (folder / f"{name}.md").write_text(markdown)


def log_audit(folder: Path, name: str, status: str, run_file: Path) -> None:
    """The audit's folder, once swapped in whole, logged to the model's MLflow run, tagged `audit.<name>` = its
    status."""
    from pipeline.tracking import model_run

    with model_run(run_file) as mlflow:
        mlflow.log_artifacts(str(folder), f"audit/{name}")
        mlflow.set_tag(f"audit.{name}", status)
