from __future__ import annotations

import copy
from pathlib import Path

import pytest
import yaml

from pipeline import PipelineError
from pipeline.cards import card_problems, load_card
from tests.conftest import ROOT, run_cli

pytestmark = pytest.mark.fast  # the unit tier: `make test-fast`

CARDS = sorted((ROOT / "data_cards").glob("*.yaml")) + sorted((ROOT / "data_cards" / "examples").glob("*.yaml"))


def shipped(name: str = "synthetic") -> dict:
    return yaml.safe_load((ROOT / "data_cards" / f"{name}.yaml").read_text())


@pytest.mark.parametrize("path", CARDS, ids=lambda p: p.stem)
def test_shipped_cards_are_valid(path: Path):
    assert card_problems(yaml.safe_load(path.read_text())) == []


def test_valid_card_prints_one_line_summary():
    result = run_cli("card", "check", "data_cards/synthetic.yaml", cwd=ROOT)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.strip().splitlines()
    assert len(lines) == 1
    assert "ok" in lines[0] and "CC-BY-4.0" in lines[0] and "site_east" in lines[0]


def _broken() -> dict:
    card = copy.deepcopy(shipped())
    card["license"]["spdx"] = "Not-A-Licence"
    card["consent"]["basis"] = "we asked nicely"
    del card["provenance"]["timeframe"]
    card["sensitive_attributes"][0]["population_shares"] = {"group_a": 0.5, "group_z": 0.5}
    card["domains"]["held_out"] = ["site_moon"]
    card["surprise"] = 1
    return card


def test_card_problems_name_every_field_path():
    fields = {field for field, _ in card_problems(_broken())}
    # schema errors come first; the cross-field rules run once the schema holds
    assert {"consent.basis", "provenance.timeframe", "surprise"} <= fields
    fixed = _broken()
    fixed["consent"]["basis"] = "explicit_opt_in"
    fixed["provenance"]["timeframe"] = {"start": "2024-01-01", "end": "2023-01-01"}
    del fixed["surprise"]
    fields = {field for field, _ in card_problems(fixed)}
    assert fields == {"license.spdx", "provenance.timeframe", "sensitive_attributes.0.population_shares",
                      "domains.held_out"}


@pytest.mark.parametrize("edit, field", [
    (lambda c: c["consent"].update(training_permission="constrained"), "consent.constraints"),
    (lambda c: c["sensitive_attributes"].append(dict(c["sensitive_attributes"][0])), "sensitive_attributes.1.name"),
    (lambda c: c["sensitive_attributes"][0].update(name="label"), "sensitive_attributes.0.name"),
    (lambda c: c["domains"].update(held_out=list(c["domains"]["values"])), "domains.held_out"),
    (lambda c: c["labels"].update(classes=["a", "a"]), "labels.classes"),
    (lambda c: c.pop("known_biases"), "known_biases"),
    (lambda c: c["personal_information"].pop("present"), "personal_information.present"),
])
def test_cross_field_rules(edit, field):
    card = copy.deepcopy(shipped())
    edit(card)
    assert field in {f for f, _ in card_problems(card)}


def test_spdx_expressions_are_accepted():
    card = copy.deepcopy(shipped())
    card["license"]["spdx"] = "MIT OR Apache-2.0"
    assert card_problems(card) == []


def test_card_check_cli_lists_every_problem_and_fails(tmp_path: Path):
    path = tmp_path / "broken.yaml"
    path.write_text(yaml.safe_dump(_broken()))
    result = run_cli("card", "check", str(path), cwd=ROOT)
    assert result.returncode == 1
    lines = result.stdout.strip().splitlines()
    assert len(lines) == len(card_problems(_broken())) >= 3
    assert all(line.startswith(f"{path}: ") for line in lines)
    assert "Traceback" not in result.stdout + result.stderr


def test_card_check_reports_yaml_syntax_error_with_line(tmp_path: Path):
    path = tmp_path / "bad.yaml"
    path.write_text("name: x\nlicense: [unclosed\n")
    result = run_cli("card", "check", str(path), cwd=ROOT)
    assert result.returncode == 1
    assert f"{path}: line " in result.stdout
    assert "Traceback" not in result.stdout + result.stderr


def test_load_card_raises_one_line_naming_file_and_field(tmp_path: Path):
    path = tmp_path / "synthetic.yaml"
    card = shipped()
    card["consent"]["basis"] = "maybe"
    path.write_text(yaml.safe_dump(card))
    with pytest.raises(PipelineError) as error:
        load_card(path)
    message = str(error.value)
    assert "\n" not in message and str(path) in message and "consent.basis" in message


HOSTILE = "![x](/etc/hostname)"


@pytest.mark.parametrize("edit, field", [
    (lambda c: c["domains"].update(values=[HOSTILE, "site_north"], held_out=["site_north"]), "domains.values.0"),
    (lambda c: c["domains"].update(held_out=[HOSTILE]), "domains.held_out.0"),
    (lambda c: c["sensitive_attributes"][0].update(values=["group_a", "<script>x</script>"]),
     "sensitive_attributes.0.values.1"),
    (lambda c: c["sensitive_attributes"][0].update(population_shares={"group_a": 0.5, "$b$": 0.5}),
     "sensitive_attributes.0.population_shares.$b$.[key]"),
    (lambda c: c["labels"].update(classes=["circle", "../square"]), "labels.classes.1"),
    (lambda c: c.update(name="_synthetic_"), "name"),
])
def test_identifiers_that_become_check_ids_and_file_names_are_restricted(edit, field):
    card = copy.deepcopy(shipped())
    edit(card)
    assert field in {f for f, _ in card_problems(card)}


def test_a_domain_column_needs_its_values_so_validation_can_reject_undeclared_ones():
    card = copy.deepcopy(shipped())
    card["domains"] = {"column": "site", "values": [], "held_out": []}
    assert [f for f, _ in card_problems(card)] == ["domains.values"]


def test_card_check_rejects_the_hostile_domains_of_the_issue_one_line_per_field(tmp_path: Path):
    card = shipped("sklearn_digits")
    card["domains"] = {"column": "label", "values": [HOSTILE, "sklearn_digits"], "held_out": [HOSTILE]}
    path = tmp_path / "sklearn_digits.yaml"
    path.write_text(yaml.safe_dump(card))
    result = run_cli("card", "check", str(path), cwd=ROOT)
    assert result.returncode == 1 and "Traceback" not in result.stdout + result.stderr
    lines = result.stdout.strip().splitlines()
    assert [line.split(": ")[1] for line in lines] == ["domains.values.0", "domains.held_out.0"], lines
    assert all(line.startswith(f"{path}: ") for line in lines)


def test_new_cards_must_state_purpose_representation_and_preparation(tmp_path: Path):
    card = copy.deepcopy(shipped())
    for name in ("purpose", "represents", "preparation"):
        del card["provenance"][name]
    problems = dict(card_problems(card))
    assert set(problems) == {"provenance.purpose", "provenance.represents", "provenance.preparation"}
    assert "original purpose of collection" in problems["provenance.purpose"]
    assert "schema_version: 1" in problems["provenance.purpose"], "the message says how an older card is read"
    path = tmp_path / "card.yaml"
    path.write_text(yaml.safe_dump(card))
    result = run_cli("card", "check", str(path), cwd=ROOT)
    assert result.returncode != 0 and "provenance.purpose" in result.stdout + result.stderr
    with pytest.raises(PipelineError, match=r"card.yaml: provenance.purpose: required for new cards"):
        load_card(path)

    card["schema_version"] = 1  # a card written before the fields: read as it was
    assert card_problems(card) == []
    card["provenance"]["preparation"] = []
    assert "provenance.preparation" in dict(card_problems(card)), "stated, it must say something"
