"""The domain-shift audit: how the model behaves on images unlike its training data.

- Held-out domains (from the card): reconstruction error and probe accuracy against unseen
  in-distribution images, with bootstrap intervals, and the worst domain.
- Corruptions in the style of ImageNet-C, written for small images and any channel count: Gaussian
  noise, blur, contrast, brightness, JPEG and pixelation at 5 severities, deterministic from a seed;
  degradation curves and a mean corruption error relative to clean images.
- Embedding drift of each held-out domain (and, as the control, of unseen in-distribution images)
  against the training images: an MMD two-sample test with an RBF kernel and a permutation p-value
  (calibrated by construction: under the null every permutation is equally likely), and the AUC of a
  cross-validated domain classifier as the effect size. Both sides are sub-sampled to bound the cost.
- Overtrust evidence: reconstructions of in- and out-of-domain images at several mask ratios, each with
  its error, so a reviewer sees plausible-looking output whose error has grown.
"""

from __future__ import annotations

import io
import logging
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from pipeline import PipelineError
from pipeline.audit import fmt, interval_decision, overall_status, write_report
from pipeline.cards import card_path, load_card
from pipeline.evaluate import SPLITS, UNSEEN, embed, linear_probe, load_model
from pipeline.params import DEFAULT_PARAMS, ShiftSettings, load_params
from pipeline.paths import EVAL, MODEL_DIR, PREPARED, SHIFT_REPORT
from pipeline.reconstruction import masking_noise, reconstruct, to_pixels
from pipeline.train import to_tensor

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

def mmd_test(x: np.ndarray, y: np.ndarray, permutations: int, seed: int) -> dict:
    """Squared MMD (biased V-statistic) with an RBF kernel at the median pairwise distance, and its
    permutation p-value (1 + #{permuted >= observed}) / (1 + permutations)."""
    z = torch.as_tensor(np.concatenate([x, y]), dtype=torch.float64)
    distances = torch.cdist(z, z).pow(2)
    bandwidth = distances[distances > 0].median() if (distances > 0).any() else torch.tensor(1.0)
    kernel = torch.exp(-distances / bandwidth)
    n, m = len(x), len(y)

    def statistic(signs: torch.Tensor) -> torch.Tensor:  # rows of +1/n for x, -1/m for y
        return ((signs @ kernel) * signs).sum(dim=-1)

    base = torch.cat([torch.full((n,), 1.0 / n, dtype=torch.float64), torch.full((m,), -1.0 / m, dtype=torch.float64)])
    observed = float(statistic(base.unsqueeze(0))[0])
    generator = torch.Generator().manual_seed(seed)
    order = torch.stack([torch.randperm(n + m, generator=generator) for _ in range(permutations)])
    permuted = statistic(base[order])
    p_value = (1 + int((permuted >= observed - 1e-12).sum())) / (1 + permutations)
    return {"mmd2": observed, "p_value": p_value, "bandwidth": float(bandwidth), "n_reference": n, "n_sample": m}


def domain_auc(x: np.ndarray, y: np.ndarray, folds: int, seed: int) -> float:
    """Cross-validated ROC AUC of a classifier telling `y` from `x`: 0.5 when indistinguishable."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import roc_auc_score
    from sklearn.model_selection import StratifiedKFold, cross_val_predict
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    features = np.concatenate([x, y])
    target = np.r_[np.zeros(len(x)), np.ones(len(y))]
    folds = max(2, min(folds, len(x), len(y)))
    scores = cross_val_predict(make_pipeline(StandardScaler(), LogisticRegression(max_iter=1000)), features, target,
                               cv=StratifiedKFold(folds, shuffle=True, random_state=seed), method="predict_proba")
    return float(roc_auc_score(target, scores[:, 1]))


def subsample(values: np.ndarray, limit: int, rng: np.random.Generator) -> np.ndarray:
    return values if len(values) <= limit else values[np.sort(rng.choice(len(values), limit, replace=False))]


def drift(reference: np.ndarray, sample: np.ndarray, settings: ShiftSettings, seed: int) -> dict:
    rng = np.random.default_rng(seed)
    x, y = subsample(reference, settings.max_samples, rng), subsample(sample, settings.max_samples, rng)
    result = mmd_test(x, y, settings.permutations, seed)
    result["auc"] = domain_auc(x, y, settings.classifier_folds, seed)
    if result["p_value"] >= settings.alpha:
        result["status"] = "pass"
    else:
        result["status"] = "fail" if result["auc"] >= settings.max_domain_auc else "inconclusive"
    return result


def relative_increase(reference: np.ndarray, sample: np.ndarray, settings: ShiftSettings, seed: int) -> dict:
    """mean(sample) / mean(reference) - 1 with a bootstrap interval (independent resampling of each side)."""
    from scipy.stats import bootstrap

    value = float(sample.mean() / reference.mean() - 1)
    interval = bootstrap((reference, sample), lambda a, b, axis=-1: b.mean(axis=axis) / a.mean(axis=axis) - 1,
                         n_resamples=settings.n_boot, confidence_level=settings.confidence, method="percentile",
                         paired=False, random_state=seed, vectorized=True).confidence_interval
    return {"value": value, "interval": [float(interval.low), float(interval.high)]}


def accuracy_drop(reference: np.ndarray, sample: np.ndarray, settings: ShiftSettings, seed: int) -> dict:
    from scipy.stats import bootstrap

    value = float(reference.mean() - sample.mean())
    interval = bootstrap((reference, sample), lambda a, b, axis=-1: a.mean(axis=axis) - b.mean(axis=axis),
                         n_resamples=settings.n_boot, confidence_level=settings.confidence, method="percentile",
                         paired=False, random_state=seed, vectorized=True).confidence_interval
    return {"value": value, "interval": [float(interval.low), float(interval.high)]}


# ---------------------------------------------------------------- the stage

def domain_checks(samples: pd.DataFrame, held_out: list[str], settings: ShiftSettings) -> tuple[dict, list[dict]]:
    """Each held-out domain's reconstruction error and probe accuracy against unseen in-distribution images."""
    unseen = samples[samples["split"].isin(UNSEEN)]
    shifted = samples[samples["split"] == "heldout"]
    labelled = samples["probe_correct"].notna().any()
    report: dict = {"in_distribution": {"count": int(len(unseen)), "recon_mse": float(unseen["recon_mse"].mean()),
                                        "probe_accuracy": float(unseen["probe_correct"].mean()) if labelled else None}}
    checks = []
    for offset, domain in enumerate(held_out):
        part = shifted[shifted["domain"] == domain]
        entry: dict = {"count": int(len(part))}
        report[domain] = entry
        if len(part) < 2:
            checks.append({"id": f"shift.error.{domain}", "status": "inconclusive", "statistic": "relative error "
                           "increase", "value": None, "interval": None, "threshold": settings.max_relative_error_increase,
                           "reason": f"{len(part)} images of this domain", "detail": "reports/shift/shift.md#domains"})
            continue
        entry["recon_mse"] = float(part["recon_mse"].mean())
        error = relative_increase(unseen["recon_mse"].to_numpy(), part["recon_mse"].to_numpy(), settings,
                                  settings.seed + offset)
        entry["relative_error_increase"] = error
        checks.append({"id": f"shift.error.{domain}", "status": interval_decision(
            *error["interval"], settings.max_relative_error_increase), "statistic": "relative error increase",
            **error, "threshold": settings.max_relative_error_increase, "detail": "reports/shift/shift.md#domains"})
        if labelled:
            entry["probe_accuracy"] = float(part["probe_correct"].mean())
            drop = accuracy_drop(unseen["probe_correct"].dropna().to_numpy(), part["probe_correct"].dropna().to_numpy(),
                                 settings, settings.seed + offset)
            entry["probe_accuracy_drop"] = drop
            checks.append({"id": f"shift.accuracy.{domain}", "status": interval_decision(
                *drop["interval"], settings.max_accuracy_drop), "statistic": "probe accuracy drop", **drop,
                "threshold": settings.max_accuracy_drop, "detail": "reports/shift/shift.md#domains"})
    measured = {d: e for d, e in report.items() if d != "in_distribution" and "recon_mse" in e}
    if measured:
        report["worst_domain"] = max(measured, key=lambda d: measured[d]["recon_mse"])
    return report, checks


def drift_checks(samples: pd.DataFrame, embeddings: np.ndarray, held_out: list[str],
                 settings: ShiftSettings) -> tuple[dict, list[dict]]:
    """Held-out domains against the training features, and unseen in-distribution images as the control."""
    reference = embeddings[(samples["split"] == "train").to_numpy()]
    candidates = {"in_distribution (control)": samples["split"].isin(UNSEEN).to_numpy()}
    candidates.update({domain: ((samples["split"] == "heldout") & (samples["domain"] == domain)).to_numpy()
                       for domain in held_out})
    report, checks = {}, []
    for offset, (name, rows) in enumerate(candidates.items()):
        if rows.sum() < 2:
            continue
        result = drift(reference, embeddings[rows], settings, settings.seed + offset)
        report[name] = result
        checks.append({"id": f"shift.drift.{name.split(' ')[0]}", "status": result["status"],
                       "statistic": "MMD permutation p-value / domain-classifier AUC", "value": result["auc"],
                       "p_value": result["p_value"], "interval": None, "threshold": settings.max_domain_auc,
                       "alpha": settings.alpha, "detail": "reports/shift/shift.md#embedding-drift"})
    return report, checks


def corruption_suite(model, images: np.ndarray, labels: np.ndarray | None, probe, mean, std, mask_ratio: float,
                     pool: str, settings: ShiftSettings) -> dict:
    """Reconstruction error and probe accuracy of clean and corrupted copies of the same images, same masks.
    The error is against the clean image: how far what the model fills in from a corrupted view is from the
    truth (measured against the corrupted input, blur and low contrast would look like improvements)."""
    noise = masking_noise(len(images), model.patch_embed.num_patches, settings.seed)
    clean_tensor = to_tensor(images, mean, std)

    def measure(pixels: np.ndarray) -> dict:
        tensor = to_tensor(pixels, mean, std)
        entry = {"recon_mse": float(reconstruct(model, tensor, noise, mask_ratio, mean, std,
                                                reference=clean_tensor).mse.mean())}
        if probe is not None:
            entry["probe_accuracy"] = float(np.mean(probe.predict(embed(model, tensor, pool, 256)) == labels))
        return entry

    clean = measure(images)
    curves = {name: [measure(corrupt(images, name, s, settings.seed)) for s in SEVERITIES] for name in CORRUPTIONS}
    result = {"images": int(len(images)), "clean": clean, "curves": curves}
    # mean corruption error relative to clean images: 1 means no degradation (ImageNet-C's CE, with the
    # clean model as the reference instead of AlexNet)
    result["relative_mce_reconstruction"] = float(np.mean(
        [[point["recon_mse"] / clean["recon_mse"] for point in curve] for curve in curves.values()]))
    if probe is not None:
        clean_error = max(1 - clean["probe_accuracy"], 1e-6)
        result["relative_mce_probe"] = float(np.mean(
            [[(1 - point["probe_accuracy"]) / clean_error for point in curve] for curve in curves.values()]))
    return result


def overtrust_figure(model, rows: list[tuple[str, np.ndarray]], mean, std, settings: ShiftSettings):
    """One row per image (in-domain, out-of-domain, corrupted); one column per mask ratio, each labelled with
    its hidden-pixel error: plausible-looking output is not evidence of a good reconstruction."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ratios = settings.mask_ratios
    figure, axes = plt.subplots(len(rows), len(ratios) + 1, figsize=(1.6 * (len(ratios) + 1), 1.7 * len(rows)),
                                squeeze=False)
    cmap = "gray" if model.in_chans == 1 else None
    for r, (label, pixels) in enumerate(rows):
        image = to_tensor(pixels[None], mean, std)
        axes[r, 0].imshow(pixels.squeeze(), cmap=cmap, vmin=0, vmax=255)
        axes[r, 0].set_ylabel(label, fontsize=7)
        for c, ratio in enumerate(ratios, start=1):
            result = reconstruct(model, image, masking_noise(1, model.patch_embed.num_patches, settings.seed + r),
                                 ratio, mean, std)
            shown = to_pixels(result.pasted, mean, std)[0].clamp(0, 1).permute(1, 2, 0).numpy().squeeze()
            axes[r, c].imshow(shown, cmap=cmap, vmin=0, vmax=1)
            axes[r, c].set_xlabel(f"MSE {float(result.mse[0]):.4f}", fontsize=7)
            if r == 0:
                axes[r, c].set_title(f"mask {ratio:.0%}", fontsize=8)
        axes[0, 0].set_title("original", fontsize=8)
        for axis in axes[r]:
            axis.set_xticks([])
            axis.set_yticks([])
    figure.suptitle("Reconstructions look plausible while the error grows: read the numbers, not the pictures",
                    fontsize=8)
    figure.tight_layout()
    return figure


def curves_figure(suite: dict):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = [k for k in ("recon_mse", "probe_accuracy") if k in suite["clean"]]
    figure, axes = plt.subplots(1, len(keys), figsize=(5 * len(keys), 3.6), squeeze=False)
    for axis, key in zip(axes[0], keys):
        for name, curve in suite["curves"].items():
            axis.plot(SEVERITIES, [point[key] for point in curve], marker="o", label=name)
        axis.axhline(suite["clean"][key], color="black", linestyle="--", linewidth=1, label="clean")
        axis.set_xlabel("severity")
        axis.set_ylabel(key.replace("_", " "))
        axis.set_xticks(SEVERITIES)
        axis.legend(fontsize=7)
    figure.suptitle(f"Corruption robustness on {suite['images']} unseen images", fontsize=9)
    figure.tight_layout()
    return figure


def markdown(result: dict) -> str:
    lines = [f"# Domain-shift audit: {result['dataset']}", "", f"**Status: {result['status'].upper()}**", "",
             "| check | status | statistic | value | interval | p-value | threshold |", "|---|---|---|---|---|---|---|"]
    for c in result["checks"]:
        lines.append(f"| {c['id']} | {c['status']} | {c['statistic']} | {fmt(c.get('value'))} | "
                     f"{fmt(c.get('interval'))} | {fmt(c.get('p_value'))} | {c['threshold']} |")
    lines += ["", "## Domains", ""]
    domains = result["domains"]
    lines.append(f"In distribution (unseen val / test): {domains['in_distribution']['count']} images, "
                 f"reconstruction MSE {fmt(domains['in_distribution']['recon_mse'])}, probe accuracy "
                 f"{fmt(domains['in_distribution']['probe_accuracy'], 3)}.")
    for name, entry in domains.items():
        if name in ("in_distribution", "worst_domain"):
            continue
        lines.append(f"- {name}: {entry['count']} images, MSE {fmt(entry.get('recon_mse'))}, relative increase "
                     f"{fmt((entry.get('relative_error_increase') or {}).get('value'))} "
                     f"{fmt((entry.get('relative_error_increase') or {}).get('interval'))}; probe accuracy "
                     f"{fmt(entry.get('probe_accuracy'), 3)}")
    if "worst_domain" in domains:
        lines.append(f"\nWorst domain by reconstruction error: **{domains['worst_domain']}**.")
    lines += ["", "## Embedding drift", "", "| compared with training | MMD² | p-value | domain AUC | status |",
              "|---|---|---|---|---|"]
    for name, entry in result["drift"].items():
        lines.append(f"| {name} | {entry['mmd2']:.5f} | {entry['p_value']:.4f} | {entry['auc']:.3f} | "
                     f"{entry['status']} |")
    suite = result["corruptions"]
    lines += ["", "## Corruptions", "", "![corruption curves](corruption_curves.png)", "",
              f"Mean corruption error relative to clean images (1 = no degradation): reconstruction "
              f"{suite['relative_mce_reconstruction']:.3f}"
              + (f", probe error {suite['relative_mce_probe']:.3f}" if "relative_mce_probe" in suite else "") + ".", "",
              "| corruption | " + " | ".join(f"severity {s}" for s in SEVERITIES) + " |",
              "|---|" + "---|" * len(SEVERITIES)]
    for name, curve in suite["curves"].items():
        lines.append(f"| {name} | " + " | ".join(fmt(point["recon_mse"]) for point in curve) + " |")
    lines += ["", "## Overtrust", "", "![overtrust](overtrust.png)", "",
              "Each reconstruction is labelled with its hidden-pixel error; out-of-domain and corrupted images can "
              "look as convincing as in-domain ones."]
    return "\n".join(lines) + "\n"


def audit_shift(params_path: Path = DEFAULT_PARAMS, cards_dir: Path = Path("data_cards"), eval_dir: Path = EVAL,
                prepared: Path = PREPARED, model_dir: Path = MODEL_DIR, out: Path = SHIFT_REPORT,
                log_to_mlflow: bool = True) -> dict:
    import matplotlib.pyplot as plt

    params = load_params(params_path)
    settings, evaluation = params.audit_shift, params.evaluate
    torch.set_num_threads(evaluation.threads)
    model, config = load_model(model_dir)
    dataset = config["dataset"]
    card = load_card(card_path(dataset, cards_dir))
    mean, std = np.asarray(config["normalisation"]["mean"]), np.asarray(config["normalisation"]["std"])
    try:
        samples = pd.read_parquet(eval_dir / "samples.parquet")
        embeddings = np.load(eval_dir / "embeddings.npz")["mae"]
        pixels = {split: np.load(prepared / dataset / f"{split}.npy") for split in SPLITS}
        records = {split: pd.read_parquet(prepared / dataset / f"{split}.parquet") for split in SPLITS}
    except FileNotFoundError as exc:
        raise PipelineError(f"{exc.filename}: not found; run `dvc repro evaluate` first") from None
    held_out = list(card.domains.held_out)
    result: dict = {"dataset": dataset, "held_out_domains": held_out, "alpha": settings.alpha,
                    "confidence": settings.confidence, "checks": []}
    if not held_out:
        result["note"] = f"card {dataset} holds out no domain: only corruptions and the control are audited"
    result["domains"], checks = domain_checks(samples, held_out, settings)
    result["checks"] += checks
    result["drift"], checks = drift_checks(samples, embeddings, held_out, settings)
    result["checks"] += checks

    # the corruption suite runs on a seeded subset of unseen in-distribution images
    unseen_pixels = np.concatenate([pixels[s] for s in UNSEEN])
    unseen_records = pd.concat([records[s] for s in UNSEEN], ignore_index=True)
    chosen = np.sort(np.random.default_rng(settings.seed).permutation(len(unseen_pixels))[:settings.corruption_images])
    probe, labels = None, None
    if samples["probe_correct"].notna().any():
        train = (samples["split"] == "train").to_numpy()
        probe = linear_probe(embeddings[train], samples.loc[train, "label"].to_numpy(), evaluation.probe_c,
                             evaluation.probe_max_iter)
        labels = unseen_records["label"].to_numpy()[chosen]
    suite = corruption_suite(model, unseen_pixels[chosen], labels, probe, mean, std, evaluation.mask_ratio,
                             evaluation.pool, settings)
    result["corruptions"] = suite
    result["checks"].append({
        "id": "shift.corruptions", "status": "fail" if suite["relative_mce_reconstruction"] > settings.max_relative_mce
        else "pass", "statistic": "mean corruption error relative to clean (reconstruction)",
        "value": suite["relative_mce_reconstruction"], "interval": None, "threshold": settings.max_relative_mce,
        "detail": "reports/shift/shift.md#corruptions"})
    result["status"] = overall_status([c["status"] for c in result["checks"]])

    out.mkdir(parents=True, exist_ok=True)
    figure = curves_figure(suite)
    figure.savefig(out / "corruption_curves.png", dpi=110)
    plt.close(figure)
    rows = [(f"in-domain {r.domain}", unseen_pixels[i]) for i, r in
            zip(chosen[:settings.overtrust_images], unseen_records.iloc[chosen[:settings.overtrust_images]].itertuples())]
    for domain in held_out:
        index = np.flatnonzero(records["heldout"]["domain"].to_numpy() == domain)[:settings.overtrust_images]
        rows += [(f"held out {domain}", pixels["heldout"][i]) for i in index]
    if len(chosen):
        rows.append(("noise severity 3", corrupt(unseen_pixels[chosen[:1]], "gaussian_noise", 3, settings.seed)[0]))
    figure = overtrust_figure(model, rows, mean, std, settings)
    figure.savefig(out / "overtrust.png", dpi=110)
    plt.close(figure)
    write_report(out, "shift", result, markdown(result), model_dir / "run.json" if log_to_mlflow else None)
    for check in result["checks"]:
        log.info("%s: %s (%s %s%s)", check["id"], check["status"], check["statistic"], fmt(check.get("value")),
                 f", p {check['p_value']:.4f}" if "p_value" in check else "")
    return result
