"""Split each validated dataset into train / val / test and keep held-out domains apart.

Runs only after validation passed. Splits are stratified by sensitive group and domain, so every
group and site keeps its share in each split, and deterministic from a seed: each stratum is shuffled
by a generator seeded from (seed, stratum), so one stratum's assignment does not depend on another's.
Records from the card's held-out domains never enter training; they form the `heldout` split the
shift audit reads. No image (sha256) may appear in two splits, across all datasets: a leak stops the
stage.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
from pathlib import Path

import numpy as np
import pandas as pd

from pipeline import PipelineError
from pipeline.cards import DataCard, card_path, load_card
from pipeline.params import DEFAULT_PARAMS, PrepareSettings, load_params
from pipeline.paths import INGESTED, PREPARED, VALIDATION_REPORT

log = logging.getLogger(__name__)

VALIDATION_SUMMARY = VALIDATION_REPORT / "summary.json"
SPLITS = ("train", "val", "test", "heldout")


def strata(manifest: pd.DataFrame, card: DataCard) -> pd.Series:
    """The stratum of each record: its domain and the values of its sensitive attributes."""
    columns = ["domain", *(attr.name for attr in card.sensitive_attributes)]
    return manifest[columns].astype(str).agg("|".join, axis=1)


def _stratum_seed(seed: int, stratum: str) -> list[int]:
    return [seed, int.from_bytes(hashlib.sha256(stratum.encode()).digest()[:8], "little")]


def assign_splits(manifest: pd.DataFrame, card: DataCard, settings: PrepareSettings) -> pd.Series:
    """The split of every record, indexed like the manifest."""
    split = pd.Series("train", index=manifest.index, dtype=object)
    held_out = manifest["domain"].isin(card.domains.held_out)
    split[held_out] = "heldout"
    rest = manifest[~held_out].sort_values("record_id")
    for stratum, index in sorted(rest.groupby(strata(rest, card)).groups.items()):
        order = np.random.default_rng(_stratum_seed(settings.seed, stratum)).permutation(np.asarray(index))
        n_test = int(round(len(order) * settings.test_fraction))
        n_val = int(round(len(order) * settings.val_fraction))
        split.loc[order[:n_test]] = "test"
        split.loc[order[n_test:n_test + n_val]] = "val"
    return split


def leaks(assigned: pd.DataFrame) -> pd.DataFrame:
    """Images (by sha256) assigned to more than one split, across every dataset."""
    splits_per_image = assigned.groupby("sha256")["split"].nunique()
    leaked = splits_per_image[splits_per_image > 1].index
    return assigned[assigned["sha256"].isin(leaked)].sort_values(["sha256", "split"])


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


def _require_validation(summary_path: Path, datasets: list[str]) -> None:
    try:
        summary = json.loads(summary_path.read_text())
    except FileNotFoundError:
        raise PipelineError(f"{summary_path}: not found; run `dvc repro validate` first") from None
    if not summary.get("passed"):
        raise PipelineError(f"{summary_path}: validation failed ({summary.get('failed_critical')} critical); "
                            "fix the data and re-run validate before preparing splits")
    missing = sorted(set(datasets) - set(summary.get("datasets", {})))
    if missing:
        raise PipelineError(f"{summary_path}: datasets {missing} were not validated; re-run validate")


def _write_pixels(assigned: pd.DataFrame, ingested: Path, target: Path, image_shape: tuple[int, int, int]) -> None:
    """Gather a split's pixels shard by shard into one .npy, written in place (memory stays flat)."""
    out = np.lib.format.open_memmap(target, mode="w+", dtype=np.uint8, shape=(len(assigned), *image_shape))
    positions = np.arange(len(assigned))
    for name, rows in assigned.groupby("pixels_file").indices.items():
        shard = np.load(ingested / name, mmap_mode="r")
        out[positions[rows]] = shard[assigned["pixels_index"].to_numpy()[rows]]
    out.flush()
    del out


def prepare(params_path: Path = DEFAULT_PARAMS, cards_dir: Path = Path("data_cards"), ingested: Path = INGESTED,
            summary_path: Path = VALIDATION_SUMMARY, out_dir: Path = PREPARED) -> dict:
    params = load_params(params_path)
    names = list(params.datasets)
    _require_validation(summary_path, names)
    assigned: dict[str, pd.DataFrame] = {}
    cards: dict[str, DataCard] = {}
    for name in names:
        cards[name] = load_card(card_path(name, cards_dir))
        manifest = pd.read_parquet(ingested / name / "manifest.parquet")
        assigned[name] = manifest.assign(split=assign_splits(manifest, cards[name], params.prepare))
    combined = pd.concat([frame[["dataset", "record_id", "sha256", "split"]] for frame in assigned.values()])
    leaked = leaks(combined)
    if not leaked.empty:
        examples = ", ".join(f"{r.dataset}/{r.record_id} in {r.split}" for r in leaked.head(6).itertuples())
        raise PipelineError(f"leakage: {leaked['sha256'].nunique()} images appear in more than one split ({examples})")

    shutil.rmtree(out_dir, ignore_errors=True)
    sizes = {}
    for name, frame in assigned.items():
        folder = out_dir / name
        folder.mkdir(parents=True)
        settings = params.datasets[name]
        image_shape = (settings.image_size, settings.image_size, settings.channels)
        for split in SPLITS:
            part = frame[frame["split"] == split].sort_values("record_id").reset_index(drop=True)
            _write_pixels(part, ingested / name, folder / f"{split}.npy", image_shape)
            part.assign(split_index=np.arange(len(part), dtype=np.int32)).to_parquet(folder / f"{split}.parquet",
                                                                                      index=False)
        sizes[name] = split_sizes(frame, cards[name])
        log.info("%s: %s", name, ", ".join(f"{s} {sizes[name][s]['total']}" for s in SPLITS))
    (out_dir / "split_sizes.json").write_text(json.dumps(sizes, indent=2, sort_keys=True) + "\n")
    return sizes
