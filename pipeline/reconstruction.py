"""Reconstructions in pixel space: per-sample errors on fixed masks, and the figures reviewers look at.

The model predicts masked patches in its target space (per-patch normalised when norm_pix_loss is on).
To show a reconstruction, and to measure it in pixels, the prediction is mapped back with each patch's
own mean and variance, as the MAE paper's figures do, then the visible patches are pasted back.
Errors are over the hidden pixels only, in [0, 1] units, so PSNR is 10 log10(1 / MSE).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from pipeline.mae import MaskedAutoencoderViT
from pipeline.normalisation import Normalisation
from pipeline.render import pyplot


@dataclass
class Reconstruction:
    pasted: torch.Tensor  # [N, C, H, W] model input space: visible patches kept, hidden ones predicted
    hidden: torch.Tensor  # [N, C, H, W] 1 where a pixel was masked
    loss: torch.Tensor  # [N] the training objective on the masked patches
    mse: torch.Tensor  # [N] pixel-space MSE over the hidden pixels, images in [0, 1]


def masking_noise(count: int, num_patches: int, seed: int) -> torch.Tensor:
    """The noise that decides which patches are hidden: the same seed hides the same patches for any model."""
    return torch.rand(count, num_patches, generator=torch.Generator().manual_seed(seed))


def psnr(mse: np.ndarray | float) -> np.ndarray | float:
    return 10 * np.log10(1.0 / np.maximum(mse, 1e-12))


@torch.no_grad()
def reconstruct(model: MaskedAutoencoderViT, images: torch.Tensor, noise: torch.Tensor, mask_ratio: float,
                normalisation: Normalisation, patch_mean: bool = False, batch_size: int = 256,
                reference: torch.Tensor | None = None) -> Reconstruction:
    """Reconstruct on the masks `noise` decides; `patch_mean` replaces the model by each patch's own mean.
    The pixel error is against `reference` where given (the clean originals of corrupted inputs), else the input.
    In batches of `batch_size`; the results stay on the model's device (a caller streaming a split keeps only
    the per-sample errors)."""
    model.eval()
    device = next(model.parameters()).device
    parts = []
    for start in range(0, len(images), batch_size):
        batch, batch_noise = images[start:start + batch_size].to(device), noise[start:start + batch_size].to(device)
        target = model.target(batch)
        if patch_mean:  # no model: the masks the model would draw from this noise (of a zero-width token tensor)
            _, mask, _ = model.random_masking(target[..., :0], mask_ratio, batch_noise)
            pred = target.mean(dim=-1, keepdim=True).expand_as(target)
        else:
            _, pred, mask = model(batch, mask_ratio, batch_noise)
        loss = (((pred - target) ** 2).mean(dim=-1) * mask).sum(dim=1) / mask.sum(dim=1)
        if model.norm_pix_loss:
            patches = model.patchify(batch)
            pred = pred * (patches.var(dim=-1, keepdim=True) + 1e-6) ** 0.5 + patches.mean(dim=-1, keepdim=True)
        hidden = model.unpatchify(mask.unsqueeze(-1).expand(-1, -1, model.patch_size**2 * model.in_chans))
        pasted = batch * (1 - hidden) + model.unpatchify(pred) * hidden
        truth = batch if reference is None else reference[start:start + batch_size].to(device)
        error = (normalisation.denormalise(pasted).clamp(0, 1) - normalisation.denormalise(truth).clamp(0, 1)) ** 2
        mse = (error * hidden).sum(dim=(1, 2, 3)) / hidden.sum(dim=(1, 2, 3))
        parts.append((pasted, hidden, loss, mse))
    return Reconstruction(*(torch.cat(column) for column in zip(*parts)))


def reconstruction_figure(model: MaskedAutoencoderViT, images: torch.Tensor, noise: torch.Tensor,
                          normalisation: Normalisation, mask_ratio: float, title: str):
    """Rows of original / masked / reconstruction, each column labelled with its pixel MSE."""
    plt = pyplot()
    images = images.to(next(model.parameters()).device)
    result = reconstruct(model, images, noise, mask_ratio, normalisation)

    def show(x: torch.Tensor) -> np.ndarray:
        return normalisation.denormalise(x.unsqueeze(0))[0].clamp(0, 1).permute(1, 2, 0).cpu().numpy().squeeze()

    columns = len(images)
    figure, axes = plt.subplots(3, columns, figsize=(1.4 * columns, 4.9), squeeze=False)
    cmap = "gray" if model.in_chans == 1 else None
    grey = normalisation.grey(images)
    for i in range(columns):
        panels = (images[i], images[i] * (1 - result.hidden[i]) + grey * result.hidden[i], result.pasted[i])
        for row, panel in enumerate(panels):
            axes[row, i].imshow(show(panel), cmap=cmap, vmin=0, vmax=1)
            axes[row, i].set_xticks([])
            axes[row, i].set_yticks([])
        axes[2, i].set_xlabel(f"MSE {float(result.mse[i]):.4f}", fontsize=7)
    for row, label in enumerate(("original", f"masked {mask_ratio:.0%}", "reconstruction")):
        axes[row, 0].set_ylabel(label, fontsize=8)
    figure.suptitle(f"{title}: mean hidden-pixel MSE {float(result.mse.mean()):.4f}", fontsize=9)
    figure.tight_layout()
    return figure
