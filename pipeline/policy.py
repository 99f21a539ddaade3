"""Consent and licence rules: pure functions, record facts in, decision and reason out; and the withdrawals file
they read (`load_withdrawals`), which ingest, validate, the report and consent-check all apply.

Fail closed: a record is accepted only when the policy can establish that using it is allowed.
"""

from __future__ import annotations

import csv
import unicodedata
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from pipeline import PipelineError
from pipeline.cards import DataCard
from pipeline.params import Policy

# Every reason a record can be quarantined for, with what it means. Ingest writes the code; reports
# print the meaning.
REASONS = {
    # the source could not produce a usable image
    "file_missing": "the metadata names a file that does not exist",
    "path_escapes_folder": "the metadata path points outside the dataset folder",
    "malformed_row": "the metadata row cannot be read as a record (more or fewer cells than the header, or a "
                     "path no file can have), so no cell of it is trusted",
    "not_a_regular_file": "the path is a named pipe, device, socket, directory or looping link: never opened",
    "unreadable_file": "the file exists but cannot be opened (permissions, a looping path)",
    "no_metadata_row": "a file in the dataset folder has no row in the metadata",
    "empty_file": "the file is zero bytes",
    "file_too_large": "the file exceeds ingest.max_file_bytes",
    "not_an_image": "the file is not an image Pillow can identify",
    "unreadable_image": "the image is corrupt or truncated",
    "decompression_bomb": "the image exceeds ingest.max_image_pixels",
    "unsupported_image_mode": "the image's pixel format cannot be converted faithfully",
    "invalid_metadata": "a metadata field cannot be parsed",
    "duplicate_record_id": "another record already has this record id",
    # governance
    "withdrawal_request": "listed in the withdrawals file",
    "training_not_permitted": "the card's training permission does not allow training",
    "consent_basis_not_accepted": "the card's consent basis is not accepted by the policy",
    "consent_undocumented": "consent is undocumented and the policy does not accept that",
    "consent_withdrawn": "the subject withdrew consent",
    "consent_missing": "the record has no consent status",
    "consent_not_accepted": "the record's consent status is not accepted by the policy",
    "license_missing": "the record has no licence",
    "license_not_allowed": "the licence is not in the policy's allowlist",
    "duplicate_image": "an accepted record already has exactly these pixels",
    # the image's own Content Credentials (C2PA manifest, CAWG training-and-data-mining assertion)
    "c2pa_invalid": "the image's C2PA manifest does not validate (the image or manifest changed after signing, or "
                    "the signature does not verify)",
    "c2pa_unreadable": "the image carries a C2PA manifest that cannot be read",
    "c2pa_training_not_allowed": "the image's Content Credentials do not allow AI training (notAllowed)",
    "c2pa_training_constrained": "the image's Content Credentials constrain AI training and the policy does not "
                                 "accept constrained permission",
    "c2pa_unknown_permission": "the image's training-and-data-mining assertion holds a value the policy does not know",
}

# Entries of the training-and-data-mining assertion that pretraining an encoder falls under (CAWG names, and the
# older c2pa. ones); `ai_inference` does not apply to training. Their uses, most restrictive first.
TRAINING_ENTRIES = ("ai_training", "ai_generative_training", "data_mining")
USES = ("notAllowed", "constrained", "allowed")

MISSING = "missing"


@dataclass(frozen=True)
class RecordFacts:
    """What the policy needs to know about one record."""

    record_id: str
    sha256: str | None
    source_sha256: str | None
    license: str | None
    consent_status: str
    c2pa_state: str | None = None  # the image's C2PA validation state; None: no manifest
    c2pa_training: str | None = None  # what its training-and-data-mining assertion says (c2pa_training())
    c2pa_detail: str = ""  # the validator's failure codes, for the quarantine's detail


@dataclass(frozen=True)
class Decision:
    reason: str | None  # None: accepted
    detail: str = ""

    @property
    def accepted(self) -> bool:
        return self.reason is None


ACCEPT = Decision(None)


def consent_status(card: DataCard, raw: object) -> str:
    """The record's consent status: its own column where the card has one, else the card's basis."""
    if card.consent.record_column is None:
        return card.consent.basis
    text = "" if raw is None else str(raw).strip().lower()
    return text if text and text != "nan" else MISSING


def record_license(card: DataCard, raw: object) -> str | None:
    if card.license.record_column is None:
        return card.license.spdx
    text = "" if raw is None else str(raw).strip()
    return text if text and text.lower() != "nan" else None


@lru_cache(maxsize=1024)
def license_allowed(expression: str, allowed: frozenset[str]) -> tuple[bool, str]:
    """Whether an SPDX expression is allowed: AND needs every part allowed, OR needs one alternative."""
    from license_expression import ExpressionError, get_spdx_licensing

    try:
        parsed = get_spdx_licensing().parse(expression, validate=True, strict=True)
    except ExpressionError as exc:
        return False, f"{expression!r} is not a valid SPDX expression ({exc})"
    allowed_keys = {key.lower() for key in allowed}

    def ok(node) -> bool:
        if hasattr(node, "key"):
            return node.key.lower() in allowed_keys
        parts = [ok(arg) for arg in node.args]
        return all(parts) if node.operator.strip().upper() == "AND" else any(parts)

    if ok(parsed):
        return True, ""
    return False, f"licence {expression!r} is not in policy.allowed_licenses"


def c2pa_training(entries: dict[str, str]) -> str | None:
    """One answer from the assertion's entries that concern training: the most restrictive use among them, or
    `unknown: <entry>=<value>` for a value that is none of the three (failing closed); None when none concerns
    training."""
    relevant = {k: v for k, v in entries.items() if k.split(".")[-1] in TRAINING_ENTRIES or k == "entries"}
    unknown = sorted(f"{k}={v}" for k, v in relevant.items() if v not in USES)
    if unknown:
        return f"unknown: {', '.join(unknown)}"[:200]
    return min(relevant.values(), key=USES.index) if relevant else None


def c2pa_decision(facts: RecordFacts, policy: Policy) -> Decision:
    """What the image's own Content Credentials decide. Fail closed: a manifest that does not validate or cannot be
    read quarantines the record; an intact one whose signer is on no trust list (`Valid`) counts, and is recorded as
    such in the manifest; no manifest decides nothing."""
    if facts.c2pa_state is None:
        return ACCEPT
    why = f": {facts.c2pa_detail}" if facts.c2pa_detail else ""
    if facts.c2pa_state == "unreadable":
        return Decision("c2pa_unreadable", f"the C2PA manifest cannot be read{why}")
    if facts.c2pa_state not in ("Valid", "Trusted"):
        return Decision("c2pa_invalid", f"C2PA validation state {facts.c2pa_state!r}{why}")
    use = facts.c2pa_training
    if use is None or use == "allowed":
        return ACCEPT
    if use == "notAllowed":
        return Decision("c2pa_training_not_allowed", "training-and-data-mining assertion: notAllowed")
    if use == "constrained":
        return ACCEPT if policy.accept_constrained_permission else Decision(
            "c2pa_training_constrained", "training-and-data-mining assertion: constrained "
                                         "(policy.accept_constrained_permission is false)")
    return Decision("c2pa_unknown_permission", f"training-and-data-mining assertion: {use}")


def load_withdrawals(path: Path) -> frozenset[str]:
    """Record ids, pixel sha256s or source-file sha256s whose subjects asked to be removed (ids in NFC, as ingest
    stores them, so either Unicode form of an id matches)."""
    try:
        with path.open(newline="", encoding="utf-8-sig") as handle:  # -sig: a spreadsheet's byte-order mark
            reader = csv.DictReader(row for row in handle if not row.startswith("#"))
            if reader.fieldnames is None or "id" not in reader.fieldnames:
                raise PipelineError(f"{path}: header: needs an 'id' column (record id or sha256)")
            return frozenset(unicodedata.normalize("NFC", row["id"].strip()) for row in reader
                             if row["id"] and row["id"].strip())
    except FileNotFoundError:
        raise PipelineError(f"{path}: withdrawals file not found (policy.withdrawals_file)") from None
    except (csv.Error, UnicodeDecodeError) as exc:
        raise PipelineError(f"{path}: cannot parse ({exc})") from None


def withdrawal_match(facts: RecordFacts, withdrawn: frozenset[str]) -> str | None:
    identities = (("record_id", facts.record_id), ("sha256", facts.sha256), ("source_sha256", facts.source_sha256))
    for field, value in identities:
        if value is not None and value in withdrawn:
            return field
    return None


def card_decision(card: DataCard, policy: Policy) -> Decision:
    """What the card alone decides for every record of the dataset."""
    permission = card.consent.training_permission
    if permission == "notAllowed" or (permission == "constrained" and not policy.accept_constrained_permission):
        return Decision("training_not_permitted", f"card consent.training_permission is {permission!r}")
    basis = card.consent.basis
    if basis == "undocumented":
        if not policy.accept_undocumented_consent:
            return Decision("consent_undocumented", "card consent.basis is 'undocumented'")
    elif basis not in policy.accepted_consent_bases:
        return Decision("consent_basis_not_accepted", f"card consent.basis {basis!r} not in policy")
    return ACCEPT


def decide(facts: RecordFacts, card: DataCard, policy: Policy, withdrawn: frozenset[str]) -> Decision:
    """Accept or quarantine one record, with the first reason in order of precedence."""
    if (field := withdrawal_match(facts, withdrawn)) is not None:
        return Decision("withdrawal_request", f"{field} is listed in {policy.withdrawals_file}")
    if not (verdict := card_decision(card, policy)).accepted:
        return verdict
    if card.consent.record_column is not None:
        column = card.consent.record_column
        status = facts.consent_status
        if status == "withdrawn":
            return Decision("consent_withdrawn", f"{column} is 'withdrawn'")
        if status == MISSING:
            return Decision("consent_missing", f"{column} is empty")
        if status not in policy.accepted_consent_statuses:
            return Decision("consent_not_accepted", f"{column} {status!r} not in policy.accepted_consent_statuses")
    if not (verdict := c2pa_decision(facts, policy)).accepted:
        return verdict
    if facts.license is None:
        return Decision("license_missing", f"{card.license.record_column} is empty")
    ok, why = license_allowed(facts.license, frozenset(policy.allowed_licenses))
    if not ok:
        return Decision("license_not_allowed", why)
    return ACCEPT
