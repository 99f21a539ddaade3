"""Great Expectations (1.x) as the validation runs it: an ephemeral context, one checkpoint per suite, Data Docs.

A table given as chunks (a manifest past `validation.chunk_rows`) runs chunk by chunk, outcomes merged, and what
spans rows (`rules.spans_rows`) runs once on the few columns it reads, so the outcomes are those one frame would
give. An expectation that raised inside GX counts as failed, never as passed.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import pandas as pd

from pipeline.validation.rules import Rule, spans_rows, validation_order

logging.getLogger("great_expectations").setLevel(logging.WARNING)  # GX logs its own import at INFO
os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")


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

    def checkpoint(self, name: str, checks: list[Rule], index_columns: list[str]):
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
                 checks: list[Rule]) -> list[dict]:
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


def run_checks(tables: dict[tuple[str, str], pd.DataFrame | Iterable[pd.DataFrame]], checks: dict[str, list[Rule]],
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
