"""The validate stage: builds the tables Great Expectations checks, runs the rules on them, and stops the pipeline on
critical failures.

Each dataset is checked as three tables:
- records: the manifest plus per-image pixel statistics (schema, governance, identity, content);
- dataset: one row holding the card's governance fields and ingest's counts (the card as data);
- coverage: one row per declared sensitive-attribute value with its count.
The rules come from each dataset's card and params.yaml (`pipeline.validation.rules`), run through GX checkpoints
(`pipeline.validation.expectations`) and are summarised for the pipeline and a reviewer
(`pipeline.validation.summary`). Near-duplicate images (candidates from hashes decided on pixels, params
`validation.near_duplicates`, within and across datasets) are a warning naming the pairs, all of them listed in
near_duplicates.csv. A manifest of more than params `validation.chunk_rows` records is never one frame: the records
suite runs chunk by chunk (outcomes merged), and what spans rows (uniqueness, `mostly` shares, coverage,
near-duplicates, the other datasets' identities) is computed from only the columns it needs, so the summary is the
one a single frame would give.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq

from pipeline.artifacts import MANIFEST, Layout, not_found, read_table, write_json
from pipeline.cards import DataCard, card_digest, card_path, load_card, spdx_problem
from pipeline.contracts import Provenance, ValidationSummary
from pipeline.near_duplicates import pair_table, shard_reader
from pipeline.params import DEFAULT_PARAMS, NearDuplicateSettings, Params, load_params
from pipeline.policy import load_withdrawals
from pipeline.validation.expectations import run_checks
from pipeline.validation.rules import Others, Rule, build_checks
from pipeline.validation.summary import NEAR_DUPLICATES, index_html, summarise

log = logging.getLogger(__name__)

# what the checks that span datasets and rows read of every manifest (with the card's attributes), never whole frames
IDENTITY_COLUMNS = ("record_id", "sha256", "phash", "license", "pixels_file", "pixels_index")


# ---------------------------------------------------------------- tables


def pixel_stats(manifest: pd.DataFrame, folder: Path) -> pd.DataFrame:
    """Per-image mean and standard deviation, read one memory-mapped shard at a time."""
    means = np.zeros(len(manifest))
    stds = np.zeros(len(manifest))
    for name, rows in manifest.groupby("pixels_file").indices.items():
        shard = np.load(folder / name, mmap_mode="r")
        images = shard[manifest.pixels_index.to_numpy()[rows]].astype(np.float32)
        flat = images.reshape(len(rows), -1)
        means[rows], stds[rows] = flat.mean(axis=1), flat.std(axis=1)
    return manifest.assign(pixel_mean=means, pixel_std=stds)


def near_duplicate_pairs(manifests: dict[str, pd.DataFrame], folders: dict[str, Path],
                         settings: NearDuplicateSettings) -> pd.DataFrame:
    """Near-duplicate pairs among every dataset's records, their pixels read from `folders` (a record with a
    malformed hash, which fails its own check, is paired on its pixels alone)."""
    columns = ["record_id", "phash", "pixels_file", "pixels_index"]
    records = pd.concat([m[columns].assign(dataset=name) for name, m in manifests.items()]
                        or [pd.DataFrame(columns=[*columns, "dataset"])], ignore_index=True)
    return pair_table(records, shard_reader(folders), settings)


def near_duplicate_column(manifest: pd.DataFrame, dataset: str, near: pd.DataFrame) -> pd.Series:
    """Per record, its near-duplicates as `<record> ~ <dataset>/<record> (distance <bits>, correlation <r>); ...`
    (distance: pHash bits, -1 where a hash is malformed); null when it has none."""
    sides = pd.concat([
        near.rename(columns={"dataset": "ds", "record_id": "id", "other_dataset": "partner_ds",
                             "other_record_id": "partner"}),
        near.rename(columns={"other_dataset": "ds", "other_record_id": "id", "dataset": "partner_ds",
                             "record_id": "partner"}),
    ])
    mine = sides[sides["ds"] == dataset].sort_values(["correlation", "partner_ds", "partner"],
                                                     ascending=[False, True, True])
    described = (mine["partner_ds"] + "/" + mine["partner"] + " (distance " + mine["distance"].astype(str)
                 + ", correlation " + mine["correlation"].map("{:.4f}".format) + ")")
    partners = described.groupby(mine["id"]).agg("; ".join)
    found = manifest["record_id"].map(partners)
    return (manifest["record_id"] + " ~ " + found).where(found.notna(), None).rename("near_duplicates")


def case_twins(record_ids: pd.Series) -> dict[str, str]:
    """Per record id that differs from another only by case (`Photo-A`, `photo-a`): `<id> ~ <the others>`. Two
    such records are one file on a file system that ignores case, and a withdrawal typed in the other case
    misses one (ids are compared exactly, after Unicode NFC)."""
    ids = pd.Series(record_ids.unique(), dtype=object)
    twins = {}
    for _, group in ids.groupby(ids.str.casefold()):
        if len(group) > 1:
            for one in group:
                twins[one] = f"{one} ~ {', '.join(sorted(other for other in group if other != one))}"
    return twins


def annotated(chunk: pd.DataFrame, dataset: str, near: pd.DataFrame, twins: dict[str, str]) -> pd.DataFrame:
    """Records with the columns the checks across records read: near-duplicates and case-only twins."""
    found = chunk["record_id"].map(twins)
    return chunk.assign(near_duplicates=near_duplicate_column(chunk, dataset, near),
                        case_twins=found.where(found.notna(), None))


def _manifest_file(path: Path) -> pq.ParquetFile:
    try:
        return pq.ParquetFile(path)
    except FileNotFoundError:
        raise not_found(path) from None


def identity_columns(path: Path, card: DataCard) -> pd.DataFrame:
    """The few manifest columns that checks across rows and datasets read (ids, hashes, licences, the card's
    attributes), never the whole manifest."""
    with _manifest_file(path) as file:
        wanted = [*IDENTITY_COLUMNS, *(attr.name for attr in card.sensitive_attributes)]
        return file.read(columns=[c for c in wanted if c in file.schema_arrow.names]).to_pandas()


def record_chunks(path: Path, folder: Path, dataset: str, near: pd.DataFrame, twins: dict[str, str],
                  rows: int) -> Iterator[pd.DataFrame]:
    """The records table `rows` records at a time: each chunk of the manifest `annotated` and with its pixel
    statistics, read when the previous one has been validated."""
    with _manifest_file(path) as file:
        for batch in file.iter_batches(batch_size=rows):
            yield pixel_stats(annotated(batch.to_pandas(), dataset, near, twins), folder)


def dataset_table(card: DataCard, provenance: Provenance, card_file: Path) -> pd.DataFrame:
    counts = provenance.counts
    return pd.DataFrame([{
        "dataset": card.name,
        "card_license_spdx": card.license.spdx,
        "card_spdx_valid": spdx_problem(card.license.spdx) is None,
        "card_consent_basis": card.consent.basis,
        "card_training_permission": card.consent.training_permission,
        "card_withdrawal": card.consent.withdrawal.strip() or None,
        "card_creators": "; ".join(card.provenance.creators) or None,
        "card_collection_method": card.provenance.collection_method.strip() or None,
        "card_sha256_matches": provenance.card.sha256 == card_digest(card_file),
        "read": counts.read,
        "accepted": counts.accepted,
        "quarantined": counts.quarantined,
        "counts_add_up": counts.read == counts.accepted + counts.quarantined,
        "quarantined_fraction": counts.quarantined / counts.read if counts.read else 1.0,
    }])


def coverage_table(manifest: pd.DataFrame, card: DataCard) -> pd.DataFrame:
    rows = [
        {"attribute": attr.name, "value": value, "count": int((manifest[attr.name] == value).sum())}
        for attr in card.sensitive_attributes
        for value in attr.values
    ]
    return pd.DataFrame(rows, columns=["attribute", "value", "count"])


# ---------------------------------------------------------------- stage


def tables_and_checks(params: Params, cards: dict[str, DataCard], cards_dir: Path, layout: Layout,
                      withdrawn: frozenset[str]):
    """The tables GX validates (a dataset's records as one frame, or as chunks past `validation.chunk_rows`), the
    checks for each dataset, and the near-duplicate pairs across all of them."""
    tables: dict[tuple[str, str], pd.DataFrame | Iterable[pd.DataFrame]] = {}
    checks: dict[str, list[Rule]] = {}
    identities = {name: identity_columns(layout.sealed(layout.ingested(name)) / MANIFEST, cards[name])
                  for name in params.datasets}
    near = near_duplicate_pairs(identities, {name: layout.ingested(name) for name in identities},
                                params.validation.near_duplicates)
    for name, identity in identities.items():
        others = [m for other, m in identities.items() if other != name]
        seen = Others(frozenset().union(*(set(m.record_id) for m in others)),
                      frozenset().union(*(set(m.sha256) for m in others)))
        path, folder = layout.manifest(name), layout.ingested(name)
        twins = case_twins(identity["record_id"])
        if len(identity) > params.validation.chunk_rows:
            tables[(name, "records")] = record_chunks(path, folder, name, near, twins, params.validation.chunk_rows)
        else:
            tables[(name, "records")] = pixel_stats(annotated(read_table(path), name, near, twins), folder)
        tables[(name, "dataset")] = dataset_table(cards[name], layout.provenance(name), card_path(name, cards_dir))
        tables[(name, "coverage")] = coverage_table(identity, cards[name])
        checks[name] = build_checks(cards[name], params, identity, seen, withdrawn)
    return tables, checks, near


def write_report(tables, checks, near: pd.DataFrame, params: Params, out_dir: Path) -> ValidationSummary:
    """Run the checks, and write Data Docs, index.html, summary.json and near_duplicates.csv under out_dir."""
    docs_dir = out_dir / "gx"
    summary = summarise(run_checks(tables, checks, docs_dir, params.validation.examples))
    write_json(out_dir / "summary.json", summary)
    near.to_csv(out_dir / NEAR_DUPLICATES, index=False)
    (out_dir / "index.html").write_text(index_html(summary, docs_dir, out_dir, len(near),
                                                    params.validation.near_duplicates))
    return summary


def validate(params_path: Path = DEFAULT_PARAMS, cards_dir: Path = Path("data_cards"),
             layout: Layout = Layout()) -> ValidationSummary:
    params = load_params(params_path)
    withdrawn = load_withdrawals(Path(params.policy.withdrawals_file))
    cards = {name: load_card(card_path(name, cards_dir)) for name in params.datasets}
    tables, checks, near = tables_and_checks(params, cards, cards_dir, layout, withdrawn)
    with layout.writing(layout.validation) as staged:
        return write_report(tables, checks, near, params, staged(layout.validation))
