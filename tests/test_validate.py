"""Great Expectations validation: the clean default data passes, and each defect is caught by its check."""

from __future__ import annotations

import os
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path

import pandas as pd
import pytest

from pipeline.artifacts import Layout
from pipeline.cards import card_path, load_card
from pipeline.contracts import ExpectationOutcome, ValidationSummary
from pipeline.params import load_params
from pipeline.validate import tables_and_checks, write_report
from pipeline.validation.summary import failure_lines
from tests.conftest import ROOT, Workspace, run_cli, small_params


@contextmanager
def inside(folder: Path):
    before = Path.cwd()
    os.chdir(folder)
    try:
        yield
    finally:
        os.chdir(before)


@pytest.fixture(scope="module")
def ingested(tmp_path_factory) -> Workspace:
    """Both default datasets ingested once (small synthetic), shared by the tests of this module."""
    import shutil

    space = Workspace(tmp_path_factory.mktemp("validate"))
    shutil.copytree(ROOT / "data_cards", space.root / "data_cards")
    space.write_params(small_params(300))
    space.run_ok(("ingest", "synthetic"), ("ingest", "sklearn_digits"))
    return space


def loaded(space: Workspace, withdrawn: frozenset[str] = frozenset()):
    params = load_params(space.root / "params.yaml")
    cards = {name: load_card(card_path(name, space.root / "data_cards")) for name in params.datasets}
    tables, checks, near = tables_and_checks(params, cards, space.root / "data_cards", Layout(space.root), withdrawn)
    return params, tables, checks, near


def outcome(summary: ValidationSummary, dataset: str, check: str) -> ExpectationOutcome:
    [found] = [c for c in summary.datasets[dataset].checks if c.check == check]
    return found


def test_clean_default_data_passes_with_data_docs(ingested: Workspace):
    result = ingested.run("validate")
    assert result.returncode == 0, result.stderr
    report = Layout(ingested.root).validation
    summary = ValidationSummary.model_validate_json((report / "summary.json").read_text())
    assert summary.passed and summary.failed_critical == 0
    synthetic = summary.datasets["synthetic"]
    assert synthetic.evaluated >= 40
    # warnings are findings, not stops: the planted defects push the quarantined share over its warning level
    assert not outcome(summary, "synthetic", "coverage.quarantine_fraction_warning").success
    assert not outcome(summary, "synthetic", "coverage.min_group_count").success, "group_b is small here"
    index = (report / "index.html").read_text()
    assert "Data validation: passed" in index and "http" not in index.split("<body>")[1].split("<a href")[0]
    assert len(list((report / "gx" / "validations").rglob("*.html"))) == 5  # 3 synthetic suites, 2 digits
    assert "%|" not in result.stderr, "GX progress bars stay quiet"


def test_chunked_validation_writes_the_summary_of_one_frame(ingested: Workspace):
    """A manifest past validation.chunk_rows is validated chunk by chunk, with today's summary.json."""
    report = Layout(ingested.root).validation
    ingested.run_ok(("validate",))
    whole = {name: (report / name).read_bytes() for name in ("summary.json", "near_duplicates.csv")}
    params = small_params(300)
    params["validation"]["chunk_rows"] = 128  # 3 chunks of synthetic, 15 of digits
    ingested.write_params(params)
    try:
        ingested.run_ok(("validate",))
    finally:
        ingested.write_params(small_params(300))
    assert {name: (report / name).read_bytes() for name in whole} == whole
    pages = list((report / "gx" / "validations" / "sklearn_digits" / "records").rglob("*.html"))
    assert len(pages) == 15 + 1, "a page per chunk and one for the checks across all records"
    assert "chunk-00014" in (report / "index.html").read_text()


def _copy(records: pd.DataFrame, row: int, record_id: str, **changes) -> pd.DataFrame:
    copy = records.iloc[[row]].copy()
    copy["record_id"] = record_id
    copy["sha256"] = f"{record_id:0>64}"[-64:]
    for column, value in changes.items():
        copy[column] = value
    return copy


def test_each_defect_is_caught_by_the_expectation_meant_for_it(ingested: Workspace, tmp_path: Path):
    with inside(ingested.root):
        params, tables, checks, near = loaded(ingested, withdrawn=frozenset({"inj-withdrawn-id"}))
        records = tables[("synthetic", "records")]
        digits_sha = tables[("sklearn_digits", "records")].sha256.iloc[0]
        late = pd.Timestamp(datetime(2031, 1, 1, tzinfo=UTC))
        injected = pd.concat([
            records,
            _copy(records, 0, "inj-withdrawn", consent_status="withdrawn"),
            _copy(records, 0, "inj-noconsent", consent_status=None),
            _copy(records, 0, "inj-nc", license="CC-BY-NC-4.0"),
            _copy(records, 0, "inj-dupimage", sha256=records.sha256.iloc[1]),
            _copy(records, 0, "inj-dupid").assign(record_id=records.record_id.iloc[2]),
            _copy(records, 0, "inj-cross", sha256=digits_sha),
            _copy(records, 0, "inj-label", label="hexagon"),
            _copy(records, 0, "inj-group", group="group_z"),
            _copy(records, 0, "inj-size", width=64),
            _copy(records, 0, "inj-late", collected_at=late),
            _copy(records, 0, "inj-withdrawn-id"),
        ], ignore_index=True)
        flat = injected.index[:20]
        injected.loc[flat, "pixel_std"] = 0.0  # 20 near-constant images, over the 1% allowed
        tables[("synthetic", "records")] = injected
        tables[("synthetic", "dataset")] = tables[("synthetic", "dataset")].assign(
            quarantined_fraction=0.5, card_spdx_valid=False)
        # the checks are built from the card and params, not from the data they check
        summary = write_report(tables, checks, near, params, tmp_path / "report")

    expected = {
        "governance.consent_status_accepted": "inj-withdrawn",
        "governance.consent_status_present": "inj-noconsent",
        "governance.license_allowed": "inj-nc",
        "identity.sha256_unique": "inj-dupimage",
        "identity.record_id_unique": records.record_id.iloc[2],
        "identity.sha256_unique_across_datasets": "inj-cross",
        "content.label_in_classes": "inj-label",
        "content.group_in_declared_values": "inj-group",
        "content.width_as_configured": "inj-size",
        "content.collected_at_in_timeframe": "inj-late",
        "governance.record_id_not_withdrawn": "inj-withdrawn-id",
        "content.not_near_constant": injected.record_id.iloc[0],
    }
    for check, record_id in expected.items():
        found = outcome(summary, "synthetic", check)
        assert not found.success and found.severity == "critical", check
        assert record_id in found.examples, (check, found.examples)
        assert found.exception is None, (check, found.exception)
    assert outcome(summary, "synthetic", "content.not_near_constant").unexpected_count == 20
    for check in ("coverage.quarantine_fraction_critical", "card.spdx_valid"):
        assert not outcome(summary, "synthetic", check).success, check
    assert outcome(summary, "synthetic", "content.pixel_mean_plausible").severity == "warning"
    assert not summary.passed
    assert summary.datasets["sklearn_digits"].failed_critical == 0, "one dataset's defects stay its own"

    lines = failure_lines(summary)
    assert any(line.startswith("synthetic: governance.license_allowed: expect_column_values_to_be_in_set(license): "
                               "1 unexpected; e.g. inj-nc") for line in lines), lines
    assert len(lines) == summary.failed_critical

    # the same records in chunks (a large manifest): every outcome as one frame gives it, the checks across rows
    # (uniqueness across chunks, the near-constant share) included
    with inside(ingested.root):
        _, _, checks, _ = loaded(ingested, withdrawn=frozenset({"inj-withdrawn-id"}))  # an expectation joins one suite
    tables[("synthetic", "records")] = [injected.iloc[start:start + 64] for start in range(0, len(injected), 64)]
    chunked = write_report(tables, checks, near, params, tmp_path / "chunked")
    assert chunked.model_dump() == summary.model_dump()


def test_an_expectation_that_errors_counts_as_failed(ingested: Workspace, tmp_path: Path):
    with inside(ingested.root):
        params, tables, checks, near = loaded(ingested)
        tables[("synthetic", "records")] = tables[("synthetic", "records")].drop(columns=["license"])
        summary = write_report(tables, checks, near, params, tmp_path / "report")
    for check in ("schema.license", "governance.license_present", "governance.license_allowed"):
        found = outcome(summary, "synthetic", check)
        assert not found.success and found.exception, check
    assert 'column "license"' in outcome(summary, "synthetic", "governance.license_allowed").exception
    assert not summary.passed
    assert any("raised an error" in line for line in failure_lines(summary))


def test_validate_cli_prints_one_line_per_critical_failure_and_exits_1(ingested: Workspace, tmp_path: Path):
    import shutil

    space = Workspace(tmp_path)
    shutil.copytree(ingested.root / "data_cards", space.root / "data_cards")
    shutil.copytree(ingested.root / "data", space.root / "data")
    params = small_params(300)
    params["datasets"]["synthetic"]["image_size"] = 24  # params now disagree with what was ingested
    space.write_params(params)
    result = space.run("validate")
    assert result.returncode == 1
    lines = [line for line in result.stderr.splitlines() if line.startswith("critical: ")]
    assert {line.split(": ")[2] for line in lines} == {"content.width_as_configured", "content.height_as_configured"}
    assert all("e.g. synthetic-" in line for line in lines)
    assert "Traceback" not in result.stderr


@pytest.mark.fast
def test_validate_without_ingested_data_is_one_line_error(tmp_path: Path):
    import shutil

    shutil.copytree(ROOT / "data_cards", tmp_path / "data_cards")
    space = Workspace(tmp_path)
    space.write_params(small_params())
    result = run_cli("validate", cwd=tmp_path)
    assert result.returncode == 2
    assert "data/ingested/synthetic: not found; run `dvc repro ingest@synthetic`" in result.stderr
