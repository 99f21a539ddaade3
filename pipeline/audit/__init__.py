"""Audits of the evaluated model (bias, domain shift): each check ends pass, fail or inconclusive.

A check compares the confidence interval of a signed difference against a stated reference with a tolerance a
reviewer accepts: it fails only when the whole interval lies beyond the tolerance in the harmful direction,
passes only when the whole interval lies within it, and is inconclusive otherwise (more data would decide),
or when a bound lies within its Monte-Carlo error of the tolerance (the resampling seed would decide). So an
alarm means the evidence is there, and a pass means the data was enough to show it. The statistics live in
pipeline.audit.stats.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

STATUSES = ("pass", "inconclusive", "fail")


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


_MARKDOWN_SPECIAL = re.compile(r"([\\`*_{}\[\]<>!|~&#])")


def text(value) -> str:
    """A card or metadata value as inert Markdown: one line, every character that could start markup escaped,
    so a value cannot inject HTML, script, links or images into a report, or split a table cell."""
    return _MARKDOWN_SPECIAL.sub(r"\\\1", " ".join(str(value).split()))


def drawn(value) -> str:
    """A card or metadata value as matplotlib draws it, literally: paired `$` would otherwise start mathtext."""
    return str(value).replace("$", r"\$")


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
