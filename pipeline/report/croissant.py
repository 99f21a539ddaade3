"""Each dataset's card as Croissant 1.0 JSON-LD (mlcroissant) with its Responsible-AI fields."""

from __future__ import annotations

import json
import os
from pathlib import Path

from pipeline.artifacts import not_found
from pipeline.cards import DataCard
from pipeline.contracts import Counts
from pipeline.sources.records import sha256_bytes


def croissant(card: DataCard, counts: Counts, manifest: Path, folder: Path) -> dict:
    """The card describing the accepted records; the manifest's contentUrl is relative to `folder`, where the JSON-LD
    is written."""
    import datetime as dt

    import mlcroissant as mlc

    try:
        digest = sha256_bytes(manifest.read_bytes())
    except FileNotFoundError:
        raise not_found(manifest) from None
    columns = ["record_id", "sha256", "license", "consent_status", "consent_basis", "domain"]
    columns += [a.name for a in card.sensitive_attributes] + (["label"] if card.labels else [])
    file_id = manifest.name
    fields = [mlc.Field(id=f"records/{c}", name=c, data_types=[mlc.DataType.TEXT],
                        source=mlc.Source(file_object=file_id, extract=mlc.Extract(column=c))) for c in columns]
    timeframe = card.provenance.timeframe
    license_url = card.license.url or f"https://spdx.org/licenses/{card.license.spdx}.html"
    metadata = mlc.Metadata(
        name=card.name, description=card.description, version=card.version, url=card.source.uri,
        license=[license_url], creators=[mlc.Person(name=c) for c in card.provenance.creators],
        cite_as=f"{card.name} v{card.version}, {', '.join(card.provenance.creators)}",
        date_published=dt.datetime.combine(timeframe.end, dt.time()),
        distribution=[mlc.FileObject(id=file_id, name=file_id, content_url=os.path.relpath(manifest, folder),
                                     encoding_formats=["application/x-parquet"], sha256=digest)],
        record_sets=[mlc.RecordSet(id="records", name="records", fields=fields)],
        data_collection=card.provenance.collection_method,
        data_collection_timeframe=[dt.datetime.combine(timeframe.start, dt.time()),
                                   dt.datetime.combine(timeframe.end, dt.time())],
        data_collection_missing_data=f"{counts.quarantined} of {counts.read} records quarantined by the consent and "
                                     "licence policy: "
                                     + ", ".join(f"{r} {n}" for r, n in sorted(counts.by_reason.items())),
        data_biases=card.known_biases, data_limitations=card.known_limitations,
        data_use_cases=card.uses.intended + [f"Out of scope: {u}" for u in card.uses.out_of_scope],
        personal_sensitive_information=[card.personal_information.description]
        + [f"{a.name}: {a.description}" for a in card.sensitive_attributes],
        data_social_impact=f"Consent basis {card.consent.basis}; training permission "
                           f"{card.consent.training_permission}. Withdrawal: {card.consent.withdrawal}",
        data_release_maintenance_plan=", ".join(m.name for m in card.maintainers),
    )
    return json.loads(json.dumps(metadata.to_json(), default=str))
