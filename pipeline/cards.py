"""The data card: what a dataset is, where it came from, and on what terms it may be used.

A card is YAML validated on load, so governance fields are checked as data rather than trusted as
free text. It carries what Datasheets for Datasets, Croissant RAI and Hugging Face dataset cards carry.
"""

from __future__ import annotations

import hashlib
from datetime import date
from functools import lru_cache
from pathlib import Path
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, ValidationError

from pipeline import PipelineError
from pipeline.params import SOURCE_KINDS, read_yaml

CONSENT_BASES = ("explicit_opt_in", "license_permits_training", "synthetic", "undocumented")
# Manifest columns a sensitive attribute may not shadow.
RESERVED_COLUMNS = frozenset(
    "record_id dataset sha256 phash source_sha256 source_uri license consent_status consent_basis collected_at "
    "contributor label domain c2pa_state c2pa_training c2pa_claim_generator c2pa_signer width height channels "
    "pixels_file pixels_index".split()
)
# Values that become check ids, file names, table keys and figure labels (group and domain values, label
# classes): a letter or digit, then letters, digits, '_', '.' or '-', so none can carry markup or a path.
Identifier = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Contact(_Strict):
    name: str = Field(min_length=1)
    email: str | None = None
    role: str | None = None


class Source(_Strict):
    kind: Literal[SOURCE_KINDS]
    uri: str | None = Field(default=None, description="where the original data lives")
    contributor_column: str | None = Field(default=None, description="raw contributor id, pseudonymised on ingest")
    collected_at_column: str | None = None


class Timeframe(_Strict):
    start: date
    end: date


class Provenance(_Strict):
    creators: list[str] = Field(min_length=1)
    collection_method: str = Field(min_length=1)
    timeframe: Timeframe
    derived_from: list[str] = []
    retrieved_at: date | None = None
    # what a data-governance review asks for (required from schema_version 2, see GOVERNANCE_FIELDS)
    purpose: str | None = Field(default=None, min_length=1, description="why the data was originally collected")
    represents: str | None = Field(default=None, min_length=1,
                                   description="what the data is assumed to represent, and of whom")
    preparation: list[str] | None = Field(default=None, min_length=1,
                                          description="data-preparation operations applied, ingest's included")


class License(_Strict):
    spdx: str = Field(min_length=1, description="SPDX licence identifier or expression")
    url: str | None = None
    record_column: str | None = Field(default=None, description="per-record licence, where records differ")


class Consent(_Strict):
    basis: Literal[CONSENT_BASES]
    record_column: str | None = Field(default=None, description="per-record consent status")
    training_permission: Literal["allowed", "notAllowed", "constrained"]
    constraints: str | None = None
    withdrawal: str = Field(min_length=1, description="how a subject withdraws consent")
    notes: str | None = None


class SensitiveAttribute(_Strict):
    name: str = Field(pattern=r"^[a-z][a-z0-9_]*$")
    values: list[Identifier] = Field(min_length=1)
    description: str = Field(min_length=1)
    population_shares: dict[Identifier, float] | None = None


class Domains(_Strict):
    column: str | None = Field(default=None, description="acquisition site / device; none: one domain")
    values: list[Identifier] = []
    held_out: list[Identifier] = []


class Labels(_Strict):
    column: str
    classes: list[Identifier] = Field(min_length=2)


class Uses(_Strict):
    intended: list[str] = Field(min_length=1)
    out_of_scope: list[str] = Field(min_length=1)


class PersonalInformation(_Strict):
    present: bool
    description: str = Field(min_length=1)


# The card format's version. 2 added the data-governance fields below; a card without `schema_version` is a new
# card and must carry them, and a card written before them declares `schema_version: 1` to be read as it was.
CARD_SCHEMA_VERSION = 2
GOVERNANCE_FIELDS = {
    "purpose": "the original purpose of collection",
    "represents": "the assumptions about what the data is meant to represent",
    "preparation": "the data-preparation operations applied (ingest's conversions included)",
}


class DataCard(_Strict):
    schema_version: Literal[1, 2] = CARD_SCHEMA_VERSION
    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_-]*$")
    version: str
    description: str = Field(min_length=1)
    maintainers: list[Contact] = Field(min_length=1)
    source: Source
    provenance: Provenance
    license: License
    consent: Consent
    sensitive_attributes: list[SensitiveAttribute] = []
    domains: Domains = Domains()
    labels: Labels | None = None
    uses: Uses
    known_limitations: list[str] = Field(min_length=1)
    known_biases: list[str] = Field(min_length=1)
    personal_information: PersonalInformation


@lru_cache(maxsize=1)
def _spdx():
    from license_expression import get_spdx_licensing

    return get_spdx_licensing()


def spdx_problem(expression: str) -> str | None:
    """Why `expression` is not a valid SPDX licence expression, or None when it is."""
    info = _spdx().validate(expression, strict=True)
    if info.errors:
        return "; ".join(info.errors)
    return None


def semantic_problems(card: DataCard) -> list[tuple[str, str]]:
    """Cross-field rules that a per-field schema cannot express."""
    problems = []
    if card.schema_version >= 2:
        problems += [(f"provenance.{name}", f"required for new cards (schema_version {CARD_SCHEMA_VERSION}, the "
                                            f"default): state {meaning}; a card written before these fields "
                                            "declares schema_version: 1")
                     for name, meaning in GOVERNANCE_FIELDS.items() if getattr(card.provenance, name) is None]
    if (why := spdx_problem(card.license.spdx)) is not None:
        problems.append(("license.spdx", f"not a valid SPDX licence expression: {why}"))
    tf = card.provenance.timeframe
    if tf.start > tf.end:
        problems.append(("provenance.timeframe", f"start {tf.start} is after end {tf.end}"))
    if card.consent.training_permission == "constrained" and not card.consent.constraints:
        problems.append(("consent.constraints", "a constrained training permission must state its constraints"))
    seen = set()
    for i, attr in enumerate(card.sensitive_attributes):
        where = f"sensitive_attributes.{i}"
        if attr.name in RESERVED_COLUMNS:
            problems.append((f"{where}.name", f"{attr.name!r} is a reserved manifest column"))
        if attr.name in seen:
            problems.append((f"{where}.name", f"{attr.name!r} is declared twice"))
        seen.add(attr.name)
        if len(set(attr.values)) != len(attr.values):
            problems.append((f"{where}.values", "values must be unique"))
        if attr.population_shares is not None:
            unknown = sorted(set(attr.population_shares) - set(attr.values))
            if unknown:
                problems.append((f"{where}.population_shares", f"unknown values {unknown}"))
            if any(share < 0 for share in attr.population_shares.values()):
                problems.append((f"{where}.population_shares", "shares must be non-negative"))
            elif abs(sum(attr.population_shares.values()) - 1) > 1e-6 and set(attr.population_shares) == set(
                attr.values
            ):
                problems.append((f"{where}.population_shares", "shares over all values must add up to 1"))
    domains = card.domains
    if domains.column is None and (domains.values or domains.held_out):
        problems.append(("domains.column", "values or held_out domains need a domain column"))
    if domains.column is not None and not domains.values:
        problems.append(("domains.values", "a domain column needs its values declared, so that validation "
                                           "rejects records of any other domain"))
    unknown_held_out = sorted(set(domains.held_out) - set(domains.values))
    if unknown_held_out:
        problems.append(("domains.held_out", f"{unknown_held_out} are not among domains.values"))
    if domains.values and set(domains.held_out) == set(domains.values):
        problems.append(("domains.held_out", "every domain is held out: nothing is left to train on"))
    if card.labels is not None and len(set(card.labels.classes)) != len(card.labels.classes):
        problems.append(("labels.classes", "classes must be unique"))
    return problems


def card_problems(raw: object) -> list[tuple[str, str]]:
    """Every problem of a parsed card as (field path, message); empty when the card is valid."""
    try:
        card = DataCard.model_validate(raw)
    except ValidationError as exc:
        return [(".".join(str(p) for p in err["loc"]) or "(top level)", err["msg"]) for err in exc.errors()]
    return semantic_problems(card)


def card_path(dataset: str, cards_dir: Path = Path("data_cards")) -> Path:
    return cards_dir / f"{dataset}.yaml"


def load_card(path: Path) -> DataCard:
    """The validated card; a broken one raises a one-line PipelineError naming the file and field."""
    raw = read_yaml(path)
    problems = card_problems(raw)
    if problems:
        field, message = problems[0]
        more = f" (+{len(problems) - 1} more; run `python -m pipeline card check {path}`)" if len(problems) > 1 else ""
        raise PipelineError(f"{path}: {field}: {message}{more}")
    return DataCard.model_validate(raw)


def card_digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def summary(card: DataCard) -> str:
    attrs = ", ".join(a.name for a in card.sensitive_attributes) or "none"
    held_out = ", ".join(card.domains.held_out) or "none"
    labels = f"{len(card.labels.classes)} classes" if card.labels else "no labels"
    return (
        f"{card.name} v{card.version}: source {card.source.kind}, licence {card.license.spdx}, "
        f"consent {card.consent.basis} (training {card.consent.training_permission}), "
        f"sensitive attributes: {attrs}, held-out domains: {held_out}, {labels}"
    )
