"""The domain-shift audit: how the model behaves on images unlike its training data.

- Held-out domains (from the card): reconstruction error and probe accuracy against unseen
  in-distribution images as the reference, signed, with bootstrap intervals adjusted over the domains
  (pipeline.audit.stats); one-sided, since a domain the model serves better is no harm; and the worst domain.
- Corruptions (`pipeline.audit.corruptions`): ImageNet-C-style corruptions at 5 severities, decided on a paired
  bootstrap interval, with the per-image results stored beside shift.json.
- Embedding drift (`pipeline.audit.drift`): an MMD permutation test and a domain classifier's AUC for a control
  that is a null, the fit to training, and each held-out domain, with the power of a test that found nothing.
- Overtrust evidence: reconstructions of in- and out-of-domain images at several mask ratios, each with
  its error, so a reviewer sees plausible-looking output whose error has grown.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from pipeline.artifacts import SHIFT, UNSEEN, Layout
from pipeline.audit import log_audit, overall_status, publish
from pipeline.audit.corruptions import (
    CORRUPTIONS_FILE,
    SEVERITIES,
    corrupt,
    corruption_check,
    corruption_pairs,
    corruption_suite,
    curves_figure,
)
from pipeline.audit.drift import IN_DISTRIBUTION, drift_checks
from pipeline.audit.stats import Criterion, compare
from pipeline.cards import card_path, load_card
from pipeline.contracts import Check, Estimate, HeldOutDomain, InDistribution, ShiftDomains, ShiftResult
from pipeline.features import linear_probe
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


DOMAINS_DETAIL = f"{SHIFT}/shift.md#domains"


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
                                        reference=IN_DISTRIBUTION, threshold=criterion.threshold,
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

    with layout.writing(layout.shift) as staged:
        out = staged(layout.shift)
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
        publish(out, "shift", result, markdown(result))
    if log_to_mlflow:
        log_audit(layout.shift, "shift", result.status, layout.run_file)
    for check in result.checks:
        log.info("%s: %s (%s %s%s)", check.id, check.status, check.statistic, fmt(check.value),
                 f", p {check.p_value:.4f}" if check.p_value is not None else "")
    return result

