"""A folder of image files plus a metadata CSV, one row per file: how users bring their own data.

The CSV needs a `path` column (relative to the folder) and the columns the card names; `record_id`
is optional (the path is used otherwise). Rows and files are reconciled both ways: a row without a
file and a file without a row are each quarantined, so nothing in the folder goes unaccounted for.
"""

from __future__ import annotations

import csv
import hashlib
import os
from collections.abc import Iterator
from pathlib import Path, PurePosixPath

from pipeline import PipelineError
from pipeline.cards import DataCard
from pipeline.params import ImageFolderSettings, IngestSettings
from pipeline.sources.records import ImageProblem, SourceRecord, decode, sha256_bytes


def required_columns(card: DataCard) -> list[str]:
    columns = [
        card.source.contributor_column,
        card.source.collected_at_column,
        card.license.record_column,
        card.consent.record_column,
        card.domains.column,
        card.labels.column if card.labels else None,
        *(attr.name for attr in card.sensitive_attributes),
    ]
    return ["path", *(c for c in columns if c is not None)]


def _read_header(metadata: Path, card: DataCard) -> None:
    with metadata.open(newline="", encoding="utf-8") as handle:
        reader = csv.reader(handle)
        header = next(_rows(reader, metadata), None)
    if header is None:
        raise PipelineError(f"{metadata}: empty file, expected a header row")
    missing = [column for column in required_columns(card) if column not in header]
    if missing:
        raise PipelineError(f"{metadata}: header: missing column(s) {missing} that the card names")


def _resolve(folder: Path, relative: str) -> Path | None:
    """The file a row names, or None when the path escapes the folder (absolute, '..', or a symlink out)."""
    if not relative or PurePosixPath(relative).is_absolute() or Path(relative).is_absolute():
        return None
    target = (folder / relative).resolve()
    return target if target.is_relative_to(folder) else None


def _image_record(folder: Path, relative: str, target: Path | None, record_id: str, metadata: dict,
                  settings: ImageFolderSettings, ingest: IngestSettings) -> SourceRecord:
    record = SourceRecord(record_id=record_id, source_uri=f"file:{relative}", metadata=metadata)
    if target is None:
        record.problem = ("path_escapes_folder", f"path {relative!r} points outside {folder}")
        return record
    if not target.is_file():
        record.problem = ("file_missing", f"no file at {relative!r}")
        return record
    size = target.stat().st_size
    if size > ingest.max_file_bytes:
        record.problem = ("file_too_large", f"{size} bytes > ingest.max_file_bytes {ingest.max_file_bytes}")
        return record
    data = target.read_bytes()
    record.source_sha256 = sha256_bytes(data)
    try:
        record.pixels = decode(data, settings.image_size, settings.channels, ingest.alpha_background,
                               ingest.max_image_pixels)
    except ImageProblem as problem:
        record.problem = (problem.reason, problem.detail)
    return record


def _unlisted_files(folder: Path, listed: set[str], skip: set[str]) -> Iterator[str]:
    for root, dirs, files in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in sorted(files):
            relative = (Path(root) / name).relative_to(folder).as_posix()
            if not name.startswith(".") and relative not in listed and relative not in skip:
                yield relative


def _rows(reader, metadata_file: Path) -> Iterator:
    """The CSV's rows; a file that is not valid CSV or UTF-8 is a one-line error naming the line."""
    try:
        yield from reader
    except (csv.Error, UnicodeDecodeError) as exc:
        raise PipelineError(f"{metadata_file}: line {reader.line_num + 1}: cannot parse ({exc})") from None


def records(card: DataCard, settings: ImageFolderSettings, ingest: IngestSettings) -> Iterator[SourceRecord]:
    folder = Path(settings.source).resolve()
    if not folder.is_dir():
        raise PipelineError(f"params.yaml: datasets.{card.name}.source: {settings.source} is not a folder")
    metadata_file = folder / settings.metadata
    if not metadata_file.is_file():
        raise PipelineError(f"{metadata_file}: metadata CSV not found")
    _read_header(metadata_file, card)
    listed: set[str] = set()
    with metadata_file.open(newline="", encoding="utf-8") as handle:
        reader = csv.DictReader(handle)
        for row in _rows(reader, metadata_file):
            row.pop(None, None)  # cells beyond the header
            relative = (row.pop("path") or "").strip()
            target = _resolve(folder, relative)
            listed.add(PurePosixPath(relative).as_posix())
            if target is not None:
                listed.add(target.relative_to(folder).as_posix())
            record_id = (row.pop("record_id", None) or "").strip() or relative
            yield _image_record(folder, relative, target, record_id, row, settings, ingest)
    for relative in _unlisted_files(folder, listed, {settings.metadata}):
        digest = None
        if _resolve(folder, relative) is not None:  # never read through a link that leaves the folder
            with (folder / relative).open("rb") as handle:
                digest = hashlib.file_digest(handle, "sha256").hexdigest()
        yield SourceRecord(
            record_id=relative,
            source_uri=f"file:{relative}",
            source_sha256=digest,
            problem=("no_metadata_row", f"{relative!r} has no row in {settings.metadata}"),
        )
