"""Pixels into the model and back: one normalise / denormalise pair, with the statistics that define both.

Stored pixels are uint8 [N, H, W, C]; the model reads float [N, C, H, W] normalised per channel with the mean and
standard deviation of the training pixels in [0, 1] units (models/mae/config.json keeps them). Reconstructions
and errors are measured back in [0, 1] pixel space. The statistics come from one streaming pass over the
training split, read in chunks; normalising happens per batch, on whatever device the batch is on.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from pipeline.contracts import NormalisationStats


def unit(pixels: np.ndarray | torch.Tensor) -> torch.Tensor:
    """uint8 [N, H, W, C] -> float [N, C, H, W] in [0, 1] units, on the pixels' device."""
    pixels = torch.from_numpy(np.ascontiguousarray(pixels)) if isinstance(pixels, np.ndarray) else pixels
    return pixels.permute(0, 3, 1, 2).float() / 255.0


@dataclass(frozen=True, eq=False)
class Normalisation:
    mean: np.ndarray  # per channel, in [0, 1] units
    std: np.ndarray
    # the statistics as tensors per (device, dtype), made once: making one from the arrays is a copy to the device
    # that waits for everything queued there, which would stall the device's queue on every batch
    _tensors: dict = field(default_factory=dict, init=False, repr=False)

    @classmethod
    def fit(cls, pixels, chunk_bytes: int = 2**26) -> Normalisation:
        """The per-channel statistics of uint8 training pixels [N, H, W, C] (an array, or rows read on demand as
        pipeline.data.NpyRows reads them); a floor on the std keeps a flat channel finite.

        One pass in chunks of about `chunk_bytes`, counting each channel's 256 values: exact, and the split is
        read once and never held whole."""
        channels = pixels.shape[-1]
        chunk = max(1, chunk_bytes // max(1, int(np.prod(pixels.shape[1:]))))
        counts = np.zeros((channels, 256), dtype=np.int64)
        for start in range(0, len(pixels), chunk):
            block = np.asarray(pixels[start:start + chunk]).reshape(-1, channels)
            for channel in range(channels):
                counts[channel] += np.bincount(block[:, channel], minlength=256)
        values = np.arange(256) / 255.0
        mean = counts @ values / counts.sum(axis=1)
        variance = (counts * (values[None] - mean[:, None]) ** 2).sum(axis=1) / counts.sum(axis=1)
        return cls(mean, np.maximum(np.sqrt(variance), 1e-3))

    @classmethod
    def of(cls, stats: NormalisationStats) -> Normalisation:
        return cls(np.asarray(stats.mean), np.asarray(stats.std))

    def stats(self) -> NormalisationStats:
        return NormalisationStats(mean=self.mean.tolist(), std=self.std.tolist())

    def _view(self, name: str, like: torch.Tensor) -> torch.Tensor:
        """`mean`, `std` or `grey` (mid-grey normalised) as [1, C, 1, 1] on `like`'s device, in its dtype."""
        key = (name, like.device, like.dtype)
        if key not in self._tensors:
            values = (0.5 - self.mean) / self.std if name == "grey" else getattr(self, name)
            self._tensors[key] = torch.as_tensor(values, dtype=like.dtype, device=like.device).view(1, -1, 1, 1)
        return self._tensors[key]

    def normalise(self, pixels: np.ndarray | torch.Tensor) -> torch.Tensor:
        """uint8 [N, H, W, C] -> normalised float [N, C, H, W], as the model reads it (on the pixels' device)."""
        return self.standardise(unit(pixels))

    def standardise(self, images: torch.Tensor) -> torch.Tensor:
        """[N, C, H, W] in [0, 1] units -> the model's input."""
        return (images - self._view("mean", images)) / self._view("std", images)

    def denormalise(self, images: torch.Tensor) -> torch.Tensor:
        """Normalised [N, C, H, W] back to pixel values in [0, 1] units (not clamped)."""
        return images * self._view("std", images) + self._view("mean", images)

    def grey(self, like: torch.Tensor) -> torch.Tensor:
        """Mid-grey (0.5) in normalised space, [C, 1, 1]: what a masked patch is shown as."""
        return self._view("grey", like)[0]
