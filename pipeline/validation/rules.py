"""The validation rules: every expectation for a dataset, derived from its card and params, never written by hand.

Each dataset is checked as three tables (`pipeline.validate` builds them): records (the manifest plus per-image
pixel statistics: schema, governance, identity, content), dataset (one row holding the card's governance fields and
ingest's counts) and coverage (one row per declared sensitive-attribute value with its count). Every expectation
carries GX's own `severity`; only a failed critical one stops the pipeline.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, time

import pandas as pd

from pipeline.cards import CONSENT_BASES, DataCard
from pipeline.near_duplicates import PHASH
from pipeline.params import Params
from pipeline.policy import card_decision, license_allowed

REQUIRED_COLUMNS = {
    "record_id": "str", "dataset": "str", "sha256": "str", "phash": "str", "source_sha256": "str",
    "source_uri": "str", "license": "str", "consent_status": "str", "consent_basis": "str", "domain": "str",
    "width": "int32", "height": "int32", "channels": "int32", "pixels_file": "str", "pixels_index": "int32",
}

@dataclass(frozen=True)
class Rule:
    """One expectation, the table it runs on, and the name a reviewer reads (`ExpectationOutcome.check`)."""

    asset: str
    name: str
    expectation: object  # a great_expectations Expectation


@dataclass(frozen=True)
class Others:
    """Identities held by the other datasets, for the cross-dataset uniqueness checks."""

    record_ids: frozenset[str]
    sha256s: frozenset[str]


# ---------------------------------------------------------------- the rules


def accepted_consent_values(card: DataCard, params: Params) -> list[str]:
    """What consent_status may hold once the policy has run: the accepted statuses, or the card's basis."""
    if card.consent.record_column is not None:
        return list(params.policy.accepted_consent_statuses)
    return [card.consent.basis] if card_decision(card, params.policy).accepted else []


def build_checks(card: DataCard, params: Params, identity: pd.DataFrame, others: Others,
                 withdrawn: frozenset[str]) -> list[Rule]:
    """Every expectation for one dataset, derived from its card and params (and the licences its records name, from
    `identity`, the manifest's identity columns)."""
    import great_expectations.expectations as gxe

    settings = params.datasets[card.name]
    rules = params.validation
    policy = params.policy
    critical, warning = "critical", "warning"
    checks: list[Rule] = []

    def add(asset: str, name: str, expectation_class, severity: str, **kwargs) -> None:
        checks.append(Rule(asset, name, expectation_class(severity=severity, meta={"check": name}, **kwargs)))

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
    checks.append(Rule("records", name, gxe.ExpectColumnValuesToBeNull(
        severity=warning, column="near_duplicates", meta={"check": name, "quote": "values"})))
    name = "identity.record_id_case_unique"  # a warning: ids are case-sensitive, but people and file systems are not
    checks.append(Rule("records", name, gxe.ExpectColumnValuesToBeNull(
        severity=warning, column="case_twins", meta={"check": name, "quote": "values"})))
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


def spans_rows(check: Rule) -> bool:
    """Whether an expectation's outcome depends on all records at once (uniqueness, a `mostly` share), so that
    outcomes on chunks cannot be added up: it runs once, on the few columns it reads."""
    import great_expectations.expectations as gxe

    return (isinstance(check.expectation, gxe.ExpectColumnValuesToBeUnique)
            or getattr(check.expectation, "mostly", 1) < 1)


def validation_order(checks: list[Rule]) -> list[str]:
    """Check names in the order GX validates a suite and lists its results: grouped by column, in order of each
    column's first expectation (Validator.process_expectations_for_validation)."""
    columns: dict[object, list[str]] = {}
    for check in checks:
        columns.setdefault(getattr(check.expectation, "column", None), []).append(check.name)
    return [name for names in columns.values() for name in names]
