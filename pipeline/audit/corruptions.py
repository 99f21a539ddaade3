"""Corruptions in the style of ImageNet-C and the check decided on them.

Written for small images and any channel count: Gaussian noise, blur, contrast, brightness, JPEG and pixelation
at 5 severities, deterministic from a seed; degradation curves of reconstruction error and probe accuracy, decided
like every other check on a bootstrap interval: on the probe's accuracy drop where the data has labels, else on
the mean corruption error relative to clean images (see `corruption_check`). The per-image results
(corruptions.parquet beside shift.json) are what the check is computed from, so a reviewer can recompute it.
"""

from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np
import pandas as pd

from pipeline.artifacts import SHIFT
from pipeline.audit.stats import Criterion, compare
from pipeline.contracts import Check, CorruptionPoint, Corruptions
from pipeline.features import embed
from pipeline.normalisation import Normalisation
from pipeline.params import ShiftSettings
from pipeline.reconstruction import masking_noise, reconstruct
from pipeline.render import pyplot

CORRUPTIONS_FILE = "corruptions.parquet"  # per image, corruption and severity, beside shift.json


# ---------------------------------------------------------------- corruptions (uint8 [N, H, W, C] in and out)

def _per_channel_image(images: np.ndarray, transform) -> np.ndarray:
    """Apply a PIL transform to every channel of every image as a greyscale picture (any channel count)."""
    from PIL import Image

    out = np.empty_like(images)
    for i, image in enumerate(images):
        for c in range(image.shape[-1]):
            out[i, :, :, c] = np.asarray(transform(Image.fromarray(image[:, :, c], mode="L")))
    return out


def gaussian_noise(images: np.ndarray, severity: int, rng: np.random.Generator) -> np.ndarray:
    sigma = (0.08, 0.12, 0.18, 0.26, 0.38)[severity - 1]
    return np.clip(images / 255.0 + rng.normal(0, sigma, images.shape), 0, 1)


def blur(images: np.ndarray, severity: int, rng: np.random.Generator) -> np.ndarray:
    from scipy.ndimage import gaussian_filter

    sigma = (0.5, 0.75, 1.0, 1.5, 2.0)[severity - 1] * images.shape[1] / 32  # scaled to the image size
    return gaussian_filter(images / 255.0, sigma=(0, sigma, sigma, 0))


def contrast(images: np.ndarray, severity: int, rng: np.random.Generator) -> np.ndarray:
    factor = (0.4, 0.3, 0.2, 0.1, 0.05)[severity - 1]
    x = images / 255.0
    mean = x.mean(axis=(1, 2, 3), keepdims=True)
    return np.clip((x - mean) * factor + mean, 0, 1)


def brightness(images: np.ndarray, severity: int, rng: np.random.Generator) -> np.ndarray:
    return np.clip(images / 255.0 + (0.1, 0.2, 0.3, 0.4, 0.5)[severity - 1], 0, 1)


def jpeg(images: np.ndarray, severity: int, rng: np.random.Generator) -> np.ndarray:
    from PIL import Image

    quality = (25, 18, 15, 10, 7)[severity - 1]

    def compress(picture):
        buffer = io.BytesIO()
        picture.save(buffer, format="JPEG", quality=quality)
        return Image.open(io.BytesIO(buffer.getvalue()))

    return _per_channel_image(images, compress) / 255.0


def pixelate(images: np.ndarray, severity: int, rng: np.random.Generator) -> np.ndarray:
    from PIL import Image

    factor = (0.6, 0.5, 0.4, 0.3, 0.25)[severity - 1]
    height, width = images.shape[1:3]
    small = (max(1, int(width * factor)), max(1, int(height * factor)))
    return _per_channel_image(images, lambda p: p.resize(small, Image.BOX).resize((width, height), Image.NEAREST)) \
        / 255.0


CORRUPTIONS = {"gaussian_noise": gaussian_noise, "blur": blur, "contrast": contrast, "brightness": brightness,
               "jpeg": jpeg, "pixelate": pixelate}
SEVERITIES = (1, 2, 3, 4, 5)


def corrupt(images: np.ndarray, name: str, severity: int, seed: int) -> np.ndarray:
    """Deterministic from (seed, corruption, severity); uint8 in, uint8 out."""
    rng = np.random.default_rng([seed, list(CORRUPTIONS).index(name), severity])
    return np.clip(np.round(CORRUPTIONS[name](images, severity, rng) * 255), 0, 255).astype(np.uint8)


# ---------------------------------------------------------------- the suite and its check

@dataclass(frozen=True)
class CorruptionPairs:
    """Per image, its clean measurement and its mean over the 30 corrupted versions: the pairs the check resamples.
    Correctness (1 when the probe names the label) only where the data has labels."""

    clean_error: np.ndarray
    corrupted_error: np.ndarray
    clean_correct: np.ndarray | None = None
    corrupted_correct: np.ndarray | None = None


def corruption_suite(model, images: np.ndarray, record_ids: np.ndarray, labels: np.ndarray | None, probe,
                     normalisation: Normalisation, mask_ratio: float, pool: str,
                     settings: ShiftSettings) -> tuple[Corruptions, pd.DataFrame]:
    """Reconstruction error and probe accuracy of clean and corrupted copies of the same images, same masks.
    The error is against the clean image: how far what the model fills in from a corrupted view is from the
    truth (measured against the corrupted input, blur and low contrast would look like improvements). Returns
    the summary and the per-image table (`corruption_table`), from which the check is computed
    (`corruption_pairs`) and which is stored beside shift.json, so a reviewer can recompute the check."""
    noise = masking_noise(len(images), model.patch_embed.num_patches, settings.seed)
    clean_tensor = normalisation.normalise(images)

    def measure(pixels: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        tensor = normalisation.normalise(pixels)
        errors = reconstruct(model, tensor, noise, mask_ratio, normalisation,
                             reference=clean_tensor).mse.numpy().astype(np.float64)
        return errors, None if probe is None else probe.predict(embed(model, tensor, pool, 256))

    def point(errors: np.ndarray, predicted: np.ndarray | None) -> CorruptionPoint:
        return CorruptionPoint(recon_mse=float(errors.mean()),
                               probe_accuracy=None if predicted is None else float((predicted == labels).mean()))

    measured = {("clean", 0): measure(images)}
    for name in CORRUPTIONS:
        for severity in SEVERITIES:
            measured[name, severity] = measure(corrupt(images, name, severity, settings.seed))
    clean = point(*measured["clean", 0])
    curves = {name: [point(*measured[name, severity]) for severity in SEVERITIES] for name in CORRUPTIONS}
    # mean corruption error relative to clean images: 1 means no degradation (ImageNet-C's CE, with the
    # clean model as the reference instead of AlexNet); undefined when the probe makes no clean error
    relative_probe = None
    if probe is not None and clean.probe_accuracy < 1:
        relative_probe = float(np.mean([[(1 - p.probe_accuracy) / (1 - clean.probe_accuracy) for p in curve]
                                        for curve in curves.values()]))
    suite = Corruptions(images=len(images), clean=clean, curves=curves,
                        relative_mce_reconstruction=float(np.mean([[p.recon_mse / clean.recon_mse for p in curve]
                                                                   for curve in curves.values()])),
                        relative_mce_probe=relative_probe,
                        decided_by="reconstruction" if probe is None else "probe_accuracy")
    return suite, corruption_table(record_ids, labels, measured)


def corruption_table(record_ids: np.ndarray, labels: np.ndarray | None,
                     measured: dict[tuple[str, int], tuple[np.ndarray, np.ndarray | None]]) -> pd.DataFrame:
    """One row per (image, corruption, severity), the clean image first as ("clean", 0): record_id, label, the
    probe's prediction on the clean image and on this version, whether that is right (null without labels or a
    probe) and the hidden-pixel reconstruction error against the clean image."""
    n = len(record_ids)
    missing = np.full(n, None, dtype=object)
    clean_predicted = measured["clean", 0][1]
    parts = []
    for (name, severity), (errors, predicted) in measured.items():
        parts.append(pd.DataFrame({
            "record_id": record_ids, "label": missing if labels is None else labels, "corruption": name,
            "severity": np.full(n, severity, dtype=np.int64),
            "clean_probe_pred": missing if predicted is None else clean_predicted,
            "probe_pred": missing if predicted is None else predicted,
            "probe_correct": np.full(n, np.nan) if predicted is None else (predicted == labels).astype(np.float64),
            "recon_mse": errors}))
    return pd.concat(parts, ignore_index=True)


def corruption_pairs(table: pd.DataFrame) -> CorruptionPairs:
    """The check's pairs from the per-image table: each image's clean row, and the mean of its corrupted rows."""
    clean = table[table["corruption"] == "clean"].set_index("record_id")
    corrupted = table[table["corruption"] != "clean"].groupby("record_id", sort=False)[
        ["recon_mse", "probe_correct"]].mean().reindex(clean.index)
    labelled = clean["probe_correct"].notna().any()
    return CorruptionPairs(clean["recon_mse"].to_numpy(), corrupted["recon_mse"].to_numpy(),
                           *((clean["probe_correct"].to_numpy(), corrupted["probe_correct"].to_numpy())
                             if labelled else (None, None)))


def corruption_check(pairs: CorruptionPairs, settings: ShiftSettings) -> Check:
    """Robustness to corruption, with a bootstrap interval like every decided check. The unit is the image: its
    clean measurement and its mean over the 30 corrupted versions (6 corruptions x 5 severities, same masks) are
    one pair, resampled together (paired percentile bootstrap: the two are correlated, so resampling them apart
    would overstate the spread), and the check is one-sided (non-inferiority).

    Where the data has labels it is decided as ImageNet-C decides it, on the classifier: the probe's accuracy under
    corruption minus its clean accuracy, at most `max_corruption_accuracy_drop` below. The reconstruction error
    against the clean image is then only reported: a brightness or contrast change shows in every visible patch,
    so even a perfect reconstructor of what it sees carries it into every hidden pixel, and that error grows with
    the corruption's size for any model trained on raw pixels. Without labels the reconstruction is all there is:
    the ratio of mean corrupted to mean clean error (exactly the reported relative mCE, since every corruption
    is applied to the same images), at most `max_relative_mce`."""
    if pairs.clean_correct is not None:
        criterion = Criterion(settings.max_corruption_accuracy_drop, "lower", equivalence=False)
        comparison = compare(pairs.clean_correct, pairs.corrupted_correct, "difference", criterion, settings,
                             seed=settings.seed, paired=True)
        statistic = "probe accuracy under corruption - clean (mean over 6 corruptions x 5 severities)"
    else:
        criterion = Criterion(settings.max_relative_mce, "higher", equivalence=False)
        comparison = compare(pairs.clean_error, pairs.corrupted_error, "ratio", criterion, settings,
                             seed=settings.seed, paired=True)
        statistic = "mean corruption error / clean error (reconstruction)"
    return Check.decided(comparison, id="shift.corruptions", area="shift", statistic=statistic,
                         reference="the same images, clean", threshold=criterion.threshold,
                         detail=f"{SHIFT}/shift.md#corruptions")


def curves_figure(suite: Corruptions):
    plt = pyplot()
    keys = ["recon_mse"] + (["probe_accuracy"] if suite.clean.probe_accuracy is not None else [])
    shown, axes = plt.subplots(1, len(keys), figsize=(5 * len(keys), 3.6), squeeze=False)
    for axis, key in zip(axes[0], keys):
        for name, curve in suite.curves.items():
            axis.plot(SEVERITIES, [getattr(point, key) for point in curve], marker="o", label=name)
        axis.axhline(getattr(suite.clean, key), color="black", linestyle="--", linewidth=1, label="clean")
        axis.set_xlabel("severity")
        axis.set_ylabel(key.replace("_", " "))
        axis.set_xticks(SEVERITIES)
        axis.legend(fontsize=7)
    shown.suptitle(f"Corruption robustness on {suite.images} unseen images", fontsize=9)
    shown.tight_layout()
    return shown
