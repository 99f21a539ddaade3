"""Source kinds: each module yields SourceRecords for one kind of dataset.

Modules are imported on demand, so an ingest stage reads only the code of its own source kind.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Iterator

from pipeline.sources.records import Item


def source_records(kind: str) -> Callable[..., Iterator[Item]]:
    """The `records(card, settings, ingest)` generator of a source kind: records, or items that make them."""
    return importlib.import_module(f"pipeline.sources.{kind}").records
