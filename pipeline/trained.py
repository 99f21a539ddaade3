"""The trained model as the later stages load it, and the prepared splits as the model reads them.

One call gives the model with its weights, normalisation, dataset and MLflow run (`load_trained`), another a split
with its records and its pixels, read by row (`load_split`), so pretrain, evaluate and audit_shift do not each
repeat the prologue, and a missing file names the stage to run. Pixels are read in batches (pipeline.data) or by
row (`take`), never a whole split at once.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch

from pipeline import PipelineError
from pipeline.artifacts import SPLITS, Layout, not_found, read_table
from pipeline.contracts import ModelConfig, RunRecord
from pipeline.data import NpyRows, SplitPixels
from pipeline.mae import MaskedAutoencoderViT
from pipeline.normalisation import Normalisation


@dataclass
class Trained:
    model: MaskedAutoencoderViT  # in eval mode, on the CPU
    config: ModelConfig
    run: RunRecord
    normalisation: Normalisation

    @property
    def dataset(self) -> str:
        return self.config.dataset


def load_trained(layout: Layout) -> Trained:
    """models/mae/ as pretrain wrote it; the weights load with weights_only, so a planted file cannot run code."""
    config, run = layout.config(), layout.run()
    try:
        state = torch.load(layout.sealed(layout.weights_file), map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise not_found(layout.weights_file) from None
    model = MaskedAutoencoderViT(**config.model)
    model.load_state_dict(state)
    return Trained(model.eval(), config, run, Normalisation.of(config.normalisation))


@dataclass
class Split:
    name: str
    records: pd.DataFrame  # row i describes pixel row i
    data: SplitPixels  # the stored uint8 pixels, read by row

    @property
    def pixels(self) -> NpyRows:
        """uint8 [N, H, W, C]: indexing reads only the rows asked for."""
        return self.data.pixels

    def __len__(self) -> int:
        return len(self.data)


def load_split(layout: Layout, dataset: str, split: str, columns: list[str] | None = None) -> Split:
    """A split's records (only `columns`, when given: a record's every manifest field costs about 1.4 KB in pandas)
    and its pixels, read by row."""
    table = read_table(layout.sealed(layout.split_records(dataset, split)), columns).reset_index(drop=True)
    return Split(split, table, SplitPixels(layout.sealed(layout.split_pixels(dataset, split))))


def load_splits(layout: Layout, dataset: str, columns: list[str] | None = None) -> dict[str, Split]:
    """Every non-empty split, train first; the train split must not be empty."""
    splits = {name: load_split(layout, dataset, name, columns) for name in SPLITS}
    if not len(splits["train"]):
        raise PipelineError(f"{layout.split_records(dataset, 'train')}: the train split is empty")
    return {name: split for name, split in splits.items() if len(split)}


def take(splits: list[Split], rows: np.ndarray) -> np.ndarray:
    """Rows of the splits' pixels taken end to end (row len(splits[0]) is the second split's first), read by row:
    the rest is never loaded."""
    return NpyRows([path for split in splits for path in split.pixels.paths])[rows]
