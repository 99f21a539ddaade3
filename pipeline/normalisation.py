"""Pixels into the model and back: one normalise / denormalise pair, with the statistics that define both.

Stored pixels are uint8 [N, H, W, C]; the model reads float [N, C, H, W] normalised per channel with the mean and
standard deviation of the training pixels in [0, 1] units (models/mae/config.json keeps them). Reconstructions
and errors are measured back in [0, 1] pixel space.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from pipeline.contracts import NormalisationStats


@dataclass(frozen=True, eq=False)
class Normalisation:
    mean: np.ndarray  # per channel, in [0, 1] units
    std: np.ndarray

    @classmethod
    def fit(cls, pixels: np.ndarray) -> Normalisation:
        """The per-channel statistics of uint8 training pixels (a floor on the std keeps a flat channel finite)."""
        values = pixels.reshape(-1, pixels.shape[-1]).astype(np.float64) / 255.0
        return cls(values.mean(axis=0), np.maximum(values.std(axis=0), 1e-3))

    @classmethod
    def of(cls, stats: NormalisationStats) -> Normalisation:
        return cls(np.asarray(stats.mean), np.asarray(stats.std))

    def stats(self) -> NormalisationStats:
        return NormalisationStats(mean=self.mean.tolist(), std=self.std.tolist())

    def _view(self, values: np.ndarray, like: torch.Tensor) -> torch.Tensor:
        return torch.as_tensor(values, dtype=like.dtype).view(1, -1, 1, 1)

    def normalise(self, pixels: np.ndarray) -> torch.Tensor:
        """uint8 [N, H, W, C] -> normalised float [N, C, H, W], as the model reads it."""
        images = torch.from_numpy(np.ascontiguousarray(pixels)).permute(0, 3, 1, 2).float() / 255.0
        return (images - self._view(self.mean, images)) / self._view(self.std, images)

    def denormalise(self, images: torch.Tensor) -> torch.Tensor:
        """Normalised [N, C, H, W] back to pixel values in [0, 1] units (not clamped)."""
        return images * self._view(self.std, images) + self._view(self.mean, images)

    def grey(self, like: torch.Tensor) -> torch.Tensor:
        """Mid-grey (0.5) in normalised space, [C, 1, 1]: what a masked patch is shown as."""
        return self._view((0.5 - self.mean) / self.std, like)[0]
