"""Split each validated dataset into train / val / test and keep held-out domains apart.

Runs only after validation passed. Each record's split is a function of its near-duplicate group and the
seed alone: the group (pipeline.near_duplicates, across all datasets) is named by the smallest sha256 in it,
a record without near-duplicates by its own image, and the BLAKE2b hash of (`prepare.seed`, that sha256),
read as a number u in [0, 1), puts it in `test` when u < test_fraction, in `val` when u < test_fraction +
val_fraction, else in `train`. So no near-copy it finds of a test image is trained on, withdrawing or adding
records moves no record outside the groups they belong to (audits before and after a withdrawal compare the
same images), the same image lands in the same split in every dataset, and another seed draws another
assignment. Records from the card's held-out domains never enter training; they form the `heldout` split the
shift audit reads (a group reaching across a held-out domain is logged as a warning: its held-out images stay
held out).

Stratification by domain and sensitive group comes from the hash ignoring both, so it holds within a
stated tolerance rather than exactly: in a stratum (domain x sensitive attribute values) of n records,
each split's count is Binomial(n, its fraction). The tolerance is that every split's count in every
stratum lies within the central 99.9% interval of that binomial (`STRATUM_CONFIDENCE`); prepare logs a
warning naming any that does not (chance alone puts about one in a thousand outside). No image (sha256)
may appear in two splits, across all datasets: a leak stops the stage.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

import numpy as np
import pandas as pd
from scipy.stats import binom

from pipeline import PipelineError
from pipeline.artifacts import MANIFEST, SPLITS, Layout, allocated, read_table
from pipeline.cards import DataCard, card_path, load_card
from pipeline.near_duplicates import group_keys, near_pairs, shard_reader
from pipeline.params import DEFAULT_PARAMS, NearDuplicateSettings, PrepareSettings, load_params

log = logging.getLogger(__name__)

STRATUM_CONFIDENCE = 0.999  # the stated stratification tolerance (see the module docstring)
GROUP = "near_duplicate_group"  # the smallest sha256 of a record's near-duplicate group: what decides its split


def strata(manifest: pd.DataFrame, card: DataCard) -> pd.Series:
    """The stratum of each record: its domain and the values of its sensitive attributes."""
    columns = ["domain", *(attr.name for attr in card.sensitive_attributes)]
    values = manifest[columns].astype(str).itertuples(index=False)
    return pd.Series(["|".join(row) for row in values], index=manifest.index, dtype=object, name="stratum")


def unit_hash(seed: int, sha256: str) -> float:
    """A number in [0, 1) fixed by the seed and the image alone (the top 53 bits of a BLAKE2b digest)."""
    digest = hashlib.blake2b(f"{seed}|{sha256}".encode(), digest_size=8).digest()
    return (int.from_bytes(digest, "big") >> 11) / 2**53


def near_duplicate_groups(manifests: dict[str, pd.DataFrame], folders: dict[str, Path],
                          settings: NearDuplicateSettings) -> dict[str, pd.Series]:
    """Each record's near-duplicate group key, found across every dataset (pixels read from `folders`), indexed
    like its manifest."""
    columns = ["sha256", "phash", "pixels_file", "pixels_index"]
    records = pd.concat([m[columns].assign(dataset=name) for name, m in manifests.items()], ignore_index=True)
    keys = group_keys(records["sha256"], near_pairs(records, shard_reader(folders), settings)).to_numpy()
    ends = np.cumsum([len(m) for m in manifests.values()])
    return {name: pd.Series(keys[end - len(m):end], index=m.index, name=GROUP)
            for (name, m), end in zip(manifests.items(), ends)}


def assign_splits(manifest: pd.DataFrame, card: DataCard, settings: PrepareSettings, key: str = "sha256") -> pd.Series:
    """The split of every record, indexed like the manifest: a function of its domain and its `key` (its image, or
    its near-duplicate group) alone, never of the other records."""
    u = manifest[key].map(lambda sha256: unit_hash(settings.seed, sha256)).to_numpy(dtype=np.float64)
    below_test, below_val = u < settings.test_fraction, u < settings.test_fraction + settings.val_fraction
    split = pd.Series(np.select([below_test, below_val], ["test", "val"], "train"), index=manifest.index,
                      dtype=object)
    split[manifest["domain"].isin(card.domains.held_out)] = "heldout"
    return split


def stratum_shares(assigned: pd.DataFrame, card: DataCard, settings: PrepareSettings) -> pd.DataFrame:
    """Per stratum and split (held-out domains aside): the count, the stratum's size n, the share, the target
    fraction, the central `STRATUM_CONFIDENCE` interval of Binomial(n, target) and whether the count is in it."""
    targets = {"train": 1 - settings.val_fraction - settings.test_fraction, "val": settings.val_fraction,
               "test": settings.test_fraction}
    kept = assigned[assigned["split"] != "heldout"]
    counts = pd.crosstab(strata(kept, card), kept["split"]).reindex(columns=list(targets),
                                                                                     fill_value=0)
    table = counts.melt(ignore_index=False, var_name="split", value_name="count").reset_index()
    table["n"] = table.groupby("stratum")["count"].transform("sum")
    table["share"] = table["count"] / table["n"]
    table["target"] = table["split"].map(targets)
    table["low"], table["high"] = binom.interval(STRATUM_CONFIDENCE, table["n"], table["target"])
    table["within"] = table["count"].between(table["low"], table["high"])
    return table.sort_values(["stratum", "split"], ignore_index=True)


def leaks(assigned: pd.DataFrame, key: str = "sha256") -> pd.DataFrame:
    """Images (by sha256), or near-duplicate groups (by GROUP), assigned to more than one split, across every
    dataset."""
    splits_per_key = assigned.groupby(key)["split"].nunique()
    leaked = splits_per_key[splits_per_key > 1].index
    return assigned[assigned[key].isin(leaked)].sort_values([key, "split"])


def split_sizes(assigned: pd.DataFrame, card: DataCard) -> dict:
    """Counts per split, overall, per group, per domain, and per group within domain, for the report."""
    sizes = {}
    for split in SPLITS:
        part = assigned[assigned["split"] == split]
        entry = {"total": int(len(part)), "by_domain": part["domain"].value_counts().sort_index().to_dict()}
        for attr in card.sensitive_attributes:
            entry[f"by_{attr.name}"] = {value: int((part[attr.name] == value).sum()) for value in attr.values}
            entry[f"by_domain_and_{attr.name}"] = {
                f"{domain}|{value}": int(n) for (domain, value), n in part.groupby(["domain", attr.name]).size().items()
            }
        sizes[split] = entry
    return sizes


def _warn_outside_tolerance(dataset: str, shares: pd.DataFrame) -> None:
    for row in shares[~shares["within"]].to_dict("records"):
        log.warning("%s: stratum %s has %d of %d records in %s (%.1f%%), outside the %g%% binomial interval "
                    "[%d, %d] around %.1f%%", dataset, row["stratum"], row["count"], row["n"], row["split"],
                    100 * row["share"], 100 * STRATUM_CONFIDENCE, row["low"], row["high"], 100 * row["target"])


def _warn_groups_across_held_out_domains(spanning: pd.DataFrame) -> None:
    """Held-out domains are the cards' choice, not the images': a group with images in one and in another domain
    is split by it (moving either side would put a domain's images in the wrong place)."""
    if not spanning.empty:
        examples = ", ".join(f"{r.dataset}/{r.record_id} in {r.split}" for r in spanning.head(6).itertuples())
        log.warning("%d near-duplicate groups reach across a held-out domain: their images in it stay in heldout, "
                    "the others follow the group's split (%s)", spanning[GROUP].nunique(), examples)


def _require_validation(layout: Layout, datasets: list[str]) -> None:
    summary = layout.validation_summary()
    if not summary.passed:
        raise PipelineError(f"{layout.validation_file}: validation failed ({summary.failed_critical} critical); "
                            "fix the data and re-run validate before preparing splits")
    missing = sorted(set(datasets) - set(summary.datasets))
    if missing:
        raise PipelineError(f"{layout.validation_file}: datasets {missing} were not validated; re-run validate")


def _write_pixels(assigned: pd.DataFrame, ingested: Path, target: Path, image_shape: tuple[int, int, int]) -> None:
    """Gather a split's pixels shard by shard into one .npy, written in place (memory stays flat)."""
    out = allocated(target, np.uint8, (len(assigned), *image_shape))
    positions = np.arange(len(assigned))
    for name, rows in assigned.groupby("pixels_file").indices.items():
        shard = np.load(ingested / name, mmap_mode="r")
        out[positions[rows]] = shard[assigned["pixels_index"].to_numpy()[rows]]
    out.flush()
    del out


def prepare(params_path: Path = DEFAULT_PARAMS, cards_dir: Path = Path("data_cards"),
            layout: Layout = Layout()) -> dict:
    params = load_params(params_path)
    names = list(params.datasets)
    _require_validation(layout, names)
    assigned: dict[str, pd.DataFrame] = {}
    cards: dict[str, DataCard] = {}
    manifests = {name: read_table(layout.sealed(layout.ingested(name)) / MANIFEST) for name in names}
    groups = near_duplicate_groups(manifests, {name: layout.ingested(name) for name in names},
                                   params.validation.near_duplicates)
    for name, manifest in manifests.items():
        cards[name] = load_card(card_path(name, cards_dir))
        manifest = manifest.assign(**{GROUP: groups[name]})
        assigned[name] = manifest.assign(split=assign_splits(manifest, cards[name], params.prepare, key=GROUP))
        _warn_outside_tolerance(name, stratum_shares(assigned[name], cards[name], params.prepare))
    combined = pd.concat([frame[["dataset", "record_id", "sha256", GROUP, "split"]] for frame in assigned.values()])
    leaked = leaks(combined)
    if not leaked.empty:
        examples = ", ".join(f"{r.dataset}/{r.record_id} in {r.split}" for r in leaked.head(6).itertuples())
        raise PipelineError(f"leakage: {leaked['sha256'].nunique()} images appear in more than one split ({examples})")
    _warn_groups_across_held_out_domains(leaks(combined, GROUP))

    sizes = {}
    with layout.writing(layout.prepared()) as staged:
        for name, frame in assigned.items():
            staged(layout.prepared(name)).mkdir(parents=True)
            settings = params.datasets[name]
            image_shape = (settings.image_size, settings.image_size, settings.channels)
            for split in SPLITS:
                part = frame[frame["split"] == split].sort_values("record_id").reset_index(drop=True)
                _write_pixels(part, layout.ingested(name), staged(layout.split_pixels(name, split)), image_shape)
                part.assign(split_index=np.arange(len(part), dtype=np.int32)).to_parquet(
                    staged(layout.split_records(name, split)), index=False)
            sizes[name] = split_sizes(frame, cards[name])
            log.info("%s: %s", name, ", ".join(f"{s} {sizes[name][s]['total']}" for s in SPLITS))
        (staged(layout.prepared()) / "split_sizes.json").write_text(json.dumps(sizes, indent=2, sort_keys=True) + "\n")
    return sizes
