"""The real handwritten digits that ship inside scikit-learn (no download).

They are the UCI "Optical Recognition of Handwritten Digits" test portion: 8x8 images of 0..16
counts, upscaled here to the configured size.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import sklearn
from PIL import Image
from sklearn.datasets import load_digits

from pipeline.cards import DataCard
from pipeline.params import DigitsSettings, IngestSettings
from pipeline.sources.records import SourceRecord, sha256_bytes, stored_pixels


def records(card: DataCard, settings: DigitsSettings, ingest: IngestSettings) -> Iterator[SourceRecord]:
    digits = load_digits()
    raw = digits.images.astype(np.uint8)  # values 0..16, exact
    label_column = card.labels.column if card.labels else "label"
    for index, (image, target) in enumerate(zip(raw, digits.target)):
        grey = Image.fromarray(np.round(image.astype(np.float64) * 255 / 16).astype(np.uint8), mode="L")
        yield SourceRecord(
            record_id=f"{card.name}-{index:04d}",
            source_uri=f"sklearn://datasets/load_digits/{index}?scikit-learn={sklearn.__version__}",
            metadata={label_column: str(int(target))},
            pixels=stored_pixels(grey, settings.image_size, settings.channels),
            source_sha256=sha256_bytes(image.tobytes()),
        )
