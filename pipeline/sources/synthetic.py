"""The embedded default dataset: shapes on textured backgrounds, deterministic from a seed.

Built so the audits have something true to find:
- the sensitive attribute `group` picks the background texture's orientation. The groups' textures
  are rotations of each other, so no group is harder by construction; a model trained mostly on one
  group reconstructs the other worse only because it saw less of it (the bias audit must catch this);
- acquisition sites differ by camera effects (blur, noise, colour cast); the card holds one out
  (the shift audit must flag it);
- governance defects are planted at configured rates and each record says which one it carries; exact copies
  and near-copies (`near_copy`) name the earlier record they were made from.
Each record draws from its own generator seeded by (seed, index), so record i does not depend on
how many records are generated.
"""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, date, datetime, time, timedelta
from io import BytesIO

import numpy as np
from PIL import Image
from scipy.ndimage import gaussian_filter

from pipeline.cards import DataCard
from pipeline.params import IngestSettings, SyntheticSettings
from pipeline.sources.records import Planted, SourceRecord, sha256_bytes, stored_pixels

SHAPES = ("circle", "square", "triangle", "cross")
SUPERSAMPLE = 2
# in the order their rates are stacked: a new defect goes last, so the records of the others stay the same
DEFECTS = ("consent_withdrawn", "consent_missing", "license_disallowed", "duplicate_image", "near_duplicate")
NEAR_COPIES = ("reencoded", "resized", "brightness", "cropped")
SOURCE_SCALE = 8  # a crop takes a few pixels off a source image this many times the stored size


def _choice(rng: np.random.Generator, shares: dict[str, object]) -> str:
    names = list(shares)
    weights = np.array([getattr(s, "share", s) for s in shares.values()], dtype=np.float64)
    return names[int(rng.choice(len(names), p=weights / weights.sum()))]


def _shape_mask(shape: str, size: int, rng: np.random.Generator) -> np.ndarray:
    """Anti-aliased coverage in [0, 1] of one shape at a random place and size."""
    n = size * SUPERSAMPLE
    radius = rng.uniform(0.2, 0.3) * n
    cy, cx = rng.uniform(radius, n - radius, size=2)
    y, x = np.mgrid[0:n, 0:n] + 0.5
    dy, dx = y - cy, x - cx
    if shape == "circle":
        mask = dx**2 + dy**2 < radius**2
    elif shape == "square":
        mask = np.maximum(abs(dx), abs(dy)) < radius * 0.85
    elif shape == "triangle":
        mask = (dy < radius * 0.8) & (abs(dx) < (dy + radius) * 0.6)
    else:
        arm = radius / 3
        mask = ((abs(dx) < arm) & (abs(dy) < radius)) | ((abs(dy) < arm) & (abs(dx) < radius))
    return mask.reshape(size, SUPERSAMPLE, size, SUPERSAMPLE).mean(axis=(1, 3))


def _texture(group_index: int, num_groups: int, size: int, rng: np.random.Generator) -> np.ndarray:
    """A low-contrast two-colour grating whose orientation is set by the group: groups are rotations of each
    other."""
    angle = np.pi * group_index / num_groups + rng.normal(0, 0.08)
    frequency = rng.uniform(0.16, 0.3)  # cycles per pixel
    phase = rng.uniform(0, 2 * np.pi)
    y, x = np.mgrid[0:size, 0:size].astype(np.float64)
    wave = 0.5 + 0.5 * np.sin(2 * np.pi * frequency * (x * np.cos(angle) + y * np.sin(angle)) + phase)
    base = rng.uniform(0.3, 0.7, size=3)
    amplitude = rng.uniform(0.08, 0.2)
    return base - amplitude + 2 * amplitude * wave[:, :, None]


def render(shape: str, group_index: int, num_groups: int, site, size: int, channels: int,
           rng: np.random.Generator) -> np.ndarray:
    background = _texture(group_index, num_groups, size, rng)
    # the shape stands out from the low-contrast grating in every channel, lighter or darker
    offset = rng.choice([-1, 1], size=3) * rng.uniform(0.25, 0.45, size=3)
    colour = np.clip(background.mean(axis=(0, 1)) + offset, 0, 1)
    coverage = _shape_mask(shape, size, rng)[:, :, None]
    image = background * (1 - coverage) + colour * coverage
    image = image * np.asarray(site.color_cast)
    if site.blur > 0:
        image = gaussian_filter(image, sigma=(site.blur, site.blur, 0))
    image = image + rng.normal(0, site.noise, size=image.shape) if site.noise > 0 else image
    if channels == 1:
        image = image @ np.array([0.299, 0.587, 0.114])[:, None]
    return np.clip(np.round(image * 255), 0, 255).astype(np.uint8)


def _defect(settings: SyntheticSettings, u: float) -> str | None:
    rates = settings.defects.model_dump()
    edge = 0.0
    for name in DEFECTS:
        edge += rates[name]
        if u < edge:
            return name
    return None


def _collected_at(site, rng: np.random.Generator) -> str:
    start, end = date.fromisoformat(site.collected_from), date.fromisoformat(site.collected_to)
    day = start + timedelta(days=int(rng.integers(0, (end - start).days + 1)))
    moment = datetime.combine(day, time(), tzinfo=UTC) + timedelta(seconds=int(rng.integers(0, 86400)))
    return moment.isoformat()


def _clean_record(settings: SyntheticSettings, card: DataCard, index: int) -> tuple[SourceRecord, str | None]:
    """Record `index` as generated before any defect is applied, and the defect it is due to carry."""
    rng = np.random.default_rng([settings.seed, index])
    defect = _defect(settings, rng.random())
    groups = list(settings.group_proportions)
    group = _choice(rng, settings.group_proportions)
    site_name = _choice(rng, settings.sites)
    site = settings.sites[site_name]
    shape = SHAPES[int(rng.integers(len(SHAPES)))]
    pixels = render(shape, groups.index(group), len(groups), site, settings.image_size, settings.channels, rng)
    record_id = f"{card.name}-{index:06d}"
    metadata = {
        "group": group,
        "site": site_name,
        "shape": shape,
        "consent": "granted",
        "license": card.license.spdx,
        "subject": f"subject-{int(rng.integers(settings.num_contributors)):05d}",
        "collected_at": _collected_at(site, rng),
    }
    record = SourceRecord(
        record_id=record_id,
        source_uri=f"synthetic://{card.name}/seed-{settings.seed}/{index}",
        metadata=metadata,
        pixels=pixels,
        source_sha256=sha256_bytes(pixels.tobytes()),
    )
    return record, defect


def near_copy(pixels: np.ndarray, kind: str, rng: np.random.Generator) -> np.ndarray:
    """Stored pixels altered the way copies of an image circulate: a JPEG round trip, scaled down and back up, a
    brightness shift, or a crop of a few pixels of the source image (a fraction of a stored pixel) scaled back."""
    size, channels = pixels.shape[0], pixels.shape[2]
    if kind == "brightness":
        shift = int(rng.choice([-1, 1]) * rng.integers(8, 25))
        return np.clip(pixels.astype(np.int16) + shift, 0, 255).astype(np.uint8)
    image = Image.fromarray(pixels[:, :, 0] if channels == 1 else pixels)
    if kind == "reencoded":
        encoded = BytesIO()
        image.save(encoded, "JPEG", quality=int(rng.integers(75, 96)))
        return stored_pixels(Image.open(encoded), size, channels)
    if kind == "resized":
        smaller = round(size * rng.uniform(0.6, 0.85))
        return stored_pixels(image.resize((smaller, smaller), Image.Resampling.BICUBIC), size, channels)
    if kind == "cropped":
        box = np.zeros(4)
        sides = rng.choice(4, size=int(rng.integers(1, 3)), replace=False)
        box[sides] = rng.integers(1, 5, size=len(sides)) / SOURCE_SCALE
        left, top, right, bottom = box
        return stored_pixels(image.resize((size, size), Image.Resampling.BICUBIC,
                                          box=(left, top, size - right, size - bottom)), size, channels)
    raise ValueError(f"unknown near-copy kind {kind!r}")


def records(card: DataCard, settings: SyntheticSettings, ingest: IngestSettings) -> Iterator[SourceRecord]:
    for index in range(settings.num_images):
        record, defect = _clean_record(settings, card, index)
        planted = Planted(defect) if defect else None
        if defect == "consent_withdrawn":
            record.metadata["consent"] = "withdrawn"
        elif defect == "consent_missing":
            record.metadata["consent"] = None
        elif defect == "license_disallowed":
            record.metadata["license"] = settings.disallowed_license
        elif defect in ("duplicate_image", "near_duplicate"):
            original = _original(settings, index)
            if original is None:
                planted = None
            else:
                copy, _ = _clean_record(settings, card, original)
                copy.record_id, copy.source_uri = record.record_id, record.source_uri
                copy.metadata["subject"] = record.metadata["subject"]
                record = copy
                kind = None
                if defect == "near_duplicate":
                    rng = np.random.default_rng([settings.seed, index, 2])
                    kind = NEAR_COPIES[int(rng.integers(len(NEAR_COPIES)))]
                    record.pixels = near_copy(record.pixels, kind, rng)
                    record.source_sha256 = sha256_bytes(record.pixels.tobytes())
                planted = Planted(defect, kind, f"{card.name}-{original:06d}")
        record.planted = planted
        yield record


def _original(settings: SyntheticSettings, index: int) -> int | None:
    """An earlier record without a defect of its own, so an exact copy is the second accepted instance and a
    near-copy has its original among the accepted records."""
    rng = np.random.default_rng([settings.seed, index, 1])
    for _ in range(32):
        if index == 0:
            return None
        candidate = int(rng.integers(0, index))
        if _defect(settings, np.random.default_rng([settings.seed, candidate]).random()) is None:
            return candidate
    return None
