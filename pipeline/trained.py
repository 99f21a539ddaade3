"""The trained model as the later stages load it, and the prepared splits as the model reads them.

One call gives the model with its weights, normalisation, dataset and MLflow run (`load_trained`), another a split
with its records, stored pixels and normalised images (`load_split`), so pretrain, evaluate and audit_shift do not
each repeat the prologue, and a missing file names the stage to run.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch

from pipeline import PipelineError
from pipeline.artifacts import SPLITS, Layout, not_found, read_array, read_table
from pipeline.contracts import ModelConfig, RunRecord
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
        state = torch.load(layout.weights_file, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise not_found(layout.weights_file) from None
    model = MaskedAutoencoderViT(**config.model)
    model.load_state_dict(state)
    return Trained(model.eval(), config, run, Normalisation.of(config.normalisation))


@dataclass
class Split:
    name: str
    records: pd.DataFrame  # row i describes pixels[i]
    pixels: np.ndarray  # stored uint8 [N, H, W, C]
    images: torch.Tensor | None = None  # normalised [N, C, H, W], when a normalisation was given

    def __len__(self) -> int:
        return len(self.pixels)


def load_split(layout: Layout, dataset: str, split: str, normalisation: Normalisation | None = None,
               records: bool = True) -> Split:
    pixels = read_array(layout.split_pixels(dataset, split))
    table = read_table(layout.split_records(dataset, split)).reset_index(drop=True) if records else pd.DataFrame()
    return Split(split, table, pixels, None if normalisation is None else normalisation.normalise(pixels))


def load_splits(layout: Layout, dataset: str, normalisation: Normalisation | None = None) -> dict[str, Split]:
    """Every non-empty split, train first; the train split must not be empty."""
    splits = {name: load_split(layout, dataset, name, normalisation) for name in SPLITS}
    if not len(splits["train"]):
        raise PipelineError(f"{layout.split_records(dataset, 'train')}: the train split is empty")
    return {name: split for name, split in splits.items() if len(split)}
