"""Ingest one dataset: card -> source records -> policy -> manifest, pixels, quarantine, provenance.

Two parts: the per-record work (read, decode, hash, judge: pipeline.ingest_record), which an engine runs in
parallel (pipeline.ingest_engines), and the single writer here, which takes the judged records in input order,
decides duplicates (the same record id, the same image) and writes. So the outputs are byte-identical whatever the
engine and worker count. Streams: records flow from the source through a bounded window of workers into fixed-size
pixel shards and parquet row groups, so memory stays flat as the dataset grows. Every record read ends in exactly
one of the manifest or the quarantine, and provenance.json counts both. Outputs are written to a temporary folder
and moved into place only when the whole dataset succeeded: no partial outputs.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import subprocess
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from tqdm import tqdm

from pipeline import PipelineError
from pipeline.artifacts import MANIFEST, PIXELS, PLANTED, PROVENANCE, QUARANTINE, Layout, write_json
from pipeline.cards import DataCard, card_digest, card_path, load_card
from pipeline.contracts import Provenance
from pipeline.ingest_engines import Engine, engine
from pipeline.ingest_record import Context, Judged
from pipeline.params import DEFAULT_PARAMS, Params, dataset_settings, load_params
from pipeline.policy import REASONS, Decision, load_withdrawals
from pipeline.sources import source_records

log = logging.getLogger(__name__)

SALT_ENV = "MAE_PIPELINE_SALT"

MANIFEST_FIELDS = [
    ("record_id", pa.string()),
    ("dataset", pa.string()),
    ("sha256", pa.string()),
    ("phash", pa.string()),  # perceptual hash of the stored pixels, for near-duplicates (pipeline.near_duplicates)
    ("source_sha256", pa.string()),
    ("source_uri", pa.string()),
    ("license", pa.string()),
    ("consent_status", pa.string()),
    ("consent_basis", pa.string()),
    ("collected_at", pa.timestamp("us", tz="UTC")),
    ("contributor", pa.string()),
    ("label", pa.string()),
    ("domain", pa.string()),
    # the image's Content Credentials, where it carries a C2PA manifest (null otherwise)
    ("c2pa_state", pa.string()),
    ("c2pa_training", pa.string()),
    ("c2pa_claim_generator", pa.string()),
    ("c2pa_signer", pa.string()),
]
PIXEL_FIELDS = [
    ("width", pa.int32()),
    ("height", pa.int32()),
    ("channels", pa.int32()),
    ("pixels_file", pa.string()),
    ("pixels_index", pa.int32()),
]
QUARANTINE_SCHEMA = pa.schema([
    ("record_id", pa.string()),
    ("dataset", pa.string()),
    ("source_uri", pa.string()),
    ("source_sha256", pa.string()),
    ("sha256", pa.string()),
    ("license", pa.string()),
    ("consent_status", pa.string()),
    ("domain", pa.string()),
    ("reason", pa.string()),
    ("detail", pa.string()),
    ("planted", pa.string()),
])


def manifest_schema(card: DataCard) -> pa.Schema:
    attributes = [(attr.name, pa.string()) for attr in card.sensitive_attributes]
    return pa.schema(MANIFEST_FIELDS + attributes + PIXEL_FIELDS)


@dataclass
class _Rows:
    """A parquet file written one row group at a time, so memory holds at most one group."""

    writer: pq.ParquetWriter
    schema: pa.Schema
    rows: list[dict] = field(default_factory=list)

    def add(self, row: dict) -> None:
        self.rows.append(row)

    def flush(self) -> None:
        if self.rows:
            self.writer.write_table(pa.Table.from_pylist(self.rows, schema=self.schema))
            self.rows.clear()


@dataclass
class _Shards:
    """Pixels in fixed-size .npy shards that later stages memory-map."""

    folder: Path
    shape: tuple[int, int, int]
    size: int
    buffer: np.ndarray = field(init=False)
    filled: int = 0
    written: int = 0

    def __post_init__(self) -> None:
        self.folder.mkdir(parents=True)
        self.buffer = np.empty((self.size, *self.shape), dtype=np.uint8)

    @property
    def current(self) -> str:
        return f"{self.folder.name}/shard-{self.written:05d}.npy"

    def add(self, pixels: np.ndarray) -> tuple[str, int]:
        where = (self.current, self.filled)
        self.buffer[self.filled] = pixels
        self.filled += 1
        return where

    def full(self) -> bool:
        return self.filled == self.size

    def flush(self) -> None:
        if self.filled:
            np.save(self.folder / Path(self.current).name, self.buffer[: self.filled])
            self.written += 1
            self.filled = 0


@dataclass
class Counts:
    read: int = 0
    accepted: int = 0
    reasons: Counter = field(default_factory=Counter)

    @property
    def quarantined(self) -> int:
        return sum(self.reasons.values())


def _final(judged: Judged, seen_ids: set[str], seen_images: set[str]) -> Decision:
    """The record's decision once duplicates are known: they need every earlier record, so the writer decides them
    in input order (the first occurrence of an id keeps it; an image is a duplicate of an earlier accepted one)."""
    duplicate_id = judged.record_id in seen_ids
    seen_ids.add(judged.record_id)
    if judged.source_problem:
        return judged.decision
    if duplicate_id:
        return Decision("duplicate_record_id", f"record_id {judged.record_id!r} appeared earlier")
    if judged.decision.accepted and judged.sha256 in seen_images:
        return Decision("duplicate_image", f"sha256 {judged.sha256[:12]}… matches an earlier accepted record")
    return judged.decision


def code_version() -> dict:
    """Git commit (when in a repository) and a digest of the package source, for lineage."""
    package = Path(__file__).parent
    digest = hashlib.sha256()
    for path in sorted(package.rglob("*.py")):
        digest.update(path.relative_to(package).as_posix().encode() + b"\0" + path.read_bytes())
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True,
                                cwd=package).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        commit = None
    return {"git_commit": commit, "code_sha256": digest.hexdigest()}


def ingest(dataset: str, params_path: Path = DEFAULT_PARAMS, cards_dir: Path = Path("data_cards"),
           layout: Layout = Layout()) -> Counts:
    params = load_params(params_path)
    settings = dataset_settings(params, dataset, params_path)
    card_file = card_path(dataset, cards_dir)
    card = load_card(card_file)
    if card.name != dataset:
        raise PipelineError(f"{card_file}: name: {card.name!r} does not match the dataset name {dataset!r}")
    if card.source.kind != settings.kind:
        raise PipelineError(f"{card_file}: source.kind: {card.source.kind!r} but params.yaml "
                            f"datasets.{dataset}.kind is {settings.kind!r}")
    withdrawn = load_withdrawals(Path(params.policy.withdrawals_file))
    salt = os.environ.get(SALT_ENV) or params.ingest.pseudonym_salt
    context = Context(card=card, policy=params.policy, withdrawn=withdrawn, salt=salt)

    with engine(params.ingest, context, settings.image_size ** 2 * settings.channels) as run, \
            layout.writing(layout.ingested(dataset)) as staged:
        tmp = staged(layout.ingested(dataset))
        counts, planted, source_sha256 = _write(card, settings, params, run, tmp)
        provenance = Provenance.model_validate({
            "dataset": dataset,
            "card": {"path": card_file.as_posix(), "sha256": card_digest(card_file), "version": card.version},
            "source": {"kind": settings.kind, "settings": settings.model_dump(mode="json"),
                       "sha256": source_sha256},
            "policy": params.policy.model_dump(mode="json"),
            "withdrawals": {"path": params.policy.withdrawals_file, "entries": len(withdrawn)},
            "code": code_version(),
            "pixels": {"shape": [settings.image_size, settings.image_size, settings.channels], "dtype": "uint8",
                       "layout": "pixels/shard-NNNNN.npy, [n, height, width, channels]",
                       "shard_size": params.ingest.shard_size},
            "counts": {"read": counts.read, "accepted": counts.accepted, "quarantined": counts.quarantined,
                       "by_reason": dict(sorted(counts.reasons.items()))},
            "reasons": {code: REASONS[code] for code in sorted(counts.reasons)},
        })
        if counts.read != counts.accepted + counts.quarantined:  # an invariant, not a user error
            raise AssertionError(f"{dataset}: read {counts.read} != accepted + quarantined")
        write_json(tmp / PROVENANCE, provenance)
        if planted:  # what the source planted on purpose, so tests and audits can check it is caught
            (tmp / PLANTED).write_text(json.dumps(planted, indent=2, sort_keys=True) + "\n")
    return counts


def _write(card: DataCard, settings, params: Params, run: Engine, tmp: Path):
    """The single writer: judged records in input order -> duplicates decided -> shards, manifest, quarantine."""
    shards = _Shards(tmp / PIXELS, (settings.image_size, settings.image_size, settings.channels),
                     params.ingest.shard_size)
    manifest_schema_ = manifest_schema(card)
    counts = Counts()
    seen_ids: set[str] = set()
    seen_images: set[str] = set()
    planted: dict[str, dict] = {}
    source_digest = hashlib.sha256()
    with pq.ParquetWriter(tmp / MANIFEST, manifest_schema_) as manifest_writer, \
            pq.ParquetWriter(tmp / QUARANTINE, QUARANTINE_SCHEMA) as quarantine_writer:
        manifest = _Rows(manifest_writer, manifest_schema_)
        quarantine = _Rows(quarantine_writer, QUARANTINE_SCHEMA)
        total = getattr(settings, "num_images", None)
        items = source_records(settings.kind)(card, settings, params.ingest)
        for judged in tqdm(run(items), total=total, desc=f"ingest {card.name}", unit="img", disable=None):
            counts.read += 1
            source_digest.update(f"{judged.record_id}\0{judged.source_sha256}\n".encode())
            if judged.planted:
                planted[judged.record_id] = {k: v for k, v in asdict(judged.planted).items() if v is not None}
            decision = _final(judged, seen_ids, seen_images)
            if decision.accepted:
                seen_images.add(judged.sha256)
                pixels_file, pixels_index = shards.add(judged.pixels)
                height, width, channels = judged.pixels.shape
                manifest.add({**judged.row, "width": width, "height": height, "channels": channels,
                              "pixels_file": pixels_file, "pixels_index": pixels_index})
                counts.accepted += 1
                if shards.full():
                    shards.flush()
                    manifest.flush()
            else:
                counts.reasons[decision.reason] += 1
                quarantine.add({**judged.quarantine, "reason": decision.reason, "detail": decision.detail})
                if len(quarantine.rows) >= params.ingest.shard_size:
                    quarantine.flush()
        shards.flush()
        manifest.flush()
        quarantine.flush()
    return counts, planted, source_digest.hexdigest()
