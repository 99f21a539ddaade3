"""Near-duplicate images: pairs of perceptual hashes within a Hamming distance, and the groups they join.

Comparing every pair costs n² / 2 distances, which millions of images cannot afford. Pigeonhole instead: cut
the 64-bit hash into `max_distance + 1` bands; two hashes at most `max_distance` bits apart differ in fewer
bands than there are, so they agree exactly on at least one. Candidates are the records that share a band's
value (a bucket), and each candidate's distance is then computed exactly, so nothing within the distance is
missed and nothing beyond it is reported. The work is the sum of the buckets' squared sizes: for hashes spread
evenly about bands x n² / 2^(64 / bands + 1) candidates (5 bands of 12-13 bits at distance 4: n² / 2800).
Groups are the connected components of the pairs (a copy of a copy joins its original's group).
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import pandas as pd
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components

BITS = 64


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


def groups(count: int, found: np.ndarray) -> np.ndarray:
    """The group (connected component) of each of `count` positions, given their pairs."""
    graph = coo_matrix((np.ones(len(found)), (found[:, 0], found[:, 1])), shape=(count, count))
    return connected_components(graph, directed=False)[1]


def pair_table(records: pd.DataFrame, max_distance: int) -> pd.DataFrame:
    """The near-duplicate pairs among records (dataset, record_id, phash), within and across datasets: one row
    per pair, the earlier record first, its distance in bits."""
    found = pairs(hash_values(records["phash"]), max_distance)
    first, second = records.iloc[found[:, 0]], records.iloc[found[:, 1]]
    return pd.DataFrame({
        "dataset": first["dataset"].to_numpy(), "record_id": first["record_id"].to_numpy(),
        "other_dataset": second["dataset"].to_numpy(), "other_record_id": second["record_id"].to_numpy(),
        "distance": found[:, 2],
    })


def group_keys(records: pd.DataFrame, max_distance: int) -> pd.Series:
    """Each record's near-duplicate group named by the smallest sha256 in it (its own sha256 when alone), indexed
    like `records`: a key that the group's other members leaving does not change unless that image leaves."""
    labels = groups(len(records), pairs(hash_values(records["phash"]), max_distance))
    return records["sha256"].groupby(labels).transform("min").rename("group")
