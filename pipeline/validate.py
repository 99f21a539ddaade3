"""Validate ingested datasets with Great Expectations and stop the pipeline on critical failures.

The suites are built from each dataset's card and params.yaml, never written by hand per dataset.
Each dataset is checked as three tables:
- records: the manifest plus per-image pixel statistics (schema, governance, identity, content);
- dataset: one row holding the card's governance fields and ingest's counts (the card as data);
- coverage: one row per declared sensitive-attribute value with its count.
Near-duplicate images (candidates from hashes decided on pixels, `validation.near_duplicates`, within and across
datasets) are a warning naming the pairs, all of them listed in near_duplicates.csv.
Every expectation carries GX's own `severity`; only a failed critical one stops the pipeline. An
expectation that raised inside GX counts as failed, never as passed.
A manifest of more than `validation.chunk_rows` records is never one frame: the records suite runs chunk by chunk
(outcomes merged), and what spans rows (uniqueness, `mostly` shares, coverage, near-duplicates, the other datasets'
identities) is computed from only the columns it needs, so the summary is the one a single frame would give.
"""

from __future__ import annotations

import html
import logging
import os
import shutil
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, time
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq

from pipeline.artifacts import Layout, not_found, read_table, write_json
from pipeline.cards import CONSENT_BASES, DataCard, card_digest, card_path, load_card, spdx_problem
from pipeline.contracts import DatasetValidation, ExpectationOutcome, Provenance, ValidationSummary
from pipeline.near_duplicates import PHASH, pair_table, shard_reader
from pipeline.params import DEFAULT_PARAMS, NearDuplicateSettings, Params, load_params
from pipeline.policy import card_decision, license_allowed, load_withdrawals

log = logging.getLogger(__name__)
logging.getLogger("great_expectations").setLevel(logging.WARNING)  # GX logs its own import at INFO
os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")

ASSETS = ("records", "dataset", "coverage")
REQUIRED_COLUMNS = {
    "record_id": "str", "dataset": "str", "sha256": "str", "phash": "str", "source_sha256": "str",
    "source_uri": "str", "license": "str", "consent_status": "str", "consent_basis": "str", "domain": "str",
    "width": "int32", "height": "int32", "channels": "int32", "pixels_file": "str", "pixels_index": "int32",
}
NEAR_DUPLICATES = "near_duplicates.csv"
# what the checks that span datasets and rows read of every manifest (with the card's attributes), never whole frames
IDENTITY_COLUMNS = ("record_id", "sha256", "phash", "license", "pixels_file", "pixels_index")


@dataclass(frozen=True)
class Check:
    """One expectation, the table it runs on, and the name a reviewer reads."""

    asset: str
    name: str
    expectation: object  # a great_expectations Expectation


@dataclass(frozen=True)
class Others:
    """Identities held by the other datasets, for the cross-dataset uniqueness checks."""

    record_ids: frozenset[str]
    sha256s: frozenset[str]


# ---------------------------------------------------------------- tables


def pixel_stats(manifest: pd.DataFrame, folder: Path) -> pd.DataFrame:
    """Per-image mean and standard deviation, read one memory-mapped shard at a time."""
    means = np.zeros(len(manifest))
    stds = np.zeros(len(manifest))
    for name, rows in manifest.groupby("pixels_file").indices.items():
        shard = np.load(folder / name, mmap_mode="r")
        images = shard[manifest.pixels_index.to_numpy()[rows]].astype(np.float32)
        flat = images.reshape(len(rows), -1)
        means[rows], stds[rows] = flat.mean(axis=1), flat.std(axis=1)
    return manifest.assign(pixel_mean=means, pixel_std=stds)


def near_duplicate_pairs(manifests: dict[str, pd.DataFrame], folders: dict[str, Path],
                         settings: NearDuplicateSettings) -> pd.DataFrame:
    """Near-duplicate pairs among every dataset's records, their pixels read from `folders` (a record with a
    malformed hash, which fails its own check, is paired on its pixels alone)."""
    columns = ["record_id", "phash", "pixels_file", "pixels_index"]
    records = pd.concat([m[columns].assign(dataset=name) for name, m in manifests.items()]
                        or [pd.DataFrame(columns=[*columns, "dataset"])], ignore_index=True)
    return pair_table(records, shard_reader(folders), settings)


def near_duplicate_column(manifest: pd.DataFrame, dataset: str, near: pd.DataFrame) -> pd.Series:
    """Per record, its near-duplicates as `<record> ~ <dataset>/<record> (distance <bits>, correlation <r>); ...`
    (distance: pHash bits, -1 where a hash is malformed); null when it has none."""
    sides = pd.concat([
        near.rename(columns={"dataset": "ds", "record_id": "id", "other_dataset": "partner_ds",
                             "other_record_id": "partner"}),
        near.rename(columns={"other_dataset": "ds", "other_record_id": "id", "dataset": "partner_ds",
                             "record_id": "partner"}),
    ])
    mine = sides[sides["ds"] == dataset].sort_values(["correlation", "partner_ds", "partner"],
                                                     ascending=[False, True, True])
    described = (mine["partner_ds"] + "/" + mine["partner"] + " (distance " + mine["distance"].astype(str)
                 + ", correlation " + mine["correlation"].map("{:.4f}".format) + ")")
    partners = described.groupby(mine["id"]).agg("; ".join)
    found = manifest["record_id"].map(partners)
    return (manifest["record_id"] + " ~ " + found).where(found.notna(), None).rename("near_duplicates")


def _manifest_file(path: Path) -> pq.ParquetFile:
    try:
        return pq.ParquetFile(path)
    except FileNotFoundError:
        raise not_found(path) from None


def identity_columns(path: Path, card: DataCard) -> pd.DataFrame:
    """The few manifest columns that checks across rows and datasets read (ids, hashes, licences, the card's
    attributes), never the whole manifest."""
    with _manifest_file(path) as file:
        wanted = [*IDENTITY_COLUMNS, *(attr.name for attr in card.sensitive_attributes)]
        return file.read(columns=[c for c in wanted if c in file.schema_arrow.names]).to_pandas()


def record_chunks(path: Path, folder: Path, dataset: str, near: pd.DataFrame, rows: int) -> Iterator[pd.DataFrame]:
    """The records table `rows` records at a time: each chunk of the manifest with its near-duplicates and pixel
    statistics, read when the previous one has been validated."""
    with _manifest_file(path) as file:
        for batch in file.iter_batches(batch_size=rows):
            chunk = batch.to_pandas()
            yield pixel_stats(chunk.assign(near_duplicates=near_duplicate_column(chunk, dataset, near)), folder)


def dataset_table(card: DataCard, provenance: Provenance, card_file: Path) -> pd.DataFrame:
    counts = provenance.counts
    return pd.DataFrame([{
        "dataset": card.name,
        "card_license_spdx": card.license.spdx,
        "card_spdx_valid": spdx_problem(card.license.spdx) is None,
        "card_consent_basis": card.consent.basis,
        "card_training_permission": card.consent.training_permission,
        "card_withdrawal": card.consent.withdrawal.strip() or None,
        "card_creators": "; ".join(card.provenance.creators) or None,
        "card_collection_method": card.provenance.collection_method.strip() or None,
        "card_sha256_matches": provenance.card.sha256 == card_digest(card_file),
        "read": counts.read,
        "accepted": counts.accepted,
        "quarantined": counts.quarantined,
        "counts_add_up": counts.read == counts.accepted + counts.quarantined,
        "quarantined_fraction": counts.quarantined / counts.read if counts.read else 1.0,
    }])


def coverage_table(manifest: pd.DataFrame, card: DataCard) -> pd.DataFrame:
    rows = [
        {"attribute": attr.name, "value": value, "count": int((manifest[attr.name] == value).sum())}
        for attr in card.sensitive_attributes
        for value in attr.values
    ]
    return pd.DataFrame(rows, columns=["attribute", "value", "count"])


# ---------------------------------------------------------------- suites


def accepted_consent_values(card: DataCard, params: Params) -> list[str]:
    """What consent_status may hold once the policy has run: the accepted statuses, or the card's basis."""
    if card.consent.record_column is not None:
        return list(params.policy.accepted_consent_statuses)
    return [card.consent.basis] if card_decision(card, params.policy).accepted else []


def build_checks(card: DataCard, params: Params, identity: pd.DataFrame, others: Others,
                 withdrawn: frozenset[str]) -> list[Check]:
    """Every expectation for one dataset, derived from its card and params (and the licences its records name, from
    `identity`, the manifest's identity columns)."""
    import great_expectations.expectations as gxe

    settings = params.datasets[card.name]
    rules = params.validation
    policy = params.policy
    critical, warning = "critical", "warning"
    checks: list[Check] = []

    def add(asset: str, name: str, expectation_class, severity: str, **kwargs) -> None:
        checks.append(Check(asset, name, expectation_class(severity=severity, meta={"check": name}, **kwargs)))

    # schema
    for column, type_ in REQUIRED_COLUMNS.items():
        add("records", f"schema.{column}", gxe.ExpectColumnValuesToBeOfType, critical, column=column, type_=type_)
    for attr in card.sensitive_attributes:
        add("records", f"schema.{attr.name}", gxe.ExpectColumnToExist, critical, column=attr.name)
    # governance
    for column in ("consent_status", "consent_basis", "license", "source_uri", "source_sha256", "sha256"):
        add("records", f"governance.{column}_present", gxe.ExpectColumnValuesToNotBeNull, critical, column=column)
    allowed = frozenset(policy.allowed_licenses)
    observed = identity["license"].dropna().unique().tolist() if "license" in identity else []
    licences = sorted(allowed | {value for value in observed if license_allowed(value, allowed)[0]})
    add("records", "governance.license_allowed", gxe.ExpectColumnValuesToBeInSet, critical,
        column="license", value_set=licences)
    add("records", "governance.consent_status_accepted", gxe.ExpectColumnValuesToBeInSet, critical,
        column="consent_status", value_set=accepted_consent_values(card, params))
    bases = list(policy.accepted_consent_bases) + (["undocumented"] if policy.accept_undocumented_consent else [])
    add("records", "governance.consent_basis_accepted", gxe.ExpectColumnValuesToBeInSet, critical,
        column="consent_basis", value_set=bases)
    if withdrawn:
        for column in ("record_id", "sha256", "source_sha256"):
            add("records", f"governance.{column}_not_withdrawn", gxe.ExpectColumnValuesToNotBeInSet, critical,
                column=column, value_set=sorted(withdrawn))
    # identity
    for column in ("record_id", "sha256"):
        add("records", f"identity.{column}_unique", gxe.ExpectColumnValuesToBeUnique, critical, column=column)
    add("records", "identity.phash_present", gxe.ExpectColumnValuesToNotBeNull, critical, column="phash")
    add("records", "identity.phash_well_formed", gxe.ExpectColumnValuesToMatchRegex, critical, column="phash",
        regex=f"^{PHASH}$")
    # a warning: near-copies may stay in the data, as prepare keeps each group in one split; its examples quote the
    # pairs, not only record ids
    name = "identity.no_near_duplicates"
    checks.append(Check("records", name, gxe.ExpectColumnValuesToBeNull(
        severity=warning, column="near_duplicates", meta={"check": name, "quote": "values"})))
    if others.record_ids:
        add("records", "identity.record_id_unique_across_datasets", gxe.ExpectColumnValuesToNotBeInSet, critical,
            column="record_id", value_set=sorted(others.record_ids))
    if others.sha256s:
        add("records", "identity.sha256_unique_across_datasets", gxe.ExpectColumnValuesToNotBeInSet, critical,
            column="sha256", value_set=sorted(others.sha256s))
    # content
    if card.labels is not None:
        add("records", "content.label_present", gxe.ExpectColumnValuesToNotBeNull, critical, column="label")
        add("records", "content.label_in_classes", gxe.ExpectColumnValuesToBeInSet, critical,
            column="label", value_set=list(card.labels.classes))
    for attr in card.sensitive_attributes:
        add("records", f"content.{attr.name}_in_declared_values", gxe.ExpectColumnValuesToBeInSet, critical,
            column=attr.name, value_set=list(attr.values))
        add("records", f"content.{attr.name}_present", gxe.ExpectColumnValuesToNotBeNull, warning, column=attr.name)
    if card.domains.values:
        add("records", "content.domain_in_declared_values", gxe.ExpectColumnValuesToBeInSet, critical,
            column="domain", value_set=list(card.domains.values))
    for column, expected in (("width", settings.image_size), ("height", settings.image_size),
                             ("channels", settings.channels)):
        add("records", f"content.{column}_as_configured", gxe.ExpectColumnValuesToBeBetween, critical,
            column=column, min_value=expected, max_value=expected)
    add("records", "content.not_near_constant", gxe.ExpectColumnValuesToBeBetween, critical,
        column="pixel_std", min_value=rules.near_constant_std, mostly=1 - rules.max_constant_fraction)
    low, high = rules.pixel_mean_range
    add("records", "content.pixel_mean_plausible", gxe.ExpectColumnValuesToBeBetween, warning,
        column="pixel_mean", min_value=low, max_value=high, mostly=1 - rules.max_constant_fraction)
    if card.source.collected_at_column:
        timeframe = card.provenance.timeframe
        start = datetime.combine(timeframe.start, time.min, tzinfo=UTC)
        end = datetime.combine(timeframe.end, time.max, tzinfo=UTC)
        add("records", "content.collected_at_in_timeframe", gxe.ExpectColumnValuesToBeBetween, critical,
            column="collected_at", min_value=start, max_value=end)
    # the card as data, and ingest's counts
    for column in ("card_license_spdx", "card_consent_basis", "card_training_permission", "card_withdrawal",
                   "card_creators", "card_collection_method"):
        add("dataset", f"card.{column[5:]}_present", gxe.ExpectColumnValuesToNotBeNull, critical, column=column)
    add("dataset", "card.spdx_valid", gxe.ExpectColumnValuesToBeInSet, critical,
        column="card_spdx_valid", value_set=[True])
    add("dataset", "card.consent_basis_stated", gxe.ExpectColumnValuesToBeInSet, critical,
        column="card_consent_basis", value_set=list(CONSENT_BASES))
    add("dataset", "card.unchanged_since_ingest", gxe.ExpectColumnValuesToBeInSet, critical,
        column="card_sha256_matches", value_set=[True])
    add("dataset", "coverage.counts_add_up", gxe.ExpectColumnValuesToBeInSet, critical,
        column="counts_add_up", value_set=[True])
    add("dataset", "coverage.quarantine_fraction_warning", gxe.ExpectColumnValuesToBeBetween, warning,
        column="quarantined_fraction", max_value=rules.quarantine_fraction_warning)
    add("dataset", "coverage.quarantine_fraction_critical", gxe.ExpectColumnValuesToBeBetween, critical,
        column="quarantined_fraction", max_value=rules.quarantine_fraction_critical)
    # coverage of each sensitive group
    if card.sensitive_attributes:
        add("coverage", "coverage.min_group_count", gxe.ExpectColumnValuesToBeBetween, warning,
            column="count", min_value=rules.min_group_count)
    return checks


# ---------------------------------------------------------------- running


def _context(docs_dir: Path):
    import great_expectations as gx
    from great_expectations.data_context.types.base import (
        DataContextConfig,
        InMemoryStoreBackendDefaults,
        ProgressBarsConfig,
    )

    config = DataContextConfig(
        store_backend_defaults=InMemoryStoreBackendDefaults(),
        data_docs_sites={"validation": {
            "class_name": "SiteBuilder",
            "show_how_to_buttons": False,
            "store_backend": {"class_name": "TupleFilesystemStoreBackend", "base_directory": str(docs_dir.resolve())},
            "site_index_builder": {"class_name": "DefaultSiteIndexBuilder"},
        }},
        analytics_enabled=False,
        progress_bars=ProgressBarsConfig(globally=False, metric_calculations=False),
    )
    return gx, gx.get_context(project_config=config, mode="ephemeral")


def _exception(result) -> str | None:
    """GX records errors in exception_info instead of raising: either one record or one per metric."""
    info = result.exception_info or {}
    records = [info] if "raised_exception" in info else list(info.values())
    messages = [r.get("exception_message") or "error" for r in records
                if isinstance(r, dict) and r.get("raised_exception")]
    return "; ".join(messages) or None


def _examples(result, limit: int, quote_values: bool = False) -> list:
    """Record ids of unexpected rows (else the values), or the values where they say more (near-duplicate pairs)."""
    found = result.result or {}
    rows = [] if quote_values else found.get("unexpected_index_list") or []
    ids = [row.get("record_id") for row in rows if isinstance(row, dict)]
    ids = [i for i in ids if i is not None]
    values = ids or found.get("partial_unexpected_list") or []
    return [v if isinstance(v, (str, int, float, bool)) or v is None else str(v) for v in values[:limit]]


def _jsonable(value):
    if isinstance(value, (np.generic,)):
        return value.item()
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    return str(value)


def spans_rows(check: Check) -> bool:
    """Whether an expectation's outcome depends on all records at once (uniqueness, a `mostly` share), so that
    outcomes on chunks cannot be added up: it runs once, on the few columns it reads."""
    import great_expectations.expectations as gxe

    return (isinstance(check.expectation, gxe.ExpectColumnValuesToBeUnique)
            or getattr(check.expectation, "mostly", 1) < 1)


def validation_order(checks: list[Check]) -> list[str]:
    """Check names in the order GX validates a suite and lists its results: grouped by column, in order of each
    column's first expectation (Validator.process_expectations_for_validation)."""
    columns: dict[object, list[str]] = {}
    for check in checks:
        columns.setdefault(getattr(check.expectation, "column", None), []).append(check.name)
    return [name for names in columns.values() for name in names]


def _total(results: tuple[dict, ...], key: str) -> int | None:
    values = [r[key] for r in results if r[key] is not None]
    return sum(values) if values else None


def merge_chunks(chunks: list[list[dict]], examples: int) -> list[dict]:
    """One outcome per expectation from its outcomes on every chunk (none spans rows): failed when it failed on any
    chunk, counts added up, the first examples in record order, every distinct error."""
    merged = []
    for results in zip(*chunks):
        errors = list(dict.fromkeys(r["exception"] for r in results if r["exception"]))
        merged.append({**results[0], "success": all(r["success"] for r in results),
                       "unexpected_count": _total(results, "unexpected_count"),
                       "element_count": _total(results, "element_count"),
                       "examples": [e for r in results for e in r["examples"]][:examples],
                       "exception": "; ".join(errors) or None})
    return merged


class _Suites:
    """One GX checkpoint per suite in an ephemeral context; each run's outcomes as summary.json states them."""

    def __init__(self, docs_dir: Path, examples: int):
        self.gx, self.context = _context(docs_dir)
        self.source = self.context.data_sources.add_pandas("ingested")
        self.examples = examples

    def checkpoint(self, name: str, checks: list[Check], index_columns: list[str]):
        gx, context = self.gx, self.context
        batch = self.source.add_dataframe_asset(name).add_batch_definition_whole_dataframe("all")
        suite = context.suites.add(gx.ExpectationSuite(name=name))
        for check in checks:
            suite.add_expectation(check.expectation)
        definition = context.validation_definitions.add(gx.ValidationDefinition(name=name, data=batch, suite=suite))
        return context.checkpoints.add(gx.Checkpoint(
            name=name, validation_definitions=[definition],
            result_format={"result_format": "COMPLETE", "unexpected_index_column_names": index_columns,
                           "partial_unexpected_count": self.examples},
        ))

    def run(self, checkpoint, frame: pd.DataFrame, asset: str, run_name: str | None = None) -> list[dict]:
        from great_expectations.core.run_identifier import RunIdentifier

        result = checkpoint.run(batch_parameters={"dataframe": frame},
                                run_id=RunIdentifier(run_name=run_name) if run_name else None)
        outcomes = []
        for run in result.run_results.values():
            for item in run.results:
                error = _exception(item)
                found = item.result or {}
                config = item.expectation_config
                outcomes.append({
                    "asset": asset,
                    "check": (config.meta or {}).get("check"),
                    "expectation": config.type,
                    "column": config.kwargs.get("column"),
                    "severity": str(getattr(config.severity, "value", config.severity)),
                    "success": bool(item.success) and error is None,
                    "unexpected_count": _jsonable(found.get("unexpected_count")),
                    "element_count": _jsonable(found.get("element_count")),
                    "observed_value": _jsonable(found.get("observed_value")),
                    "examples": [] if item.success and error is None else _examples(
                        item, self.examples, quote_values=(config.meta or {}).get("quote") == "values"),
                    "exception": error,
                })
        return outcomes


def _run_chunked(suites: _Suites, name: str, asset: str, chunks: Iterable[pd.DataFrame],
                 checks: list[Check]) -> list[dict]:
    """The suite over chunks: what spans rows once, on its columns gathered from every chunk (with record_id, for
    examples); the rest chunk by chunk, merged; listed in the order one run over all records would list them."""
    across = [c for c in checks if spans_rows(c)]
    local = [c for c in checks if not spans_rows(c)]
    needed = list(dict.fromkeys(["record_id", *(c.expectation.column for c in across)]))
    checkpoint = suites.checkpoint(name, local, ["record_id"]) if local else None
    parts, gathered = [], []
    for number, chunk in enumerate(chunks):
        if checkpoint is not None:
            parts.append(suites.run(checkpoint, chunk, asset, f"chunk-{number:05d}"))
        gathered.append(chunk[[c for c in needed if c in chunk.columns]])
    outcomes = merge_chunks(parts, suites.examples)
    if across:
        whole = suites.checkpoint(f"{name}.across", across, ["record_id"])
        outcomes += suites.run(whole, pd.concat(gathered, ignore_index=True), asset, "all-records")
    order = {check: i for i, check in enumerate(validation_order(checks))}
    return sorted(outcomes, key=lambda outcome: order[outcome["check"]])


def run_checks(tables: dict[tuple[str, str], pd.DataFrame | Iterable[pd.DataFrame]], checks: dict[str, list[Check]],
               docs_dir: Path, examples: int) -> dict[str, list[dict]]:
    """Run every suite through GX checkpoints (a table given as chunks, chunk by chunk); build Data Docs; return one
    outcome per expectation."""
    suites = _Suites(docs_dir, examples)
    outcomes: dict[str, list[dict]] = {}
    for (dataset, asset), frame in tables.items():
        asset_checks = [c for c in checks[dataset] if c.asset == asset]
        if not asset_checks:
            continue
        name = f"{dataset}.{asset}"
        if isinstance(frame, pd.DataFrame):
            index_columns = ["record_id"] if "record_id" in frame.columns else []
            found = suites.run(suites.checkpoint(name, asset_checks, index_columns), frame, asset)
        else:
            found = _run_chunked(suites, name, asset, frame, asset_checks)
        outcomes.setdefault(dataset, []).extend(found)
    suites.context.build_data_docs()
    return outcomes


# ---------------------------------------------------------------- summary


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


def _index_html(summary: ValidationSummary, docs_dir: Path, out_dir: Path, near_pairs: int,
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


# ---------------------------------------------------------------- stage


def tables_and_checks(params: Params, cards: dict[str, DataCard], cards_dir: Path, layout: Layout,
                      withdrawn: frozenset[str]):
    """The tables GX validates (a dataset's records as one frame, or as chunks past `validation.chunk_rows`), the
    checks for each dataset, and the near-duplicate pairs across all of them."""
    tables: dict[tuple[str, str], pd.DataFrame | Iterable[pd.DataFrame]] = {}
    checks: dict[str, list[Check]] = {}
    identities = {name: identity_columns(layout.manifest(name), cards[name]) for name in params.datasets}
    near = near_duplicate_pairs(identities, {name: layout.ingested(name) for name in identities},
                                params.validation.near_duplicates)
    for name, identity in identities.items():
        others = [m for other, m in identities.items() if other != name]
        seen = Others(frozenset().union(*(set(m.record_id) for m in others)),
                      frozenset().union(*(set(m.sha256) for m in others)))
        path, folder = layout.manifest(name), layout.ingested(name)
        if len(identity) > params.validation.chunk_rows:
            tables[(name, "records")] = record_chunks(path, folder, name, near, params.validation.chunk_rows)
        else:
            manifest = read_table(path)
            tables[(name, "records")] = pixel_stats(
                manifest.assign(near_duplicates=near_duplicate_column(manifest, name, near)), folder)
        tables[(name, "dataset")] = dataset_table(cards[name], layout.provenance(name), card_path(name, cards_dir))
        tables[(name, "coverage")] = coverage_table(identity, cards[name])
        checks[name] = build_checks(cards[name], params, identity, seen, withdrawn)
    return tables, checks, near


def write_report(tables, checks, near: pd.DataFrame, params: Params, out_dir: Path) -> ValidationSummary:
    """Run the checks, and write Data Docs, index.html, summary.json and near_duplicates.csv under out_dir."""
    shutil.rmtree(out_dir, ignore_errors=True)
    docs_dir = out_dir / "gx"
    summary = summarise(run_checks(tables, checks, docs_dir, params.validation.examples))
    write_json(out_dir / "summary.json", summary)
    near.to_csv(out_dir / NEAR_DUPLICATES, index=False)
    (out_dir / "index.html").write_text(_index_html(summary, docs_dir, out_dir, len(near),
                                                    params.validation.near_duplicates))
    return summary


def validate(params_path: Path = DEFAULT_PARAMS, cards_dir: Path = Path("data_cards"),
             layout: Layout = Layout()) -> ValidationSummary:
    params = load_params(params_path)
    withdrawn = load_withdrawals(Path(params.policy.withdrawals_file))
    cards = {name: load_card(card_path(name, cards_dir)) for name in params.datasets}
    tables, checks, near = tables_and_checks(params, cards, cards_dir, layout, withdrawn)
    return write_report(tables, checks, near, params, layout.validation)
