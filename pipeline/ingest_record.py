"""One record's work at ingest, the part that runs in parallel: make the record (read and decode its file, for a
deferred source item), hash its stored pixels, take their perceptual hash, and decide everything but duplicates.

Pure apart from reading the record's own file, so any worker, process or Ray node gives the same answer.
Duplicates (the same record id, the same image) need every earlier record: the single writer in pipeline.ingest
decides them in input order.
"""

from __future__ import annotations

import hashlib
import hmac
from dataclasses import dataclass
from datetime import UTC, date, datetime

import numpy as np

from pipeline.cards import DataCard
from pipeline.params import Policy
from pipeline.policy import Decision, RecordFacts, c2pa_training, consent_status, decide, record_license
from pipeline.sources.records import Item, Planted, SourceRecord, perceptual_hash, pixels_sha256, resolved


@dataclass(frozen=True)
class Context:
    """What judging a record needs besides the record; the same for every record, sent once per worker."""

    card: DataCard
    policy: Policy
    withdrawn: frozenset[str]
    salt: str


@dataclass(frozen=True)
class Judged:
    """A record after its own work. `decision` is final when it is the source's own problem (`source_problem`);
    otherwise the writer may still turn it into a duplicate. `row` (the manifest row but its pixel columns) and
    `pixels` are there only when `decision` accepts; `quarantine` is the quarantine row but its reason and detail."""

    record_id: str
    source_sha256: str | None
    sha256: str | None
    planted: Planted | None
    decision: Decision
    source_problem: bool
    quarantine: dict
    row: dict | None = None
    pixels: np.ndarray | None = None


def pseudonym(dataset: str, raw: object, salt: str) -> str | None:
    """A salted hash of a contributor id: stable within a salt, never reversible to the raw id."""
    if raw is None or str(raw).strip() == "":
        return None
    digest = hmac.new(salt.encode(), f"{dataset}:{raw}".encode(), hashlib.sha256).hexdigest()
    return f"c-{digest[:20]}"


def parse_timestamp(raw: object) -> datetime | None:
    """An ISO date or datetime; naive values are taken as UTC."""
    if raw is None or str(raw).strip() == "":
        return None
    text = str(raw).strip()
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        moment = datetime.combine(date.fromisoformat(text), datetime.min.time())
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


def _text(raw: object) -> str | None:
    text = "" if raw is None else str(raw).strip()
    return text or None


def _facts(record: SourceRecord, card: DataCard, sha: str | None) -> RecordFacts:
    meta = record.metadata
    return RecordFacts(
        record_id=record.record_id,
        sha256=sha,
        source_sha256=record.source_sha256,
        license=record_license(card, meta.get(card.license.record_column)),
        consent_status=consent_status(card, meta.get(card.consent.record_column)),
        c2pa_state=record.credentials.state if record.credentials else None,
        c2pa_training=c2pa_training(record.credentials.entries) if record.credentials else None,
        c2pa_detail=record.credentials.detail if record.credentials else "",
    )


def _domain(record: SourceRecord, card: DataCard) -> str | None:
    return _text(record.metadata.get(card.domains.column)) if card.domains.column else card.name


def _manifest_row(record: SourceRecord, card: DataCard, facts: RecordFacts, collected_at, salt: str) -> dict:
    meta = record.metadata
    row = {
        "record_id": record.record_id,
        "dataset": card.name,
        "sha256": facts.sha256,
        "phash": perceptual_hash(record.pixels),
        "source_sha256": record.source_sha256,
        "source_uri": record.source_uri,
        "license": facts.license,
        "consent_status": facts.consent_status,
        "consent_basis": card.consent.basis,
        "collected_at": collected_at,
        "contributor": pseudonym(card.name, meta.get(card.source.contributor_column), salt)
        if card.source.contributor_column else None,
        "label": _text(meta.get(card.labels.column)) if card.labels else None,
        "domain": _domain(record, card),
        "c2pa_state": facts.c2pa_state,
        "c2pa_training": facts.c2pa_training,
        "c2pa_claim_generator": record.credentials.claim_generator if record.credentials else None,
        "c2pa_signer": record.credentials.signer if record.credentials else None,
    }
    row.update({attr.name: _text(meta.get(attr.name)) for attr in card.sensitive_attributes})
    return row


def judge(item: Item, context: Context) -> Judged:
    """The record's own decision, in order of precedence: its source's problem, unparseable metadata, policy."""
    record = resolved(item)
    card = context.card
    sha = pixels_sha256(record.pixels) if record.pixels is not None else None
    facts = _facts(record, card, sha)
    quarantine = {
        "record_id": record.record_id, "dataset": card.name, "source_uri": record.source_uri,
        "source_sha256": record.source_sha256, "sha256": sha, "license": facts.license,
        "consent_status": facts.consent_status, "domain": _domain(record, card),
        "planted": record.planted.defect if record.planted else None,
    }
    judged = dict(record_id=record.record_id, source_sha256=record.source_sha256, sha256=sha,
                  planted=record.planted, quarantine=quarantine)
    if record.problem is not None:
        return Judged(**judged, decision=Decision(*record.problem), source_problem=True)
    collected_at = None
    if card.source.collected_at_column:
        column = card.source.collected_at_column
        try:
            collected_at = parse_timestamp(record.metadata.get(column))
        except ValueError:
            raw = record.metadata.get(column)
            return Judged(**judged, decision=Decision("invalid_metadata", f"{column}: cannot parse {raw!r} as an ISO "
                                                                          "date"), source_problem=False)
    decision = decide(facts, card, context.policy, context.withdrawn)
    if not decision.accepted:
        return Judged(**judged, decision=decision, source_problem=False)
    return Judged(**judged, decision=decision, source_problem=False,
                  row=_manifest_row(record, card, facts, collected_at, context.salt), pixels=record.pixels)


def judge_all(items: list[Item], context: Context) -> list[Judged]:
    """A chunk of items, judged in order: the unit of work a worker takes."""
    return [judge(item, context) for item in items]
