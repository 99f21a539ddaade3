"""Each dataset's card as Croissant 1.1 JSON-LD (mlcroissant) with its Responsible-AI fields, its provenance in
PROV-O (`prov:wasDerivedFrom` the card's sources, `prov:wasGeneratedBy` the collection and the preparation
activities) and its usage conditions (`usageInfo`: an ODRL offer permitting or prohibiting AI training, as the
card's consent states, beside the licence). mlcroissant writes the standard fields and carries the PROV-O ones as
extra properties; the `prov` and `odrl` prefixes are added to the context, and the result must load back in
mlcroissant without an error."""

from __future__ import annotations

import json
import os
from pathlib import Path

from pipeline.artifacts import not_found
from pipeline.cards import DataCard
from pipeline.contracts import Counts
from pipeline.sources.records import sha256_bytes

CROISSANT_1_1 = "http://mlcommons.org/croissant/1.1"
PREFIXES = {"prov": "http://www.w3.org/ns/prov#", "odrl": "http://www.w3.org/ns/odrl/2/"}


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
    prov = card.provenance
    activities = [{"@type": "prov:Activity", "prov:label": "collection", "sc:description": prov.collection_method,
                   "prov:startedAtTime": str(timeframe.start), "prov:endedAtTime": str(timeframe.end)}]
    activities += [{"@type": "prov:Activity", "prov:label": "preparation", "sc:description": step}
                   for step in prov.preparation or []]
    extra = {"prov:wasGeneratedBy": activities,
             "prov:wasAttributedTo": [{"@type": "prov:Agent", "prov:label": c} for c in prov.creators]}
    if prov.derived_from:
        extra["prov:wasDerivedFrom"] = [{"@type": "prov:Entity", "prov:label": d} for d in prov.derived_from]
    metadata = mlc.Metadata(
        ctx=mlc.Context(conforms_to=CROISSANT_1_1), conforms_to=[CROISSANT_1_1], extra_properties=extra,
        name=card.name, description=card.description, version=card.version, url=card.source.uri,
        license=[license_url], creators=[mlc.Person(name=c) for c in card.provenance.creators],
        cite_as=f"{card.name} v{card.version}, {', '.join(card.provenance.creators)}",
        date_published=dt.datetime.combine(timeframe.end, dt.time()),
        distribution=[mlc.FileObject(id=file_id, name=file_id, content_url=os.path.relpath(manifest, folder),
                                     encoding_formats=["application/x-parquet"], sha256=digest)],
        record_sets=[mlc.RecordSet(id="records", name="records", fields=fields)],
        data_collection=prov.collection_method,
        data_preprocessing_protocol=list(prov.preparation or []),
        data_collection_timeframe=[dt.datetime.combine(timeframe.start, dt.time()),
                                   dt.datetime.combine(timeframe.end, dt.time())],
        data_collection_missing_data=f"{counts.quarantined} of {counts.read} records quarantined by the consent and "
                                     "licence policy: "
                                     + ", ".join(f"{r} {n}" for r, n in sorted(counts.by_reason.items())),
        data_biases=card.known_biases,
        data_limitations=card.known_limitations + ([f"Assumed to represent: {prov.represents}"]
                                                   if prov.represents else []),
        data_use_cases=([f"Original purpose of collection: {prov.purpose}"] if prov.purpose else [])
        + card.uses.intended + [f"Out of scope: {u}" for u in card.uses.out_of_scope],
        personal_sensitive_information=[card.personal_information.description]
        + [f"{a.name}: {a.description}" for a in card.sensitive_attributes],
        data_social_impact=f"Consent basis {card.consent.basis}; training permission "
                           f"{card.consent.training_permission}. Withdrawal: {card.consent.withdrawal}",
        data_release_maintenance_plan=", ".join(m.name for m in card.maintainers),
    )
    document = json.loads(json.dumps(metadata.to_json(), default=str))
    document["@context"].update(PREFIXES)
    document["usageInfo"] = usage_conditions(card, license_url)
    return document


def usage_conditions(card: DataCard, license_url: str) -> list[dict]:
    """The licence and the consent's training permission, as Croissant 1.1's `usageInfo` (ODRL)."""
    consent = card.consent
    rule = {"@type": "odrl:Permission" if consent.training_permission != "notAllowed" else "odrl:Prohibition",
            "odrl:action": {"@id": "odrl:use"}, "name": "AI training"}
    if consent.training_permission == "constrained":
        rule["odrl:constraint"] = [{"@type": "odrl:Constraint", "name": consent.constraints}]
    key = "odrl:prohibition" if consent.training_permission == "notAllowed" else "odrl:permission"
    return [{"@type": "CreativeWork", "name": "Licence", "url": license_url},
            {"@type": ["CreativeWork", "odrl:Offer"], "name": f"Training permission: {consent.training_permission} "
             f"(consent basis {consent.basis})", key: rule}]
