"""A folder of image files plus a metadata CSV, one row per file: how users bring their own data.

The CSV needs a `path` column (relative to the folder) and the columns the card names; `record_id`
is optional (the path is used otherwise). Rows and files are reconciled both ways: a row without a
file and a file without a row are each quarantined, so nothing in the folder goes unaccounted for.
Only regular files are ever opened: a named pipe would block ingest and a device can have effects.
"""

from __future__ import annotations

import csv
import hashlib
import io
import mimetypes
import os
import re
import stat
from collections.abc import Iterable, Iterator
from functools import lru_cache, partial
from pathlib import Path, PurePosixPath
from typing import BinaryIO

from pipeline import PipelineError
from pipeline.cards import DataCard
from pipeline.params import ImageFolderSettings, IngestSettings
from pipeline.sources.records import Credentials, ImageProblem, Item, SourceRecord, decode, sha256_bytes

# the CAWG training-and-data-mining assertion, and the C2PA one it replaced
TRAINING_MINING = re.compile(r"^(cawg|c2pa)\.training-mining(\.v\d+)?$")

FILE_TYPES = {stat.S_IFDIR: "a directory", stat.S_IFIFO: "a named pipe", stat.S_IFSOCK: "a socket",
              stat.S_IFCHR: "a character device", stat.S_IFBLK: "a block device",
              stat.S_IFLNK: "a symbolic link that does not resolve"}


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


def _utf8_lines(lines: Iterable[str], metadata: Path) -> Iterator[str]:
    """The lines, stopping at the first that is not UTF-8. Bad bytes arrive as surrogates
    (errors="surrogateescape"): a strict decoder fails a whole read-ahead block, not a line."""
    for number, line in enumerate(lines, 1):
        try:
            line.encode("utf-8")
        except UnicodeEncodeError as exc:
            byte = ord(line[exc.start]) - 0xDC00
            raise PipelineError(f"{metadata}: line {number}: not UTF-8 (byte 0x{byte:02x})") from None
        yield line


def _csv_rows(handle: Iterable[str], metadata: Path) -> Iterator[tuple[int, list[str]]]:
    """Each non-blank record with the line it starts on; a file that is not valid CSV is a one-line
    error naming the line."""
    reader = csv.reader(_utf8_lines(handle, metadata))
    end = 0
    try:
        for cells in reader:  # a blank line is an empty record, so every line belongs to one record
            start, end = end + 1, reader.line_num
            if cells:
                yield start, cells
    except csv.Error as exc:
        raise PipelineError(f"{metadata}: line {reader.line_num}: cannot parse ({exc})") from None


def _header(rows: Iterator[tuple[int, list[str]]], metadata: Path, card: DataCard) -> list[str]:
    first = next(rows, None)
    if first is None:
        raise PipelineError(f"{metadata}: empty file, expected a header row")
    header = first[1]
    missing = [column for column in required_columns(card) if column not in header]
    if missing:
        raise PipelineError(f"{metadata}: header: missing column(s) {missing} that the card names")
    return header


def _resolve(folder: Path, relative: str) -> Path | None:
    """The file a row names, or None when the path escapes the folder (absolute, '..', or a symlink out).
    A symbolic link loop resolves to the link itself, which is then refused by its type."""
    if not relative or PurePosixPath(relative).is_absolute() or Path(relative).is_absolute():
        return None
    target = Path(os.path.realpath(folder / relative))
    return target if target.is_relative_to(folder) else None


def _open_regular(path: Path, relative: str) -> BinaryIO:
    """A resolved path opened for reading only when it is a regular file. The type is checked before
    opening and again on the descriptor (opened without following links or waiting for a writer), so
    a pipe swapped in between can neither block ingest nor be read. A missing file raises
    FileNotFoundError (or NotADirectoryError) for the caller to judge."""
    try:
        mode = os.lstat(path).st_mode
        if stat.S_ISREG(mode):
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
            mode = os.fstat(fd).st_mode
            if stat.S_ISREG(mode):
                return os.fdopen(fd, "rb")
            os.close(fd)
    except (FileNotFoundError, NotADirectoryError):
        raise
    except OSError as exc:
        raise ImageProblem("unreadable_file", f"cannot open {relative!r}: {exc.strerror}") from None
    kind = FILE_TYPES.get(stat.S_IFMT(mode), "a special file")
    raise ImageProblem("not_a_regular_file", f"{relative!r} is {kind}, not a regular file")


def _image_record(folder: Path, relative: str, target: Path | None, record_id: str, metadata: dict,
                  settings: ImageFolderSettings, ingest: IngestSettings) -> SourceRecord:
    record = SourceRecord(record_id=record_id, source_uri=f"file:{relative}", metadata=metadata)
    if target is None:
        record.problem = ("path_escapes_folder", f"path {relative!r} points outside {folder}")
        return record
    try:
        with _open_regular(target, relative) as handle:
            size = os.fstat(handle.fileno()).st_size
            if size > ingest.max_file_bytes:
                raise ImageProblem("file_too_large", f"{size} bytes > ingest.max_file_bytes {ingest.max_file_bytes}")
            data = handle.read()
        record.source_sha256 = sha256_bytes(data)
        record.credentials = read_credentials(data, relative)
        record.pixels = decode(data, settings.image_size, settings.channels, ingest.alpha_background,
                               ingest.max_image_pixels)
    except (FileNotFoundError, NotADirectoryError):
        record.problem = ("file_missing", f"no file at {relative!r}")
    except ImageProblem as problem:
        record.problem = (problem.reason, problem.detail)
    return record


@lru_cache(maxsize=1)
def _c2pa_formats() -> frozenset[str]:
    import c2pa

    return frozenset(c2pa.Reader.get_supported_mime_types())


def read_credentials(data: bytes, relative: str) -> Credentials | None:
    """The image's C2PA manifest as read and validated by c2pa-python, or None when it carries none (or is of a
    format C2PA does not cover). A manifest that cannot be read is `unreadable`, never an exception."""
    import c2pa

    mime = mimetypes.guess_type(relative)[0]
    if mime not in _c2pa_formats():
        return None
    try:
        reader = c2pa.Reader.try_create(mime, io.BytesIO(data))
        if reader is None:
            return None
        with reader:
            state, manifest = reader.get_validation_state(), reader.get_active_manifest() or {}
            failures = (reader.get_validation_results() or {}).get("activeManifest", {}).get("failure", [])
    except (c2pa.C2paError, KeyError, ValueError) as exc:
        return Credentials(state="unreadable", detail=str(exc).splitlines()[0][:300] if str(exc) else "unreadable")
    entries = {}  # a malformed assertion keeps its raw value, which the policy then refuses as unknown
    for assertion in manifest.get("assertions", []):
        if isinstance(assertion, dict) and TRAINING_MINING.match(str(assertion.get("label", ""))):
            data = assertion.get("data")
            found = data.get("entries") if isinstance(data, dict) else data
            entries.update({str(k): str(v.get("use")) if isinstance(v, dict) else repr(v) for k, v in found.items()}
                           if isinstance(found, dict) else {"entries": repr(found)})
    info = (manifest.get("claim_generator_info") or [{}])[0]
    generator = manifest.get("claim_generator") or " ".join(str(info[k]) for k in ("name", "version") if info.get(k))
    signature = manifest.get("signature_info") or {}
    signer = ", ".join(str(signature[k]) for k in ("common_name", "issuer") if signature.get(k)) or None
    return Credentials(state=str(state), entries=entries, claim_generator=generator or None, signer=signer,
                       detail="; ".join(f"{f.get('code')}: {f.get('explanation')}" for f in failures)[:300])


def _unlisted_record(folder: Path, relative: str, metadata_name: str) -> SourceRecord:
    """A file without a row: hashed when it is a regular file inside the folder, else refused by its type."""
    record = SourceRecord(record_id=relative, source_uri=f"file:{relative}",
                          problem=("no_metadata_row", f"{relative!r} has no row in {metadata_name}"))
    target = _resolve(folder, relative)
    if target is None:  # never read through a link that leaves the folder
        return record
    try:
        with _open_regular(target, relative) as handle:
            record.source_sha256 = hashlib.file_digest(handle, "sha256").hexdigest()
    except (FileNotFoundError, NotADirectoryError):
        pass  # a dangling link: nothing to hash
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


def records(card: DataCard, settings: ImageFolderSettings, ingest: IngestSettings) -> Iterator[Item]:
    """Rows, then files without a row, in order; each file is read and decoded by the deferred item (in ingest's
    workers)."""
    folder = Path(settings.source).resolve()
    if not folder.is_dir():
        raise PipelineError(f"params.yaml: datasets.{card.name}.source: {settings.source} is not a folder")
    metadata_file = folder / settings.metadata
    if not metadata_file.is_file():
        raise PipelineError(f"{metadata_file}: metadata CSV not found")
    listed: set[str] = set()
    # utf-8-sig: spreadsheet programs start the file with a byte-order mark
    with metadata_file.open(newline="", encoding="utf-8-sig", errors="surrogateescape") as handle:
        rows = _csv_rows(handle, metadata_file)
        header = _header(rows, metadata_file, card)
        for line, cells in rows:
            if len(cells) != len(header):  # its cells cannot be matched to columns, so none is trusted
                where = f"{settings.metadata} line {line}"
                yield SourceRecord(record_id=where, source_uri=f"file:{settings.metadata}", problem=(
                    "malformed_row", f"{where}: {len(cells)} cells, the header has {len(header)}"))
                continue
            row = dict(zip(header, cells))
            relative = row.pop("path").strip()
            if "\x00" in relative:  # no file can have that name, and the OS refuses to look one up
                where = f"{settings.metadata} line {line}"
                yield SourceRecord(record_id=where, source_uri=f"file:{settings.metadata}", problem=(
                    "malformed_row", f"{where}: the path cell holds a NUL byte"))
                continue
            target = _resolve(folder, relative)
            listed.add(PurePosixPath(relative).as_posix())
            if target is not None:
                listed.add(target.relative_to(folder).as_posix())
            record_id = row.pop("record_id", "").strip() or relative
            yield partial(_image_record, folder, relative, target, record_id, row, settings, ingest)
    for relative in _unlisted_files(folder, listed, {settings.metadata}):
        yield partial(_unlisted_record, folder, relative, settings.metadata)
