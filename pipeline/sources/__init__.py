"""Source kinds: each module yields SourceRecords for one kind of dataset.

Modules are imported on demand, so an ingest stage reads only the code of its own source kind.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Iterator

from pipeline.sources.records import SourceRecord


def source_records(kind: str) -> Callable[..., Iterator[SourceRecord]]:
    """The `records(card, settings)` generator of a source kind."""
    return importlib.import_module(f"pipeline.sources.{kind}").records
