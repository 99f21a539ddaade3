"""What validation found, for the pipeline and for a reviewer: summary.json's model, one line per failure, and an
index page that opens offline."""

from __future__ import annotations

import html
from pathlib import Path

from pipeline.contracts import DatasetValidation, ExpectationOutcome, ValidationSummary
from pipeline.params import NearDuplicateSettings

ASSETS = ("records", "dataset", "coverage")
NEAR_DUPLICATES = "near_duplicates.csv"


def summarise(outcomes: dict[str, list[dict]]) -> ValidationSummary:
    datasets = {}
    for dataset, results in outcomes.items():
        checks = [ExpectationOutcome(**r) for r in results]
        failed = [r for r in checks if not r.success]
        datasets[dataset] = DatasetValidation(
            evaluated=len(checks), failed=len(failed), failed_critical=sum(r.severity == "critical" for r in failed),
            failed_warning=sum(r.severity == "warning" for r in failed), checks=checks)
    critical = sum(d.failed_critical for d in datasets.values())
    return ValidationSummary(passed=critical == 0, failed_critical=critical,
                             failed_warning=sum(d.failed_warning for d in datasets.values()), datasets=datasets)


def failure_lines(summary: ValidationSummary, severity: str = "critical") -> list[str]:
    """One line per failed expectation of a severity: dataset, check, expectation, count, examples."""
    lines = []
    for dataset, info in summary.datasets.items():
        for r in info.checks:
            if r.success or r.severity != severity:
                continue
            column = f"({r.column})" if r.column else ""
            count = "raised an error: " + r.exception if r.exception else f"{r.unexpected_count} unexpected"
            if r.unexpected_count is None and not r.exception:
                count = f"observed {r.observed_value}"
            examples = f"; e.g. {', '.join(map(str, r.examples))}" if r.examples else ""
            lines.append(f"{dataset}: {r.check}: {r.expectation}{column}: {count}{examples}")
    return lines


def index_html(summary: ValidationSummary, docs_dir: Path, out_dir: Path, near_pairs: int,
                near: NearDuplicateSettings) -> str:
    """A static index that opens offline (GX's own index renders its tables with JavaScript from CDNs)."""
    esc = html.escape
    parts = [
        "<!doctype html><html lang='en'><head><meta charset='utf-8'><title>Data validation</title><style>",
        "body{font-family:system-ui,sans-serif;margin:2rem;max-width:75rem}table{border-collapse:collapse;"
        "width:100%;margin-bottom:2rem}td,th{border:1px solid #ccc;padding:.3rem .5rem;text-align:left;"
        "font-size:.9rem}.fail{background:#fde2e2}.warn{background:#fff4d6}.ok{color:#1a7f37}</style></head><body>",
        f"<h1>Data validation: {'passed' if summary.passed else 'FAILED'}</h1>",
        f"<p>{summary.failed_critical} critical and {summary.failed_warning} warning expectations failed. "
        "Great Expectations' own pages for each suite are linked below (they need a network connection for "
        "their styling; their content reads without it).</p>",
        f"<p>{near_pairs} near-duplicate pairs (thumbnails correlated at least {near.min_correlation}, among "
        f"candidates from pHash and SimHash, within and across datasets): "
        f"<a href='{NEAR_DUPLICATES}'>{NEAR_DUPLICATES}</a>.</p>",
    ]
    for dataset, info in summary.datasets.items():
        parts.append(f"<h2>{esc(dataset)}</h2><p>{info.evaluated} expectations evaluated, {info.failed} failed "
                     f"({info.failed_critical} critical, {info.failed_warning} warning). Suites: ")
        links = []
        for asset in ASSETS:
            pages = sorted((docs_dir / "validations" / dataset / asset).rglob("*.html"))
            if len(pages) == 1:
                links.append(f"<a href='{esc(pages[0].relative_to(out_dir).as_posix())}'>{esc(asset)}</a>")
            elif pages:  # validated in chunks: a page per chunk (.../<run name>/<run time>/<batch>.html) and one
                # for the checks across all records
                runs = ", ".join(f"<a href='{esc(page.relative_to(out_dir).as_posix())}'>{esc(page.parts[-3])}</a>"
                                 for page in pages)
                links.append(f"{esc(asset)} ({runs})")
        parts.append(", ".join(links) + "</p>")
        parts.append("<table><tr><th>status</th><th>severity</th><th>check</th><th>expectation</th>"
                     "<th>unexpected</th><th>examples / error</th></tr>")
        for r in sorted(info.checks, key=lambda r: (r.success, r.severity != "critical")):
            css = "ok" if r.success else ("fail" if r.severity == "critical" else "warn")
            status = "passed" if r.success else "failed"
            detail = r.exception or ", ".join(map(str, r.examples))
            parts.append(
                f"<tr class='{css}'><td>{status}</td><td>{esc(r.severity)}</td><td>{esc(str(r.check))}</td>"
                f"<td>{esc(r.expectation)}{'(' + esc(r.column) + ')' if r.column else ''}</td>"
                f"<td>{esc(str(r.unexpected_count if r.unexpected_count is not None else r.observed_value))}"
                f"</td><td>{esc(detail)}</td></tr>")
        parts.append("</table>")
    parts.append("</body></html>")
    return "".join(parts)
