"""The domain-shift audit: how the model behaves on images unlike its training data.

- Held-out domains (from the card): reconstruction error and probe accuracy against unseen
  in-distribution images as the reference, signed, with bootstrap intervals adjusted over the domains
  (pipeline.audit.stats); one-sided, since a domain the model serves better is no harm; and the worst domain.
- Corruptions in the style of ImageNet-C, written for small images and any channel count: Gaussian
  noise, blur, contrast, brightness, JPEG and pixelation at 5 severities, deterministic from a seed;
  degradation curves of reconstruction error and probe accuracy, decided like every other check on a bootstrap
  interval: on the probe's accuracy drop where the data has labels, else on the mean corruption error relative
  to clean images (see `corruption_check`). The per-image results (corruptions.parquet beside shift.json) are
  what the check is computed from, so a reviewer can recompute it.
- Embedding drift: an MMD two-sample test with an RBF kernel and a permutation p-value (calibrated by
  construction: under the null every permutation is equally likely), and the AUC of a cross-validated domain
  classifier as the effect size. Three kinds of test, chosen so that the control is a null:
  - the control (`shift.drift.in_distribution`): test against val images, both unseen random splits of the same
    domains, so it rejects in about alpha of splits (measured in tests/test_shift.py and docs/architecture.md);
  - fit to training (`shift.drift.fit_to_training`): unseen in-distribution (val, test) against training
    images. Not a null, since the model was fit to the training images: reported as that signal, expected to
    differ, never as the control;
  - each held-out domain against unseen in-distribution images (val, test), not against training images:
    with train not a null, a domain tested against it would mix the fit to training into the shift; against
    unseen images only the domain differs, the same reference its error and accuracy checks use.
  No decision depends on the seed of a subsample: each side is every image, or past `max_samples` (which
  bounds the cost at scale) the first by a keyed hash of the record ids, a fixed function of the data; the
  classifier's folds follow the same order. The one seed left, the permutations', is covered by the Monte-Carlo
  safeguard: permutations double while the p-value lies within its Monte-Carlo error of alpha. A control or
  domain test that finds nothing states its power: held-out-domain embeddings mixed into in-distribution ones
  at several shares, the same test simulated on them at the same sample sizes, and the smallest share detected
  with the target power (a simulation, reported, deciding nothing).
- Overtrust evidence: reconstructions of in- and out-of-domain images at several mask ratios, each with
  its error, so a reviewer sees plausible-looking output whose error has grown.
"""

from __future__ import annotations

import hashlib
import io
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from pipeline.artifacts import SHIFT, UNSEEN, Layout
from pipeline.audit import overall_status, publish
from pipeline.audit.stats import Criterion, compare, p_value_mc_error
from pipeline.cards import card_path, load_card
from pipeline.contracts import (
    Check,
    CorruptionPoint,
    Corruptions,
    Drift,
    Estimate,
    HeldOutDomain,
    InDistribution,
    MinDetectable,
    PermutationTest,
    Power,
    PowerPoint,
    ShiftDomains,
    ShiftResult,
)
from pipeline.evaluate import embed, linear_probe
from pipeline.normalisation import Normalisation
from pipeline.params import DEFAULT_PARAMS, ShiftSettings, load_params
from pipeline.reconstruction import masking_noise, reconstruct
from pipeline.render import (
    checks_table,
    corruption_sentence,
    drawn,
    evidence_table,
    figure,
    fmt,
    inconclusive_list,
    pyplot,
    save_figure,
    table,
    text,
)
from pipeline.trained import load_splits, load_trained, take

log = logging.getLogger(__name__)


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


# ---------------------------------------------------------------- drift tests (pure)

def mmd_test(x: np.ndarray, y: np.ndarray, permutations: int, seed: int | np.random.Generator,
             alpha: float | None = None, max_permutations: int | None = None) -> PermutationTest:
    """Squared MMD (biased V-statistic) with the RBF kernel exp(-d² / bandwidth²), the bandwidth being the median
    distance between distinct points of the pooled sample, and its permutation p-value
    (1 + #{permuted >= observed}) / (1 + permutations). Given `alpha`, the permutations double (up to
    `max_permutations`) while the p-value lies within its Monte-Carlo error of alpha."""
    from scipy.spatial.distance import pdist, squareform

    distances = pdist(np.concatenate([x, y]).astype(np.float64))  # i < j only: no self-distances
    bandwidth = float(np.median(distances)) if distances.size else 0.0
    bandwidth = bandwidth if bandwidth > 0 else 1.0
    kernel = np.exp(-squareform(distances ** 2) / bandwidth ** 2)
    n, m = len(x), len(y)
    signs = np.r_[np.full(n, 1.0 / n), np.full(m, -1.0 / m)]  # +1/n for x, -1/m for y
    observed = float(signs @ kernel @ signs)
    rng = np.random.default_rng(seed)
    exceeded, done, batch = 0, 0, permutations
    while True:
        for start in range(0, batch, 1000):  # bounds the memory of one matrix product
            permuted = rng.permuted(np.tile(signs, (min(1000, batch - start), 1)), axis=1)
            exceeded += int((np.einsum("ij,ij->i", permuted @ kernel, permuted) >= observed - 1e-12).sum())
        done += batch
        p_value = (1 + exceeded) / (1 + done)
        error = p_value_mc_error(p_value, done)
        if alpha is None or abs(p_value - alpha) > error or done >= (max_permutations or 0):
            break
        batch = min(done, max_permutations - done)
    return PermutationTest(mmd2=observed, p_value=p_value, mc_error=error, permutations=done, bandwidth=bandwidth,
                           n_reference=n, n_sample=m)


def domain_auc(x: np.ndarray, y: np.ndarray, folds: int) -> float:
    """Cross-validated ROC AUC of a classifier telling `y` from `x`: 0.5 when indistinguishable. The folds are
    contiguous runs of each side's rows, unshuffled: callers pass rows in keyed order (`keyed_rows`), so the
    folds, like the rows, are a fixed function of the data and no seed can move the AUC. Fitted on one thread, as
    the probe is (pipeline.evaluate.OneThread): lbfgs's threaded products change with the thread count."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import roc_auc_score
    from sklearn.model_selection import StratifiedKFold, cross_val_predict
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler
    from threadpoolctl import threadpool_limits

    features = np.concatenate([x, y])
    target = np.r_[np.zeros(len(x)), np.ones(len(y))]
    folds = max(2, min(folds, len(x), len(y)))
    with threadpool_limits(limits=1):
        scores = cross_val_predict(make_pipeline(StandardScaler(), LogisticRegression(max_iter=1000)), features,
                                   target, cv=StratifiedKFold(folds), method="predict_proba")
    return float(roc_auc_score(target, scores[:, 1]))


def record_keys(record_ids) -> np.ndarray:
    """A keyed hash of each record id (64 bits): a pseudo-random order that is a fixed function of the records."""
    return np.array([int.from_bytes(hashlib.blake2b(str(r).encode(), digest_size=8, person=b"shift.drift").digest(),
                                    "big") for r in record_ids], dtype=np.uint64)


def keyed_rows(rows: np.ndarray, keys: np.ndarray, limit: int | None) -> np.ndarray:
    """The indices of the rows selected by the mask `rows`, in keyed order, the first `limit` of them: every row
    when there are at most `limit` (or `limit` is None), else a subsample fixed by the records themselves, whatever
    the seed."""
    index = np.flatnonzero(rows)
    return index[np.argsort(keys[index], kind="stable")][:limit]


def subsample(values: np.ndarray, limit: int, rng: np.random.Generator) -> np.ndarray:
    return values if len(values) <= limit else values[np.sort(rng.choice(len(values), limit, replace=False))]


def drift(x: np.ndarray, y: np.ndarray, reference: str, settings: ShiftSettings, seed: int) -> Drift:
    """The drift decision on `y` against `x` (rows in keyed order, at most settings.max_samples each): pass when
    the MMD test finds nothing; fail when it finds drift the domain classifier tells apart with an AUC of at least
    settings.max_domain_auc; inconclusive for a smaller drift, or a p-value within its Monte-Carlo error of alpha.
    The only seed is the permutations', whose Monte-Carlo error decides nothing (see `mmd_test`)."""
    test = mmd_test(x, y, settings.permutations, seed, settings.alpha, settings.max_permutations)
    auc = domain_auc(x, y, settings.classifier_folds)
    reason = None
    if abs(test.p_value - settings.alpha) <= test.mc_error:
        status = "inconclusive"
        reason = (f"the p-value {test.p_value:.4f} lies within its Monte-Carlo error (±{test.mc_error:.4f}) of alpha "
                  f"{settings.alpha} after {test.permutations} permutations: the permutation seed, not the data, "
                  "would decide")
    elif test.p_value >= settings.alpha:
        status = "pass"
    elif auc >= settings.max_domain_auc:
        status = "fail"
    else:
        status = "inconclusive"
        reason = (f"significant drift (p {test.p_value:.4f}) with a domain-classifier AUC of {auc:.3f}, below "
                  f"{settings.max_domain_auc}: a small shift")
    return Drift(**dict(test), reference=reference, auc=auc, status=status, reason=reason)


def drift_power(reference: np.ndarray, in_distribution: np.ndarray | None, shifted: np.ndarray, n: int, m: int,
                settings: ShiftSettings, seed: int) -> Power:
    """What a drift test of `n` reference against `m` other images could have found: the share of `shifted`
    (held-out-domain) embeddings mixed into in-distribution ones that the same test detects at settings.alpha,
    in settings.power_trials simulations per share (with settings.power_permutations permutations each, fewer
    than the test's own, to stay cheap; a coarser p-value only makes the estimate conservative). With
    `in_distribution` None the in-distribution images come from the `reference` pool, disjoint from the
    reference side; where the pool cannot fill both at these sizes, the reference side takes what is left and the
    point says so (fewer images: a lower bound on the power)."""
    rng = np.random.default_rng(seed)
    curve = []
    for share in settings.power_shares:
        k = int(round(share * m))
        shared = in_distribution is None
        side = min(n, len(reference) - (m - k)) if shared else n
        if k > len(shifted) or side < 2 or (not shared and m - k > len(in_distribution)):
            curve.append(PowerPoint(share=share, power=None, note="not enough images to mix at this share"))
            continue
        detected = 0
        for _ in range(settings.power_trials):
            if shared:
                order = rng.permutation(len(reference))
                x, fill = reference[order[:side]], reference[order[side:side + m - k]]
            else:
                x, fill = subsample(reference, n, rng), subsample(in_distribution, m - k, rng)
            y = np.concatenate([fill, subsample(shifted, k, rng)])
            detected += mmd_test(x, y, settings.power_permutations, rng).p_value < settings.alpha
        note = None if side == n else (f"{side} reference images, not {n}: the pool also fills the in-distribution "
                                       "side; a lower bound on the power")
        curve.append(PowerPoint(share=share, power=detected / settings.power_trials, note=note))
    reached = [point.share for point in curve if point.power is not None and point.power >= settings.power]
    return Power(curve=curve, detectable_share=min(reached, default=None), target=settings.power,
                 trials=settings.power_trials, permutations=settings.power_permutations, n_reference=n, n_sample=m)


# ---------------------------------------------------------------- the checks

DOMAINS_DETAIL = f"{SHIFT}/shift.md#domains"
CORRUPTIONS_FILE = "corruptions.parquet"  # per image, corruption and severity, beside shift.json


def domain_checks(samples: pd.DataFrame, held_out: list[str],
                  settings: ShiftSettings) -> tuple[ShiftDomains, list[Check]]:
    """Each held-out domain's reconstruction error and probe accuracy against unseen in-distribution images."""
    unseen = samples[samples["split"].isin(UNSEEN)]
    shifted = samples[samples["split"] == "heldout"]
    labelled = samples["probe_correct"].notna().any()
    measured = [d for d in held_out if (shifted["domain"] == d).sum() >= 2]
    tests = {"error": ("recon_mse", "relative", "relative error increase (domain / in-distribution - 1)",
                       Criterion(settings.max_relative_error_increase, "higher", equivalence=False)),
             "accuracy": ("probe_correct", "difference", "probe accuracy difference (domain - in-distribution)",
                          Criterion(settings.max_accuracy_drop, "lower", equivalence=False))}
    entries, checks = {}, []
    for offset, domain in enumerate(held_out):
        part = shifted[shifted["domain"] == domain]
        if domain not in measured:
            entries[domain] = HeldOutDomain(count=len(part))
            checks.append(Check(id=f"shift.error.{domain}", area="shift", status="inconclusive",
                                statistic=tests["error"][2], threshold=settings.max_relative_error_increase,
                                reason=f"{len(part)} images of this domain", detail=DOMAINS_DETAIL))
            continue
        estimates = {}
        for name, (column, kind, statistic, criterion) in tests.items():
            if column == "probe_correct" and not labelled:
                continue
            result = compare(unseen[column].to_numpy(), part[column].to_numpy(), kind, criterion, settings,
                             seed=[settings.seed, offset], comparisons=len(measured), adjustment=settings.adjustment)
            estimates[f"{name}_comparison"] = Estimate(value=result.value, interval=result.interval)
            checks.append(Check.decided(result, id=f"shift.{name}.{domain}", area="shift", statistic=statistic,
                                        reference="in-distribution (val, test)", threshold=criterion.threshold,
                                        detail=DOMAINS_DETAIL))
        entries[domain] = HeldOutDomain(count=len(part), recon_mse=float(part["recon_mse"].mean()),
                                        probe_accuracy=float(part["probe_correct"].mean()) if labelled else None,
                                        **estimates)
    errors = {d: e.recon_mse for d, e in entries.items() if e.recon_mse is not None}
    domains = ShiftDomains(in_distribution=InDistribution(
        count=len(unseen), recon_mse=float(unseen["recon_mse"].mean()),
        probe_accuracy=float(unseen["probe_correct"].mean()) if labelled else None), held_out=entries,
        worst_domain=max(errors, key=errors.get) if errors else None)
    return domains, checks


IN_DISTRIBUTION = "in-distribution (val, test)"
FIT_TO_TRAINING = ("expected to differ: the model was fit to the training images, so their embeddings are not a "
                   "sample of what unseen images give; a signal of fit, not a shift in the data and not a control")


def drift_checks(samples: pd.DataFrame, embeddings: np.ndarray, held_out: list[str],
                 settings: ShiftSettings) -> tuple[dict[str, Drift], list[Check]]:
    """The control (test images against val images: both unseen random splits of the same domains, a null), the
    fit to training (unseen in-distribution against training images, reported, expected to differ) and each
    held-out domain against unseen in-distribution images. Each side is every image, or past settings.max_samples
    a subsample fixed by a keyed hash of the record ids. A control or domain test that found nothing also reports
    its power against held-out images mixed into in-distribution ones."""
    split = samples["split"].to_numpy()
    val, test, train = split == "val", split == "test", split == "train"
    unseen = np.isin(split, UNSEEN)
    heldout = split == "heldout"
    keys = record_keys(samples["record_id"])
    # name -> (reference rows, the reference in words, tested rows, power: (in-distribution pool, None for the
    # reference's own; held-out images mixed in), or None where no power is simulated)
    tests = {"in_distribution (control)": (val, "val images", test,
                                           (test, heldout & samples["domain"].isin(held_out).to_numpy())),
             "fit_to_training": (train, "training images", unseen, None)}
    for domain in held_out:
        rows = heldout & (samples["domain"] == domain).to_numpy()
        tests[domain] = (unseen, IN_DISTRIBUTION, rows, (None, rows))
    report, checks = {}, []
    for offset, (name, (reference_rows, reference, rows, power)) in enumerate(tests.items()):
        if reference_rows.sum() < 2 or rows.sum() < 2:
            continue
        x = embeddings[keyed_rows(reference_rows, keys, settings.max_samples)]
        y = embeddings[keyed_rows(rows, keys, settings.max_samples)]
        result = drift(x, y, reference, settings, settings.seed + offset)
        reason, minimum = result.reason, None
        if power is None:
            reason = "; ".join(filter(None, [reason, FIT_TO_TRAINING]))
        elif result.p_value >= settings.alpha:
            pool, source = power
            if source.sum() >= 2:
                every = [None if mask is None else embeddings[keyed_rows(mask, keys, None)]
                         for mask in (reference_rows, pool, source)]  # keyed order: the rows' order moves nothing
                result.power = drift_power(*every, result.n_reference, result.n_sample, settings,
                                           settings.seed + offset)
                minimum = MinDetectable(
                    value=result.power.detectable_share,
                    definition=f"smallest share of held-out-domain images among {result.n_sample} in-distribution "
                               f"ones that this test detects (p < {settings.alpha}) with {settings.power:.0%} power "
                               f"against {result.n_reference} {reference} (simulated, {settings.power_trials} "
                               "trials per share)")
            else:
                reason = reason or "no held-out-domain images to simulate a shift with: the test's power is unknown"
        result.reason = reason
        report[name] = result
        checks.append(Check(id=f"shift.drift.{name.split(' ')[0]}", area="shift", status=result.status,
                            statistic="MMD permutation p-value / domain-classifier AUC", value=result.auc,
                            p_value=result.p_value, mc_error=result.mc_error, permutations=result.permutations,
                            threshold=settings.max_domain_auc, alpha=settings.alpha, reference=reference,
                            power=result.power, min_detectable=minimum, reason=reason,
                            detail=f"{SHIFT}/shift.md#embedding-drift"))
    return report, checks


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


# ---------------------------------------------------------------- figures and report

def overtrust_figure(model, rows: list[tuple[str, np.ndarray]], normalisation: Normalisation, settings: ShiftSettings):
    """One row per image (in-domain, out-of-domain, corrupted); one column per mask ratio, each labelled with
    its hidden-pixel error: plausible-looking output is not evidence of a good reconstruction."""
    plt = pyplot()
    ratios = settings.mask_ratios
    shown, axes = plt.subplots(len(rows), len(ratios) + 1, figsize=(1.6 * (len(ratios) + 1), 1.7 * len(rows)),
                               squeeze=False)
    cmap = "gray" if model.in_chans == 1 else None
    for r, (label, pixels) in enumerate(rows):
        image = normalisation.normalise(pixels[None])
        axes[r, 0].imshow(pixels.squeeze(), cmap=cmap, vmin=0, vmax=255)
        axes[r, 0].set_ylabel(drawn(label), fontsize=7)
        for c, ratio in enumerate(ratios, start=1):
            result = reconstruct(model, image, masking_noise(1, model.patch_embed.num_patches, settings.seed + r),
                                 ratio, normalisation)
            pasted = normalisation.denormalise(result.pasted)[0].clamp(0, 1).permute(1, 2, 0).numpy().squeeze()
            axes[r, c].imshow(pasted, cmap=cmap, vmin=0, vmax=1)
            axes[r, c].set_xlabel(f"MSE {float(result.mse[0]):.4f}", fontsize=7)
            if r == 0:
                axes[r, c].set_title(f"mask {ratio:.0%}", fontsize=8)
        axes[0, 0].set_title("original", fontsize=8)
        for axis in axes[r]:
            axis.set_xticks([])
            axis.set_yticks([])
    shown.suptitle("Reconstructions look plausible while the error grows: read the numbers, not the pictures",
                   fontsize=8)
    shown.tight_layout()
    return shown


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


def markdown(result: ShiftResult) -> str:
    lines = [f"# Domain-shift audit: {text(result.dataset)}", "", f"**Status: {result.status.upper()}**", "",
             "Domain checks compare each held-out domain with unseen in-distribution images, signed, one-sided (a "
             "domain served better is no harm): a check passes when its whole interval lies short of the threshold "
             "in the harmful direction, fails when it lies wholly beyond it, and is inconclusive otherwise. "
             f"Intervals are at {result.confidence:.0%} over the held-out domains ({result.adjustment}). The "
             "Monte-Carlo error is the half-width of a bound's (or the p-value's) 99.9% Monte-Carlo interval; "
             "resamples and permutations double while it reaches the threshold. A drift test that found nothing "
             "states the share of held-out images it detects with the target power.", ""]
    if result.note:
        lines += [text(result.note), ""]
    lines += checks_table(result.checks) + evidence_table(result.checks) + inconclusive_list(result.checks)
    domains = result.domains
    inside = domains.in_distribution
    lines += ["## Domains", "", f"In distribution (unseen val / test): {inside.count} images, reconstruction MSE "
              f"{fmt(inside.recon_mse)}, probe accuracy {fmt(inside.probe_accuracy, 3)}.", ""]
    lines += table(["held-out domain", "images", "MSE", "relative increase", "interval", "probe accuracy",
                    "difference", "interval"],
                   [[text(name), entry.count, fmt(entry.recon_mse),
                     fmt(entry.error_comparison and entry.error_comparison.value),
                     fmt(entry.error_comparison and entry.error_comparison.interval), fmt(entry.probe_accuracy, 3),
                     fmt(entry.accuracy_comparison and entry.accuracy_comparison.value),
                     fmt(entry.accuracy_comparison and entry.accuracy_comparison.interval)]
                    for name, entry in domains.held_out.items()])
    if domains.worst_domain is not None:
        lines += [f"Worst domain by reconstruction error: **{text(domains.worst_domain)}**.", ""]
    lines += ["## Embedding drift", "",
              "The control compares test with val images, both unseen random splits of the same domains: a null, "
              f"so it finds drift in about {result.alpha:.0%} of splits. Training against unseen images "
              "(`fit_to_training`) is expected to differ, since the model was fit to the training images: a signal "
              "of fit, not a control. Each held-out domain is compared with unseen in-distribution images (val and "
              "test). Each side is every image, or past `max_samples` a subsample fixed by a keyed hash of the "
              "record ids, so no decision depends on a subsampling seed.", ""]
    lines += table(["test", "reference", "images", "MMD²", "bandwidth", "p-value", "permutations", "domain AUC",
                    "status"],
                   [[text(name), text(entry.reference or "—"), f"{entry.n_reference} / {entry.n_sample}",
                     f"{entry.mmd2:.5f}", f"{entry.bandwidth:.4f}", f"{entry.p_value:.4f} ± {entry.mc_error:.4f}",
                     entry.permutations, f"{entry.auc:.3f}", entry.status] for name, entry in result.drift.items()])
    for name, entry in result.drift.items():
        power = entry.power
        if power:
            found = power.detectable_share
            lines += [f"Power of the {text(name)} test ({power.n_reference} {text(entry.reference or 'reference')} "
                      f"against {power.n_sample} images, {power.trials} simulations per share, {power.permutations} "
                      "permutations each): held-out images mixed in at "
                      + ", ".join(f"{p.share:.0%}: {fmt(p.power, 2)}" for p in power.curve)
                      + (f". It detects a {found:.0%} share with {power.target:.0%} power." if found is not None
                         else f". No share tried reaches {power.target:.0%} power."), ""]
    suite = result.corruptions
    check = next(c for c in result.checks if c.id == "shift.corruptions")
    lines += ["## Corruptions", ""] + figure("corruption_curves.png", "corruption curves")
    lines += [corruption_sentence(suite, check), "",
              f"Per image, corruption and severity (the clean image as `clean`, severity 0): `{CORRUPTIONS_FILE}` "
              "beside this report holds the probe's clean and corrupted prediction, whether it is right, and the "
              "reconstruction error; the check's interval is a paired bootstrap of each image's clean row against "
              "the mean of its corrupted rows (`stats.compare`, paired, seeded by `audit_shift.seed`).", ""]
    lines += ["Reconstruction error (hidden pixels, against the clean image):", ""]
    lines += table(["corruption"] + [f"severity {s}" for s in SEVERITIES],
                   [[name] + [fmt(point.recon_mse) for point in curve] for name, curve in suite.curves.items()])
    if suite.clean.probe_accuracy is not None:
        lines += [f"Probe accuracy (clean: {fmt(suite.clean.probe_accuracy, 3)}):", ""]
        lines += table(["corruption"] + [f"severity {s}" for s in SEVERITIES],
                       [[name] + [fmt(point.probe_accuracy, 3) for point in curve]
                        for name, curve in suite.curves.items()])
    lines += ["## Overtrust", ""] + figure("overtrust.png", "overtrust")
    lines += ["Each reconstruction is labelled with its hidden-pixel error; out-of-domain and corrupted images can "
              "look as convincing as in-domain ones."]
    return "\n".join(lines).rstrip() + "\n"


def audit_shift(params_path: Path = DEFAULT_PARAMS, cards_dir: Path = Path("data_cards"), layout: Layout = Layout(),
                log_to_mlflow: bool = True) -> ShiftResult:
    params = load_params(params_path)
    settings, evaluation = params.audit_shift, params.evaluate
    torch.set_num_threads(evaluation.threads)
    trained = load_trained(layout)
    model, normalisation = trained.model, trained.normalisation
    card = load_card(card_path(trained.dataset, cards_dir))
    samples, embeddings = layout.samples(), layout.embeddings("mae")
    splits = load_splits(layout, trained.dataset, ["record_id", "domain", "label"])
    held_out = list(card.domains.held_out)
    domains, checks = domain_checks(samples, held_out, settings)
    drifts, found = drift_checks(samples, embeddings, held_out, settings)
    checks += found

    # the corruption suite runs on a seeded subset of unseen in-distribution images, read by row
    unseen = [splits[s] for s in UNSEEN if s in splits]
    unseen_records = pd.concat([s.records for s in unseen], ignore_index=True)
    chosen = np.sort(np.random.default_rng(settings.seed).permutation(len(unseen_records))[:settings.corruption_images])
    chosen_pixels = take(unseen, chosen)
    probe, labels = None, None
    if samples["probe_correct"].notna().any():
        train = (samples["split"] == "train").to_numpy()
        probe = linear_probe(embeddings[train], samples.loc[train, "label"].to_numpy(), evaluation.probe_c,
                             evaluation.probe_max_iter)
        labels = unseen_records["label"].to_numpy()[chosen]
    suite, per_image = corruption_suite(model, chosen_pixels, unseen_records["record_id"].to_numpy()[chosen], labels,
                                        probe, normalisation, evaluation.mask_ratio, trained.config.pool, settings)
    checks.append(corruption_check(corruption_pairs(per_image), settings))
    result = ShiftResult(
        dataset=trained.dataset, held_out_domains=held_out, alpha=settings.alpha, confidence=settings.confidence,
        adjustment=settings.adjustment, n_boot=settings.n_boot, max_n_boot=settings.max_n_boot,
        permutations=settings.permutations, max_permutations=settings.max_permutations, power=settings.power,
        note=None if held_out else f"card {trained.dataset} holds out no domain: only corruptions, the control and "
                                   "the fit to training are audited",
        domains=domains, drift=drifts, corruptions=suite, checks=checks,
        status=overall_status([c.status for c in checks]))

    out = layout.shift
    out.mkdir(parents=True, exist_ok=True)
    per_image.to_parquet(out / CORRUPTIONS_FILE, index=False)
    save_figure(curves_figure(suite), out / "corruption_curves.png")
    rows = [(f"in-domain {r.domain}", pixels) for pixels, r in
            zip(chosen_pixels, unseen_records.iloc[chosen[:settings.overtrust_images]].itertuples())]
    if "heldout" in splits:
        heldout = splits["heldout"]
        for domain in held_out:
            index = np.flatnonzero(heldout.records["domain"].to_numpy() == domain)[:settings.overtrust_images]
            rows += [(f"held out {domain}", heldout.pixels[i]) for i in index]
    if len(chosen):
        rows.append(("noise severity 3", corrupt(chosen_pixels[:1], "gaussian_noise", 3, settings.seed)[0]))
    save_figure(overtrust_figure(model, rows, normalisation, settings), out / "overtrust.png")
    publish(out, "shift", result, markdown(result), layout.run_file if log_to_mlflow else None)
    for check in result.checks:
        log.info("%s: %s (%s %s%s)", check.id, check.status, check.statistic, fmt(check.value),
                 f", p {check.p_value:.4f}" if check.p_value is not None else "")
    return result
