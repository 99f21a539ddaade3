"""Near-duplicate images: candidate pairs from hashes, each decided on the pixels, and the groups they join.

Comparing every pair's pixels costs n² / 2 comparisons, which millions of images cannot afford; a hash alone
either misses copies or pairs look-alikes (a 64-bit pHash at 32 x 32 pixels puts some re-encoded copies 6-10
bits from their original, and unrelated images of the same shape, place and size within 4). So detection is
two steps:

1. Candidates: pairs within `phash_distance` bits of pHash (the manifest's `phash`), or within `hash_distance`
   bits in any of `hashes` SimHashes of the image's thumbnail (colour, 8 x 8, mean removed, unit length: the
   sign of its dot product with 64 fixed random +-1 vectors per hash). A SimHash bit differs between two
   thumbnails with probability (angle between them) / pi, so a near-copy (correlation >= 0.98, angle <= 0.2)
   differs in about 4 of 64 bits, and a copy missed by one hash is caught by another drawn independently.
2. Decision: a candidate is a near-duplicate when the correlation of the two thumbnails (their dot product) is
   at least `min_correlation` and that of 16 x 16 thumbnails at least `min_detail_correlation`: brightness and
   contrast changes drop out, colour and layout stay, and look-alikes (same shape, place and size, another
   texture) that agree at 8 x 8 differ at 16 x 16, where a resized or re-encoded copy still agrees.

Pairs within a distance come from band buckets, never all pairs: cut the 64-bit hash into distance + 1 bands;
two hashes at most that many bits apart agree exactly on at least one band (pigeonhole), so candidates are the
records that share a band's value, each checked exactly. The work is the buckets' squared sizes, about
bands x n² / 2^(64 / bands + 1) for evenly spread hashes (n² / 2800 at distance 4). Memory is a few 64-bit hashes
per image; thumbnails are read again, only for the records of candidate pairs. Thumbnail and hash arithmetic is
exact (integers), so the same pixels give the same pairs whatever the thread count.
Groups are the connected components of the pairs (a copy of a copy joins its original's group).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import numpy as np
import pandas as pd
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components

from pipeline.params import NearDuplicateSettings

log = logging.getLogger(__name__)

BITS = 64
PHASH = r"[0-9a-f]{16}"  # records.perceptual_hash: 64 bits as hex
THUMBNAIL = 8  # pixels a side: the layout and colours that survive re-encoding, resizing and small crops
DETAIL = 16  # pixels a side of the second thumbnail the decision reads: texture that tells look-alikes apart
SCALE = 2**14  # a unit-length thumbnail's components as integers (|component| <= 1)
FLAT = 0.5  # a thumbnail whose RMS deviation from its mean is below this many grey levels has no layout to compare
SEED = 0  # of the SimHash projections: fixed, so hashes (and pairs) do not change between runs
BATCH = 4096  # images read and reduced at a time


def hash_values(hex_hashes: Iterable[str]) -> np.ndarray:
    """16-hex-digit hashes (the manifest's `phash`) as unsigned 64-bit integers."""
    return np.frombuffer(bytes.fromhex("".join(hex_hashes)), dtype=">u8").astype(np.uint64)


def bands(max_distance: int) -> list[tuple[int, int]]:
    """(shift, mask) of each of the `max_distance + 1` bands, as even as 64 bits allow."""
    edges = np.linspace(0, BITS, max_distance + 2).round().astype(int)
    return [(int(low), (1 << int(high - low)) - 1) for low, high in zip(edges[:-1], edges[1:])]


def pairs(hashes: np.ndarray, max_distance: int) -> np.ndarray:
    """Every pair (i, j, distance), i < j positions in `hashes`, at most `max_distance` bits apart, sorted."""
    found = []
    for shift, mask in bands(max_distance):
        keys = (hashes >> np.uint64(shift)) & np.uint64(mask)
        order = np.argsort(keys, kind="stable")
        ordered = keys[order]
        starts = np.flatnonzero(np.r_[True, ordered[1:] != ordered[:-1]])
        ends = np.r_[starts[1:], len(ordered)]
        for start, end in zip(starts[ends - starts > 1], ends[ends - starts > 1]):
            members = np.sort(order[start:end])
            first, second = np.triu_indices(len(members), 1)
            first, second = members[first], members[second]
            distance = np.bitwise_count(hashes[first] ^ hashes[second])
            near = distance <= max_distance
            found.append(np.stack([first[near], second[near], distance[near]], axis=1))
    if not found:
        return np.empty((0, 3), dtype=np.int64)
    return np.unique(np.concatenate(found).astype(np.int64), axis=0)  # a pair that shares several bands, once


def _area_weights(size: int, side: int) -> np.ndarray:
    """[side, size] integer weights: side x the overlap of each pixel with each thumbnail cell, so each cell sums
    to `size` (area averaging at any size, in integers)."""
    edges = np.arange(side + 1) * size / side
    low, high = edges[:-1, None], edges[1:, None]
    pixel = np.arange(size)[None, :]
    return np.round(np.clip(np.minimum(high, pixel + 1) - np.maximum(low, pixel), 0, None) * side)


def thumbnails(images: np.ndarray, side: int = THUMBNAIL) -> np.ndarray:
    """[n, size, size, channels] uint8 as [n, 3 * side²] int32 thumbnails: area-averaged to side², grey repeated
    to three channels (so datasets of either kind compare), the mean removed (a brightness shift drops out),
    scaled to length SCALE (so does contrast). A flat thumbnail is all zeros and pairs with nothing. The sums are
    of integers below 2^53, exact in floating point whatever order the matrix product adds them in."""
    count, size, _, channels = images.shape
    weights = _area_weights(size, side)
    rows = images.reshape(count, size, size * channels).transpose(0, 2, 1).reshape(-1, size) @ weights.T
    cells = rows.reshape(count, size, channels, side).transpose(0, 2, 3, 1).reshape(-1, size) @ weights.T
    cells = cells.reshape(count, channels, side * side)  # [n, channel, row x column] x size²
    if channels == 1:
        cells = np.repeat(cells, 3, axis=1)
    cells = cells.reshape(count, -1) / size**2
    centred = cells - cells.mean(axis=1, keepdims=True)
    norm = np.sqrt((centred**2).sum(axis=1, keepdims=True))
    flat = norm < FLAT * np.sqrt(centred.shape[1])
    return np.where(flat, 0, np.round(centred / np.where(flat, 1, norm) * SCALE)).astype(np.int32)


def projections(count: int) -> np.ndarray:
    """[3 * 8 * 8, 64 * count] fixed random +-1 vectors: one column per SimHash bit."""
    rng = np.random.default_rng(SEED)
    return rng.choice(np.array([-1.0, 1.0]), size=(THUMBNAIL * THUMBNAIL * 3, BITS * count))


def simhashes(thumbs: np.ndarray, count: int) -> np.ndarray:
    """[n, count] 64-bit SimHashes of thumbnails: bit b is whether the thumbnail's dot product with projection b
    is positive (sums of integers below 2^53: exact)."""
    bits = (thumbs.astype(np.float64) @ projections(count)) > 0
    packed = np.packbits(bits.reshape(len(thumbs), count, BITS), axis=-1)
    return packed.view(">u8").reshape(len(thumbs), count).astype(np.uint64)


def correlations(first: np.ndarray, second: np.ndarray) -> np.ndarray:
    """Row-wise correlation of thumbnails (0 where either is flat), from exact integer dot products."""
    a, b = first.astype(np.int64), second.astype(np.int64)
    dot, norms = (a * b).sum(axis=1), (a * a).sum(axis=1) * (b * b).sum(axis=1)
    return np.where(norms > 0, dot / np.sqrt(np.maximum(norms, 1)), 0.0)


def candidates(phashes: np.ndarray, has_phash: np.ndarray, hashes: np.ndarray, flat: np.ndarray,
               settings: NearDuplicateSettings) -> np.ndarray:
    """Sorted unique (i, j), i < j: pairs within `phash_distance` bits of pHash (records with one) or within
    `hash_distance` bits in any SimHash (records with a thumbnail that is not flat)."""
    found = []
    for positions, values, distance in (
            (np.flatnonzero(has_phash), phashes[has_phash], settings.phash_distance),
            *((np.flatnonzero(~flat), hashes[~flat, k], settings.hash_distance) for k in range(hashes.shape[1]))):
        near = pairs(values, distance)
        found.append(np.stack([positions[near[:, 0]], positions[near[:, 1]]], axis=1))
    return np.unique(np.concatenate(found), axis=0) if found else np.empty((0, 2), dtype=np.int64)


ImageReader = Callable[[pd.DataFrame], Iterator[tuple[np.ndarray, np.ndarray]]]


def shard_reader(folders: dict[str, Path]) -> ImageReader:
    """Reads records' stored pixels (`dataset`, `pixels_file`, `pixels_index`), one memory-mapped shard and at most
    BATCH images at a time: yields (positions in the frame, images)."""
    def read(records: pd.DataFrame) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        for (dataset, name), rows in records.groupby(["dataset", "pixels_file"], sort=True).indices.items():
            shard = np.load(folders[dataset] / name, mmap_mode="r")
            indices = records["pixels_index"].to_numpy()[rows]
            for start in range(0, len(rows), BATCH):
                yield rows[start:start + BATCH], shard[indices[start:start + BATCH]]
    return read


def near_pairs(records: pd.DataFrame, read: ImageReader, settings: NearDuplicateSettings) -> np.ndarray:
    """The near-duplicate pairs among records (phash, and what `read` needs to find their pixels): an array of
    (i, j, pHash distance or -1 where a hash is malformed, correlation), i < j positions, sorted."""
    has_phash = records["phash"].str.fullmatch(PHASH, na=False).to_numpy()
    phashes = np.zeros(len(records), dtype=np.uint64)
    phashes[has_phash] = hash_values(records["phash"][has_phash])
    hashes = np.zeros((len(records), settings.hashes), dtype=np.uint64)
    flat = np.zeros(len(records), dtype=bool)
    for rows, images in read(records):
        thumbs = thumbnails(images)
        hashes[rows], flat[rows] = simhashes(thumbs, settings.hashes), ~thumbs.any(axis=1)
    found = candidates(phashes, has_phash, hashes, flat, settings)
    involved = np.unique(found)
    thumbs = np.zeros((len(involved), THUMBNAIL * THUMBNAIL * 3), dtype=np.int32)
    details = np.zeros((len(involved), DETAIL * DETAIL * 3), dtype=np.int32)
    for rows, images in read(records.iloc[involved]):
        thumbs[rows], details[rows] = thumbnails(images), thumbnails(images, DETAIL)
    first, second = np.searchsorted(involved, found[:, 0]), np.searchsorted(involved, found[:, 1])
    correlation = correlations(thumbs[first], thumbs[second])
    near = ((correlation >= settings.min_correlation)
            & (correlations(details[first], details[second]) >= settings.min_detail_correlation))
    log.info("near-duplicates: %d candidate pairs among %d images, %d decided near-copies", len(found),
             len(records), int(near.sum()))
    i, j = found[near, 0], found[near, 1]
    both = has_phash[i] & has_phash[j]
    distance = np.where(both, np.bitwise_count(phashes[i] ^ phashes[j]).astype(np.int64), -1)
    return np.rec.fromarrays([i, j, distance, correlation[near]], names="i,j,distance,correlation")


def groups(count: int, found: np.ndarray) -> np.ndarray:
    """The group (connected component) of each of `count` positions, given their pairs (i, j)."""
    graph = coo_matrix((np.ones(len(found)), (found["i"], found["j"])), shape=(count, count))
    return connected_components(graph, directed=False)[1]


def pair_table(records: pd.DataFrame, read: ImageReader, settings: NearDuplicateSettings) -> pd.DataFrame:
    """The near-duplicate pairs among records (dataset, record_id, phash, pixels), within and across datasets: one
    row per pair, the earlier record first, with its pHash distance in bits and the thumbnails' correlation."""
    found = near_pairs(records, read, settings)
    first, second = records.iloc[found["i"]], records.iloc[found["j"]]
    return pd.DataFrame({
        "dataset": first["dataset"].to_numpy(), "record_id": first["record_id"].to_numpy(),
        "other_dataset": second["dataset"].to_numpy(), "other_record_id": second["record_id"].to_numpy(),
        "distance": found["distance"], "correlation": found["correlation"].round(4),
    })


def group_keys(sha256: pd.Series, found: np.ndarray) -> pd.Series:
    """Each record's near-duplicate group, given the pairs among records (positions in `sha256`), named by the
    smallest sha256 in it (its own when alone), indexed like `sha256`: a key that the group's other members leaving
    does not change unless that image leaves."""
    return sha256.groupby(groups(len(sha256), found)).transform("min").rename("group")
