"""The consent and licence policy as pure functions: record facts in, decision out."""

from __future__ import annotations

import pytest
import yaml

from pipeline.cards import DataCard
from pipeline.params import Policy
from pipeline.policy import RecordFacts, consent_status, decide, license_allowed, record_license
from tests.conftest import ROOT, default_params

pytestmark = pytest.mark.fast  # the unit tier: `make test-fast`

NOTHING_WITHDRAWN: frozenset[str] = frozenset()


def card(name: str = "synthetic", **consent) -> DataCard:
    raw = yaml.safe_load((ROOT / "data_cards" / f"{name}.yaml").read_text())
    raw["consent"].update(consent)
    return DataCard.model_validate(raw)


def policy(**changes) -> Policy:
    return Policy.model_validate({**default_params()["policy"], **changes})


def facts(consent: str = "granted", license: str | None = "CC-BY-4.0", **ids) -> RecordFacts:
    return RecordFacts(record_id=ids.get("record_id", "r1"), sha256=ids.get("sha256", "aa"),
                       source_sha256=ids.get("source_sha256", "bb"), license=license, consent_status=consent)


def reason(record: RecordFacts, data_card: DataCard | None = None, rules: Policy | None = None,
           withdrawn: frozenset[str] = NOTHING_WITHDRAWN) -> str | None:
    return decide(record, data_card or card(), rules or policy(), withdrawn).reason


def test_a_clean_record_is_accepted():
    assert reason(facts()) is None


@pytest.mark.parametrize("status, expected", [
    ("withdrawn", "consent_withdrawn"),
    ("missing", "consent_missing"),
    ("denied", "consent_not_accepted"),
    ("granted", None),
])
def test_per_record_consent(status, expected):
    assert reason(facts(consent=status)) == expected


def test_consent_status_normalises_the_record_column():
    data_card = card()
    assert consent_status(data_card, " Granted ") == "granted"
    assert consent_status(data_card, None) == "missing"
    assert consent_status(data_card, "") == "missing"
    assert consent_status(card("sklearn_digits"), "anything") == "undocumented"


def test_undocumented_consent_follows_the_policy_switch():
    digits = card("sklearn_digits")
    record = facts(consent="undocumented")
    assert reason(record, digits, policy(accept_undocumented_consent=True)) is None
    assert reason(record, digits, policy(accept_undocumented_consent=False)) == "consent_undocumented"


def test_consent_basis_must_be_accepted():
    rules = policy(accepted_consent_bases=["synthetic"])
    assert reason(facts(), rules=rules) == "consent_basis_not_accepted"


@pytest.mark.parametrize("permission, accept_constrained, expected", [
    ("notAllowed", True, "training_not_permitted"),
    ("constrained", False, "training_not_permitted"),
    ("constrained", True, None),
    ("allowed", False, None),
])
def test_training_permission(permission, accept_constrained, expected):
    data_card = card(training_permission=permission, constraints="research only")
    assert reason(facts(), data_card, policy(accept_constrained_permission=accept_constrained)) == expected


@pytest.mark.parametrize("expression, allowed", [
    ("CC-BY-4.0", True),
    ("cc-by-4.0", True),
    ("CC-BY-NC-4.0", False),
    ("MIT OR GPL-3.0-only", True),
    ("MIT AND GPL-3.0-only", False),
    ("(MIT OR GPL-3.0-only) AND CC0-1.0", True),
    ("Definitely-Not-SPDX", False),
])
def test_licence_allowlist_understands_spdx_expressions(expression, allowed):
    ok, why = license_allowed(expression, frozenset(default_params()["policy"]["allowed_licenses"]))
    assert ok is allowed
    assert (why == "") is allowed


def test_licence_missing_and_not_allowed():
    assert reason(facts(license=None)) == "license_missing"
    assert reason(facts(license="CC-BY-NC-4.0")) == "license_not_allowed"
    assert record_license(card(), "  ") is None
    assert record_license(card("sklearn_digits"), None) == "CC-BY-4.0"


@pytest.mark.parametrize("field", ["record_id", "sha256", "source_sha256"])
def test_withdrawal_matches_any_identifier(field):
    record = facts()
    assert reason(record, withdrawn=frozenset({getattr(record, field)})) == "withdrawal_request"


def test_withdrawal_takes_precedence_over_other_reasons():
    record = facts(consent="missing", license=None)
    assert reason(record, withdrawn=frozenset({"r1"})) == "withdrawal_request"
    assert reason(record) == "consent_missing"
